"""Zero-shot scores and metrics against slow references."""

import numpy as np
import pytest

from fvlm_jax import evaluate, train_state


def pairwise_auc(y, s):
    """AUC as the Mann-Whitney statistic: the share of (positive, negative) pairs ranked right, ties count 1/2."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def closest_to_corner_threshold(y, s):
    """Brute force over every candidate threshold (each score, highest first): the first one whose (FPR, TPR) is
    nearest to (0, 1)."""
    best, best_d = None, np.inf
    for t in sorted(set(s.tolist()), reverse=True):
        pred = s >= t
        tpr = (pred & (y == 1)).sum() / (y == 1).sum()
        fpr = (pred & (y == 0)).sum() / (y == 0).sum()
        d = fpr**2 + (1 - tpr) ** 2
        if d < best_d:
            best, best_d = t, d
    return best


def counted_metrics(y, s, threshold):
    """Thresholded metrics by counting the confusion matrix in a loop."""
    tp = fp = tn = fn = 0
    for label, score in zip(y.tolist(), s.tolist()):
        if score >= threshold:
            tp, fp = tp + (label == 1), fp + (label == 0)
        else:
            fn, tn = fn + (label == 1), tn + (label == 0)

    def f1(hits, false_alarms, misses):
        return 2 * hits / (2 * hits + false_alarms + misses) if hits else 0.0

    n = tp + fp + tn + fn
    return {"accuracy": (tp + tn) / n, "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "f1_weighted": (f1(tp, fp, fn) * (tp + fn) + f1(tn, fn, fp) * (tn + fp)) / n}


def test_task_scores_match_loop():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 3, 4))
    prompts = rng.normal(size=(2, 2, 4))
    index = [2, 0]
    got = evaluate.task_scores(img, prompts, index, 0.07)
    for n in range(5):
        for t in range(2):
            s = [float(img[n, index[t]] @ prompts[t, k]) / 0.07 for k in range(2)]
            want = np.exp(s[1]) / (np.exp(s[0]) + np.exp(s[1]))
            assert got[n, t] == pytest.approx(want, rel=1e-9)


def test_roc_threshold_is_closest_point_to_corner():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = y * 0.5 + rng.random(200)
    thr = evaluate.roc_threshold(y, s)
    assert thr == pytest.approx(closest_to_corner_threshold(y, s))


def test_report_uses_threshold_split_and_skips_single_class_tasks():
    rng = np.random.default_rng(2)
    targets = np.stack([rng.integers(0, 2, 50), np.zeros(50, int)], 1)
    scores = rng.random((50, 2))
    thr_targets = np.stack([rng.integers(0, 2, 40), rng.integers(0, 2, 40)], 1)
    thr_scores = rng.random((40, 2))
    thr = closest_to_corner_threshold(thr_targets[:, 0], thr_scores[:, 0])  # from the threshold split only
    scores[:4, 0] = thr  # scans scored exactly at the threshold count as positive
    out = evaluate.zero_shot_report(scores, targets, ["a", "b"], thr_scores, thr_targets)
    assert out["per_task"]["b"] is None and "b" not in out["thresholded"]
    assert out["per_task"]["a"] == out["mean_auc"] == pytest.approx(pairwise_auc(targets[:, 0], scores[:, 0]))
    assert out["thresholded"]["a"] == pytest.approx({**counted_metrics(targets[:, 0], scores[:, 0], thr),
                                                     "threshold": thr})
    assert out["macro"] == pytest.approx(counted_metrics(targets[:, 0], scores[:, 0], thr))


def test_unlabelled_scans_are_left_out_of_their_task():
    """-1 targets (no label in the table) are dropped per task, in the reported and the threshold split."""
    rng = np.random.default_rng(3)
    targets = rng.integers(0, 2, (60, 2))
    scores = rng.random((60, 2))
    thr_targets, thr_scores = rng.integers(0, 2, (40, 2)), rng.random((40, 2))
    targets[:15, 0] = -1
    thr_targets[:10, 0] = -1
    out = evaluate.zero_shot_report(scores, targets, ["a", "b"], thr_scores, thr_targets)
    assert out["per_task"]["a"] == pytest.approx(pairwise_auc(targets[15:, 0], scores[15:, 0]))
    assert out["per_task"]["b"] == pytest.approx(pairwise_auc(targets[:, 1], scores[:, 1]))
    assert out["unlabelled"] == {"a": 15, "b": 0} and out["positives"]["a"] == int((targets[:, 0] == 1).sum())
    thr = closest_to_corner_threshold(thr_targets[10:, 0], thr_scores[10:, 0])
    assert out["thresholded"]["a"] == pytest.approx({**counted_metrics(targets[15:, 0], scores[15:, 0], thr),
                                                     "threshold": thr})


def tiny_model_and_batches(sizes=(4, 4, 3)):
    from configs import demo
    from fvlm_jax import synthetic

    cfg = demo.get_config()
    cfg.model.vision.width = cfg.model.text.width = cfg.model.embed_dim = 32
    batches = []
    for n, seed in zip(sizes, range(len(sizes))):
        b = synthetic.random_batch(cfg, n, seed=seed)
        b.update(mask=np.arange(n) < n - (seed == len(sizes) - 1),  # the last batch ends in a padding row
                 targets=np.arange(n * 2).reshape(n, 2) + 100 * seed, id=np.array([f"{seed}-{i}".encode()
                                                                                for i in range(n)]))
        batches.append(b)
    return train_state.create_model(cfg, "fvlm"), batches


@pytest.mark.slow
def test_pipelined_encoding_equals_one_batch_at_a_time():
    """Copies ahead in a thread (ahead=2) or in the loop (0): the embeddings of a plain per-batch call, in order,
    padding rows dropped, targets and ids aligned."""
    model, batches = tiny_model_and_batches()
    enc = evaluate.image_encoder(model)
    want = np.concatenate([np.asarray(enc(b["image"], b["labels"])[0])[b["mask"]] for b in batches])
    assert want.shape == (10, 7, 32)  # 10 scans, the demo's 7 anatomies
    for ahead in (0, 2):
        got = evaluate.encode_images(model, iter(batches), ahead=ahead, desc="test" if ahead else None)
        np.testing.assert_array_equal(got["emb"], want)
        np.testing.assert_array_equal(got["targets"], np.concatenate([b["targets"][b["mask"]] for b in batches]))
        assert got["ids"] == ["0-0", "0-1", "0-2", "0-3", "1-0", "1-1", "1-2", "1-3", "2-0", "2-1"]
    # The eval stream's form: labels packed (k voxels per byte), each sample's window shifted into its first byte.
    from input_pipeline import label_packing
    rng = np.random.default_rng(0)
    packed_batches = []
    for b in batches:
        labels = np.asarray(b["labels"])
        k, x = label_packing.packing_factor(int(labels.max())), labels.shape[-1]
        shift = rng.integers(0, k, len(labels))
        rows = [np.concatenate([rng.integers(0, 2, (*lab.shape[:-1], s), np.uint8), lab], -1)
                for lab, s in zip(labels, shift)]  # s junk voxels before the window
        packed = np.stack([label_packing.pack_labels(r, k)[..., :label_packing.packed_width(x, k)] for r in rows])
        packed_batches.append({**{key: v for key, v in b.items() if key != "labels"}, "labels_packed": packed,
                               "label_shift": shift})
    assert any(b["label_shift"].any() for b in packed_batches)
    np.testing.assert_array_equal(evaluate.encode_images(model, iter(packed_batches))["emb"], want)


def test_encoding_raises_the_sources_error_and_stops_its_thread():
    import threading

    model, batches = tiny_model_and_batches((2, 2))

    def source():
        yield batches[0]
        raise OSError("record file unreadable")

    with pytest.raises(OSError, match="unreadable"):
        evaluate.encode_images(model, source(), ahead=2)
    assert not any(t.name == "prefetch_to_device" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(ValueError, match="no batches"):
        evaluate.encode_images(model, iter([]), ahead=2)


def test_roc_threshold_keeps_every_roc_point_and_never_saturates():
    """Tied scores: the closest point to (0, 1) may be one scikit-learn's default drops as collinear. Brute force
    over every candidate threshold is the reference. A (0, 0) optimum leaves saturated scores negative."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(4, 12))
        y = rng.integers(0, 2, n)
        if y.min() == y.max():
            continue
        score = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], n)
        best = min(((np.mean(score[y == 0] >= t)) ** 2 + (1 - np.mean(score[y == 1] >= t)) ** 2)
                   for t in [*np.unique(score), np.inf])
        thr = evaluate.roc_threshold(y, score)
        got = np.mean(score[y == 0] >= thr) ** 2 + (1 - np.mean(score[y == 1] >= thr)) ** 2
        assert got == pytest.approx(best), (y, score, thr)
    y, score = np.array([0, 0, 1]), np.array([1.0, 1.0, 0.0])  # best: call nothing positive
    thr = evaluate.roc_threshold(y, score)
    assert not (score >= thr).any()
