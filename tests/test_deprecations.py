"""Renamed names still work for one release, and say so (DeprecationWarning)."""
import importlib
import sys

import pytest

import gmoe.convert
import gmoe_kernels.naive
import gmoe_kernels.reference


def test_from_gmoe_reference_warns_and_loads_as_from_published_gmoe(monkeypatch):
    calls = []
    monkeypatch.setattr(gmoe.convert.published, "from_published_gmoe",
                        lambda *args: calls.append(args) or "model")
    with pytest.warns(DeprecationWarning, match="from_published_gmoe"):
        assert gmoe.convert.from_gmoe_reference("hf_model", "path", "reference") == "model"
    assert calls == [("hf_model", "path", "reference")]


@pytest.mark.parametrize("name", ["expert_ffn_loop", "graph_router_loop"])
def test_loops_under_reference_warn_and_are_the_naive_ones(name):
    with pytest.warns(DeprecationWarning, match="gmoe_kernels.naive"):
        assert getattr(gmoe_kernels.reference, name) is getattr(gmoe_kernels.naive, name)


@pytest.mark.parametrize("old, new, names", [
    ("gmoe_kernels.reference.loop", "gmoe_kernels.naive", ["expert_ffn_loop", "graph_router_loop"]),
    ("gmoe_kernels.reference.expert_ffn", "gmoe_kernels.reference.expert_mix",
     ["expert_mix", "expert_mix_forward", "expert_mix_backward"]),
    ("gmoe_kernels.triton.expert_ffn", "gmoe_kernels.triton.expert_mix",
     ["expert_mix", "expert_mix_forward", "expert_mix_backward"]),
])
def test_old_module_paths_warn_and_reexport(old, new, names, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.import_module(old)
    target = importlib.import_module(new)
    for name in names:
        assert getattr(module, name) is getattr(target, name)


@pytest.mark.parametrize("module, name, op", [
    ("gmoe_kernels.triton", "ExpertMixFunction", "expert_mix"),
    ("gmoe_kernels.triton.expert_ffn", "ExpertMixFunction", "expert_mix"),
    ("gmoe_kernels.triton.graph_router", "GraphRouterGCN", "graph_router_gcn"),
])
def test_removed_autograd_functions_apply_the_registered_op(module, name, op, monkeypatch):
    calls = []
    function = getattr(importlib.import_module(module), name)
    monkeypatch.setattr(function, "_op", lambda *args: calls.append(args) or "out")
    with pytest.warns(DeprecationWarning, match=f"torch.ops.gmoe_kernels.{op}"):
        assert function.apply(1, 2) == "out"
    assert calls == [(1, 2)]
