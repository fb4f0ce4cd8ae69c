"""What every contender shares: the contender names, `Contender` (one implementation of one op on
one case) and `collect`, which builds a list of them and turns failures into error rows;
`Problem`, the weights and inputs of one FFN/router case, with `make_problem`; and
`check_agreement` of the FFN and router outputs against the reference.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from gmoe_kernels.reference import normalized_adjacency, topk_route

from ..shapes import Case, make_routing

FFN_IMPLS = ("gmoe-triton", "gmoe-reference", "loop", "peft-lora", "dense-frozen", "mixlora")
ROUTER_IMPLS = ("graph-triton", "graph-reference", "graph-pyg", "linear")
STEP_IMPLS = ("gmoe-triton", "gmoe-reference", "loop", "peft-lora", "dense-frozen", "mixlora",
              "gmoe-converted")
# Run only when asked by name (--impls, micro-benchmarks): lora-plain stands in for peft-lora
# when PEFT is not installed (the same LoRA maths in plain PyTorch); graph-loop is the
# per-token oracle `graph_router_loop` (a Python loop over tokens: slow by design);
# gmoe-linear is GMoE with the linear router (the real-model step names it); gmoe-token the graph
# router with the token readout (the `gmoe-token` method's router), reference backend.
EXTRA_IMPLS = {"ffn": ("lora-plain",), "router": ("graph-loop",), "step": ("lora-plain", "gmoe-linear", "gmoe-token")}
# The real-model training step (forward, loss, backward, AdamW step) of shapes.REAL_STEP_MODELS.
REAL_STEP_IMPLS = ("dense-frozen", "peft-lora", "gmoe-reference", "gmoe-linear", "loop")
LORA_KEYS = ("lora_a_gate", "lora_b_gate", "lora_a_up", "lora_b_up", "lora_a_down", "lora_b_down")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class Contender:
    """One implementation of one op on one case.

    forward() runs the op (recording autograd unless inference_only) and returns a tuple of
    output tensors; fwd_bwd() runs forward then the backward into `leaves` with fixed
    upstream gradients. `persistent` tensors (weights, inputs) are left out of saved bytes.
    """
    impl: str
    op: str
    forward: Callable[[], tuple] | None = None
    leaves: list = field(default_factory=list)
    grads: Callable[[tuple], tuple] | None = None     # outputs -> upstream gradients
    persistent: list = field(default_factory=list)
    inference_only: bool = False
    error: str | None = None
    note: str = ""
    model: nn.Module | None = None   # step contenders: the model, for the agreement check
    _optimizer: object = field(default=None, repr=False)  # train(): AdamW over `leaves`

    def fwd(self):
        if self.inference_only:
            with torch.no_grad():
                return self.forward()
        return self.forward()

    def fwd_bwd(self):
        outs = self.forward()
        torch.autograd.grad(outs, self.leaves, self.grads(outs))

    def train(self):
        """One training step: forward, backward into the leaves' .grad, AdamW step, zero_grad.
        (The optimizer is made on the first call; lr is small so routing stays put.)"""
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.leaves, lr=1e-5)
        outs = self.forward()
        torch.autograd.backward(outs, self.grads(outs))
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)


def unavailable(impl, op, why) -> Contender:
    return Contender(impl, op, error=why)


def triton_missing(op_name: str, device: torch.device) -> str | None:
    """Why the Triton backend of `op_name` cannot be timed here (None when it can)."""
    if device.type != "cuda":
        return "needs a CUDA device"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1: the interpreter is never timed"
    try:
        import gmoe_kernels.triton as triton_ops
    except Exception as err:  # noqa: BLE001 - report any import failure
        return f"gmoe_kernels.triton does not import ({type(err).__name__}: {err})"
    if not hasattr(triton_ops, op_name):
        return f"gmoe_kernels.triton has no {op_name} yet"
    return None


def package_missing(name: str) -> str | None:
    return None if importlib.util.find_spec(name) is not None else f"package {name!r} not installed"


def collect(op: str, impls, build: Callable[[str, list], Contender]) -> list[Contender]:
    """The contenders of `op` named in `impls`, in order, each made by `build(impl, rows)`.

    `build` raises ValueError for a name it does not know, which propagates; any other
    exception becomes an error row, so the report shows why instead of dropping the row.
    `build` may first append a row of its own to `rows` (the "not installed" row of a
    contender that its stand-in replaces).
    """
    rows: list[Contender] = []
    for impl in impls:
        try:
            c = build(impl, rows)
        except ValueError:
            raise
        except Exception as err:  # noqa: BLE001 - a broken contender becomes an error row
            c = unavailable(impl, op, f"{type(err).__name__}: {err}")
        rows.append(c)
    return rows


# --------------------------------------------------------------------------- shared weights
@dataclass
class Problem:
    case: Case
    x: torch.Tensor                 # (T, H), requires grad
    frozen: dict                    # gate_weight (F,H), up_weight (F,H), down_weight (H,F)
    lora: dict                      # LORA_KEYS -> (E, ., .), trainable
    router: dict                    # graph router weights (see functional.graph_router)
    expert_adjacency: torch.Tensor  # (E, E) bool
    linear_weight: torch.Tensor     # (E, H) the linear router / MixLoRA gate
    indices: torch.Tensor           # (T, K) int64: top-K of softmax(x W_lin^T)
    weights: torch.Tensor           # (T, K) fp32, requires grad
    dy: torch.Tensor                # (T, H) upstream gradient of the FFN output
    scaling: float
    activation: str


def ring_adjacency(num_experts: int) -> torch.Tensor:
    """A fixed ring of expert–expert edges (density 2/(E-1)): never twins for E >= 4."""
    adj = torch.zeros(num_experts, num_experts, dtype=torch.bool)
    if num_experts >= 3:
        i = torch.arange(num_experts)
        adj[i, (i + 1) % num_experts] = True
        adj[(i + 1) % num_experts, i] = True
    return adj


def make_problem(case: Case, device, dtype, seed: int = 0) -> Problem:
    s, v = case.shape, case.variant
    T, H, Fd, E, K, R, G, L = s.tokens, s.hidden, s.inter, v.experts, v.top_k, v.rank, s.gcn_dim, s.gcn_layers
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, grad=False, dt=dtype):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)
        return t.requires_grad_(grad)

    x = rand(T, H, grad=True)
    frozen = dict(gate_weight=rand(Fd, H, scale=H ** -0.5), up_weight=rand(Fd, H, scale=H ** -0.5),
                  down_weight=rand(H, Fd, scale=Fd ** -0.5))
    lora = dict(lora_a_gate=rand(E, R, H, scale=H ** -0.5, grad=True),
                lora_b_gate=rand(E, Fd, R, scale=0.02, grad=True),
                lora_a_up=rand(E, R, H, scale=H ** -0.5, grad=True),
                lora_b_up=rand(E, Fd, R, scale=0.02, grad=True),
                lora_a_down=rand(E, R, Fd, scale=Fd ** -0.5, grad=True),
                lora_b_down=rand(E, H, R, scale=0.02, grad=True))
    expert_adjacency = ring_adjacency(E)
    router = dict(token_weight=rand(G, H, scale=H ** -0.5, grad=True),
                  expert_weight=rand(G, H, scale=H ** -0.5, grad=True),
                  expert_features=rand(E, H, scale=H ** -0.5),
                  adjacency=normalized_adjacency(expert_adjacency).to(device),
                  gcn_weight=rand(L, G, G, scale=G ** -0.5, grad=True),
                  score_weight=rand(G, scale=G ** -0.5, grad=True))
    linear_weight = rand(E, H, scale=0.02, grad=True)
    if case.routing == "balanced":   # the routing a (random) linear router picks
        with torch.no_grad():
            probs = torch.softmax((x @ linear_weight.t()).float(), dim=-1)
            indices, weights = topk_route(probs, K)
    else:                            # a skewed expert popularity (shapes.ROUTINGS)
        indices, weights = make_routing(T, E, K, case.routing, seed=seed, device=device)
    return Problem(case, x, frozen, lora, router, expert_adjacency.to(device), linear_weight,
                   indices, weights.requires_grad_(True), rand(T, H), 2.0, s.activation)


def check_agreement(p: Problem, contenders: list[Contender], atol: float, rtol: float) -> dict:
    """Max |difference| of each contender's output against gmoe-reference (same function only)."""
    same_function = {"gmoe-triton", "loop", "mixlora", "graph-triton", "graph-pyg"}
    refs = {c.op: c for c in contenders if c.impl in ("gmoe-reference", "graph-reference") and c.error is None}
    report = {}
    with torch.no_grad():
        for c in contenders:
            if c.error or c.impl not in same_function or c.op not in refs:
                continue
            want = refs[c.op].forward()[0].float()
            got = c.forward()[0].float()
            err = (got - want).abs().max().item()
            tol = atol + rtol * want.abs().max().item()
            report[c.impl] = (err, err <= tol and math.isfinite(err))
    return report
