#!/usr/bin/env bash
# Every GPU check and the full GPU benchmark in one command (< 8 minutes on one H200).
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Needs only this checkout and a Python with torch (CUDA), triton and transformers; installs
# nothing (the checkout is put on PYTHONPATH). peft, mixlora and torch-geometric are used
# when present; without PEFT, `lora-plain` (the same LoRA maths) stands in for peft-lora.
# Steps, each under its own `timeout`, logs teed into OUT_DIR:
#   1. environment: nvidia-smi, versions                       -> env.txt
#   2. other GPU-marked tests of tests/ (pytest -m gpu), if any  -> tests_gpu.log
#   3. kernels vs reference at real shapes, bf16/fp16/fp32,
#      NaN-poisoned outputs (tests/gpu/test_kernels.py)          -> gpu_kernels.log, .jsonl
#   4. the full benchmark (benchmarks/run.py --device cuda)      -> bench.json/.csv/.log, plots/
#   4b. the expert-mix token kernels forced to each variant
#       (GMOE_EXPAND=gather|dot|grouped), llama3-8b E8-K2-R16,
#       E32-K8-R8                                                -> expand_<variant>.json/.log
#   4c. one training step under set_sync_debug_mode("error")
#       (tests/gpu/test_sync.py)                                 -> sync_check.json/.log
#   4c'. the fine-tuning job, 2 steps on one GPU, bf16 (benchmarks/gpu_job_check.py) -> job_check.json/.log
#   4c''. compile-ready decoding: a static-cache decode step under torch.compile
#       (mode="reduce-overhead", fullgraph) vs eager, SmolLM2-shaped, 4 layers,
#       batch 1 and 8 (benchmarks/gpu_decode_check.py)          -> decode_check.json/.log
#       and where the small-batch expert path pays on Triton
#       (benchmarks/small_batch.py, bf16)                        -> small_batch.json/.log
#   4d. the compile table: every kernel and config for sm_90 and
#       sm_80, registers, spills, shared, atomics (CPU only)     -> compile_gate.json/.log
#   5. a short summary table, printed last                       -> summary.txt
# Exit status: non-zero when a correctness step failed or the benchmark produced nothing.
# Time limits (seconds) can be changed with GPU_CHECK_TESTS_S, GPU_CHECK_KERNELS_S,
# GPU_CHECK_BENCH_S; the benchmark stops starting new cases GPU_CHECK_BENCH_TAIL_S before its limit.
# GPU_CHECK_ALLOW_CPU=1 dry-runs the script on a machine without a GPU (quick CPU benchmark).
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT/plots"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
# 30 + 100 + 110 + 3·40 + 30 + 90 = 480 s of limits: under 8 minutes with start-up; with the
# decode steps (90 + 40 s) 610 s, about 11 minutes (not yet run on a GPU).
TESTS_S=${GPU_CHECK_TESTS_S:-30}
KERNELS_S=${GPU_CHECK_KERNELS_S:-100}
BENCH_S=${GPU_CHECK_BENCH_S:-110}
EXPAND_S=${GPU_CHECK_EXPAND_S:-40}
SYNC_S=${GPU_CHECK_SYNC_S:-30}
COMPILE_S=${GPU_CHECK_COMPILE_S:-90}
DECODE_S=${GPU_CHECK_DECODE_S:-90}
SMALL_BATCH_S=${GPU_CHECK_SMALL_BATCH_S:-40}
BENCH_TAIL_S=${GPU_CHECK_BENCH_TAIL_S:-40}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0          # tests/conftest.py only sets it when unset: real kernels here
unset GMOE_BACKEND
START=$(date +%s)
status=0
step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

step "environment"
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown"
  nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not found"
  "$PY" - <<'EOF'
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0))
for p in ("triton", "transformers", "peft", "mixlora", "torch-geometric", "pytest", "pytest-benchmark", "matplotlib"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "not installed")
EOF
} 2>&1 | tee "$OUT/env.txt"
DEVICE_ARGS=(--device cuda)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "no CUDA device visible: nothing to check" | tee "$OUT/summary.txt"
    exit 2
  fi
  echo "GPU_CHECK_ALLOW_CPU=1: dry run of this script on the CPU (quick benchmark; kernel checks skip)"
  DEVICE_ARGS=(--device cpu --quick)
fi

step "other GPU-marked tests (pytest tests -m gpu, steps 3 and 4c apart), limit ${TESTS_S}s"
timeout -k 10 "$TESTS_S" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider \
  --ignore=tests/gpu/test_kernels.py --ignore=tests/gpu/test_sync.py 2>&1 | tee "$OUT/tests_gpu.log"
rc=${PIPESTATUS[0]}
case $rc in
  0) tests_line="tests -m gpu: passed" ;;
  5) tests_line="tests -m gpu: none marked (ok)" ;;
  124|137) tests_line="tests -m gpu: TIMED OUT after ${TESTS_S}s"; status=1 ;;
  *) tests_line="tests -m gpu: FAILED (rc $rc, see tests_gpu.log)"; status=1 ;;
esac

step "Triton kernels vs reference at real shapes (bf16/fp16/fp32, poisoned), limit ${KERNELS_S}s"
rm -f "$OUT/gpu_kernels.jsonl"
GMOE_GPU_REPORT="$OUT/gpu_kernels.jsonl" timeout -k 10 "$KERNELS_S" \
  "$PY" -m pytest tests/gpu/test_kernels.py -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_kernels.log"
rc=${PIPESTATUS[0]}
case $rc in
  0) kernels_line="kernel checks: passed" ;;
  124|137) kernels_line="kernel checks: TIMED OUT after ${KERNELS_S}s"; status=1 ;;
  *) kernels_line="kernel checks: FAILED (rc $rc, see gpu_kernels.log)"; status=1 ;;
esac
kernels_line="$kernels_line; $(tail -n 1 "$OUT/gpu_kernels.log")"

step "benchmark (benchmarks/run.py ${DEVICE_ARGS[*]}), limit ${BENCH_S}s"
timeout -k 10 "$BENCH_S" "$PY" benchmarks/run.py "${DEVICE_ARGS[@]}" --budget-s $(( BENCH_S - BENCH_TAIL_S )) \
  --json "$OUT/bench.json" --csv "$OUT/bench.csv" --plot "$OUT/plots/gpu" 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
case $rc in
  0) bench_line="benchmark: complete" ;;
  124|137) bench_line="benchmark: TIMED OUT after ${BENCH_S}s (bench.json keeps the rows measured so far)" ;;
  *) bench_line="benchmark: FAILED (rc $rc, see bench.log)" ;;
esac
[ -s "$OUT/bench.json" ] || status=1

step "expert-mix token kernels, gather / one-hot tl.dot / grouped (GMOE_EXPAND), limit ${EXPAND_S}s each"
expand_line="token-kernel variants:"
for mode in gather dot grouped; do
  GMOE_EXPAND=$mode timeout -k 10 "$EXPAND_S" "$PY" benchmarks/run.py --device cuda --ops ffn \
    --impls gmoe-triton --shapes llama3-8b --variants E8-K2-R16,E32-K8-R8 --routings balanced,hot --no-check \
    --json "$OUT/expand_$mode.json" 2>&1 | tee "$OUT/expand_$mode.log"
  expand_line="$expand_line $mode rc ${PIPESTATUS[0]};"
done

step "one training step under torch.cuda.set_sync_debug_mode('error'), limit ${SYNC_S}s"
GMOE_SYNC_REPORT="$OUT/sync_check.json" timeout -k 10 "$SYNC_S" \
  "$PY" -m pytest tests/gpu/test_sync.py -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/sync_check.log"
rc=${PIPESTATUS[0]}
[ $rc = 0 ] && grep -q "skipped" "$OUT/sync_check.log" && ! grep -q "passed" "$OUT/sync_check.log" && rc=2
case $rc in
  0) sync_line="host syncs: none in a training step" ;;
  2) sync_line="host syncs: skipped (no CUDA device)" ;;
  124|137) sync_line="host syncs: TIMED OUT after ${SYNC_S}s"; status=1 ;;
  *) sync_line="host syncs: FOUND (rc $rc, see sync_check.log)"; status=1 ;;
esac

step "the fine-tuning job on this GPU: 2 steps of the tiny model, bf16, a checkpoint (benchmarks/gpu_job_check.py)"
timeout -k 10 "${GPU_CHECK_JOB_S:-120}" "$PY" benchmarks/gpu_job_check.py "$OUT" 2>&1 | tee "$OUT/job_check.log"
job_rc=${PIPESTATUS[0]}
job_line="fine-tuning job on the GPU: $([ "$job_rc" = 0 ] && echo ok || echo "FAILED (rc $job_rc)")"
[ "$job_rc" = 0 ] || status=1

step "compile-ready decoding: reduce-overhead decode step vs eager (benchmarks/gpu_decode_check.py), limit ${DECODE_S}s"
timeout -k 10 "$DECODE_S" "$PY" benchmarks/gpu_decode_check.py "$OUT" --layers 4 2>&1 | tee "$OUT/decode_check.log"
rc=${PIPESTATUS[0]}
case $rc in
  0) decode_line="compiled decode (reduce-overhead): matches eager, no host sync" ;;
  124|137) decode_line="compiled decode: TIMED OUT after ${DECODE_S}s (decode_check.json keeps the rows so far)" ;;
  *) decode_line="compiled decode: FAILED (rc $rc, see decode_check.log)"; status=1 ;;
esac
timeout -k 10 "$SMALL_BATCH_S" "$PY" benchmarks/small_batch.py --device cuda --backend triton --dtype bf16 \
  --json "$OUT/small_batch.json" 2>&1 | tee "$OUT/small_batch.log"
decode_line="$decode_line; small-batch path on Triton: $(tail -n 1 "$OUT/small_batch.log")"

step "compile table: every kernel and config for sm_90/sm_80 (ptxas), limit ${COMPILE_S}s"
TRITON_INTERPRET=0 timeout -k 10 "$COMPILE_S" "$PY" -m benchmarks.compile_gate --workers "$(nproc)" \
  --json "$OUT/compile_gate.json" > "$OUT/compile_gate.log" 2>&1
rc=$?
compile_line="compile gate: $(tail -n 1 "$OUT/compile_gate.log" 2>/dev/null) (rc $rc)"

step "summary"
{
  echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START ))s, commit $(git rev-parse --short HEAD 2>/dev/null)"
  echo "$tests_line"
  echo "$kernels_line"
  echo "$bench_line"
  echo "$expand_line"
  echo "$sync_line"
  echo "$job_line"
  echo "$decode_line"
  echo "$compile_line"
  [ -s "$OUT/gpu_kernels.jsonl" ] && "$PY" benchmarks/report.py --kernels "$OUT/gpu_kernels.jsonl"
  [ -s "$OUT/bench.json" ] && "$PY" benchmarks/report.py "$OUT/bench.json" --summary
  echo "results: $OUT (to keep them: cp $OUT/bench.json benchmarks/results/<gpu>.json, and the .csv)"
} 2>&1 | tee "$OUT/summary.txt"
exit $status
