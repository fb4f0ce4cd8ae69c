"""How a freshly injected router spreads real tokens over the experts, before any training.

    python -m benchmarks.routing_injection [--task obqa] [--examples 64] [--json PATH]

For each router variant (the graph router at several token-projection gains, with the published
degree coupling, with uniform token coupling and with the token readout, and the linear router), on SmolLM2-135M and the
first `--examples` held-out examples of a task (gold prompt and answer) (the job's split), averaged over the 30 layers:
- `top_set_fraction`, `busiest_share`, `degree_correlation`, `effective_experts`: `gmoe.telemetry` (the
  fraction of tokens on the layer's most common top-K set, the busiest expert's share of the slots, the
  slots' rank correlation with the experts' degrees in the expert graph, the mean of 1/Σ_k w_k²);
- `token_to_expert_ratio`: in the GCN's first layer, the mean norm of the token node's term
  Â[i, t]·t over the mean norm of the expert nodes' terms Σ_j Â[i, j]·e_j, for an expert node i.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os

import torch

import gmoe
from gmoe.finetune.assets import load_base_model
from gmoe.finetune.encoding import PadCollator, training_features
from gmoe.finetune.job import JobConfig, prepare_data
from gmoe.finetune.methods import AdapterSpec, gmoe_config
from gmoe.finetune.routing import measure_routing
from gmoe_kernels.activations import act

GAINS = (1.0, 10.0, 100.0, 1000.0)


def variants() -> list[tuple[str, gmoe.GMoEConfig]]:
    graph = gmoe_config("gmoe", AdapterSpec())
    out = [(f"graph gain {g:g} {c}", dataclasses.replace(graph, token_init_gain=g, token_coupling=c))
           for c in ("degree", "uniform") for g in GAINS]
    out.append(("graph gain 100 degree, edge density 0.25", dataclasses.replace(graph, edge_density=0.25)))
    out += [(f"graph gain {g:g} degree, token readout", dataclasses.replace(graph, token_init_gain=g, token_readout=True))
            for g in (1.0, 3.0, 10.0, 100.0)]
    out.append(("linear (no graph)", gmoe_config("gmoe-no-graph", AdapterSpec())))
    return out


def token_to_expert_ratio(model, inputs: dict[str, torch.Tensor]) -> float | None:
    """Mean over layers of ||Â[i, t] t|| / ||Σ_j Â[i, j] e_j||, averaged over experts i and tokens."""
    captured = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0].detach()))
             for i, layer in enumerate(model.gmoe_layers())]
    try:
        with torch.no_grad():
            model.base_model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    ratios = []
    mask = inputs["attention_mask"].reshape(-1).bool()
    for i, layer in enumerate(model.gmoe_layers()):
        router = layer.router
        if not hasattr(router, "expert_adjacency"):
            return None
        a_hat = router.normalized_adjacency()
        num_experts = a_hat.shape[0] - 1
        x = captured[i].reshape(-1, captured[i].shape[-1])[mask].float()
        token = act(router.activation, x @ router.token_weight.t())                                   # (T, G)
        experts = act(router.activation, router.expert_features @ router.expert_weight.t())            # (E, G)
        token_term = a_hat[:num_experts, num_experts, None] * token.norm(dim=1).mean()                 # (E, 1)
        expert_term = (a_hat[:num_experts, :num_experts] @ experts).norm(dim=1)                        # (E,)
        ratios.append(float((token_term.squeeze(1) / expert_term).mean()))
    return sum(ratios) / len(ratios)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="obqa")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the injection")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a folder; give a file path")
    data = prepare_data(JobConfig(task=args.task))
    base, tok = load_base_model("smollm2-135m")
    batch = PadCollator(tok.pad_token_id)(training_features(tok, data.eval[:args.examples], 256))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}  # what measure_routing routes
    rows = []
    for name, config in variants():
        torch.manual_seed(args.seed)
        model = gmoe.get_gmoe_model(copy.deepcopy(base), dataclasses.replace(config, backend="reference"))
        summary = measure_routing(model, tok, data.eval, max_length=256, max_examples=args.examples)["summary"]
        row = {"router": name, "top_set_fraction": summary["top_set_fraction"],
               "busiest_share": summary["busiest_share"], "degree_correlation": summary["degree_correlation"],
               "effective_experts": summary["effective_experts"],
               "token_to_expert_ratio": token_to_expert_ratio(model, inputs)}
        rows.append(row)
        corr, ratio = row["degree_correlation"], row["token_to_expert_ratio"]
        print(f"{name:42s} top set {row['top_set_fraction']:.3f}  busiest {row['busiest_share']:.3f}  "
              f"degree corr {'–' if corr is None else f'{corr:+.2f}'}  effective {row['effective_experts']:.2f}  "
              f"token/expert {'–' if ratio is None else f'{ratio:.1f}'}", flush=True)
    if args.json:
        from benchmarks.report import machine_stamp

        with open(args.json, "w") as f:
            json.dump({"stamp": machine_stamp(torch.device("cpu"), torch.float32, torch.get_num_threads()),
                       "task": args.task, "examples": args.examples, "rows": rows}, f, indent=1)
            f.write("\n")
    return rows


if __name__ == "__main__":
    main()
