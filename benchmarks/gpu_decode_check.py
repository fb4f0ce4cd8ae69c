"""Compile-ready decoding on a GPU: a decode step with transformers' static KV cache, compiled with
torch.compile(mode="reduce-overhead", fullgraph=True) (CUDA graphs), against the same step eager.

    python benchmarks/gpu_decode_check.py OUT_DIR            (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_decode_check.py OUT_DIR --device cpu --tiny   (a dry run of the script)

A SmolLM2-135M-shaped Llama (H 576, F 1536, 30 layers; random weights: no download), bf16 on the
GPU, with GMoE (graph and linear routers, E 8, K 2, r 8, attention LoRAs; the Triton backend)
and the frozen model. For each and batch 1 and 8:
- correct: the compiled step's logits against eager's over `steps` greedy steps (bf16
  tolerance), and the same greedy tokens;
- no host sync: the compiled steps replay under torch.cuda.set_sync_debug_mode("error");
- timed: median ms per decode step, eager and compiled (CUDA events, after warm-up).
Writes OUT_DIR/decode_check.json; exits non-zero when a correctness check failed.
Not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tolerances import TOLERANCES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a 1-layer model of width 64 (the CPU dry run)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers of the SmolLM2-shaped model")
    p.add_argument("--models", default="gmoe-graph,base,gmoe-linear", help="in the order they run")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt", type=int, default=32)
    return p.parse_args(argv)


def build(kind: str, tiny: bool, layers: int, device, dtype):
    import transformers

    from gmoe import GMoEConfig, get_gmoe_model

    torch.manual_seed(0)
    size = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256) if tiny else \
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
             num_key_value_heads=3, vocab_size=49152)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**size, max_position_embeddings=512))
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if kind == "base":
        return model
    config = GMoEConfig(num_experts=8, top_k=2, r=8, lora_alpha=16, router=kind.split("-")[1],
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], backend="auto")
    gmoe = get_gmoe_model(model, config)
    with torch.no_grad():
        for name, p in gmoe.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return gmoe.eval().requires_grad_(False)


def _cache_kwarg(model) -> str:
    """transformers 5 renames past_key_values to cache."""
    forward = getattr(model, "base_model", model).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _timer(device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def measure(fn):
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            return out, start.elapsed_time(end)
        return measure

    def measure(fn):
        t = time.perf_counter()
        out = fn()
        return out, 1e3 * (time.perf_counter() - t)
    return measure


def decode(model, step, ids, steps, device, sync_check=False):
    """Prefill eagerly into a fresh static cache, then `steps` greedy steps with `step`:
    (logits (B, steps, V), ms per step)."""
    import transformers

    batch, prompt = ids.shape
    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt + steps + 1)
    key = _cache_kwarg(model)
    with torch.no_grad():
        logits = model(input_ids=ids, **{key: cache}, use_cache=True,
                       cache_position=torch.arange(prompt, device=device)).logits
        token = logits[:, -1:].argmax(-1)
        outs, times = [], []
        timer = _timer(device)
        for i in range(steps):
            position = torch.tensor([prompt + i], device=device)
            guard = torch.cuda.set_sync_debug_mode if sync_check and device.type == "cuda" else None
            with _sync_errors(guard):
                logits, ms = timer(lambda token=token, position=position: step(token, cache, position))
            logits = logits.clone()   # a CUDA-graph output is overwritten by the next replay
            outs.append(logits)
            times.append(ms)
            token = logits[:, -1:].argmax(-1)
    return torch.cat(outs, 1), statistics.median(times[len(times) // 2:])


@contextlib.contextmanager
def _sync_errors(setter):
    if setter is None:
        yield
        return
    setter("error")
    try:
        yield
    finally:
        setter("default")


def check(kind, model, batch, args, device, dtype) -> dict:
    key = _cache_kwarg(model)

    def step(token, cache, position):
        return model(input_ids=token, **{key: cache}, cache_position=position, use_cache=True).logits

    mode = dict(mode="reduce-overhead") if device.type == "cuda" else dict(backend="aot_eager")
    compiled = torch.compile(step, fullgraph=True, **mode)
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=gen).to(device)
    start = time.perf_counter()
    decode(model, compiled, ids, 3, device)          # compile and warm up (CUDA-graph recording)
    compile_s = time.perf_counter() - start
    eager_logits, eager_ms = decode(model, step, ids, args.steps, device)
    compiled_logits, compiled_ms = decode(model, compiled, ids, args.steps, device, sync_check=True)
    atol, rtol = TOLERANCES[dtype]
    close = torch.allclose(compiled_logits.float(), eager_logits.float(), atol=10 * atol, rtol=10 * rtol)
    same = bool(torch.equal(compiled_logits.argmax(-1), eager_logits.argmax(-1)))
    return {"model": kind, "batch": batch, "steps": args.steps, "compile_s": round(compile_s, 1),
            "max_abs_diff": (compiled_logits.float() - eager_logits.float()).abs().max().item(),
            "logits_close": bool(close), "greedy_same": same, "eager_ms_per_step": round(eager_ms, 3),
            "compiled_ms_per_step": round(compiled_ms, 3),
            "compiled_tok_per_s": round(1e3 * batch / compiled_ms, 1), "eager_tok_per_s": round(1e3 * batch / eager_ms, 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check (pass --device cpu --tiny for a dry run)")
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows, failed = [], False
    doc = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "dtype": str(dtype),
           "torch": torch.__version__, "layers": 1 if args.tiny else args.layers,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for kind in args.models.split(","):
        model = build(kind, args.tiny, args.layers, device, dtype)
        for batch in (int(b) for b in args.batches.split(",")):
            try:
                row = check(kind, model, batch, args, device, dtype)
            except Exception as err:  # noqa: BLE001 - report and go on with the others
                row = {"model": kind, "batch": batch, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            failed |= bool(row.get("error")) or not (row.get("logits_close") and row.get("greedy_same"))
            rows.append(row)
            print(json.dumps(row), flush=True)
            # written after every row: a time limit keeps what was measured
            (Path(args.out) / "decode_check.json").write_text(json.dumps(doc, indent=1) + "\n")
        del model
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
