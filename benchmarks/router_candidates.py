"""Candidates for a graph router in which the token decides, prototyped on the reference path and
compared at injection and after a short training run (docs/routing.md, "A router in which the token
decides").

    python -m benchmarks.router_candidates [--steps 40] [--json PATH]

Each candidate keeps the published structure, a GCN over the E expert nodes plus the token node
(N^0 = [P; t], P = act(X W_expᵀ), t = act(W_tok x), N^l = act(Â N^(l-1) W_lᵀ)), and adds one
token–expert interaction:
- `readout` (built: `GMoEConfig.token_readout`, method `gmoe-token`): ℓ_i = ⟨N^L_i, W_q x⟩ instead of
  ⟨N^L_i, w_p⟩: each token reads the expert states with its own vector;
- `film`: expert nodes conditioned on the token, N^0_i = P_i ⊙ (W_f x) (FiLM without the shift);
- `gatv2`: GATv2 token–expert edges, Â[i, t] = Â[t, i] = E·α_i·Â[i, t] with
  α = softmax_i(aᵀ LeakyReLU(W_s t + W_d P_i)) (uniform α gives the published Â).
`film` and `gatv2` exist only here (dense per-token reference maths, no kernels); the published
router and `readout` run the library's own code.

1. Injection: every candidate at token-projection gains 1, 3, 10 and 100, on the first 64 held-out
   OBQA examples, as `benchmarks/routing_injection.py` measures them (means over the 30 layers).
2. Training: the published router (gain 100, `gmoe`) and each candidate at its injection gain with
   the lowest top-2-set fraction, `--steps` steps of batch 8 on SIQA's training half (lr 5e-4, no
   warm-up, load_decay 0.9 for the candidates, as `gmoe-token`), then the routing on 64 SIQA held-out
   examples and the median step time (one thread).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import gmoe
from gmoe.finetune.assets import load_base_model
from gmoe.finetune.encoding import PadCollator, training_features
from gmoe.finetune.job import JobConfig, prepare_data
from gmoe.finetune.methods import AdapterSpec, gmoe_config
from gmoe.finetune.routing import measure_routing
from gmoe.router import GraphRouter
from gmoe_kernels import functional
from gmoe_kernels.activations import act

GAINS = (1.0, 3.0, 10.0, 100.0)
CANDIDATES = ("readout", "film", "gatv2")
EXAMPLES = 64
METRICS = ("top_set_fraction", "busiest_share", "degree_correlation", "effective_experts")


class CandidateRouter(GraphRouter):
    """A GraphRouter whose forward is one candidate's dense per-token maths (`kind`)."""

    kind = "film"

    def forward(self, x: torch.Tensor, backend: str | None = None):
        num_experts, tokens = self.num_experts, x.shape[0]
        a_hat = self.normalized_adjacency().to(x.dtype)
        token = act(self.activation, x @ self.token_weight.t())                            # (T, G)
        experts = act(self.activation, self.expert_features @ self.expert_weight.t())      # (E, G)
        experts = experts.expand(tokens, *experts.shape)
        adjacency = a_hat.expand(tokens, *a_hat.shape)
        if self.kind == "film":
            experts = experts * (x @ self.film_weight.t())[:, None, :]
        elif self.kind == "gatv2":
            scores = F.leaky_relu((token @ self.source_weight.t())[:, None, :]
                                  + experts @ self.target_weight.t(), 0.2) @ self.attention_weight
            coupling = num_experts * torch.softmax(scores, dim=1) * a_hat[:num_experts, num_experts]  # (T, E)
            adjacency = adjacency.clone()
            adjacency[:, :num_experts, num_experts] = coupling
            adjacency[:, num_experts, :num_experts] = coupling
        nodes = torch.cat([experts, token[:, None, :]], dim=1)                             # (T, E+1, G)
        for weight in self.gcn_weight:
            nodes = act(self.activation, adjacency @ nodes @ weight.t())
        logits = nodes[:, :num_experts] @ self.score_weight
        probs = torch.softmax(logits, dim=-1)
        indices, weights = functional.topk_route(probs, self.top_k, backend="reference")
        return logits, probs, indices, weights


PROTOTYPES = {kind: type(f"{kind.upper()}Router", (CandidateRouter,), {"kind": kind}) for kind in ("film", "gatv2")}


def _glorot(rows: int, cols: int, like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(nn.init.xavier_uniform_(torch.empty(rows, cols, dtype=like.dtype, device=like.device)))


def build(base, kind: str, gain: float, seed: int = 0) -> gmoe.GMoEModel:
    """The published router (`kind` "published"), `readout` (the library's) or a prototype, injected
    at token gain `gain` with a fixed seed; the candidates also take gmoe-token's load_decay 0.9."""
    config = gmoe_config("gmoe" if kind == "published" else "gmoe-token", AdapterSpec())
    config = dataclasses.replace(config, token_init_gain=gain, token_readout=kind == "readout",
                                 backend="reference")
    torch.manual_seed(seed)
    model = gmoe.get_gmoe_model(copy.deepcopy(base), config)
    if kind not in ("published", "readout"):
        for layer in model.gmoe_layers():
            make_prototype(layer.router, kind)
    return model


def make_prototype(router: GraphRouter, kind: str) -> CandidateRouter:
    """Turn a published GraphRouter into the `kind` prototype in place: the same parameters and
    buffers, another forward, and the candidate's own new parameters (Glorot)."""
    router.__class__ = PROTOTYPES[kind]
    width, hidden = router.token_weight.shape
    if kind == "film":
        router.film_weight = _glorot(width, hidden, router.token_weight)
    else:
        router.source_weight = _glorot(width, width, router.token_weight)
        router.target_weight = _glorot(width, width, router.token_weight)
        router.attention_weight = nn.Parameter(_glorot(1, width, router.token_weight).detach().squeeze(0))
    return router


def routing(model, tokenizer, examples) -> dict:
    summary = measure_routing(model, tokenizer, examples, max_length=256, max_examples=EXAMPLES)["summary"]
    return {name: summary[name] for name in METRICS}


def train(model, tokenizer, examples, steps: int) -> list[float]:
    """`steps` AdamW steps of batch 8 (lr 5e-4) on the task loss plus the router loss; step times."""
    collate = PadCollator(tokenizer.pad_token_id)
    feats = training_features(tokenizer, examples[:8 * steps], 256)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    model.train()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batch = collate(feats[8 * step:8 * step + 8])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    model.eval()
    return times


def _line(label: str, row: dict) -> str:
    corr = row["degree_correlation"]
    return (f"{label:28s} top set {row['top_set_fraction']:.3f}  busiest {row['busiest_share']:.3f}  degree corr "
            f"{'–' if corr is None else f'{corr:+.2f}'}  effective {row['effective_experts']:.2f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps of the short run (batch 8)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    base, tokenizer = load_base_model("smollm2-135m")
    obqa, siqa = prepare_data(JobConfig(task="obqa")), prepare_data(JobConfig(task="siqa"))
    injection = []
    for kind in ("published", *CANDIDATES):
        for gain in (100.0,) if kind == "published" else GAINS:
            row = {"router": kind, "gain": gain, **routing(build(base, kind, gain), tokenizer, obqa.eval)}
            injection.append(row)
            print(_line(f"{kind} gain {gain:g}", row), flush=True)
    trained = []
    for kind in ("published", *CANDIDATES):
        rows = [r for r in injection if r["router"] == kind]
        gain = min(rows, key=lambda r: r["top_set_fraction"])["gain"]
        model = build(base, kind, gain)
        before = routing(model, tokenizer, siqa.eval)
        times = train(model, tokenizer, siqa.train, args.steps)
        row = {"router": kind, "gain": gain, "steps": args.steps, "step_seconds": statistics.median(times),
               "injection": before, "trained": routing(model, tokenizer, siqa.eval)}
        trained.append(row)
        print(_line(f"{kind} gain {gain:g} SIQA before", before), flush=True)
        print(_line(f"  after {args.steps} steps ({row['step_seconds']:.2f} s/step)", row["trained"]), flush=True)
    result = {"injection_task": "obqa", "training_task": "siqa", "examples": EXAMPLES,
              "injection": injection, "training": trained}
    if args.json:
        from benchmarks.report import machine_stamp

        result = {"stamp": machine_stamp(torch.device("cpu"), torch.float32, torch.get_num_threads()), **result}
        with open(args.json + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        os.replace(args.json + ".tmp", args.json)
    return result


if __name__ == "__main__":
    main()
