"""Triton backend (GPU; the CPU interpreter under TRITON_INTERPRET=1).

Not implemented yet: every op falls back with a clear error until the kernels land.
"""
