"""Figures a user looks at after a run: training curves and per-task zero-shot AUC of each method."""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; training hosts have no display
import matplotlib.pyplot as plt  # noqa: E402


def _read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def training_curves(metrics_paths: dict[str, str], out_path: str) -> None:
    """metrics_paths: {method: metrics.jsonl}. Plots loss and learning rate against step."""
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    for method, path in metrics_paths.items():
        if not os.path.exists(path):
            continue
        rows = _read_metrics(path)
        steps = [r["step"] for r in rows]
        ax_loss.plot(steps, [r["loss"] for r in rows], label=method, lw=0.8)
        ax_lr.plot(steps, [r["learning_rate"] for r in rows], label=method)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def auc_bars(summary: dict, out_path: str) -> None:
    """summary: {method: {"mean_auc", "per_task": {task: auc}}} as in summary.json."""
    methods = list(summary)
    tasks = list(summary[methods[0]]["per_task"])
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(tasks)), 4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        vals = [summary[m]["per_task"][t] or 0.0 for t in tasks]
        ax.bar([j + i * width for j in range(len(tasks))], vals, width,
               label=f"{m} (mean {summary[m]['mean_auc']:.3f})")
    ax.axhline(0.5, color="grey", lw=0.5, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="zero-shot AUC", ylim=(0, 1))
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
