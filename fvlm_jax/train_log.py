"""What training writes as it runs: metrics.jsonl rows, one console line per log interval, TensorBoard scalars."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from input_pipeline.import_guard import unimportable


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop lines logged after the checkpoint we resume from (and a line cut short by a kill), so a resumed log
    has each step exactly once."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError):
                continue
    with open(path + ".tmp", "w") as f:  # replaced in one step: a kill here leaves the old log whole
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def tensorboard_writer(train_dir: str, start: int):
    """A TensorBoard event writer in <train_dir>/tensorboard (tensorboardX: no TensorFlow in training).

    It marks a restart at step start + 1, so TensorBoard drops the events of earlier runs from that step on (those
    logged after the checkpoint this run resumes from, or a whole earlier run): each step shows once, as in
    metrics.jsonl."""
    return summary_writer_class()(os.path.join(train_dir, "tensorboard"), flush_secs=30, purge_step=start + 1)


def summary_writer_class():
    """tensorboardX's SummaryWriter, imported without PyTorch.

    tensorboardX's writer module imports torch whenever it is installed, only to accept torch tensors as values;
    training logs Python floats. That import cost 2 CPU-s in every training process of a machine with torch (the
    tests' machines have it). While tensorboardX loads, torch is marked unimportable, unless it is loaded already;
    the mark is removed afterwards, so a later `import torch` works as usual."""
    with unimportable("torch"):  # tensorboardX expects the ImportError where torch is not installed
        from tensorboardX import SummaryWriter
    return SummaryWriter


PEER_METRICS = ("peer_loss", "peer_grad_norm", "peer_param_norm", "peer_temperature", "coteach_alpha")


def metrics_row(step: int, metrics: dict, learning_rate: float, anatomies) -> dict:
    """One metrics.jsonl row from a step's fetched metrics. A co-teaching step's row also has the peer's loss, norms
    and temperature and the step's mixing weight (PEER_METRICS); `loss` and the rest are model A's."""
    row = {"step": step, "loss": float(metrics["loss"]), "learning_rate": learning_rate,
           "grad_norm": float(metrics["grad_norm"]), "param_norm": float(metrics["param_norm"]),
           "temperature": float(metrics["temperature"])}
    row.update({f"loss/{a}": float(v) for a, v in zip(anatomies, metrics["per_anatomy"])})
    row.update({k: float(metrics[k]) for k in PEER_METRICS if k in metrics})
    return row


def console_line(method: str, row: dict, total: int, rate: float, batch_size: int, anatomies) -> str:
    """One readable line per log interval: step, loss, per-anatomy losses, learning rate, volumes/s, ETA."""
    eta = (total - row["step"]) * batch_size / rate if rate > 0 else float("nan")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
    parts = " ".join(f"{a} {row[f'loss/{a}']:.3f}" for a in anatomies if f"loss/{a}" in row)
    return (f"{method} step {row['step']}/{total}  loss {row['loss']:.4f}" + (f" ({parts})" if parts else "")
            + (f"  peer loss {row['peer_loss']:.4f} (alpha {row['coteach_alpha']:.2f})" if "peer_loss" in row else "")
            + f"  lr {row['learning_rate']:.2e}  {rate:.1f} vol/s  ETA {eta_s}")


def tensorboard_scalars(tb, row: dict, rate: float) -> None:
    step = row["step"]
    for k, v in row.items():
        if k != "step":
            tb.add_scalar(k, v, step)
    if np.isfinite(rate):
        tb.add_scalar("volumes_per_s", rate, step)
    tb.flush()
