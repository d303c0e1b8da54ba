"""Where things live in a workdir, and reading what preparation left there. Standard library only.

  raw/        the generated demo data set (data.source = "demo")
  records/    prepared TFRecords (tfds folder), tokenizer.model (or a BERT's tokenizer.json), manifest.json,
              stats.json, rejects.jsonl
  train/      fVLM checkpoints/, metrics.jsonl and tensorboard/ (event files, with train.tensorboard)
  clip/train/ the whole-volume CLIP baseline, same layout
  eval/       <method>.json zero-shot results, scores_<method>_<split>.csv, report.md, roc.png, reliability.png,
              auc.png, training.png;  summary.json at the top
  export/<method>/  self-contained inference folders (fvlm_jax.export.Predictor)
"""

from __future__ import annotations

import json
import os


def train_dir(workdir: str, method: str) -> str:
    return os.path.join(workdir, "train") if method == "fvlm" else os.path.join(workdir, method, "train")


def records_dir(workdir: str) -> str:
    return os.path.join(workdir, "records")


def manifest_path(workdir: str) -> str:
    return os.path.join(records_dir(workdir), "manifest.json")


def is_prepared(workdir: str) -> bool:
    """Whether `--mode=prepare` finished in this workdir (it writes the manifest last)."""
    return os.path.exists(manifest_path(workdir))


def load_manifest(workdir: str) -> dict:
    path = manifest_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run --mode=prepare first")
    with open(path) as f:
        return json.load(f)


def read_json(path: str):
    """The parsed JSON file, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_stats(workdir: str) -> dict | None:
    """records/stats.json (written by --mode=prepare), or None."""
    return read_json(os.path.join(records_dir(workdir), "stats.json"))
