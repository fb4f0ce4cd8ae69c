#!/usr/bin/env bash
# The routing study (docs/routing.md), resumable: every finished run is skipped, so rerun it after a
# crash or a stop. Several copies may run at once on one output folder (each run takes one thread with
# OMP_NUM_THREADS=1, so one copy per core): the job's run locks give each (task, method, seed) to exactly
# one of them, and a copy moves on past a run another one holds.
#   OMP_NUM_THREADS=1 bash benchmarks/routing_study.sh outputs/study      (from the repository root)
# Then: bash benchmarks/collect_runs.sh outputs/study benchmarks/results/routing-study
#       python -m benchmarks.routing_study
set -uo pipefail
out=${1:-outputs/study}
python=${PYTHON:-python}
compare() {
    # exit 3: some runs were held by another copy (they finish there); anything else non-zero stops here
    "$python" -m gmoe.finetune compare --preset study --output-dir "$out" "$@"
    local rc=$?
    [ $rc -eq 0 ] || [ $rc -eq 3 ] || exit $rc
}
# Routing runs (seed 0): every option alone, their combination and the linear router with the GMoE losses.
compare --task siqa --seeds 1 \
    --methods gmoe,mixlora,lora,gmoe-window,gmoe-frozen,gmoe-uniform,gmoe-no-graph,gmoe-balanced
# Accuracy: the methods of the study's tables (benchmarks/routing_study.py), 3 seeds on each task.
accuracy=$("$python" -c "from benchmarks.routing_study import HEADLINE; print(','.join(HEADLINE))") || exit
for task in siqa piqa; do
    compare --task "$task" --seeds 3 --methods "$accuracy"
done
