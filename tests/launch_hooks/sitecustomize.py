"""Fault injection for the job's multi-process and resume tests, loaded at interpreter start by putting
this folder on PYTHONPATH (Python imports `sitecustomize` by itself). It acts only when asked:
- GMOE_TEST_STEP_SLEEP=S: every training step sleeps S seconds first (so a test can signal or kill a run
  between two checkpoints of a tiny model that otherwise trains in milliseconds);
- GMOE_TEST_FAIL_DATA_RANK=R: preparing the data fails on rank R only (bad data on one node)."""
import os

_SLEEP = float(os.environ.get("GMOE_TEST_STEP_SLEEP", "0") or 0)
_FAIL_RANK = os.environ.get("GMOE_TEST_FAIL_DATA_RANK")

if _SLEEP or _FAIL_RANK is not None:
    import importlib.abc
    import sys

    def _patch(module):
        if module.__name__ == "gmoe.finetune.training" and _SLEEP:
            import time

            original = module.FinetuneTrainer.training_step

            def slow_step(self, *args, **kwargs):
                time.sleep(_SLEEP)
                return original(self, *args, **kwargs)

            module.FinetuneTrainer.training_step = slow_step
        if module.__name__ == "gmoe.finetune.job" and _FAIL_RANK is not None \
                and os.environ.get("RANK", "0") == _FAIL_RANK:
            def bad_data(cfg):
                raise ValueError(f"injected: the training file of rank {_FAIL_RANK} is unreadable")

            module.prepare_data = bad_data

    class _Finder(importlib.abc.MetaPathFinder):
        """Patches the two modules right after they are first imported."""

        def find_spec(self, name, path=None, target=None):
            if name not in ("gmoe.finetune.training", "gmoe.finetune.job"):
                return None
            sys.meta_path.remove(self)
            try:
                import importlib.util

                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            loader = spec.loader
            exec_module = loader.exec_module

            def patched_exec(module):
                exec_module(module)
                _patch(module)

            loader.exec_module = patched_exec
            return spec

    sys.meta_path.insert(0, _Finder())
