"""The real CLI on the demo config (tiny sizes): train both methods, then resume, evaluate and export in one run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, run_cli

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_eval_export_and_resume(prepared_demo, tmp_path):
    """The train stage (4 steps; in this process, as `run.py --mode=train` runs it), then the CLI's --mode=all with
    6 steps, which finds the records prepared, resumes both trainings, evaluates (checkpoint chosen on valid among
    steps 2, 4, 6) and exports."""
    import shutil

    from conftest import tiny_config

    from fvlm_jax import stages

    # A copy of the shared workdir (raw data and records): --mode=all runs prepare again, which rewrites the records
    # that other tests read at the same time.
    workdir = tmp_path / "demo"
    shutil.copytree(prepared_demo, workdir)
    stages.run_train(tiny_config(), str(workdir))  # a CLI process would add 10 CPU-s of imports
    fvlm_log = _metrics(workdir / "train" / "metrics.jsonl")
    assert [r["step"] for r in fvlm_log] == [1, 2, 3, 4]
    assert all({"loss", "learning_rate", "loss/lung"} <= set(r) and np.isfinite(r["loss"]) for r in fvlm_log)
    assert (workdir / "clip" / "train" / "metrics.jsonl").exists()

    # A rerun with a longer budget resumes each method from its step-4 checkpoint instead of starting over.
    # data.workers=1: prepare processes the copied scans (new paths, so new cache keys) in the CLI process itself
    # (the shared workdir was prepared with the spawned pool of 2).
    res = run_cli(workdir, "--mode=all", "--config.train.steps=6", "--config.data.workers=1")
    resumed = _metrics(workdir / "train" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[:4] == fvlm_log
    assert res.stderr.count("resumed from step 4") == 2

    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == {"fvlm", "clip"}
    for method in summary.values():  # the values are checked against recounts below
        assert len(method["per_task"]) == 13 and "lung/Lung nodule" in method["per_task"]
        lo, hi = method["mean_auc_ci"]
        assert lo <= method["mean_auc"] <= hi
    assert "mean AUC" in res.stdout and "volume->report" in res.stdout
    detail = {m: json.loads((workdir / "eval" / f"{m}.json").read_text()) for m in summary}
    for d in detail.values():
        assert d["split"] == "test" and d["threshold_split"] == "valid" and d["count"] == "scan"
        # Checkpoints 2, 4 and 6 are kept (train.keep_checkpoints=4); the best valid macro AUC is chosen.
        cands = {int(k): v for k, v in d["selection"]["candidates"].items()}
        assert sorted(cands) == [2, 4, 6] and d["step"] == max(sorted(cands), key=lambda k: (cands[k], k))
    anatomies = json.loads((workdir / "records" / "manifest.json").read_text())["anatomies"]
    assert set(detail["clip"]["retrieval"]) == {"global"}
    assert "concatenated" in detail["fvlm"]["retrieval"] and set(detail["fvlm"]["retrieval"]) <= {"concatenated",
                                                                                                  *anatomies}
    report = (workdir / "eval" / "report.md").read_text()
    assert "| **mean AUC** |" in report and "report to volume" in report
    assert all((workdir / "eval" / f).stat().st_size > 0 for f in ("roc.png", "reliability.png", "auc.png"))

    # Every AUC of summary.json from the per-scan CSV with scikit-learn (unlabelled scans, -1, left out).
    import csv

    from sklearn.metrics import roc_auc_score

    for method in summary:
        rows = list(csv.DictReader((workdir / "eval" / f"scores_{method}_test.csv").open()))
        assert len(rows) == detail[method]["num_scans"] == 12 and rows[0]["patient"] == rows[0]["id"][:-4]
        for task, auc in summary[method]["per_task"].items():
            y = np.array([int(r[f"label:{task}"]) for r in rows])
            s = np.array([float(r[f"score:{task}"]) for r in rows])
            known = y >= 0
            want = roc_auc_score(y[known], s[known]) if 0 < y[known].sum() < known.sum() else None
            assert auc == pytest.approx(want, abs=1e-12), (method, task)

    from fvlm_jax.export import Predictor

    pred = Predictor(str(workdir / "export" / "fvlm"))
    scan = next((workdir / "raw" / "dataset" / "test").glob("*/*/*.nii.gz"))
    seg = workdir / "raw" / "segmentations" / "test" / scan.name
    scores = pred.score(str(scan), str(seg))
    enc = pred.encode(str(scan), str(seg))
    # Each task's prompt pairs embedded by the exported model and averaged; a score is the two-way softmax of the
    # similarities of its anatomy's embedding to them, by hand.
    temp = float(pred.model.temp())

    # Every prompt of the export's tasks and of the config's, embedded in one (compiled) call of the text encoder.
    cfg = tiny_config()
    texts = sorted({p for t in pred.tasks for pair in [(t["negative"], t["positive"]), *t["variants"]] for p in pair}
                   | {p for *_, neg, pos in [*cfg.eval.tasks, *cfg.eval.prompt_variants] for p in (neg, pos)})
    from flax import nnx

    tokens = pred.tokenizer.encode(texts, pred.prep["text_len"])
    embedded = dict(zip(texts, np.asarray(nnx.jit(lambda m, t: m.encode_text(t))(pred.model, tokens), np.float64)))

    def embed(pairs):
        return np.stack([embedded[p] for pair in pairs for p in pair])

    def task_prompts(t):  # the mean over the task's pairs (its own and its variants), as evaluation scores
        pairs = [(t["negative"], t["positive"]), *map(tuple, t["variants"])]
        return embed(pairs).reshape(len(pairs), 2, -1).mean(0)

    assert all(len(t["variants"]) == 1 for t in pred.tasks)  # configs/demo.py: one variant pair per task
    prompts = {f"{t['anatomy']}/{t['label']}": (t, task_prompts(t)) for t in pred.tasks}
    assert len(prompts) == 13 and set(scores) == set(prompts)
    for name, (t, p) in prompts.items():
        s_neg, s_pos = p @ enc["embeddings"][t["anatomy"]] / temp
        assert scores[name] == pytest.approx(1 / (1 + np.exp(s_neg - s_pos)), abs=1e-5), name
    assert set(enc["embeddings"]) == set(pred.anatomies) and all(enc["present"].values())
    np.testing.assert_allclose(np.linalg.norm(enc["embeddings"]["lung"]), 1.0, rtol=1e-4)

    # Export ships the checkpoint evaluation chose; on the raw files it gives the embeddings evaluation computes
    # from the records.
    assert f"exported fvlm (step {detail['fvlm']['step']}, chosen by --mode=eval" in res.stderr
    from fvlm_jax import evaluate
    from input_pipeline import tfdata

    batches = tfdata.eval_batches(str(workdir / "records"), "valid", batch_size=4, size_zyx=(32, 48, 64))
    from_records = evaluate.encode_images(pred.model, batches)
    scan = next((workdir / "raw" / "dataset" / "valid").glob("*/*/*.nii.gz"))
    enc = pred.encode(str(scan), str(workdir / "raw" / "segmentations" / "valid" / scan.name))
    row = from_records["ids"].index(scan.name.removesuffix(".nii.gz"))
    for i, anatomy in enumerate(pred.anatomies):
        np.testing.assert_allclose(enc["embeddings"][anatomy], from_records["emb"][row, i], atol=1e-4)

    # The chosen step's valid macro AUC, as the checkpoint selection scored it, recounted from these embeddings:
    # each task's prompt pairs (eval.tasks and eval.prompt_variants of the tiny config) averaged by hand, AUC as
    # the share of (positive, negative) pairs ranked right (ties 1/2), unlabelled scans (-1) out.
    pairs = {}
    for a, label, neg, pos in [*cfg.eval.tasks, *cfg.eval.prompt_variants]:
        pairs.setdefault((a, label), []).append((neg, pos))
    columns = json.loads((workdir / "records" / "manifest.json").read_text())["label_columns"]
    aucs = []
    for (a, label), ps in pairs.items():
        p = embed(ps).reshape(len(ps), 2, -1).mean(0)
        logits = from_records["emb"][:, list(pred.anatomies).index(a)].astype(np.float64) @ p.T / temp
        s = 1 / (1 + np.exp(logits[:, 0] - logits[:, 1]))
        y = from_records["targets"][:, columns.index(label)]
        pos, neg = s[y == 1], s[y == 0]
        if len(pos) and len(neg):
            aucs.append(np.mean([1.0 if x > z else 0.5 if x == z else 0.0 for x in pos for z in neg]))
    chosen = str(detail["fvlm"]["step"])
    assert detail["fvlm"]["selection"]["candidates"][chosen] == pytest.approx(np.mean(aucs), abs=1e-6)


def test_bad_config_value_is_a_clear_error(tmp_path):
    """One message and exit status 1, no traceback (run.py: config_checks.user_error)."""
    cmd = [sys.executable, str(ROOT / "run.py"), TINY_CONFIG, f"--workdir={tmp_path}", "--mode=prepare",
           "--config.model.input_zyx=(30, 48, 64)"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: invalid config:") and "must be divisible by model.vision.patch_zyx" in (
        res.stderr), res.stderr


def test_every_documented_data_override_exists():
    """Overrides the README tells users to pass must be config fields (ml_collections rejects unknown ones)."""
    import re
    from pathlib import Path

    from configs import demo

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    cfg = demo.get_config()
    for dotted in sorted(set(re.findall(r"--config\.([a-z_]+(?:\.[a-z_]+)+)=", readme))):
        node = cfg
        for part in dotted.split("."):
            assert part in node, f"--config.{dotted} is in the README but not in configs/demo.py"
            node = node[part]
