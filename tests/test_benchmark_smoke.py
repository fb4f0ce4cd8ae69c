"""benchmarks/run.py runs end to end on a tiny shape and writes the documented JSON rows."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_py_tiny_writes_rows(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "benchmarks/run.py", "--device", "cpu", "--quick", "--shapes", "tiny",
                    "--variants", "E8-K2-R8", "--ops", "ffn", "--no-check", "--threads", "1",
                    "--json", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    rows = data["rows"] if isinstance(data, dict) else data
    assert rows, "no rows written"
    for row in rows:
        for key in ("impl", "shape", "op", "mode", "ms", "tokens_per_s", "saved_bytes", "peak_bytes"):
            assert key in row, key
    impls = {r["impl"] for r in rows}
    assert {"gmoe-reference", "loop", "dense-frozen"} <= impls
    ok = [r for r in rows if r["ms"] is not None]
    assert all(r["ms"] > 0 for r in ok)
