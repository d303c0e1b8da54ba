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
from tqdm.auto import tqdm

from fvlm_jax import augment, sharding
from fvlm_jax.models.fvlm import FVLM
from fvlm_jax.prefetch import prefetch


class ImageEncoder:
    """Embeds CT volumes with a model's image tower: call it with host arrays (image uint8 [B, Z, Y, X], labels
    [B, Z, Y, X]) to get device arrays (emb [B, A, E], present [B, A], intact [B, A]). With `label_shift` [B] the
    labels are the packed window of `input_pipeline.tfdata.center_window` (uint8 [B, Z, Y, W]), unpacked on the
    device (`augment.unpack_window`): half the bytes to copy, and no unpacking on the host.

    The call is two parts that can run in different threads: `put` copies a batch to the devices, `encode` runs the
    jitted encoder on the copy (asynchronously, as JAX dispatches). With a mesh (and the sharding rules), the batch
    is split over the mesh's batch axes as in training, so evaluation uses every device; every process must then
    pass the same whole batch, and the outputs are replicated so that every process can read them back.
    """

    def __init__(self, model: FVLM, mesh: jax.sharding.Mesh | None = None, rules=None):
        graphdef, self._state = nnx.split(model)
        rules = rules or sharding.DEFAULT_RULES

        def encode(state, image, labels, label_shift):
            if label_shift is not None:
                labels = augment.unpack_window(labels, image.shape[-1], label_shift)
            with sharding.axis_rules(rules):
                return nnx.merge(graphdef, state).encode_image(image.astype(jnp.float32) / 255.0, labels)

        self.mesh = mesh
        if mesh is None:
            self._enc = jax.jit(encode)
            return
        self._enc = jax.jit(encode, out_shardings=NamedSharding(mesh, P()))
        self._spec = sharding.logical_to_spec(("batch",), rules)
        self._shards = int(np.prod([mesh.shape[a] for a in jax.tree.leaves(tuple(self._spec))]))

    def put(self, image: np.ndarray, labels: np.ndarray, label_shift: np.ndarray | None = None) -> tuple:
        """(image, labels, label_shift) on the devices (label_shift stays None for unpacked labels)."""
        arrays = (image, labels, label_shift)
        if self.mesh is None:
            return jax.device_put(arrays)
        # A batch that does not split evenly over the batch shards (a short last batch) is replicated instead.
        put = NamedSharding(self.mesh, self._spec if image.shape[0] % self._shards == 0 else P())
        return jax.device_put(arrays, put)

    def encode(self, image: jax.Array, labels: jax.Array, label_shift: jax.Array | None = None):
        if self.mesh is None:
            return self._enc(self._state, image, labels, label_shift)
        with jax.set_mesh(self.mesh):
            return self._enc(self._state, image, labels, label_shift)

    def __call__(self, image, labels, label_shift=None):
        return self.encode(*self.put(image, labels, label_shift))


def image_encoder(model: FVLM, mesh: jax.sharding.Mesh | None = None, rules=None) -> ImageEncoder:
    """fn(image uint8 [B, Z, Y, X], labels [B, Z, Y, X]) -> (emb [B, A, E], present, intact); see ImageEncoder."""
    return ImageEncoder(model, mesh, rules)


def encode_images(model: FVLM | ImageEncoder, batches: Iterable[dict], mesh: jax.sharding.Mesh | None = None,
                  rules=None, *, ahead: int = 2, desc: str | None = None) -> dict:
    """Embeds every scan: returns {"emb": [N, A, E], "targets": [N, C], "ids": [N]} (padding rows dropped).

    Pipelined like the training loop: a background thread copies `ahead` batches to the devices ahead of the
    encoder (0: copy in the loop), and batch k+1 is dispatched before batch k's embeddings are read back. `desc`
    shows a progress bar (scans) with that label on process 0. Pass an ImageEncoder (its mesh and rules are then
    its own) to reuse its compiled function across calls; a model gets a new one, compiled on the first batch.
    """
    enc = model if isinstance(model, ImageEncoder) else image_encoder(model, mesh, rules)

    def stage(b: dict):
        keep = np.asarray(b["mask"], bool)
        ids = [i.decode() if isinstance(i, bytes) else str(i) for i in np.asarray(b["id"])[keep]]
        arrays = (b["image"], b["labels_packed"], b["label_shift"]) if "label_shift" in b else (b["image"], b["labels"])
        return enc.put(*arrays), keep, np.asarray(b["targets"])[keep], ids

    staged = prefetch(batches, stage, ahead) if ahead > 0 else (stage(b) for b in batches)
    embs, targets, ids = [], [], []
    bar = tqdm(desc=desc, unit="scan", disable=desc is None or jax.process_index() != 0)

    def collect(emb: jax.Array, keep: np.ndarray) -> None:
        embs.append(np.asarray(emb)[keep])
        bar.update(int(keep.sum()))

    pending = None  # (embeddings dispatched but not yet read back, keep)
    try:
        for arrays, keep, t, i in staged:
            emb = enc.encode(*arrays)[0]
            if pending is not None:
                collect(*pending)
            pending = (emb, keep)
            targets.append(t)
            ids.extend(i)
        if pending is not None:
            collect(*pending)
    finally:
        staged.close()
        bar.close()
    if not embs:
        raise ValueError("encode_images: no batches")
    return {"emb": np.concatenate(embs), "targets": np.concatenate(targets), "ids": ids}


def prompt_embeddings(model: FVLM, tokens: np.ndarray) -> np.ndarray:
    """tokens [T, 2, L] (negative, positive prompt per task) -> [T, 2, E].

    The weights go in as arguments, not closed over: a model trained with FSDP across hosts has weights no process
    holds whole. On such a model's mesh the tokens and the result are replicated, so every process reads it back.
    """
    graphdef, state = nnx.split(model)
    encode = lambda st, t: nnx.merge(graphdef, st).encode_text(t)  # noqa: E731
    mesh = next((x.sharding.mesh for x in jax.tree.leaves(state)
                 if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)), None)
    if mesh is None:
        return np.asarray(jax.jit(encode)(state, tokens))
    whole = NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        return np.asarray(jax.jit(encode, out_shardings=whole)(state, jax.device_put(tokens, whole)))


def task_scores(img_emb: np.ndarray, prompt_emb: np.ndarray, anatomy_index: Sequence[int],
                temperature: float) -> np.ndarray:
    """img_emb [N, A, E], prompt_emb [T, 2, E], anatomy_index[t] (0 for a global-pool model) -> P(positive) [N, T]."""
    img = img_emb[:, np.asarray(anatomy_index)]  # [N, T, E]
    logits = np.einsum("nte,tke->ntk", img, prompt_emb) / temperature
    logits = logits - logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p[..., 1] / p.sum(-1)


def roc_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """Threshold of the ROC point closest to (FPR 0, TPR 1). Every point is a candidate (scikit-learn's default
    drops collinear points, and with tied scores one of those can be the closest). The point (0, 0) (threshold inf,
    nothing positive) maps to just above the highest score, so a score that saturated at 1.0 stays negative."""
    fpr, tpr, thr = skm.roc_curve(y, score, drop_intermediate=False)
    best = np.argmin(fpr**2 + (1 - tpr) ** 2)
    return float(thr[best]) if np.isfinite(thr[best]) else float(np.nextafter(np.max(score), np.inf))


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
