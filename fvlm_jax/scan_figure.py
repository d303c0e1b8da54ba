"""The picture of one predicted scan: axial and coronal slices of the model input with each anatomy's outline, and
the top findings of each scored anatomy beside them (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

TOP_FINDINGS = 3


def best_slice(labels: np.ndarray, axis: int, ids: Sequence[int]) -> int:
    """Index along `axis` of the slice showing the most of the anatomies `ids` (then the most of their voxels);
    the middle slice when none is there."""
    if not len(ids):
        return labels.shape[axis] // 2
    other = tuple(a for a in range(3) if a != axis)
    hit = np.stack([(labels == i).sum(axis=other) for i in ids])  # [len(ids), n]
    key = (hit > 0).sum(0) * labels.size + hit.sum(0)
    return int(np.argmax(key)) if key.max() > 0 else labels.shape[axis] // 2


def render(path: str, image: np.ndarray, labels: np.ndarray, spacing_xyz: Sequence[float], anatomies: Sequence[str],
           status: Mapping[str, str], findings: Mapping[str, Sequence[tuple[str, float]]], title: str) -> None:
    """Writes a PNG to `path`.

    image uint8 [Z, Y, X] (the model input: canonical RAS, HU window mapped to 0..255), labels [Z, Y, X] (a + 1 =
    anatomies[a]); status: anatomy -> "scored" or why it is not; findings: scored anatomy -> [(label, P)], highest
    first. Slices are shown in radiological convention (patient's right on the image's left, anterior / superior at
    the top), with each present anatomy's outline: solid where scored, dashed where not.
    """
    sx, sy, sz = (float(s) for s in spacing_xyz)
    present = [(a, name) for a, name in enumerate(anatomies) if (labels == a + 1).any()]
    scored_ids = [a + 1 for a, name in present if status[name] == "scored"] or [a + 1 for a, _ in present]
    z = best_slice(labels, 0, scored_ids)
    y = best_slice(labels, 1, scored_ids)
    views = [("axial", image[z, ::-1, ::-1], labels[z, ::-1, ::-1], sy / sx, f"axial, slice {z}"),
             ("coronal", image[::-1, y, ::-1], labels[::-1, y, ::-1], sz / sx, f"coronal, slice {y}")]
    colors = [f"C{i % 10}" for i in range(len(anatomies))]
    fig = Figure(figsize=(13, 5.2), dpi=100)
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 1.15])
    for col, (_, img, lab, aspect, label) in enumerate(views):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(img, cmap="gray", vmin=0, vmax=255, aspect=aspect, interpolation="nearest")
        for a, name in present:
            mask = lab == a + 1
            if mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[colors[a]], linewidths=1.4,
                           linestyles="solid" if status[name] == "scored" else "dashed")
        ax.set_title(label, fontsize=10)
        ax.text(0.02, 0.5, "R", color="yellow", transform=ax.transAxes, fontsize=9, va="center")
        ax.text(0.98, 0.5, "L", color="yellow", transform=ax.transAxes, fontsize=9, va="center", ha="right")
        ax.set_xticks([])
        ax.set_yticks([])
    if present:
        handles = [Line2D([], [], color=colors[a], ls="-" if status[n] == "scored" else "--", label=n)
                   for a, n in present]
        fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.05, 0.02), ncol=min(len(handles), 7),
                   fontsize=8, frameon=False)
    ax = fig.add_subplot(grid[0, 2])
    ax.axis("off")
    lines = []
    scored = [n for n in anatomies if status[n] == "scored"]
    if not scored:
        lines += ["NO SCORED ANATOMY", ""]
    for name in scored:
        top = ", ".join(f"{label} {p:.2f}" for label, p in list(findings.get(name, ()))[:TOP_FINDINGS])
        lines.append(f"{name}: {top or 'no task'}")
    for name in anatomies:
        if status[name] != "scored":
            lines.append(f"{name}: {status[name]} - not scored")
    lines += ["", "Zero-shot P(positive) per finding (top 3 per anatomy);", "uncalibrated research output,",
              "not a diagnosis. Dashed outline: not scored."]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=9, family="monospace", wrap=True,
            transform=ax.transAxes)
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, format="png")
