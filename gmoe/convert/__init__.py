"""Load adapters trained elsewhere: the published GMoE code and the `mixlora` package.

- `from_published_gmoe(model, path)`: an adapter folder written by the published GMoE code
  (BAI-LAB/GMoE on mLoRA 0.3.2; `routing_strategy: "goe"`), graph router. Its former name,
  `from_gmoe_reference`, still works for one release and warns (DeprecationWarning).
- `from_mixlora(model, path)`: an adapter folder of the `mixlora` PyPI package
  (`peft_type: "MIXLORA"`, `routing_strategy: "mixlora"`), linear router.

Both read `adapter_config.json` and `adapter_model.bin` (`torch.load(weights_only=True)`),
check every key and shape before touching the model, inject GMoE into `model` and return a
normal `GMoEModel`: trainable further, saved by `save_pretrained` in this package's format.

Mapping (mLoRA names: w1 = gate_proj, w3 = up_proj, w2 = down_proj):

  published GMoE  mixlora.layers.{i}.                   this package  <mlp>. / <attn>.
  gate.mlp.weight            (G, H)                     router.token_weight   W_tok
  gate.mlp_struct.weight     (G, H)                     router.expert_weight  W_exp
  gate.X                     (E, H)                     router.expert_features
  gate.convs.{l}.lin.weight  (G, G)                     router.gcn_weight[l]
  gate.proj.weight           (1, G)                     router.score_weight   (G,)
  gate.lamb / gate.theta     () / (1,)                  router.poisson_rate / router.normal_std
  experts.{e}.w1_proj.lora_A/B.weight (R,H)/(F,R)       experts.gate_proj.lora_A[e] / lora_B[e]
  self_attn.{q,k,v,o}_proj.lora_A/B.weight              <attn>.lora_A.weight / lora_B.weight
  (graph rebuilt as the published code does at load)    router.expert_adjacency

  mixlora         mixlora.layers.{i}.
  mlp.moe_gate.weight        (E, H)                     router.weight
  mlp.{proj}.experts.{e}.lora_A/B.weight                experts.{proj}.lora_A[e] / lora_B[e]
  self_attn.{proj}.lora_A/B.weight                      <attn>.lora_A.weight / lora_B.weight

Settings this package cannot express (DoRA, MixLoRA's jitter noise, an activation other than
the MLP's, expert LoRA settings that differ from the attention LoRA's) raise a ValueError
that says so, rather than load something that computes differently.

Modules: `published` (from_published_gmoe, published_expert_graph), `mixlora` (from_mixlora),
`_common` (what both loaders share: reading the folder, settings, key and shape checks, the copy
into a GMoEModel).
"""
from .mixlora import from_mixlora
from .published import from_gmoe_reference, from_published_gmoe, published_expert_graph

__all__ = ["from_gmoe_reference", "from_mixlora", "from_published_gmoe", "published_expert_graph"]
