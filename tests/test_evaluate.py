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
        for key in evaluate.TEXT_KEYS:  # the records' texts ride along, for retrieval
            np.testing.assert_array_equal(got[key], np.concatenate([b[key][b["mask"]] for b in batches]))
    # Texts in chunks of 4 (the last padded): as one direct call.
    tokens = got["report_tokens"][:, :32]
    np.testing.assert_allclose(evaluate.text_embeddings(model, tokens, batch_size=4),
                               np.asarray(model.encode_text(tokens)), atol=1e-6)
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


# ---- Protocol pieces of --mode=eval (fvlm_jax.eval_stats, fvlm_jax.zero_shot), against slow references ----------

from sklearn import metrics as skm  # noqa: E402

from fvlm_jax import eval_stats, zero_shot  # noqa: E402


def bootstrap_samples(patients, draws, seed):
    """The scans of each draw written out: every scan of each drawn patient, once per time it was drawn (a loop
    over `draw_patients`, the draws the vectorised code weights by)."""
    names = sorted(set(patients))
    drawn = eval_stats.draw_patients(len(names), draws, seed)
    return [np.array([i for p in row for i, q in enumerate(patients) if q == names[p]]) for row in drawn]


def random_patients(rng, n):
    """n scan ids, CT-RATE style, of fewer patients (1-3 scans each, some with two reconstructions)."""
    ids = []
    while len(ids) < n:
        p = len(ids)
        ids += [f"valid_{p}_{s}_1" for s in "ab"[:rng.integers(1, 3)]]
    return ids[:n]


def test_patient_and_scan_of_ct_rate_ids():
    assert eval_stats.patient_of("train_123_a_1") == "train_123"
    assert eval_stats.patient_of("valid_7_b_12") == "valid_7"
    assert eval_stats.patient_of("patient7_ct1") == "patient7_ct1"  # not CT-RATE: its own patient
    ids = ["train_1_a_10", "train_1_a_2", "train_2_a_2", "train_1_b_1", "x", "train_1_a_3", "train_2_a_1", "x2"]
    picked = eval_stats.one_per_scan(ids)
    # Brute force: of each scan (CT-RATE: the id without its last _number) the lowest reconstruction number.
    scans = {}
    for i, rid in enumerate(ids):
        head, _, num = rid.rpartition("_")
        key, n = (head, int(num)) if rid.startswith("train_") else (rid, 0)
        scans.setdefault(key, []).append((n, i))
    assert picked.tolist() == sorted(min(v)[1] for v in scans.values())
    assert sorted(ids[i] for i in picked) == ["train_1_a_2", "train_1_b_1", "train_2_a_1", "x", "x2"]
    shuffled = [ids[i] for i in (3, 0, 7, 5, 1, 6, 2, 4)]
    assert sorted(shuffled[i] for i in eval_stats.one_per_scan(shuffled)) == sorted(ids[i] for i in picked)


def test_bootstrap_auc_matches_scikit_learn_on_each_resampled_set():
    rng = np.random.default_rng(0)
    ids = random_patients(rng, 40)
    patients = [eval_stats.patient_of(i) for i in ids]
    y = rng.integers(0, 2, len(ids))
    s = np.round(y * 0.3 + rng.random(len(ids)), 1)  # ties
    w = eval_stats.scan_weights(patients, 60, seed=5)
    got = eval_stats.weighted_auc(y, s, w)
    for d, idx in enumerate(bootstrap_samples(patients, 60, 5)):
        np.testing.assert_array_equal(w[d], np.bincount(idx, minlength=len(ids)))
        want = skm.roc_auc_score(y[idx], s[idx]) if 0 < y[idx].sum() < len(idx) else np.nan
        np.testing.assert_allclose(got[d], want, rtol=1e-12, equal_nan=True)


def test_bootstrap_report_matches_a_slow_loop():
    """Intervals of per-task AUC, macro AUC and thresholded macro metrics: percentiles of the metrics recomputed
    on each resampled set with scikit-learn (unlabelled scans out per task; a draw with one class in a task has no
    AUC for it and no macro AUC)."""
    rng = np.random.default_rng(1)
    ids = random_patients(rng, 30)
    patients = [eval_stats.patient_of(i) for i in ids]
    targets = (rng.random((30, 3)) < [0.5, 0.2, 0.4]).astype(int)
    targets[:4, 2] = -1
    targets[:, 1] = 0
    targets[[0, 9], 1] = 1  # two positives: some draws have none
    scores = rng.random((30, 3)) + 0.3 * targets
    thresholds = {"a": 0.6, "c": 0.8}
    draws = 100
    got = eval_stats.bootstrap_report(scores, targets, ["a", "b", "c"], eval_stats.scan_weights(patients, draws, 3),
                                      thresholds)
    aucs, macro = [], {m: [] for m in eval_stats.THRESHOLD_METRICS}
    for idx in bootstrap_samples(patients, draws, 3):
        row, per_metric = [], {m: [] for m in macro}
        for t, name in enumerate("abc"):
            sel = idx[targets[idx, t] >= 0]
            y, s = targets[sel, t], scores[sel, t]
            row.append(skm.roc_auc_score(y, s) if 0 < y.sum() < len(y) else np.nan)
            if name in thresholds:
                for m, v in evaluate.threshold_metrics(y, s, thresholds[name]).items():
                    per_metric[m].append(v)
        aucs.append(row)
        for m in macro:
            macro[m].append(np.mean(per_metric[m]))
    aucs = np.array(aucs)

    def ci(v):
        v = np.asarray(v)[np.isfinite(v)]
        return np.percentile(v, [2.5, 97.5]).tolist()

    for t, name in enumerate("abc"):
        assert got["per_task"][name] == pytest.approx(ci(aucs[:, t]), rel=1e-9), name
    assert got["mean_auc"] == pytest.approx(ci(aucs.mean(1)), rel=1e-9)
    assert got["draws_used"] == int(np.isfinite(aucs.mean(1)).sum()) < draws  # task b: some draws lack a positive
    for m in macro:
        assert got["macro"][m] == pytest.approx(ci(macro[m]), rel=1e-9), m


def test_bootstrap_of_a_demo_sized_split_takes_seconds():
    """1000 draws of the demo's 192-scan test split, 13 tasks, both methods' numbers (printed for the docs)."""
    import time

    rng = np.random.default_rng(2)
    targets = rng.integers(0, 2, (192, 13))
    scores = rng.random((192, 13))
    t0 = time.perf_counter()
    w = eval_stats.scan_weights([f"test_{i}" for i in range(192)], 1000, 0)
    for _ in range(2):
        eval_stats.bootstrap_report(scores, targets, [str(t) for t in range(13)], w, {str(t): 0.5 for t in range(13)})
    seconds = time.perf_counter() - t0
    print(f"bootstrap, 1000 draws, 192 scans, 13 tasks, 2 methods: {seconds:.2f} s")
    assert seconds < 30


def test_retrieval_ranks_and_recall_match_brute_force():
    rng = np.random.default_rng(3)
    sim = np.round(rng.normal(size=(25, 25)), 1)  # ties
    ranks = eval_stats.retrieval_ranks(sim)
    for q in range(25):
        # Gallery sorted best first, the match ahead of the items it ties with: its 1-based position.
        order = sorted(range(25), key=lambda g: (-sim[q, g], g != q))
        assert ranks[q] == order.index(q) + 1
    got = eval_stats.retrieval_metrics(ranks, (1, 5, 10))
    for k in (1, 5, 10):
        assert got[f"recall@{k}"] == sum(1 for q in range(25) if ranks[q] <= k) / 25
    assert got["mean_rank"] == pytest.approx(sum(ranks.tolist()) / 25) and got["queries"] == 25


def test_retrieval_of_concatenated_anatomy_embeddings():
    """Concatenated embeddings: a report's similarity to a volume is the sum of the cosine similarities of the
    anatomies it describes / sqrt(A * described); reports with no anatomy text and, per anatomy, reports without
    that anatomy are left out of the gallery and the queries."""
    rng = np.random.default_rng(4)
    n, a, e = 12, 3, 5

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    img, txt = unit(rng.normal(size=(n, a, e))), unit(rng.normal(size=(n, a, e)))
    has = rng.random((n, a)) < 0.7
    has[0] = False
    img_cat, txt_cat = eval_stats.concatenated(img, txt, has)
    for v in range(n):
        for r in (r for r in range(n) if has[r].any()):
            want = sum(img[v, k] @ txt[r, k] for k in range(a) if has[r, k]) / np.sqrt(a * has[r].sum())
            assert img_cat[v] @ txt_cat[r] == pytest.approx(want)
    out = zero_shot.retrieval(img, txt, has, ["x", "y", "z"])
    rows = [i for i in range(n) if has[i].any()]
    sim = np.array([[img_cat[v] @ txt_cat[r] for r in rows] for v in rows])  # [volumes, reports]
    assert out["concatenated"]["ranks"]["volume_to_report"][0] == 0  # no report text: not in the gallery
    for direction, s in (("volume_to_report", sim), ("report_to_volume", sim.T)):
        want = [1 + sum(s[q, g] > s[q, q] for g in range(len(rows))) for q in range(len(rows))]
        assert out["concatenated"]["ranks"][direction][rows].tolist() == want
        assert out["concatenated"][direction]["recall@5"] == np.mean(np.array(want) <= 5)
    rows_y = [i for i in range(n) if has[i, 1]]
    assert out["y"]["volume_to_report"]["queries"] == len(rows_y)
    want = [1 + sum(img[v, 1] @ txt[g, 1] > img[v, 1] @ txt[v, 1] for g in rows_y) for v in rows_y]
    assert out["y"]["ranks"]["volume_to_report"][rows_y].tolist() == want


def test_reliability_bins_match_a_loop():
    rng = np.random.default_rng(5)
    s = np.concatenate([rng.random(200), [1.0, 0.0]])
    y = (rng.random(202) < s).astype(int)
    got = eval_stats.reliability_bins(y, s, bins=5)
    ece = 0.0
    for b in range(5):
        members = [i for i in range(202) if b / 5 <= s[i] < (b + 1) / 5 or (b == 4 and s[i] == 1.0)]
        assert got["count"][b] == len(members)
        assert got["mean_score"][b] == pytest.approx(np.mean(s[members]))
        assert got["positive_rate"][b] == pytest.approx(np.mean(y[members]))
        ece += len(members) / 202 * abs(np.mean(y[members]) - np.mean(s[members]))
    assert got["ece"] == pytest.approx(ece)


def test_mean_of_prompt_pairs_averages_the_similarities():
    rng = np.random.default_rng(6)
    img, pairs = rng.normal(size=(4, 2, 3)), rng.normal(size=(5, 2, 3))
    task_of_pair, index = [0, 1, 0, 1, 1], [1, 0]
    got = evaluate.task_scores(img, evaluate.mean_prompts(pairs, task_of_pair, 2), index, 0.1)
    for n in range(4):
        for t in range(2):
            mine = [p for p in range(5) if task_of_pair[p] == t]
            s_neg, s_pos = (np.mean([img[n, index[t]] @ pairs[p, k] for p in mine]) / 0.1 for k in (0, 1))
            assert got[n, t] == pytest.approx(1 / (1 + np.exp(s_neg - s_pos)))
    with pytest.raises(ValueError, match="at least one prompt pair"):
        evaluate.mean_prompts(pairs, [0, 0, 0, 0, 0], 2)


def test_checkpoint_choice_and_task_spec_checks():
    assert zero_shot.candidate_steps("latest", [200, 400, 700]) == [700]
    assert zero_shot.candidate_steps("all", [700, 200]) == [200, 700]
    assert zero_shot.candidate_steps("400, 200", [200, 400, 700]) == [200, 400]
    with pytest.raises(ValueError, match="not saved"):
        zero_shot.candidate_steps("300", [200, 400])
    with pytest.raises(ValueError, match="choose 'latest'"):
        zero_shot.candidate_steps("best", [200])
    with pytest.raises(FileNotFoundError, match="--mode=train"):
        zero_shot.candidate_steps("latest", [])
    from configs import ct_rate, demo

    cfg = demo.get_config()
    columns = ["Renal cyst"] + [t[1] for t in demo.TASKS if t[1] != "Renal cyst"]
    spec = zero_shot.task_spec(cfg, columns)
    assert len(spec.names) == 13 and len(spec.pairs) == 26 and spec.pairs[0] == (0, *demo.TASKS[0][2:])
    assert spec.columns[12] == 0  # "Renal cyst" is the table's first column
    cfg.eval.prompt_variants = [("lung", "Cardiomegaly", "a", "b")]
    with pytest.raises(ValueError, match="not a task"):
        zero_shot.task_spec(cfg, [t[1] for t in demo.TASKS])
    from fvlm_jax import config_checks

    cfg.eval.update(count="per_volume", checkpoints="best")
    with pytest.raises(ValueError) as err:
        config_checks.validate(cfg)
    for key in ("eval.prompt_variants", "eval.count", "eval.checkpoints"):
        assert key in str(err.value)
    ct = ct_rate.get_config()
    assert len(ct_rate.LABEL_ANATOMY) == 18 and len(ct.eval.tasks) == 16
    assert {t[1] for t in ct.eval.tasks} == {k for k, v in ct_rate.LABEL_ANATOMY.items() if v}


def test_scores_csv_recomputes_every_auc_with_scikit_learn(tmp_path):
    rng = np.random.default_rng(7)
    ids = random_patients(rng, 20)
    targets = rng.integers(-1, 2, (20, 2))
    data = {"ids": ids, "patients": [eval_stats.patient_of(i) for i in ids], "scores": rng.random((20, 2)),
            "targets": targets,
            "retrieval": {"global": {"ranks": {"report_to_volume": np.arange(20) % 4}}}}
    path = tmp_path / "scores.csv"
    zero_shot.write_scores_csv(str(path), data, ["lung/a", "heart/b"])
    import csv

    rows = list(csv.DictReader(path.open()))
    assert [r["id"] for r in rows] == ids and rows[0]["patient"] == eval_stats.patient_of(ids[0])
    report = evaluate.zero_shot_report(data["scores"], targets, ["lung/a", "heart/b"])
    for name in ("lung/a", "heart/b"):
        y = np.array([int(r[f"label:{name}"]) for r in rows])
        s = np.array([float(r[f"score:{name}"]) for r in rows])
        assert report["per_task"][name] == skm.roc_auc_score(y[y >= 0], s[y >= 0])
    assert [r["rank:global:report_to_volume"] for r in rows[:4]] == ["", "1", "2", "3"]
