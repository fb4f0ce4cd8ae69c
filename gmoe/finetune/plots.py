"""PNG plots (matplotlib, Agg): loss curves, routing telemetry over training, and the comparison
bar chart with error bars."""
from __future__ import annotations

import os


def _save(fig, path: str) -> None:
    """The PNG written atomically (report.write_bytes): a crash never leaves half an image."""
    import io

    from .report import write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes(path, buf.getvalue())


def _finish(plt, fig, title: str, path: str, top: float) -> str:
    """The figure titled (the panels end at `top`), written to `path` and closed."""
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, top))
    _save(fig, path)
    plt.close(fig)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(log_history: list[dict], path: str, title: str) -> str:
    """Task loss and router loss against the optimizer step."""
    plt = _plt()
    rows = [r for r in log_history if "task_loss" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["task_loss"] for r in rows], marker="o", ms=3)
    axes[0].set(title="task loss (gold continuation tokens)", xlabel="step", ylabel="cross-entropy")
    axes[1].plot(steps, [r["router_loss"] for r in rows], marker="o", ms=3, color="tab:orange")
    axes[1].set(title="router loss", xlabel="step")
    return _finish(plt, fig, title, path, top=0.96)


ROUTING_PANELS = (("busiest_share", "busiest expert's share of slots"),
                  ("load_entropy", "normalised entropy of the load"),
                  ("top_set_fraction", "tokens on the most common top-K set"),
                  ("normal_std", "σ (Normal loss std)"),
                  ("effective_experts", "effective experts per token, 1/Σ w²"))


def routing_over_training(routing_history: list[dict], path: str, title: str) -> str | None:
    """Five panels over the training steps: the busiest expert's share, the load's normalised
    entropy, the fraction of tokens on the layer's most common top-K set, σ and the effective number
    of experts per token (absent from records written before it was counted). Each shows the
    mean over layers (line) and the range over layers (band); the balanced value is dotted."""
    if not routing_history:
        return None
    plt = _plt()
    steps = [h["step"] for h in routing_history]
    num_experts = routing_history[0]["num_experts"]
    fig, axes = plt.subplots(1, len(ROUTING_PANELS), figsize=(4.2 * len(ROUTING_PANELS), 3.4))
    for ax, (field, label) in zip(axes, ROUTING_PANELS):
        per_layer = [[layer.get(field) for layer in h["layers"]] for h in routing_history]
        if any(v is None for row in per_layer for v in row):
            ax.set(title=label)
            ax.text(0.5, 0.5, "not in this router", ha="center", va="center", transform=ax.transAxes)
            continue
        mean = [sum(row) / len(row) for row in per_layer]
        ax.fill_between(steps, [min(r) for r in per_layer], [max(r) for r in per_layer], alpha=0.25,
                        label="range over layers")
        ax.plot(steps, mean, marker="o", ms=3, label="mean over layers")
        balanced = {"busiest_share": 1.0 / num_experts, "load_entropy": 1.0,
                    "effective_experts": routing_history[0].get("top_k")}.get(field)
        if balanced is not None:
            ax.axhline(balanced, color="k", ls=":", lw=1, label="balanced")
        ax.set(title=label, xlabel="step")
    axes[0].legend(fontsize=7)
    return _finish(plt, fig, title, path, top=0.94)


def routing_by_method(histories: dict[str, list[dict]], path: str, title: str) -> str | None:
    """The busiest expert's share and the fraction of tokens on the most common top-K set over the
    training steps, one line per method (mean over layers; balanced share dotted): several runs'
    `routing_history` on one figure."""
    histories = {m: h for m, h in histories.items() if h}
    if not histories:
        return None
    plt = _plt()
    fields = ROUTING_PANELS[0], ROUTING_PANELS[2]
    fig, axes = plt.subplots(1, len(fields), figsize=(5.2 * len(fields), 3.6))
    for ax, (field, label) in zip(axes, fields):
        for method, history in histories.items():
            steps = [h["step"] for h in history]
            ax.plot(steps, [h["summary"][field] for h in history], marker="o", ms=2.5, label=method)
        if field == "busiest_share":
            ax.axhline(1.0 / next(iter(histories.values()))[0]["num_experts"], color="k", ls=":", lw=1,
                       label="balanced")
        ax.set(title=label + " (mean over layers)", xlabel="step", ylim=(0, 1))
    axes[0].legend(fontsize=7)
    return _finish(plt, fig, title, path, top=0.94)


def comparison_bars(rows: list[dict], path: str, title: str, metric: str = "acc") -> str:
    """One bar per method: mean over seeds with a ± std error bar; the seeds as dots."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.8))
    names = [r["method"] for r in rows]
    means = [r[f"{metric}_mean"] for r in rows]
    stds = [r[f"{metric}_std"] or 0.0 for r in rows]
    ax.bar(range(len(rows)), means, yerr=stds, capsize=4, color=["0.6" if n == "zero-shot" else "tab:blue"
                                                                  for n in names])
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r[f"{metric}_values"]), r[f"{metric}_values"], color="k", s=8, zorder=3)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set(ylabel=metric, title=title)
    low = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(m + s for m, s in zip(means, stds)) + 0.05))
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _save(fig, path)
    plt.close(fig)
    return path
