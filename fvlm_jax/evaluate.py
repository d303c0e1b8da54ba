"""Zero-shot classification: per anatomy, a negative/positive prompt pair, softmax score; AUC and CT-CLIP metrics.

Protocol: the score of a task is softmax([s_neg, s_pos] / temperature)[pos] with s = image-anatomy embedding .
prompt embedding. Per-task decision thresholds (closest ROC point to (0, 1)) are chosen on `data.threshold_split`
and applied to `data.eval_split`; with two different splits nothing is tuned on the reported numbers (the demo).
CT-RATE has no third split, so configs/ct_rate.py uses the reported split for both, as CT-CLIP does (AUC is
threshold-free either way).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn import metrics as skm

from fvlm_jax import sharding
from fvlm_jax.models.fvlm import FVLM


def image_encoder(model: FVLM, mesh: jax.sharding.Mesh | None = None, rules=None):
    """A jitted fn(image uint8 [B, Z, Y, X], labels [B, Z, Y, X]) -> (emb [B, A, E], present, intact).

    With a mesh (and the sharding rules), the batch is split over the mesh's batch axes like in training, so
    evaluation uses every device; every process must then pass the same whole batch.
    """
    graphdef, state = nnx.split(model)

    def encode(state, image, labels):
        with sharding.axis_rules(rules or sharding.DEFAULT_RULES):
            return nnx.merge(graphdef, state).encode_image(image.astype(jnp.float32) / 255.0, labels)

    if mesh is None:
        enc = jax.jit(encode)
        return lambda image, labels: enc(state, image, labels)
    # Replicated outputs: every process can read the embeddings back, also when the mesh spans several hosts.
    enc = jax.jit(encode, out_shardings=NamedSharding(mesh, P()))
    spec = sharding.logical_to_spec(("batch",), rules or sharding.DEFAULT_RULES)
    shards = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(spec))]))

    def run(image, labels):
        put = NamedSharding(mesh, spec if image.shape[0] % shards == 0 else P())
        with jax.set_mesh(mesh):
            return enc(state, jax.device_put(image, put), jax.device_put(labels, put))

    return run


def encode_images(model: FVLM, batches: Iterable[dict], mesh: jax.sharding.Mesh | None = None,
                  rules=None) -> dict:
    """Embeds every scan: returns {"emb": [N, A, E], "targets": [N, C], "ids": [N]} (padding rows dropped)."""
    enc = image_encoder(model, mesh, rules)
    embs, targets, ids = [], [], []
    for b in batches:
        keep = b["mask"]
        embs.append(np.asarray(enc(b["image"], b["labels"])[0])[keep])
        targets.append(b["targets"][keep])
        ids.extend(i.decode() if isinstance(i, bytes) else str(i) for i in b["id"][keep])
    return {"emb": np.concatenate(embs), "targets": np.concatenate(targets), "ids": ids}


def prompt_embeddings(model: FVLM, tokens: np.ndarray) -> np.ndarray:
    """tokens [T, 2, L] (negative, positive prompt per task) -> [T, 2, E]."""
    return np.asarray(jax.jit(lambda t: model.encode_text(t))(tokens))


def task_scores(img_emb: np.ndarray, prompt_emb: np.ndarray, anatomy_index: Sequence[int],
                temperature: float) -> np.ndarray:
    """img_emb [N, A, E], prompt_emb [T, 2, E], anatomy_index[t] (0 for a global-pool model) -> P(positive) [N, T]."""
    img = img_emb[:, np.asarray(anatomy_index)]  # [N, T, E]
    logits = np.einsum("nte,tke->ntk", img, prompt_emb) / temperature
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p[..., 1] / p.sum(-1)


def roc_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """Threshold of the ROC point closest to (FPR 0, TPR 1)."""
    fpr, tpr, thr = skm.roc_curve(y, score)
    best = np.argmin(fpr**2 + (1 - tpr) ** 2)
    return float(min(thr[best], 1.0))


def threshold_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict:
    pred = (score >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {"accuracy": float(skm.accuracy_score(y, pred)),
            "sensitivity": float(tp / max(tp + fn, 1)), "specificity": float(tn / max(tn + fp, 1)),
            "precision": float(skm.precision_score(y, pred, zero_division=0)),
            "f1_weighted": float(skm.f1_score(y, pred, average="weighted", zero_division=0))}


def zero_shot_report(scores: np.ndarray, targets: np.ndarray, task_names: Sequence[str],
                     threshold_scores: np.ndarray | None = None, threshold_targets: np.ndarray | None = None) -> dict:
    """AUC per task and macro mean; with a threshold split, also the thresholded metrics macro-averaged.

    scores/targets: [N, T]; a target of -1 means "no label" and leaves that scan out of that task. Tasks whose
    labelled targets are all one class get no AUC (reported as null).
    """
    per_task, thresholded = {}, {}
    for t, name in enumerate(task_names):
        known = targets[:, t] >= 0
        y, s = targets[known, t], scores[known, t]
        if len(y) == 0 or y.min() == y.max():
            per_task[name] = None
            continue
        per_task[name] = float(skm.roc_auc_score(y, s))
        if threshold_scores is not None:
            tk = threshold_targets[:, t] >= 0
            ty, ts = threshold_targets[tk, t], threshold_scores[tk, t]
            if 0 < ty.sum() < len(ty):
                thr = roc_threshold(ty, ts)
                thresholded[name] = threshold_metrics(y, s, thr) | {"threshold": thr}
    aucs = [v for v in per_task.values() if v is not None]
    out = {"mean_auc": float(np.mean(aucs)) if aucs else float("nan"), "per_task": per_task,
           "num_scans": int(len(scores)),
           "positives": {n: int((targets[:, t] == 1).sum()) for t, n in enumerate(task_names)},
           "unlabelled": {n: int((targets[:, t] < 0).sum()) for t, n in enumerate(task_names)}}
    if thresholded:
        out["thresholded"] = thresholded
        out["macro"] = {k: float(np.mean([m[k] for m in thresholded.values()]))
                        for k in ("accuracy", "sensitivity", "specificity", "precision", "f1_weighted")}
    return out
