"""The routing telemetry's share of a training step: one GMoE model, steps timed with the
telemetry on and off, interleaved (benchmarks.measure.time_group), side by side in one run.

    python -m benchmarks.telemetry_overhead [--device cuda] [--layers 4] [--json PATH]

The model has SmolLM2-135M's layer shapes (H 576, F 1536, 9 heads, 3 KV heads) with random
weights and `--layers` decoder layers, GMoE E 8, K 2, r 8 on every MLP, a batch of 8 x 128
tokens with some padding. The step is forward, backward and zero_grad (no optimizer). On a shared
machine the two steps' medians differ by more than the telemetry costs, so the counting ops are also
timed alone, on the routing of a real forward.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import transformers

import gmoe
import gmoe.losses
import gmoe.telemetry
from benchmarks.measure import FULL, setup_threads, time_group
from benchmarks.report import machine_stamp


def build(layers: int, device: torch.device):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=512)
    base = transformers.LlamaForCausalLM(config).to(device)
    model = gmoe.get_gmoe_model(base, gmoe.GMoEConfig(num_experts=8, top_k=2, r=8, lora_alpha=16)).train()
    ids = torch.randint(0, 2048, (8, 128), device=device)
    mask = torch.ones_like(ids)
    mask[::2, 96:] = 0
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def count_only(model, batch):
    """The telemetry's own work for one step (the counts of every layer, then the window update), on
    the routing the model's last training forward produced: timed alone, it does not drown in the step's noise."""
    model.train()
    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, o: captured.append(m.last_routing))
             for layer in model.gmoe_layers()]
    with torch.no_grad():
        model.base_model(**batch)
    for hook in hooks:
        hook.remove()
    layers = model.gmoe_layers()
    mask = batch["attention_mask"].reshape(-1).bool()
    tokens = mask.float().sum()

    # the routed mass is the batch load the losses compute anyway: not the telemetry's cost
    mass = torch.stack([gmoe.losses.batch_load(probs.gather(1, indices), indices, 8, mask)
                        for probs, indices, _ in captured])

    def run():
        counts = model._routing_counts(layers, captured, mask)
        gmoe.telemetry.accumulate(layers, {**counts, "routing_mass": mass}, tokens)
    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers must be at least 1")
    if args.json and os.path.isdir(args.json):
        parser.error(f"--json {args.json} is a folder; give a file path")
    device = torch.device(args.device)
    threads = setup_threads(device, args.threads)
    model, batch = build(args.layers, device)

    def step(telemetry: bool):
        def run():
            model.routing_telemetry = telemetry
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    timings = time_group({"telemetry on": step(True), "telemetry off": step(False)}, device, FULL)
    on, off = timings["telemetry on"][0], timings["telemetry off"][0]
    counting = time_group({"counting": count_only(model, batch)}, device, FULL)["counting"][0]
    result = {"stamp": machine_stamp(device, torch.float32, threads), "layers": args.layers,
              "tokens": int(batch["attention_mask"].sum()), "step_ms_on": on, "step_ms_off": off,
              "overhead": on / off - 1.0, "counting_ms": counting, "counting_share": counting / off,
              "contended": {k: v[2] for k, v in timings.items()}}
    print(f"{result['stamp']['device_name']}: step {off:.1f} ms without telemetry, {on:.1f} ms with it: "
          f"{100 * result['overhead']:+.2f} %; the counting ops alone {counting:.2f} ms "
          f"({100 * result['counting_share']:.3f} % of the step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
