"""The compile gate (benchmarks/compile_gate.py): every Triton kernel, at every config its
launcher or autotuner can choose at the benchmark registry's real shapes, compiles for sm_90 and
sm_80 with no register spills, shared memory within the target's limit and no acq_rel atomics.

It runs in a subprocess: this test process has TRITON_INTERPRET=1 (tests/conftest.py), under
which @triton.jit functions cannot be compiled. The table it prints is the README's kernel table.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _toolchain_missing() -> str:
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        return f"cuobjdump not found in the triton wheel ({cuobjdump.parent})"
    return ""


@pytest.mark.skipif(bool(_toolchain_missing()), reason=_toolchain_missing() or "toolchain present")
def test_every_kernel_compiles_spill_free_for_hopper_and_ampere(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "GMOE_EXPAND")}
    env["PYTHONPATH"] = str(ROOT)
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_gate", "--json", str(out),
                           "--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    print(proc.stdout)  # the table (pytest -s shows it; the README quotes it)
    assert out.exists(), f"the gate did not finish (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    # every kernel of gmoe_kernels.triton was captured, at each target
    for target in ("sm_90", "sm_80"):
        kernels = {r["kernel"] for r in rows if r["target"] == target}
        assert kernels >= {"_expert_mix_fwd_kernel", "_expert_mix_bwd_token_kernel",
                           "_expert_mix_fwd_dot_kernel", "_expert_mix_bwd_token_dot_kernel",
                           "_expert_mix_fwd_grouped_kernel", "_expert_mix_bwd_grouped_kernel",
                           "_expert_mix_bwd_expert_kernel", "_sum_chunks_kernel",
                           "_graph_router_fwd_kernel", "_graph_router_bwd_kernel",
                           "_histogram_kernel", "_plan_scatter_kernel", "_gather_rows_kernel",
                           "_combine_rows_kernel"}, (target, sorted(kernels))
        # the graph router's kernels with the token-readout option too
        readout = {r["kernel"] for r in rows if r["target"] == target and "token-readout" in r["config"]}
        assert readout == {"_graph_router_fwd_kernel", "_graph_router_bwd_kernel"}, (target, sorted(readout))
    bad = [line for line in proc.stdout.splitlines() if line.startswith("  _")]
    assert proc.returncode == 0 and not bad, "\n".join(bad) or proc.stderr[-3000:]
