"""PNG plots (matplotlib, Agg): loss curves, expert load share per layer over training, and the
comparison bar chart with error bars."""
from __future__ import annotations

import os


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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_load_heatmap(load_history: list[dict], path: str, title: str) -> str | None:
    """Left: share of each expert in each layer's load per logging window (rows: layer, expert;
    columns: window end step). Right: the share over the whole run (layers × experts)."""
    if not load_history:
        return None
    import numpy as np

    plt = _plt()
    loads = np.array([h["load"] for h in load_history], dtype=float)  # [windows, layers, experts]
    share = loads / np.clip(loads.sum(axis=2, keepdims=True), 1e-12, None)
    windows, layers, experts = share.shape
    total = loads.sum(axis=0)
    total_share = total / np.clip(total.sum(axis=1, keepdims=True), 1e-12, None)
    fig, axes = plt.subplots(1, 2, figsize=(12, max(4.0, 0.12 * layers * experts / 2)),
                             gridspec_kw={"width_ratios": [3, 1]})
    image = share.transpose(1, 2, 0).reshape(layers * experts, windows)
    im = axes[0].imshow(image, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                        vmax=max(float(image.max()), 1.0 / experts))
    for layer in range(1, layers):
        axes[0].axhline(layer * experts - 0.5, color="white", lw=0.4)
    step = max(1, layers // 15)
    axes[0].set_yticks([l * experts + (experts - 1) / 2 for l in range(0, layers, step)],
                       [f"layer {l}" for l in range(0, layers, step)], fontsize=7)
    xt = list(range(0, windows, max(1, windows // 10)))
    axes[0].set_xticks(xt, [str(load_history[i]["step"]) for i in xt], fontsize=7)
    axes[0].set(xlabel="step (end of logging window)", title=f"expert load share per layer ({experts} experts each)")
    fig.colorbar(im, ax=axes[0], fraction=0.03)
    im2 = axes[1].imshow(total_share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0)
    axes[1].set_xticks(range(experts))
    axes[1].set_yticks(range(0, layers, step))
    axes[1].set(xlabel="expert", ylabel="layer", title="whole run")
    fig.colorbar(im2, ax=axes[1], fraction=0.08)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
