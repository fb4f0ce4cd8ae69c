"""Compile-ready decoding: a decode step with transformers' static KV cache compiles whole
(torch.compile fullgraph=True, inductor on the CPU) and matches eager.

One tiny model, one compiled step function, reused for several steps (the cache position is an
input, so the steps share one graph). Inductor's C++ compile is the slow part (tens of seconds
on 2 cores): one test compiles once and checks everything.
"""
import inspect

import pytest
import torch

from gmoe import GMoEConfig, get_gmoe_model
from tests.models import tiny_model
from tests.tolerances import assert_close

SMALL = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("router", ["graph"])
def test_static_cache_decode_step_compiles_whole_and_matches_eager(router):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = get_gmoe_model(tiny_model("llama", layers=1), GMoEConfig(**SMALL, router=router, backend="reference"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    batch, prompt, steps = 2, 5, 3
    ids = torch.randint(0, 64, (batch, prompt))

    def new_cache():
        return transformers.StaticCache(config=model.config, max_cache_len=prompt + steps + 1)

    # transformers 5 renames past_key_values to cache
    key = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"

    def decode_step(token, cache, position):
        return model(input_ids=token, **{key: cache}, cache_position=position, use_cache=True).logits

    compiled_step = torch.compile(decode_step, fullgraph=True, backend="inductor")
    results = {}
    with torch.no_grad():
        for name, step in (("eager", decode_step), ("compiled", compiled_step)):
            cache = new_cache()
            logits = model(input_ids=ids, **{key: cache}, use_cache=True,
                           cache_position=torch.arange(prompt)).logits
            token = logits[:, -1:].argmax(-1)
            outs = []
            for i in range(steps):
                logits = step(token, cache, torch.tensor([prompt + i]))
                outs.append(logits)
                token = logits[:, -1:].argmax(-1)
            results[name] = torch.cat(outs, 1)
    assert_close(results["compiled"], results["eager"], name="decode logits")
    assert torch.equal(results["compiled"].argmax(-1), results["eager"].argmax(-1))


@pytest.mark.slow
def test_generate_with_a_static_cache_compiles_the_step_and_gives_the_eager_tokens():
    """`generate(cache_implementation="static", compile_config=...)`: transformers compiles the
    model's forward itself (on a CPU only when asked with `_compile_all_devices`); with a
    left-padded batch the compiled decoding gives the eager tokens, from one graph."""
    configuration = pytest.importorskip("transformers.generation.configuration_utils")
    if not hasattr(configuration, "CompileConfig"):
        pytest.skip("this transformers has no CompileConfig (added after 4.46)")
    CompileConfig = configuration.CompileConfig

    torch.manual_seed(0)
    model = get_gmoe_model(tiny_model("llama", layers=1), GMoEConfig(**SMALL, backend="reference"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    ids = torch.randint(1, 64, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    eager = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           output_scores=True, return_dict_in_generate=True)
    config = CompileConfig(fullgraph=True)
    config._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              cache_implementation="static", compile_config=config)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1   # the step was compiled
    differs = (compiled != eager.sequences)[:, ids.shape[1]:]
    if differs.any():   # only where eager's best two logits tie to rounding may a step choose otherwise
        row, step = (int(i) for i in differs.nonzero()[0])
        top2 = eager.scores[step][row].topk(2).values
        assert float(top2[0] - top2[1]) < 1e-4, f"compiled decoding chose another token at step {step}"
