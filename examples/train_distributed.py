"""Data-parallel GMoE fine-tuning with Hugging Face Accelerate: one script for every launcher.

    python examples/train_distributed.py                                   # one process
    torchrun --nproc_per_node 2 examples/train_distributed.py              # DDP (gloo on CPU, nccl on GPU)
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_distributed.py
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/train_distributed.py
    accelerate launch --use_deepspeed --deepspeed_config_file examples/deepspeed/zero2.json \
        --num_processes 2 examples/train_distributed.py
On a machine without a GPU, prefix `accelerate launch` with ACCELERATE_USE_CPU=1 and add
`--num_processes 2` (torchrun needs nothing more: the script picks gloo itself); Accelerate then
runs DDP whatever the config says (it applies FSDP and DeepSpeed on GPUs only).

By default it trains a tiny random Llama (no download) on the bundled text; `--model NAME`
takes a Hugging Face causal LM instead (the text is then tokenized with its tokenizer).
Each rank trains on its shard of the data; the router losses and the expert load are global
(README, "Scaling out"), so every rank prints the same load, and the script checks that.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from gmoe import GMoEConfig, get_gmoe_model
from gmoe.config import WEIGHTS_NAME

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "tiny_corpus.txt"


class Windows(torch.utils.data.Dataset):
    """Non-overlapping windows of `seq_len` token ids: input_ids = labels, no padding."""

    def __init__(self, ids: torch.Tensor, seq_len: int):
        n = ids.numel() // seq_len
        if n == 0:
            raise ValueError(f"the text has {ids.numel()} tokens, fewer than --seq-len {seq_len}")
        self.ids = ids[: n * seq_len].view(n, seq_len)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build(args):
    """(model, token ids of the text)."""
    text = args.text.read_text(encoding="utf-8")
    if args.model == "tiny":
        from train_tiny import tiny_llama  # examples/ is this script's folder
        base = tiny_llama(seed=args.seed)  # vocabulary 256: the text's UTF-8 bytes are the tokens
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    else:
        import transformers
        base = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank
    config = GMoEConfig(num_experts=args.num_experts, top_k=args.top_k, r=args.r, lora_alpha=2 * args.r,
                        gcn_dim=args.gcn_dim, edge_density=0.1)
    return get_gmoe_model(base, config), ids


def save_adapter(accelerator, model, path: Path):
    """Gather the full state on the main process (DDP, FSDP and DeepSpeed alike) and write the
    adapter folder that GMoEModel.from_pretrained reads."""
    from safetensors.torch import save_file
    state = accelerator.get_state_dict(model)  # a collective under FSDP/DeepSpeed: every rank calls it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        keys = list(unwrapped.adapter_state_dict())
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: state[f"base_model.{k}"].detach().cpu().contiguous() for k in keys}, str(path / WEIGHTS_NAME),
                  metadata={"format": "pt", "peft_type": "GMOE"})
        unwrapped.gmoe_config.save(path)
        accelerator.print(f"adapter saved to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (a random tiny Llama) or a Hugging Face model name")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per rank per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--gcn-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="write the adapter folder here at the end")
    args = parser.parse_args(argv)

    from accelerate import Accelerator
    from accelerate.utils import set_seed
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    model, ids = build(args)
    data = Windows(ids, args.seq_len)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    gmoe_model = accelerator.unwrap_model(model)
    accelerator.print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type}, "
                      f"{len(data)} sequences of {args.seq_len} tokens")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and accelerator.distributed_type != "FSDP":
        accelerator.print("note: Accelerate applies its FSDP plugin on GPUs only; this CPU run is plain DDP")

    model.train()
    step, start = 0, time.perf_counter()
    while step < args.steps:
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(**batch)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss = accelerator.reduce(out.loss.detach(), "mean").item()
            router = out.router_loss.item()  # global: the same on every rank
            if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
                accelerator.print(f"step {step:4d}  loss {loss:.4f}  router {router:.4f}  "
                                  f"{time.perf_counter() - start:6.1f}s")
            if step == args.steps:
                break

    load = gmoe_model.expert_load()
    every_rank = accelerator.gather(load.unsqueeze(0).to(accelerator.device))
    same = bool((every_rank == every_rank[0]).all())
    share = load / load.sum(dim=1, keepdim=True).clamp_min(1e-12)
    accelerator.print("expert load share per layer: "
                      + "; ".join(" ".join(f"{v:.2f}" for v in row) for row in share.tolist()))
    accelerator.print(f"expert load identical on all {accelerator.num_processes} ranks: {same}")
    if args.save is not None:
        save_adapter(accelerator, model, args.save)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not same:
        raise SystemExit("the expert load differs between ranks")


if __name__ == "__main__":
    main()
