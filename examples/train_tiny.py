"""A plain training loop for GMoE on a random tiny Llama and a bundled text, with no download:

    python examples/train_tiny.py [--steps 150] [--router graph|linear] [--save my-adapter]

`transformers.Trainer` works unchanged too (the router loss is inside out.loss); this loop shows
the model API in a few lines and prints the LM loss, the router loss and the expert load.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gmoe import GMoEConfig, GMoEModel, get_gmoe_model


def byte_batches(text: str, seq_len: int, batch_size: int, generator: torch.Generator):
    """Endless random windows of a UTF-8 text as byte ids (vocabulary 256): input_ids = labels."""
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if data.numel() <= seq_len:
        raise ValueError(f"the text has {data.numel()} bytes; it needs more than seq_len={seq_len}")
    while True:
        starts = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=generator)
        ids = torch.stack([data[s : s + seq_len] for s in starts.tolist()])
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def train_loop(model: GMoEModel, batches, steps: int, lr: float, log_every: int = 10, log=print):
    """AdamW on the trainable adapter parameters; logs loss, router loss and expert load."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (loaded with is_trainable=False?)")
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(batches)
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((out.loss.item(), out.router_loss.item()))
        if step % log_every == 0 or step == 1 or step == steps:
            window = history[-log_every:]
            loss = sum(h[0] for h in window) / len(window)
            router = sum(h[1] for h in window) / len(window)
            log(f"step {step:4d}  loss {loss:.4f} = LM {loss - router:.4f} + router {router:.4f}"
                f"  {time.perf_counter() - start:6.1f}s")
    return history


def format_load(model: GMoEModel) -> str:
    load = model.expert_load()
    share = load / load.sum(dim=1, keepdim=True).clamp_min(1e-12)
    lines = ["expert load share per layer (experts 0..E-1):"]
    for i, row in enumerate(share.tolist()):
        lines.append(f"  layer {i}: " + " ".join(f"{v:5.1%}" for v in row))
    return "\n".join(lines)


def tiny_llama(vocab_size=256, hidden_size=128, intermediate_size=344, layers=2, seed=0):
    """A small LlamaForCausalLM built from a config (random weights, no download)."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                                      intermediate_size=intermediate_size, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="GMoE demo: fine-tune a tiny Llama on a bundled text")
    parser.add_argument("--text", type=Path, default=Path(__file__).resolve().parent / "data" / "tiny_corpus.txt")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--router", choices=["graph", "linear"], default="graph")
    parser.add_argument("--save", type=Path, default=None, help="save the adapter here at the end")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.text.is_file():
        parser.error(f"--text {args.text} does not exist")

    torch.manual_seed(args.seed)
    base = tiny_llama(seed=args.seed)
    # The demo base is random, so the MLP LoRAs get a larger rank than the paper's r=2.
    config = GMoEConfig(num_experts=8, top_k=2, r=8, lora_alpha=16, router=args.router,
                        gcn_layers=2, gcn_dim=64, edge_density=0.1, aux_loss_coef=0.01 if args.router == "linear" else 0.0)
    model = get_gmoe_model(base, config)
    model.print_trainable_parameters()
    batches = byte_batches(args.text.read_text(), args.seq_len, args.batch_size,
                           torch.Generator().manual_seed(args.seed))
    history = train_loop(model, batches, args.steps, args.lr, log_every=max(1, args.steps // 10))
    def mean_lm(rows):
        return sum(loss - router for loss, router in rows) / len(rows)

    print(f"LM loss: first 10 steps {mean_lm(history[:10]):.3f} -> last 10 steps {mean_lm(history[-10:]):.3f}")
    print(format_load(model))
    if args.save:
        model.save_pretrained(args.save)
        print(f"adapter saved to {args.save}")


if __name__ == "__main__":
    main()
