"""Benchmark suite of gmoe_kernels / gmoe: `python benchmarks/run.py --help`.

Helpers: shapes (the named-shape registry), contenders (every implementation built from one
shared set of weights), measure (timing, saved-for-backward bytes, peak memory, the floor),
report (table, JSON, CSV, plots, the machine stamp). Micro-benchmarks: bench_*.py, collected
only by `pytest benchmarks --benchmark-only`.
"""
