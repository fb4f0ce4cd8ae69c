"""Faults and bad input on disk: a clear error, nothing lost.

- Our adapter format is safetensors only: no pickle is ever written.
- Pickle inputs (the published code's adapter_model.bin) load with weights_only=True: a
  pickle that would run code is refused, and the code does not run.
- A truncated or tampered adapter file, or a corrupt adapter_config.json, raises a ValueError
  naming the problem, and leaves the model as it was: neither the base model handed to
  from_pretrained nor the adapters of a model being resumed change.
- A crash in the middle of save_pretrained leaves the previous adapter intact.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from gmoe import GMoEConfig, GMoEModel, get_gmoe_model
from gmoe.convert import from_published_gmoe, from_mixlora
from gmoe.trainer import load_checkpoint_adapter
from tests.models import tiny_model
from tests.test_convert import write_published_gmoe, write_mixlora

SMALL = dict(num_experts=4, top_k=2, r=2, lora_alpha=4, gcn_dim=16, edge_density=0.5)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
LORA_A = "model.layers.0.mlp.experts.gate_proj.lora_A"
ADJACENCY = "model.layers.1.mlp.router.expert_adjacency"
LOAD, STD, RATE = ("model.layers.0.mlp.expert_load", "model.layers.0.mlp.router.normal_std",
                   "model.layers.1.mlp.router.poisson_rate")


def _base():
    torch.manual_seed(0)  # the same pretrained base every time
    return tiny_model("llama")


def _trained_adapter(folder):
    """A GMoE model with non-zero adapters and load, saved to `folder`; returns the model."""
    model = get_gmoe_model(_base(), GMoEConfig(**SMALL))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 64, (2, 6))
    model.train()
    model(input_ids=ids, labels=ids)  # advance the running load
    model.save_pretrained(folder)
    return model


def _snapshot(module):
    """Every parameter and buffer (values, requires_grad) and the module types: 'unchanged' means all equal."""
    return ({k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()},
            {n: p.requires_grad for n, p in module.named_parameters()},
            [type(m).__name__ for m in module.modules()])


def _assert_unchanged(module, snapshot):
    tensors, flags, types = _snapshot(module)
    assert types == snapshot[2], "modules were injected or replaced"
    assert flags == snapshot[1], "requires_grad flags changed"
    assert sorted(tensors) == sorted(snapshot[0])
    changed = [k for k in tensors if not torch.equal(tensors[k], snapshot[0][k])]
    assert not changed, f"tensors changed: {changed[:4]}"


# ----------------------------------------------------------------------------- pickles

def test_save_pretrained_writes_safetensors_and_json_only(tmp_path):
    _trained_adapter(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == [CONFIG, WEIGHTS]
    json.loads((tmp_path / "a" / CONFIG).read_text())
    raw = (tmp_path / "a" / WEIGHTS).read_bytes()
    # safetensors: an 8-byte header length, then a JSON header; a pickle starts with 0x80,
    # torch.save's zip with "PK".
    assert raw[8:9] == b"{" and not raw.startswith((b"\x80", b"PK"))
    assert load_file(tmp_path / "a" / WEIGHTS)


class _RunsCode:
    """A pickle payload: unpickling calls open(path, "w"), which creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("fmt", ["gmoe", "mixlora"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, fmt):
    base = _base()
    write, load = (write_published_gmoe, from_published_gmoe) if fmt == "gmoe" else (write_mixlora, from_mixlora)
    _, weights = write(tmp_path / "a", base)
    sentinel = tmp_path / "pwned"
    torch.save({**weights, "payload": _RunsCode(sentinel)}, tmp_path / "a" / "adapter_model.bin")
    before = _snapshot(base)
    with pytest.raises(ValueError, match=r"adapter_model.bin could not be read as a dict of tensors .*Weights only"):
        load(base, tmp_path / "a")
    assert not sentinel.exists(), "unpickling ran the payload"
    _assert_unchanged(base, before)
    # The payload is live: a plain (unsafe) torch.load does run it.
    torch.load(tmp_path / "a" / "adapter_model.bin", weights_only=False)
    assert sentinel.exists()


# ----------------------------------------------------------------------------- tampered weights

def _edit_header(path, edit):
    """Rewrite the JSON header of a safetensors file with `edit(header)`, keeping the data bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format allows space padding; keep the data 8-aligned
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size:])


def _set(header, key, **fields):
    header[key].update(fields)


def _resave(path, change):
    state = load_file(path)
    change(state)
    save_file({k: v.contiguous() for k, v in state.items()}, path)


TAMPERED = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "corrupt or not a safetensors"),
    "header-not-json": (lambda p: p.write_bytes(p.read_bytes().replace(b'"dtype"', b'"dtyp\x00', 1)),
                        "corrupt or not a safetensors"),
    "header-length": (lambda p: p.write_bytes((10 ** 9).to_bytes(8, "little") + p.read_bytes()[8:]),
                      "corrupt or not a safetensors"),
    "header-offsets": (lambda p: _edit_header(p, lambda h: _set(h, LORA_A, data_offsets=[0, 8])),
                       "corrupt or not a safetensors"),
    # Consistent edits that safetensors itself cannot notice:
    "header-dtype": (lambda p: _edit_header(p, lambda h: _set(h, LORA_A, dtype="I32")),
                     rf"{LORA_A} has dtype torch.int32 but this model expects torch.float32"),
    "header-bool-as-u8": (lambda p: _edit_header(p, lambda h: _set(h, ADJACENCY, dtype="U8")),
                          rf"{ADJACENCY} has dtype torch.uint8 but this model expects torch.bool"),
    "header-shape": (lambda p: _edit_header(p, lambda h: _set(h, LORA_A, shape=h[LORA_A]["shape"][::-1])),
                     rf"{LORA_A} has shape \(32, 2, 4\) but this model expects \(4, 2, 32\)"),
    "wrong-shape": (lambda p: _resave(p, lambda s: s.update({LORA_A: s[LORA_A][:, :1]})),
                    rf"{LORA_A} has shape \(4, 1, 32\)"),
    "wrong-dtype": (lambda p: _resave(p, lambda s: s.update({LORA_A: s[LORA_A].long()})),
                    rf"{LORA_A} has dtype torch.int64"),
    "renamed-key": (lambda p: _resave(p, lambda s: s.update({LORA_A + "_": s.pop(LORA_A)})),
                    rf"missing keys \['{LORA_A}'\], unexpected keys \['{LORA_A}_'\]"),
    "missing-key": (lambda p: _resave(p, lambda s: s.pop(LORA_A)), rf"missing keys \['{LORA_A}'\]"),
    "extra-key": (lambda p: _resave(p, lambda s: s.update(extra=torch.zeros(1))), r"unexpected keys \['extra'\]"),
    "nan": (lambda p: _resave(p, lambda s: s[LORA_A].view(-1).__setitem__(3, float("nan"))),
            rf"{LORA_A} holds NaN or infinite values"),
    # Finite values that load fine and make the next step's losses inf or NaN:
    "negative-load": (lambda p: _resave(p, lambda s: s[LOAD].__setitem__(0, -1e30)),
                      rf"{LOAD} holds negative expert loads"),
    "asymmetric-graph": (lambda p: _resave(p, lambda s: s[ADJACENCY].__setitem__((0, 1), ~s[ADJACENCY][1, 0])),
                         rf"{ADJACENCY} is not a symmetric"),
    "self-edge": (lambda p: _resave(p, lambda s: s[ADJACENCY].__setitem__((2, 2), True)),
                  rf"{ADJACENCY} has self-edges"),
    "negative-std": (lambda p: _resave(p, lambda s: s[STD].fill_(-1.0)), rf"{STD} is -1, but it must be > 0"),
    "zero-rate": (lambda p: _resave(p, lambda s: s[RATE].fill_(0.0)), rf"{RATE} is 0, but it must be > 0"),
}
@pytest.mark.parametrize("case", list(TAMPERED))
def test_from_pretrained_of_a_tampered_file_fails_and_leaves_the_base_untouched(tmp_path, case):
    tamper, pattern = TAMPERED[case]
    _trained_adapter(tmp_path / "a")
    tamper(tmp_path / "a" / WEIGHTS)
    base = _base()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=pattern):
        GMoEModel.from_pretrained(base, tmp_path / "a")
    _assert_unchanged(base, before)


@pytest.mark.parametrize("case", list(TAMPERED))
def test_resuming_from_a_tampered_checkpoint_fails_and_keeps_the_adapters(tmp_path, case):
    tamper, pattern = TAMPERED[case]
    model = _trained_adapter(tmp_path / "a")
    tamper(tmp_path / "a" / WEIGHTS)
    with torch.no_grad():  # the model has moved on since the checkpoint
        model.gmoe_layers()[0].experts["gate_proj"].lora_B.add_(1.0)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint_adapter(model, tmp_path / "a")
    _assert_unchanged(model, before)


def test_a_failure_half_way_through_the_copy_restores_the_adapters(tmp_path, monkeypatch):
    model = _trained_adapter(tmp_path / "a")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(2.0)
    before = _snapshot(model)
    real_copy, calls = torch.Tensor.copy_, []

    def copy_then_fail(self, src, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # four adapter tensors already overwritten
            raise KeyboardInterrupt("interrupted")
        return real_copy(self, src, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "copy_", copy_then_fail)
    with pytest.raises(KeyboardInterrupt):
        load_checkpoint_adapter(model, tmp_path / "a")
    monkeypatch.undo()
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------- corrupt config

CORRUPT_CONFIGS = {
    "not-json": (lambda c: "{not json", "not valid JSON"),
    "binary": (lambda c: "\udcff", "not valid JSON"),
    "not-an-object": (lambda c: json.dumps([c]), "must hold a JSON object, got list"),
    "no-peft-type": (lambda c: json.dumps({k: v for k, v in c.items() if k != "peft_type"}), "not a GMoE adapter"),
    "bad-value": (lambda c: json.dumps({**c, "num_experts": 0}), r"GMoEConfig.num_experts=0"),
    "bad-type": (lambda c: json.dumps({**c, "top_k": "2"}), r"GMoEConfig.top_k='2'"),
    "null-list": (lambda c: json.dumps({**c, "target_modules": None}), r"GMoEConfig.target_modules=None"),
    "unknown-field": (lambda c: json.dumps({**c, "num_expert": 4}), r"unknown fields \['num_expert'\]"),
    "other-version": (lambda c: json.dumps({**c, "format_version": 4}), "format_version=4 is not supported"),
    "other-shapes": (lambda c: json.dumps({**c, "r": 4}), r"lora_A.* has shape .* but this model expects"),
}


@pytest.mark.parametrize("case", list(CORRUPT_CONFIGS))
def test_from_pretrained_of_a_corrupt_config_fails_and_leaves_the_base_untouched(tmp_path, case):
    corrupt, pattern = CORRUPT_CONFIGS[case]
    _trained_adapter(tmp_path / "a")
    config = json.loads((tmp_path / "a" / CONFIG).read_text())
    (tmp_path / "a" / CONFIG).write_text(corrupt(config), errors="surrogateescape")
    base = _base()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=pattern):
        GMoEModel.from_pretrained(base, tmp_path / "a")
    _assert_unchanged(base, before)


# ----------------------------------------------------------------------------- interrupted save

@pytest.mark.parametrize("where", ["weights", "config", "first-rename"])
def test_a_crash_during_save_keeps_the_previous_adapter(tmp_path, monkeypatch, where):
    model = _trained_adapter(tmp_path / "a")
    saved = {name: (tmp_path / "a" / name).read_bytes() for name in (WEIGHTS, CONFIG)}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def crash(*args, **kwargs):
        raise OSError("No space left on device")

    if where == "weights":
        monkeypatch.setattr("gmoe.model.save_file", crash)
    elif where == "config":
        monkeypatch.setattr(GMoEConfig, "save", crash)
    else:
        monkeypatch.setattr("gmoe.io.os.replace", crash)
    with pytest.raises(OSError, match="No space left"):
        model.save_pretrained(tmp_path / "a")
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "a")) == [CONFIG, WEIGHTS]  # no temporary folder left behind
    assert {name: (tmp_path / "a" / name).read_bytes() for name in saved} == saved
    GMoEModel.from_pretrained(_base(), tmp_path / "a")  # and it still loads


def test_a_crash_during_a_first_save_leaves_no_adapter(tmp_path, monkeypatch):
    model = get_gmoe_model(_base(), GMoEConfig(**SMALL))
    monkeypatch.setattr(GMoEConfig, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path / "a")
    assert os.listdir(tmp_path / "a") == []  # nothing a loader could mistake for an adapter
