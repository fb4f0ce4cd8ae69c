"""GMoEModel: inject GMoE into a Hugging Face causal LM, run it, save and load adapters.

Injection is explicit and reversible: every decoder MLP is replaced by a GMoEMLP holding a
reference to it, every `target_modules` linear by a LoRALinear; `unload()` puts the
original modules back. Unknown attributes go to the wrapped model, as with PeftModel.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from . import losses, telemetry
from .activation import detect_activation
from .config import CONFIG_NAME, WEIGHTS_NAME, GMoEConfig
from .io import atomic_save_dir, check_adapter_state, check_not_merged, mark_merged, read_safetensors
from .layers import GMoEMLP, LoRALinear, adapter_dtype
from .padding import TokenRows
from .topology import warn_if_twins

SUPPORTED = "Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 (any decoder whose MLP has gate_proj, up_proj, down_proj and act_fn)"


def is_gated_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
        and callable(getattr(module, "act_fn", None))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


class GMoEModel(nn.Module):
    """A Hugging Face causal LM with GMoE adapters. Build with `get_gmoe_model` or `from_pretrained`."""

    # The router loss is a per-batch mean: Trainer must not pass num_items_in_batch (which
    # only the LM loss would honour); it then averages both over gradient accumulation.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, config: GMoEConfig, _build_graph: bool = True):
        super().__init__()
        self.base_model = model
        config = dataclasses.replace(config)  # never mutate the caller's config
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        self.gmoe_config = config
        if any(isinstance(m, (GMoEMLP, LoRALinear)) for m in model.modules()):
            raise ValueError(f"this {type(model).__name__} already holds GMoE layers; call unload() on the "
                             "GMoEModel that wraps it first")
        mlps = [(n, m) for n, m in model.named_modules() if is_gated_mlp(m)]
        if not mlps:
            raise ValueError(f"{type(model).__name__} has no decoder MLP with gate_proj, up_proj, down_proj and "
                             f"act_fn, so GMoE cannot be injected. Supported: {SUPPORTED}")
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for param in model.parameters():
            param.requires_grad_(False)
        activation = detect_activation(model, mlps[0][1])
        targets = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.rpartition(".")[2] in config.target_modules]
        missing = sorted(set(config.target_modules) - {n.rpartition(".")[2] for n, _ in targets})
        if missing:
            raise ValueError(f"target_modules {missing} match no nn.Linear in {type(model).__name__}; "
                             "check the names (e.g. q_proj, k_proj, v_proj, o_proj) or remove them")
        self._injected: list[tuple[str, nn.Module]] = []
        self._token_rows = TokenRows()  # the real tokens of an eval forward, shared by the layers
        for name, mlp in mlps:
            layer = GMoEMLP(mlp, config, activation, build_graph=_build_graph)
            layer.layer_name = name  # for messages
            layer.token_rows = self._token_rows
            _set_module(model, name, layer)
            self._injected.append((name, mlp))
        for name, linear in targets:
            _set_module(model, name, LoRALinear(linear, config.r, config.lora_alpha, config.lora_dropout,
                                                dtype=adapter_dtype(linear, config)))
            self._injected.append((name, linear))
        self._padding_hooks = (model.register_forward_pre_hook(self._note_padding, with_kwargs=True),
                               model.register_forward_hook(self._clear_padding))
        self._unloaded = False
        self._adapters_disabled = False
        self._non_finite_steps: dict[tuple[str, ...], torch.Tensor] = {}  # see _advance_load
        #: Count routing telemetry in training forwards (`routing_stats`); on by default.
        self.routing_telemetry = True
        self._measuring_routing = False
        self.train(model.training)  # new modules start in the base model's mode

    # ----- attribute forwarding, as PeftModel does -----
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def gmoe_layers(self) -> list[GMoEMLP]:
        return [m for m in self.base_model.modules() if isinstance(m, GMoEMLP)]

    # ----- forward with router losses -----
    def forward(self, input_ids=None, attention_mask=None, labels=None, inputs_embeds=None, **kwargs):
        """The base model's forward; with labels (or in training) the router loss joins `loss`
        and is returned alone as `router_loss`. Other keyword arguments go to the base model."""
        if self._unloaded:
            raise RuntimeError("this GMoEModel was unloaded; use the base model it returned, or load the adapter again")
        self._check_inputs(input_ids, inputs_embeds)
        return_dict = kwargs.pop("return_dict", None)
        given = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                     inputs_embeds=inputs_embeds)
        try:
            out = self.base_model(**{k: v for k, v in given.items() if v is not None}, return_dict=True, **kwargs)
            if not self.training and self._measuring_routing and not self._adapters_disabled:
                self._count_eval_routing(attention_mask)
            if (labels is not None or self.training) and not self._adapters_disabled:
                router_loss = self.router_loss(attention_mask)
                out["router_loss"] = router_loss
                if out.get("loss") is not None:
                    out["loss"] = out["loss"] + router_loss.to(out["loss"].dtype)
        finally:
            for layer in self.gmoe_layers():
                layer.last_routing = layer.last_loss_targets = None
        return out.to_tuple() if return_dict is False else out

    def _note_padding(self, module, args, kwargs):
        """Forward pre-hook on the base model: in eval, which of this forward's tokens are real,
        for the GMoE layers (`gmoe.padding`). `generate` calls the base model directly, so the
        hook (not this class's forward) is where every eval forward passes."""
        if torch.compiler.is_compiling():
            return
        if module.training:
            self._token_rows.clear()
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        self._token_rows.note_mask(kwargs.get("attention_mask"), tokens)

    def _clear_padding(self, module, args, output):
        if not torch.compiler.is_compiling():
            self._token_rows.clear()

    def _check_inputs(self, input_ids, inputs_embeds):
        if input_ids is not None:
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"input_ids must be an integer tensor (int64), got {input_ids.dtype}; "
                                "pass token ids from the tokenizer, not embeddings")
            device = self.base_model.get_input_embeddings().weight.device
            if input_ids.device != device:
                raise ValueError(f"input_ids are on {input_ids.device} but the model is on {device}; "
                                 f"call input_ids.to('{device}')")

    def router_loss(self, attention_mask=None) -> torch.Tensor:
        """Router loss of the last forward, summed over its terms and averaged over layers.

        In training mode this also advances every layer's running expert load (once per
        forward). The batch statistics the losses need (load, Poisson sums, Switch sums, token
        count) are summed over data-parallel ranks in one all-reduce for all layers, so every
        rank's router loss and gradients equal one process on the concatenated batch.
        """
        cfg = self.gmoe_config
        layers = [m for m in self.gmoe_layers() if m.last_routing is not None]
        if not layers:
            raise RuntimeError("router_loss() needs a forward pass first")
        routings = [layer.last_routing for layer in layers]
        masks = [self._token_mask(attention_mask, probs) for probs, _, _ in routings]
        for layer, (probs, _, _) in zip(layers, routings):
            self._check_router_graph(layer, probs)
        training = layers[0].training
        stats = {"tokens": losses.token_count(routings[0][0], masks[0]),
                 "load": torch.stack([losses.batch_load(probs.gather(1, indices), indices, cfg.num_experts, mask)
                                      for (probs, indices, _), mask in zip(routings, masks)])}
        if cfg.poisson_loss_coef > 0:
            stats["poisson"] = torch.stack([losses.poisson_distinction_sum(probs, layer.last_loss_targets[0], mask)
                                            for layer, (probs, _, _), mask in zip(layers, routings, masks)])
        if cfg.aux_loss_coef > 0:
            stats["switch"] = torch.stack([losses.switch_stats(probs, indices, mask)
                                           for (probs, indices, _), mask in zip(routings, masks)])
        count_routing = training and self.routing_telemetry
        if count_routing:  # the telemetry counts join the same all-reduce: every rank holds the global counts
            stats.update(self._routing_counts(layers, routings, masks[0]))
        if training:  # eval counts nothing, so it needs no collective (rank-0-only eval works)
            stats = losses.global_sums(stats)
        tokens = stats["tokens"]
        # load_decay 1.0 (the default) keeps the whole run's load, as published; below 1 old steps
        # fade, so this batch's share (the only part with a gradient) does not shrink like 1/steps.
        # The previous load is the same on every rank, so the decayed load stays exact under DDP.
        previous = torch.stack([layer.expert_load.detach().float() for layer in layers])
        load_now = cfg.load_decay * previous + cfg.top_k * stats["load"]
        loss = torch.zeros(len(layers), dtype=torch.float32, device=load_now.device)
        if cfg.poisson_loss_coef > 0:
            loss = loss + cfg.poisson_loss_coef * stats["poisson"] / tokens.clamp_min(1.0)
        if cfg.normal_loss_coef > 0:
            loss = loss + cfg.normal_loss_coef * torch.stack([
                losses.normal_balance(load, layer.last_loss_targets[1]) for layer, load in zip(layers, load_now)])
        if cfg.aux_loss_coef > 0:
            loss = loss + cfg.aux_loss_coef * torch.stack([
                losses.switch_loss_from_stats(switch, tokens, cfg.top_k) for switch in stats["switch"]])
        if training:
            self._advance_load(layers, load_now, stats["load"])
        if count_routing:  # the routed mass is the batch load, already summed over ranks
            telemetry.accumulate(layers, {**stats, "routing_mass": stats["load"]}, tokens)
        return loss.mean()

    def _advance_load(self, layers, load_now, batch_load):
        """c_prev <- c_now, except for a layer whose batch load is non-finite (a NaN or inf
        activation this step): its running load keeps its old value instead of turning NaN
        for good. That step's loss is non-finite anyway, so the trainer's own guards act.

        Naming those layers needs the flags on the host, a synchronisation the training step
        must not have: the non-finite steps are counted per layer on the device, and
        `report_non_finite()` warns later, where the host reads anyway."""
        finite = torch.isfinite(batch_load).all(dim=1)
        with torch.no_grad():
            for layer, ok, load in zip(layers, finite, load_now):
                layer.expert_load.copy_(torch.where(ok, load, layer.expert_load))
            if not torch.compiler.is_compiling():  # (a compiled graph keeps only the load update)
                names = tuple(layer.layer_name for layer in layers)
                pending = self._non_finite_steps.get(names)
                bad = (~finite).long()
                self._non_finite_steps[names] = bad if pending is None else pending.to(bad.device) + bad

    def report_non_finite(self) -> None:
        """Warn, naming the layers, if training forwards since the last report had non-finite
        router probabilities (their expert load was not counted). Reads a small tensor: a host
        synchronisation, so it runs where the host waits anyway: `expert_load()` and
        GMoETrainer's logging call it."""
        pending, self._non_finite_steps = self._non_finite_steps, {}
        bad = {}
        for names, steps in pending.items():
            for name, n in zip(names, steps.tolist()):
                if n:
                    bad[name] = bad.get(name, 0) + n
        if bad:
            warnings.warn(f"non-finite router probabilities in {list(bad)} (in {list(bad.values())} training "
                          "steps since the last report, per layer): those steps' expert load is not counted for "
                          "them (the running load keeps its previous value)", RuntimeWarning, stacklevel=3)

    @staticmethod
    def _token_mask(attention_mask, probs, warn=True):
        if attention_mask is None:
            return None
        if attention_mask.numel() != probs.shape[0]:
            if warn:
                warnings.warn(f"attention_mask has {attention_mask.numel()} entries for {probs.shape[0]} routed "
                              "tokens (a 4-D or packed mask?); padding cannot be left out of the router loss and load",
                              stacklevel=3)
            return None
        return attention_mask.reshape(-1).to(probs.device).bool()

    @staticmethod
    def _check_router_graph(layer, probs):
        if (layer.training and torch.is_grad_enabled() and not probs.requires_grad
                and any(p.requires_grad for p in layer.router.parameters())):
            raise RuntimeError("the router's probabilities carry no gradient, so the router would not train: "
                               "reentrant activation checkpointing runs the forward without grad. Use "
                               "model.gradient_checkpointing_enable() (non-reentrant) instead")

    # ----- routing telemetry -----
    def _routing_counts(self, layers, routings, mask) -> dict[str, torch.Tensor]:
        """This forward's slot, set and effective-expert counts for all layers at once
        (`gmoe.telemetry.batch_counts`)."""
        indices = torch.stack([indices for _, indices, _ in routings])
        weights = torch.stack([weights for _, _, weights in routings])
        return telemetry.batch_counts(indices, weights, mask, layers[0].routing_set_digits,
                                      layers[0].routing_sets.shape[0])

    def _count_eval_routing(self, attention_mask) -> None:
        """Inside `measuring_routing`: add an eval forward's routing to the window (local counts)."""
        layers = [m for m in self.gmoe_layers() if m.last_routing is not None]
        if not layers or not self.routing_telemetry:
            return
        routings = [layer.last_routing for layer in layers]
        mask = self._token_mask(attention_mask, routings[0][0], warn=False)
        counts = self._routing_counts(layers, routings, mask)
        counts["routing_mass"] = torch.stack([
            losses.batch_load(probs.gather(1, indices), indices, self.gmoe_config.num_experts, mask)
            for probs, indices, _ in routings])
        telemetry.accumulate(layers, counts, losses.token_count(routings[0][0], mask))

    def routing_stats(self, reset: bool = True) -> telemetry.RoutingStats:
        """Per-layer routing telemetry since the last reset (see `gmoe.telemetry`): slot and
        probability-mass shares, the busiest expert's share, the load's normalised entropy, the
        fraction of tokens on the most common top-K set, idle experts, λ and σ. Training
        forwards always count (summed over data-parallel ranks); eval forwards count inside
        `measuring_routing()`. Reads the device counts (a host synchronisation); `reset` starts
        a new window."""
        layers = self.gmoe_layers()
        stats = telemetry.read_window(layers, self.gmoe_config.top_k)
        if reset:
            telemetry.reset(layers)
        return stats

    @contextlib.contextmanager
    def measuring_routing(self):
        """Within this context eval-mode forwards count in the routing telemetry too (for a report
        on a dataset). It starts a new window; read it with `routing_stats()` inside. Leaving the
        outermost context starts another, so eval counts never join a training window."""
        previous = self._measuring_routing
        telemetry.reset(self.gmoe_layers())
        self._measuring_routing = True
        try:
            yield self
        finally:
            self._measuring_routing = previous
            if not previous:
                telemetry.reset(self.gmoe_layers())

    def expert_load(self) -> torch.Tensor:
        """(num_layers, num_experts) fp32: each layer's running expert load. Gives the deferred
        warning about non-finite router probabilities first (`report_non_finite`)."""
        self.report_non_finite()
        return torch.stack([m.expert_load.detach().clone() for m in self.gmoe_layers()])

    # ----- inference -----
    @property
    def router_cache(self) -> bool:
        """Whether eval forwards reuse each graph router's token-independent terms (expert
        nodes, layer 1's constant, Â) instead of recomputing them per forward; on by default.
        The cache is rebuilt whenever a tensor it depends on changes (`gmoe.router_cache`)."""
        return all(getattr(m.router, "cache_terms", True) for m in self.gmoe_layers())

    @router_cache.setter
    def router_cache(self, enabled: bool) -> None:
        for layer in self.gmoe_layers():
            if hasattr(layer.router, "cache_terms"):
                layer.router.cache_terms = bool(enabled)
                layer.router.term_cache.clear()

    def clear_router_cache(self) -> None:
        """Drop every router's cached terms. Needed only after writing router weights through
        `.data` (which bypasses the version counters the cache watches)."""
        for layer in self.gmoe_layers():
            if hasattr(layer.router, "term_cache"):
                layer.router.term_cache.clear()

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within this context the model computes exactly the base model: every GMoE MLP runs
        its base MLP, every LoRA linear its base linear, and no router loss is added or counted."""
        modules = [m for m in self.base_model.modules() if isinstance(m, (GMoEMLP, LoRALinear))]
        previous = [m.disabled for m in modules]
        self._adapters_disabled = True
        try:
            for m in modules:
                m.disabled = True
            yield
        finally:
            for m, flag in zip(modules, previous):
                m.disabled = flag
            self._adapters_disabled = False

    def merge_attention(self) -> "GMoEModel":
        """Fold every plain LoRA (the attention `target_modules`) into its base linear's weight,
        in place, and remove the LoRA module. The GMoE experts stay: which experts run depends
        on each token, so they have no single weight to merge into. Returns self."""
        merged = False
        for name, module in list(self.base_model.named_modules()):
            if isinstance(module, LoRALinear):
                _set_module(self.base_model, name, module.merged_base())
                merged = True
        if merged:
            mark_merged(self.base_model, self.gmoe_config)
        return self

    def merge_and_unload(self, drop_experts: bool = False) -> nn.Module:
        """PEFT's merge_and_unload, where it can exist: with drop_experts=True, merge the
        attention LoRAs into the base weights and remove the experts, returning the base model."""
        if not drop_experts:
            raise ValueError("GMoE experts cannot be merged into the base MLP: the experts a token uses depend "
                             "on the token. Use merge_attention() to fold only the attention LoRAs into their "
                             "base linears (the experts stay), or merge_and_unload(drop_experts=True) for the base "
                             "model with the attention LoRAs merged and the experts removed")
        self.merge_attention()
        return self.unload()

    # ----- housekeeping -----
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Enable activation checkpointing on the base model, non-reentrant (the default here):
        reentrant checkpointing runs the forward without grad, so the router could not train."""
        ckpt_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if ckpt_kwargs["use_reentrant"]:
            raise ValueError("use_reentrant=True is not supported: it runs the forward without grad, so the "
                             "router loss could not reach the router; leave use_reentrant unset (False)")
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs, **kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """transformers 5 name of gradient_checkpointing_enable."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def unload(self) -> nn.Module:
        """Remove every injected module and return the untouched base model (with the
        requires_grad flags its parameters had before injection)."""
        for name, original in self._injected:
            _set_module(self.base_model, name, original)
        self._injected = []
        for hook in self._padding_hooks:
            hook.remove()
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, param.requires_grad))
        self._unloaded = True
        return self.base_model

    # ----- save / load -----
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable adapter tensors plus the GMoE buffers (expert features, graph, load)."""
        state = {}
        for name, module in self.base_model.named_modules():
            if isinstance(module, GMoEMLP):
                for key, value in module.state_dict().items():
                    if not key.startswith("base_layer."):
                        state[f"{name}.{key}"] = value
            elif isinstance(module, LoRALinear):
                state[f"{name}.lora_A.weight"] = module.lora_A.weight
                state[f"{name}.lora_B.weight"] = module.lora_B.weight
        return {k: v.detach().contiguous() for k, v in state.items()}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write adapter_config.json and adapter_model.safetensors atomically to `path`."""
        self.report_non_finite()  # copying to the host synchronises anyway
        state = {k: v.cpu() for k, v in self.adapter_state_dict().items()}
        with atomic_save_dir(path, [WEIGHTS_NAME, CONFIG_NAME]) as tmp:
            save_file(state, str(Path(tmp, WEIGHTS_NAME)), metadata={"format": "pt", "peft_type": "GMOE"})
            self.gmoe_config.save(tmp)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike, is_trainable: bool = False,
                        backend: str | None = None) -> "GMoEModel":
        """Load an adapter written by save_pretrained onto `model` (the same base model). A model into
        which an adapter's attention LoRAs were merged (`gmoe.io.MERGED_MARK` in its config) is refused: they
        would apply twice."""
        check_not_merged(model, path)
        config = GMoEConfig.load(path)
        config.backend = backend or "auto"  # a runtime choice of this machine, not part of the adapter
        weights = Path(path, WEIGHTS_NAME)
        state = read_safetensors(weights)
        flags = [(p, p.requires_grad) for p in model.parameters()]
        wrapped = cls(model, config, _build_graph=False)
        try:
            wrapped.load_adapter_state_dict(state, source=str(weights))
        except BaseException:  # give the base model back as it came
            wrapped.unload()
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
        for layer in wrapped.gmoe_layers():
            if config.router == "graph":
                warn_if_twins(layer.router.expert_adjacency, f"adapter {path}")
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
        return wrapped

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Copy adapter tensors in, all or nothing: keys, shapes, dtype kinds and finiteness are
        checked first (`gmoe.io.check_adapter_state`), and a copy that still fails half-way (an
        interrupt) puts every adapter tensor back as it was."""
        own = self.adapter_state_dict()
        check_adapter_state(own, state, source)
        targets = dict(self.base_model.named_parameters())
        targets.update(dict(self.base_model.named_buffers()))
        snapshot = {k: v.clone() for k, v in own.items()}
        with torch.no_grad():
            try:
                for key, value in state.items():
                    # reshape: adapters of format version 1 hold λ and σ 0-dim, (1,) since version 2
                    targets[key].copy_(value.reshape(own[key].shape).to(targets[key].dtype))
            except BaseException:
                for key, value in snapshot.items():
                    targets[key].copy_(value)
                raise


def get_gmoe_model(model: nn.Module, config: GMoEConfig) -> GMoEModel:
    """Freeze `model` and inject GMoE into every decoder MLP (and LoRA into target_modules)."""
    if not isinstance(config, GMoEConfig):
        raise TypeError(f"config must be a GMoEConfig, got {type(config).__name__}")
    return GMoEModel(model, config)
