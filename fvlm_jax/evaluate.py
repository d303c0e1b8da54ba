"""Zero-shot classification: per anatomy, negative/positive prompt pairs, softmax score; AUC and CT-CLIP metrics.

Protocol: the score of a task is softmax([s_neg, s_pos] / temperature)[pos] with s = image-anatomy embedding .
prompt embedding; a task with several prompt pairs uses the mean of its pairs' embeddings (`mean_prompts`), i.e.
the mean similarity. Per-task decision thresholds (closest ROC point to (0, 1)) are chosen on
`data.threshold_split` and applied to `data.eval_split`; with two different splits nothing is tuned on the reported
numbers (the demo). CT-RATE has no third split, so configs/ct_rate.py uses the reported split for both, as CT-CLIP
does (AUC is threshold-free either way). Bootstrap intervals and retrieval: `fvlm_jax.eval_stats`; the whole
`--mode=eval` run: `fvlm_jax.zero_shot`.
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

from fvlm_jax import anatomy, augment, sharding
from fvlm_jax.models.fvlm import FVLM
from fvlm_jax.prefetch import prefetch
from input_pipeline import label_packing


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

    def load(self, model: FVLM) -> None:
        """Encode with `model`'s weights from now on. The model must have the same architecture and parameter
        shardings (another checkpoint of the same run): the compiled function is reused, not compiled again."""
        self._state = nnx.split(model)[1]

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
    """Embeds every scan: returns {"emb": [N, A, E], "targets": [N, C], "ids": [N]} (padding rows dropped), plus
    the batches' texts where they hold them (`TEXT_KEYS`: text_tokens [N, A, L], has_text [N, A], report_tokens
    [N, R]; retrieval embeds them with `text_embeddings`).

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
        texts = {k: np.asarray(b[k])[keep] for k in TEXT_KEYS if k in b}
        return enc.put(*arrays), keep, np.asarray(b["targets"])[keep], ids, texts

    staged = prefetch(batches, stage, ahead) if ahead > 0 else (stage(b) for b in batches)
    embs, targets, ids, texts = [], [], [], []
    bar = tqdm(desc=desc, unit="scan", disable=desc is None or jax.process_index() != 0)

    def collect(emb: jax.Array, keep: np.ndarray) -> None:
        embs.append(np.asarray(emb)[keep])
        bar.update(int(keep.sum()))

    pending = None  # (embeddings dispatched but not yet read back, keep)
    try:
        for arrays, keep, t, i, x in staged:
            emb = enc.encode(*arrays)[0]
            if pending is not None:
                collect(*pending)
            pending = (emb, keep)
            targets.append(t)
            ids.extend(i)
            texts.append(x)
        if pending is not None:
            collect(*pending)
    finally:
        staged.close()
        bar.close()
    if not embs:
        raise ValueError("encode_images: no batches")
    out = {"emb": np.concatenate(embs), "targets": np.concatenate(targets), "ids": ids}
    return out | {k: np.concatenate([x[k] for x in texts]) for k in texts[0]}


TEXT_KEYS = ("text_tokens", "has_text", "report_tokens")


def public_windows(image: np.ndarray, labels: np.ndarray, anatomies: Sequence[int], crop_zyx, patch_zyx):
    """The public protocol's windows of one scan (fVLM eval.py:276-327): yields (a, image [z, y, x], labels
    [z, y, x]) for each anatomy a of `anatomies` that the scan holds and `anatomy.public_usable` admits.

    image [Z, Y, X] and labels [Z, Y, X] (0 background, a + 1 for anatomy a) are the scan's whole stored volume.
    A window is `anatomy.public_crop_window` around anatomy a, its labels keeping anatomy a alone (eval.py crops
    `mask == a + 1`), both zero-padded at the end to a multiple of the patch. An anatomy absent from the scan gets
    no window (eval.py leaves its scores empty).
    """
    whole = np.bincount(labels.ravel(), minlength=labels.max(initial=0) + 1)[1:]
    for a in anatomies:
        if a >= len(whole) or not whole[a]:
            continue
        mask = labels == a + 1
        start, stop = anatomy.public_crop_window(mask, crop_zyx)
        window = tuple(slice(b, e) for b, e in zip(start, stop))
        lab = anatomy.pad_end_to_multiple(np.where(mask[window], a + 1, 0).astype(labels.dtype), patch_zyx)
        # eval.py passes skip_organ = a: the cropped anatomy is exempt from both rules, so this always admits it.
        if anatomy.public_usable(lab, whole, skip=a)[a]:
            yield a, anatomy.pad_end_to_multiple(image[window], patch_zyx), lab


def encode_public(enc: ImageEncoder, batches: Iterable[dict], anatomies: Sequence[int], num_anatomies: int,
                  crop_zyx, patch_zyx, *, global_pool: bool = False, desc: str | None = None) -> dict:
    """Embeds every scan as fVLM's public eval.py does: one window per anatomy (`public_windows`), each through the
    image encoder at its own size (the position embeddings resized to its token grid; a scan's windows of one shape
    go together, one compilation per distinct shape and count). Batches hold whole volumes, one scan each
    (`input_pipeline.tfdata.eval_batches` with size_zyx=None; packed or plain labels, as `encode_images` takes them).

    Returns {"emb": [N, A, E] (anatomy a's embedding from its own window; the global-pool baseline's embedding of
    that window; zeros where no window), "scored": [N, A] bool (a window was embedded), "targets", "ids"} like
    `encode_images`, without texts (the public protocol has no retrieval).
    """
    embs, scored, targets, ids = [], [], [], []
    bar = tqdm(desc=desc, unit="scan", disable=desc is None or jax.process_index() != 0)
    for b in batches:
        for i in np.flatnonzero(np.asarray(b["mask"], bool)):
            image = np.asarray(b["image"][i])
            if "labels_packed" in b:
                packed = np.asarray(b["labels_packed"][i])
                k = label_packing.factor_from_shapes(packed.shape[-1], image.shape[-1])
                labels = label_packing.unpack_labels(packed, k, image.shape[-1], int(b["label_shift"][i]))
            else:
                labels = np.asarray(b["labels"][i])
            groups = {}  # windows of one shape go through the encoder together (CT-RATE: often heart, esophagus
            for a, img, lab in public_windows(image, labels, anatomies, crop_zyx, patch_zyx):  # and aorta)
                groups.setdefault(img.shape, []).append((a, img, lab))
            out = [([a for a, _, _ in g], enc(np.stack([w[1] for w in g]), np.stack([w[2] for w in g]))[0])
                   for g in groups.values()]  # all dispatched, then read back
            emb, got = None, np.zeros(num_anatomies, bool)
            for group, e in out:
                e = np.asarray(e)  # [windows, A or 1, E]
                emb = np.zeros((num_anatomies, e.shape[-1]), e.dtype) if emb is None else emb
                for j, a in enumerate(group):
                    emb[a], got[a] = e[j, 0 if global_pool else a], True
            embs.append(emb)
            scored.append(got)
            targets.append(np.asarray(b["targets"][i]))
            rid = np.asarray(b["id"])[i]
            ids.append(rid.decode() if isinstance(rid, bytes) else str(rid))
            bar.update(1)
    bar.close()
    if not ids:
        raise ValueError("encode_public: no scans")
    width = next((e.shape[-1] for e in embs if e is not None), 1)
    emb = np.stack([np.zeros((num_anatomies, width), np.float32) if e is None else e for e in embs])
    return {"emb": emb, "scored": np.stack(scored), "targets": np.stack(targets), "ids": ids}


def zero_unscored(scores: np.ndarray, scored: np.ndarray, anatomy_index: Sequence[int]) -> np.ndarray:
    """scores [N, T] with 0 where task t's anatomy has no window in scan n (scored [N, A] False): eval.py leaves
    that cell empty and calc_metrics.py:64-66 reads it as 0."""
    return np.where(scored[:, np.asarray(anatomy_index)], scores, 0.0)


class TextEmbedder:
    """Embeds token arrays with a model's text tower: call it with tokens [N, ..., L] to get [N, ..., E] on the
    host. With `lengths` (one per anatomy), tokens [N, A, L] are anatomy texts, each cut to its anatomy's length as
    in training (`FVLM.encode_anatomy_texts`). `batch_size` > 0 encodes N in chunks of that many (the last padded,
    so one compiled shape). `load` swaps in another checkpoint's weights and keeps the compiled function.

    The weights go in as arguments, not closed over: a model trained with FSDP across hosts has weights no process
    holds whole. On such a model's mesh the tokens and the result are replicated, so every process reads it back.
    """

    def __init__(self, model: FVLM, lengths: Sequence[int] | None = None):
        graphdef, state = nnx.split(model)
        lengths = None if lengths is None else tuple(int(n) for n in lengths)

        def encode(st, tokens):
            m = nnx.merge(graphdef, st)
            return m.encode_text(tokens) if lengths is None else m.encode_anatomy_texts(tokens, lengths)

        self.mesh = next((x.sharding.mesh for x in jax.tree.leaves(state)
                          if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding)), None)
        self._whole = None if self.mesh is None else NamedSharding(self.mesh, P())
        self._enc = jax.jit(encode, out_shardings=self._whole)
        self._state = state

    def load(self, model: FVLM) -> None:
        """Embed with `model`'s weights from now on (same architecture and shardings)."""
        self._state = nnx.split(model)[1]

    def __call__(self, tokens: np.ndarray, batch_size: int = 0) -> np.ndarray:
        n = len(tokens)
        size = batch_size if 0 < batch_size < n else n
        out = []
        for start in range(0, n, size):
            chunk = tokens[start:start + size]
            pad = size - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            if self.mesh is None:
                out.append(np.asarray(self._enc(self._state, chunk))[:size - pad])
            else:
                with jax.set_mesh(self.mesh):
                    out.append(np.asarray(self._enc(self._state, jax.device_put(chunk, self._whole)))[:size - pad])
        return np.concatenate(out)


def text_embeddings(model: FVLM, tokens: np.ndarray, lengths: Sequence[int] | None = None,
                    batch_size: int = 0) -> np.ndarray:
    """tokens [N, ..., L] -> [N, ..., E] (see TextEmbedder)."""
    return TextEmbedder(model, lengths)(tokens, batch_size)


def prompt_embeddings(model: FVLM, tokens: np.ndarray) -> np.ndarray:
    """tokens [T, 2, L] (negative, positive prompt per task or prompt pair) -> [T, 2, E] (`text_embeddings`)."""
    return text_embeddings(model, tokens)


def mean_prompts(pair_emb: np.ndarray, task_of_pair: Sequence[int], num_tasks: int) -> np.ndarray:
    """pair_emb [P, 2, E] of P prompt pairs, task_of_pair[p] its task -> [T, 2, E], each task's mean over its pairs.
    Scores are linear in the prompt embedding, so this is the mean of the pairs' similarities (s_neg, s_pos) before
    the two-way softmax (prompt ensembling as in CLIP, without renormalising the mean)."""
    task_of_pair = np.asarray(task_of_pair)
    if sorted(set(task_of_pair.tolist())) != list(range(num_tasks)):
        raise ValueError(f"every task needs at least one prompt pair: pairs cover tasks {sorted(set(task_of_pair))}")
    return np.stack([pair_emb[task_of_pair == t].mean(0) for t in range(num_tasks)])


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
