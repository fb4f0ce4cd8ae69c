"""Compile every Triton kernel for Hopper and Ampere on a machine without a GPU.

How: the launchers run on `meta` tensors at the benchmark registry's real shapes while
`JITFunction.run` and `Autotuner.run` are replaced by recorders, so each launch the package
would make is captured with its exact arguments and, for an autotuned kernel, every config
its launcher's pruning keeps (the launchers prune for the target they are given). Each (kernel, specialisation, config) is then compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`, the argument
specialisation done as the JIT does it (`native_specialize_impl`: 16-divisible ints and
pointers, ints equal to 1 as constants), and `cuobjdump -res-usage` reads registers and
stack (spill) bytes of the cubin. Shared memory is Triton's dynamic allocation; atomics are
counted in the PTX (`atom.`/`red.`), acq_rel ones separately.

Run as `python -m benchmarks.compile_gate [--json out.json]` with TRITON_INTERPRET unset
(the interpreter replaces @triton.jit functions with objects `triton.compile` cannot take);
tests/test_compile_gate.py does that in a subprocess and asserts the limits.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise SystemExit("compile_gate: unset TRITON_INTERPRET (the interpreter cannot compile)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, native_specialize_impl  # noqa: E402

from benchmarks.shapes import SHAPES  # noqa: E402

TARGETS = {"sm_90": 90, "sm_80": 80}
SHARED_LIMIT = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
GATE_SHAPES = ("llama3-8b", "qwen2-7b")
EXTRA_VARIANTS = ((8, 2, 2),)   # the paper's R 2 on the large shapes too (R > 16: not gated yet)
DECODE_TOKENS = 16   # a decoding-size call beside the registry's T (T = 1: see NOTES, not gated)
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    configs: list | None   # the autotuner's pruned configs; None for a plain launch


@dataclass
class Row:
    kernel: str
    target: str
    dtype: str
    config: str
    registers: int
    stack: int
    shared: int
    atomics: int
    acq_rel_atomics: int
    error: str = ""


@contextlib.contextmanager
def recorded_launches():
    """Replace kernel launches by recorders; yields the list of captured Launches."""
    launches: list[Launch] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, None))

    def tuner_run(self, *args, **kwargs):
        # the launchers prune configs before they reach triton.autotune (see
        # gmoe_kernels/triton/_common.py `launch`): every config here is one it can pick
        fn = self.fn
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        launches.append(Launch(fn, args, kwargs, list(self.configs)))

    saved = JITFunction.run, Autotuner.run, torch._assert_async
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    torch._assert_async = lambda *a, **k: None   # meta tensors hold no values to check
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run, torch._assert_async = saved


def _spec(launch: Launch, config) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of one launch, specialised as the JIT does."""
    values = dict(zip(launch.fn.arg_names, launch.args))
    extra = dict(launch.kwargs)
    if config is not None:
        extra.update(config.all_kwargs())
    options = {k: extra.pop(k) for k in _OPTION_KEYS if extra.get(k) is not None}
    values.update({k: v for k, v in extra.items() if k in launch.fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(launch.fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                           not param.do_not_specialize_on_alignment)
        if kind == "constexpr":
            signature[param.name] = "constexpr"
            constexprs[param.name] = key
        else:
            signature[param.name] = kind
            if key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    options.setdefault("num_warps", 4)
    options.setdefault("num_stages", 3)
    return signature, constexprs, attrs, options


def _describe(constexprs: dict, options: dict) -> str:
    """The config and the variant-defining constexprs of a compile, e.g. 'K=2 R=16 BT=8 ...'."""
    keys = [k for k in constexprs if k in ("K", "R") or k.startswith(("BLOCK", "R_PAD", "K_PAD"))]
    parts = [f"{k.replace('BLOCK_', 'B')}={constexprs[k]}" for k in keys]
    if "DOT_DTYPE" in constexprs:
        parts.append(f"dot={constexprs['DOT_DTYPE']}")
    if constexprs.get("TOKEN_READOUT"):
        parts.append("token-readout")
    return " ".join(parts + [f"w{options['num_warps']}", f"s{options['num_stages']}"])


def _resources(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes per thread) from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_TOOLS, "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    reg = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return int(reg.group(1)), int(stack.group(1))


def _compile(job) -> Row:
    fn, signature, constexprs, attrs, options, target, dtype = job
    config = _describe(constexprs, options)
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", TARGETS[target], 32), options=options)
        ptx = compiled.asm["ptx"]
        registers, stack = _resources(compiled.asm["cubin"])
        atomics = re.findall(r"^\s*(?:@%p\d+\s+)?(atom|red)\.[\w.]+", ptx, flags=re.M)
        acq_rel = re.findall(r"^\s*(?:@%p\d+\s+)?(?:atom|red)\.[\w.]*acq_rel", ptx, flags=re.M)
        return Row(fn.__name__, target, dtype, config, registers, stack,
                   compiled.metadata.shared, len(atomics), len(acq_rel))
    except Exception as exc:  # a kernel that does not compile is a gate failure, not a crash
        return Row(fn.__name__, target, dtype, config, 0, 0, 0, 0, 0,
                   error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")


def _meta(*shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _capture_expert_mix(tokens, hidden, inter, experts, top_k, rank, dtype, mode, target):
    expert_mix = importlib.import_module("gmoe_kernels.triton.expert_mix")
    previous = os.environ.get("GMOE_EXPAND")
    os.environ["GMOE_EXPAND"] = mode
    try:
        x = _meta(tokens, hidden, dtype=dtype)
        gate, up = _meta(tokens, inter, dtype=dtype), _meta(tokens, inter, dtype=dtype)
        a_g, a_u = _meta(experts, rank, hidden, dtype=dtype), _meta(experts, rank, hidden, dtype=dtype)
        b_g, b_u = _meta(experts, inter, rank, dtype=dtype), _meta(experts, inter, rank, dtype=dtype)
        a_d = _meta(experts, rank, inter, dtype=dtype)
        indices = _meta(tokens, top_k, dtype=torch.int64)
        weights = _meta(tokens, top_k, dtype=torch.float32)
        args = (x, gate, up, a_g, b_g, a_u, b_u, a_d, indices, weights, 2.0, "silu")
        h_c, z = expert_mix.expert_mix_forward(*args)
        expert_mix.expert_mix_backward(h_c, z, *args, target=target)
    finally:
        if previous is None:
            del os.environ["GMOE_EXPAND"]
        else:
            os.environ["GMOE_EXPAND"] = previous


def _capture_graph_router(tokens, experts, width, layers):
    """The GCN kernels (fp32 whatever the model's dtype: the router stays fp32), with the shared
    readout w_p and with the token-readout option (each token's q = W_q x)."""
    graph_router = importlib.import_module("gmoe_kernels.triton.graph_router")
    f32 = torch.float32
    c1, u = _meta(experts + 1, width, dtype=f32), _meta(tokens, width, dtype=f32)
    adj = _meta(experts + 1, experts + 1, dtype=f32)
    gcn, score = _meta(layers, width, width, dtype=f32), _meta(width, dtype=f32)
    logits, probs = graph_router.graph_router_gcn_forward(c1, u, adj, gcn, score, "silu")
    graph_router.graph_router_gcn_backward(logits, probs, probs, c1, u, adj, gcn, score, "silu")
    readout = _meta(tokens, width, dtype=f32)
    logits, probs = graph_router.graph_router_gcn_forward(c1, u, adj, gcn, None, "silu", readout=readout)
    graph_router.graph_router_gcn_backward(logits, probs, probs, c1, u, adj, gcn, None, "silu", readout=readout)


def _capture_routing(tokens, hidden, experts, top_k, dtype):
    """The plan kernels, then the launchers behind dispatch (gather), combine and combine's
    backward (scaled gather): called directly, since the custom ops run their fakes on meta
    tensors."""
    routing = importlib.import_module("gmoe_kernels.triton.routing")
    indices = _meta(tokens, top_k, dtype=torch.int64)
    plan = routing.make_routing_plan(indices, experts)
    x = _meta(tokens, hidden, dtype=dtype)
    rows = routing.gather_rows(x, plan.sorted_pairs, top_k, None, dtype)
    weights = _meta(tokens, top_k, dtype=torch.float32)
    routing.combine_rows(rows, plan.inverse, tokens, top_k, weights, dtype)
    routing.gather_rows(x, plan.sorted_pairs, top_k, weights, dtype)


def capture_all() -> list[tuple[Launch, str, str]]:
    """Every launch at the gate's shapes: (launch, dtype label, target). Captured once per
    target, since config pruning may depend on it (the launchers' `target` argument)."""
    captured = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for target, capability in TARGETS.items():
        for label, dtype in dtypes.items():
            with recorded_launches() as launches:
                _capture_shapes(dtype, capability)
            captured.extend((launch, label, target) for launch in launches)
    return captured


def _capture_shapes(dtype, capability):
    modes = importlib.import_module("gmoe_kernels.triton.expert_mix_configs").EXPAND_MODES
    for name in GATE_SHAPES:
        shape = SHAPES[name]
        variants = {(v.experts, v.top_k, v.rank) for v in shape.variants} | set(EXTRA_VARIANTS)
        for tokens in (shape.tokens, DECODE_TOKENS):
            for experts, top_k, rank in sorted(variants):
                for mode in modes:
                    _capture_expert_mix(tokens, shape.hidden, shape.inter, experts, top_k, rank,
                                        dtype, mode, capability)
                _capture_graph_router(tokens, experts, shape.gcn_dim, shape.gcn_layers)
                _capture_routing(tokens, shape.hidden, experts, top_k, dtype)


def jobs(captured) -> list[tuple]:
    """Unique compile jobs: (fn, signature, constexprs, attrs, options, target, dtype)."""
    seen, out = set(), []
    for launch, dtype, target in captured:
        for config in launch.configs or [None]:
            signature, constexprs, attrs, options = _spec(launch, config)
            key = (launch.fn.__name__, tuple(signature.items()), repr(sorted(constexprs.items())),
                   repr(sorted(attrs.items())), tuple(sorted(options.items())), target)
            if key not in seen:
                seen.add(key)
                out.append((launch.fn, signature, constexprs, attrs, options, target, dtype))
    return out


def run_gate(workers: int = 2, only: str = "", target: str = "", dtype: str = "") -> list[Row]:
    todo = [job for job in jobs(capture_all()) if only in job[0].__name__
            and target in job[5] and dtype in job[6]]
    with ThreadPoolExecutor(workers) as pool:   # ptxas runs as a subprocess: threads overlap it
        rows = list(pool.map(_compile, todo))
    return sorted(rows, key=lambda r: (r.kernel, r.target, r.dtype, r.config))


def violations(rows: list[Row]) -> list[str]:
    bad = []
    for r in rows:
        where = f"{r.kernel} [{r.target} {r.dtype} {r.config}]"
        if r.error:
            bad.append(f"{where}: does not compile: {r.error}")
        elif r.stack:
            bad.append(f"{where}: {r.stack} B stack per thread (register spills)")
        elif r.shared > SHARED_LIMIT[r.target]:
            bad.append(f"{where}: {r.shared} B shared memory > {SHARED_LIMIT[r.target]}")
        elif r.acq_rel_atomics:
            bad.append(f"{where}: {r.acq_rel_atomics} acq_rel atomics (use sem='relaxed')")
    return bad


def table(rows: list[Row]) -> str:
    lines = ["| kernel | target | dtype | config | registers | stack | shared | atomics |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.kernel} | {r.target} | {r.dtype} | {r.config} | {r.registers} | "
                     f"{r.stack} | {r.shared} | {r.atomics} |")
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    """Per kernel and target: how many compiles, register range, worst stack and shared memory,
    and the atomics per compile (the README quotes this)."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.target), []).append(r)
    lines = ["| kernel | target | compiles | registers | max stack B | max shared KB | atomics |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (kernel, target), rs in sorted(groups.items()):
        regs = sorted(r.registers for r in rs)
        atomics = sorted({r.atomics for r in rs})
        lines.append(f"| `{kernel}` | {target} | {len(rs)} | {regs[0]}–{regs[-1]} | "
                     f"{max(r.stack for r in rs)} | {max(r.shared for r in rs) / 1024:.1f} | "
                     f"{'–'.join(map(str, (atomics[0], atomics[-1]))) if len(atomics) > 1 else atomics[0]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="", help="compile only kernels whose name contains this")
    parser.add_argument("--target", default="", help="only this target (sm_90 or sm_80)")
    parser.add_argument("--dtype", default="", help="only this data dtype (bf16, fp16, fp32)")
    parser.add_argument("--summary", action="store_true", help="one row per kernel and target")
    args = parser.parse_args(argv)
    rows = run_gate(args.workers, args.only, args.target, args.dtype)
    print(summary_table(rows) if args.summary else table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    bad = violations(rows)
    for line in bad:
        print("  " + line)
    print(f"{len(rows)} compiles, {len(bad)} violations (stack, shared memory, acq_rel atomics)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
