"""Figures a user looks at after a run: training curves, per-task zero-shot AUC, ROC curves and reliability."""

from __future__ import annotations

import json
import os

import matplotlib
import numpy as np
from sklearn import metrics as skm

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


def roc_curves(scores: dict, names: list[str], out_path: str) -> None:
    """scores: {method: (scores [N, T], targets [N, T] with -1 = no label)}; names: the T tasks "anatomy/label".
    One panel per anatomy with the ROC curve of each of its tasks, one line style per method."""
    anatomies = list(dict.fromkeys(n.split("/")[0] for n in names))
    cols = min(4, len(anatomies))
    rows = -(-len(anatomies) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, anatomy in zip(axes.flat, anatomies):
        tasks = [t for t, n in enumerate(names) if n.split("/")[0] == anatomy]
        for j, t in enumerate(tasks):
            for k, (method, (s, y)) in enumerate(scores.items()):
                known = y[:, t] >= 0
                if len(set(y[known, t].tolist())) < 2:
                    continue
                fpr, tpr, _ = skm.roc_curve(y[known, t], s[known, t])
                auc = skm.auc(fpr, tpr)
                ax.plot(fpr, tpr, styles[k % len(styles)], color=f"C{j}", lw=1,
                        label=f"{method} {names[t].split('/', 1)[1]} {auc:.2f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set(title=anatomy, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5, loc="lower right")
    for ax in list(axes.flat)[len(anatomies):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def reliability(bins: dict, out_path: str) -> None:
    """bins: {method: eval_stats.reliability_bins(...)} over all tasks' scores. Share of positives against mean
    score per bin (the diagonal is perfect calibration), and how many scores fall in each bin."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=(3, 1), sharex=True)
    for method, b in bins.items():
        x, y = np.asarray(b["mean_score"], float), np.asarray(b["positive_rate"], float)
        ok = np.isfinite(x)
        ax.plot(x[ok], y[ok], "o-", ms=3, label=f"{method} (ECE {b['ece']:.3f})")
        edges = np.linspace(0, 1, len(b["count"]) + 1)
        ax_n.stairs(b["count"], edges, label=method)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
    ax.set(ylabel="share of positives", title="reliability (all tasks)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    ax_n.set(xlabel="score (P(positive))", ylabel="scores", yscale="log")
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
