"""The statistics of a zero-shot evaluation: which records count (one reconstruction per scan), the patient
bootstrap, retrieval ranks and reliability bins. NumPy only; tests/test_evaluate.py checks each function against
scikit-learn or a slow loop on small random inputs.

Patients: the records keep no patient id, so it is read from CT-RATE's volume names, `train_123_a_1` -> patient
`train_123` (scan `train_123_a`, reconstruction 1). A record whose id does not follow that convention (the JSONL
manifest's sources) is its own scan and its own patient.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from input_pipeline.ct_rate import scan_key

CI_LEVEL = 0.95
RECALL_AT = (1, 5, 10, 50, 100)


def patient_of(record_id: str) -> str:
    """CT-RATE: "train_123_a_1" -> "train_123"; any other id is its own patient."""
    scan = scan_key(record_id)
    return scan.rpartition("_")[0] if scan != record_id else record_id


def one_per_scan(ids: Sequence[str]) -> np.ndarray:
    """Indices (ascending) of the records that count when a scan counts once: of each CT-RATE scan the
    reconstruction with the lowest number (train_1_a_1 before train_1_a_2, and _2 before _10). Deterministic: it
    depends on the ids only, not on their order."""
    best: dict[str, tuple[int, int]] = {}
    for i, rid in enumerate(ids):
        scan = scan_key(rid)
        number = int(rid.rpartition("_")[2]) if scan != rid else 0
        if scan not in best or number < best[scan][0]:
            best[scan] = (number, i)
    return np.sort(np.array([i for _, i in best.values()], dtype=np.int64))


def draw_patients(num_patients: int, draws: int, seed: int) -> np.ndarray:
    """[draws, num_patients] patient indices: each row a sample of the patients drawn with replacement."""
    return np.random.default_rng(seed).integers(0, num_patients, (draws, num_patients))


def scan_weights(patients: Sequence[str], draws: int, seed: int) -> np.ndarray:
    """The patient bootstrap as weights: [draws, N] how many copies of each scan a draw holds (all scans of a
    drawn patient go in, once per time it was drawn). Patients are ordered by name before drawing, so the weights
    depend on the set of patients and the seed: every task and method scored on the same scans gets the same draws.
    """
    names, index = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    drawn = draw_patients(len(names), draws, seed)
    counts = np.zeros((draws, len(names)), np.float64)
    np.add.at(counts, (np.arange(draws)[:, None], drawn), 1.0)
    return counts[:, index]


def weighted_auc(y: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of weighted samples: y [N] (0/1), score [N], weights [D, N] (copies of each scan) -> [D].

    The Mann-Whitney statistic, ties counted 1/2, which is what scikit-learn's roc_auc_score gives on the sample
    with its copies written out. NaN where a draw holds no positive or no negative. Vectorised over draws: the
    scans are sorted by score once; the negative weight below each tie group is a cumulative sum.
    """
    order = np.argsort(score, kind="stable")
    s, pos = score[order], y[order] == 1
    w = weights[:, order]
    # cum[:, k]: negative weight of the first k sorted scans; each scan's tie group spans [start, end).
    cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(w * ~pos, axis=1)], axis=1)
    _, start, size = np.unique(s, return_index=True, return_counts=True)
    group = np.repeat(np.arange(len(start)), size)
    below = cum[:, start[group]]
    tied = cum[:, (start + size)[group]] - below
    wins = np.sum(w * pos * (below + 0.5 * tied), axis=1)
    n_pos, n_neg = np.sum(w * pos, axis=1), cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), wins / (n_pos * n_neg), np.nan)


THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1_weighted")


def weighted_threshold_metrics(y: np.ndarray, score: np.ndarray, threshold: float,
                               weights: np.ndarray) -> dict[str, np.ndarray]:
    """`evaluate.threshold_metrics` (score >= threshold is positive) of weighted samples: weights [D, N] -> each
    metric [D]. Empty denominators give 0, as there (and as scikit-learn's zero_division=0)."""
    pred, yes = score >= threshold, y == 1
    tp, fp = weights @ (pred & yes), weights @ (pred & ~yes)
    fn, tn = weights @ (~pred & yes), weights @ (~pred & ~yes)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    n = tp + fp + fn + tn
    f1_pos, f1_neg = ratio(2 * tp, 2 * tp + fp + fn), ratio(2 * tn, 2 * tn + fn + fp)
    return {"accuracy": ratio(tp + tn, n), "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "precision": ratio(tp, tp + fp), "f1_weighted": ratio(f1_pos * (tp + fn) + f1_neg * (tn + fp), n)}


def percentile_ci(values: np.ndarray, level: float = CI_LEVEL) -> list[float] | None:
    """The percentile interval of the finite bootstrap values ([lo, hi]); None when none is finite."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return None
    tail = 100 * (1 - level) / 2
    return [float(x) for x in np.percentile(v, [tail, 100 - tail])]


def bootstrap_report(scores: np.ndarray, targets: np.ndarray, task_names: Sequence[str], weights: np.ndarray,
                     thresholds: dict[str, float] | None = None) -> dict:
    """Bootstrap CIs of `evaluate.zero_shot_report`'s numbers from the draws `weights` [D, N] (`scan_weights`).

    Per task: the AUC of each draw over the task's labelled scans (targets -1 left out). Macro mean AUC: per draw,
    the mean over the tasks that have a point AUC; a draw in which one of them is undefined (one class only) is
    left out of the macro interval. Thresholded metrics (tasks in `thresholds`, at those fixed thresholds): per
    draw the macro mean over those tasks. Returns {"per_task": {task: [lo, hi] | None}, "mean_auc": [lo, hi],
    "macro": {metric: [lo, hi]}, "draws", "draws_used"} and, for paired comparisons, the per-draw "mean_auc_draws".
    """
    per_task, aucs = {}, []
    for t, name in enumerate(task_names):
        known = targets[:, t] >= 0
        y = targets[known, t]
        if len(y) == 0 or y.min() == y.max():
            per_task[name] = None
            continue
        draw_auc = weighted_auc(y, scores[known, t], weights[:, known])
        per_task[name] = percentile_ci(draw_auc)
        aucs.append(draw_auc)
    mean_draws = np.mean(aucs, axis=0) if aucs else np.full(len(weights), np.nan)
    out = {"per_task": per_task, "mean_auc": percentile_ci(mean_draws), "draws": int(len(weights)),
           "draws_used": int(np.isfinite(mean_draws).sum()), "level": CI_LEVEL, "mean_auc_draws": mean_draws}
    if thresholds:
        per_metric = {m: [] for m in THRESHOLD_METRICS}
        for t, name in enumerate(task_names):
            if name not in thresholds:
                continue
            known = targets[:, t] >= 0
            got = weighted_threshold_metrics(targets[known, t], scores[known, t], thresholds[name], weights[:, known])
            for m in THRESHOLD_METRICS:
                per_metric[m].append(got[m])
        out["macro"] = {m: percentile_ci(np.mean(v, axis=0)) for m, v in per_metric.items()}
    return out


def concatenated(img_emb: np.ndarray, txt_emb: np.ndarray, has_text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole-scan embeddings for retrieval from per-anatomy ones: image [N, A, E] -> [N, A*E], the anatomies'
    embeddings side by side; texts [N, A, E] with has_text [N, A] -> [N, A*E], an anatomy the report does not
    describe set to zeros (a report that describes none: all zeros). Both L2-normalised, so the dot product of a
    volume and a report is the sum of the described anatomies' cosine similarities / sqrt(A * described)."""
    def unit(x):
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)

    n = len(img_emb)
    return unit(img_emb.reshape(n, -1)), unit((txt_emb * has_text[..., None]).reshape(n, -1))


def retrieval_ranks(sim: np.ndarray) -> np.ndarray:
    """sim [Q, G] with query q's match at gallery item q -> [Q] ranks (1 = first): 1 + the number of gallery
    items scored strictly above the match (a tie with the match does not push it down)."""
    return 1 + np.sum(sim > np.diagonal(sim)[:, None], axis=1)


def retrieval_metrics(ranks: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict:
    """Recall@k (share of queries whose match ranks k or better), mean and median rank, gallery size."""
    ranks = np.asarray(ranks)
    return {**{f"recall@{k}": float(np.mean(ranks <= k)) for k in ks},
            "mean_rank": float(np.mean(ranks)), "median_rank": float(np.median(ranks)), "queries": int(len(ranks))}


def reliability_bins(y: np.ndarray, score: np.ndarray, bins: int = 10) -> dict:
    """Calibration of scores in [0, 1] against 0/1 labels, over `bins` equal-width bins (a score of 1 in the last):
    per bin the count, mean score and share of positives (NaN when empty), and the expected calibration error
    (sum over bins of count / N * |share of positives - mean score|)."""
    b = np.minimum((np.asarray(score) * bins).astype(int), bins - 1)
    count = np.bincount(b, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore"):
        mean_score = np.bincount(b, score, minlength=bins) / count
        positives = np.bincount(b, y.astype(np.float64), minlength=bins) / count
    gap = np.where(count > 0, np.abs(positives - mean_score), 0.0)
    return {"count": count.astype(int).tolist(), "mean_score": mean_score.tolist(),
            "positive_rate": positives.tolist(), "ece": float(np.sum(count / max(count.sum(), 1) * gap))}
