"""The real CLI on the demo config (tiny sizes): prepare -> train both methods -> eval -> export, resume, inference."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_CONFIG, run_cli

pytestmark = pytest.mark.slow  # subprocesses or training: not in the fast lane


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_eval_export_and_resume(prepared_demo):
    workdir = prepared_demo
    run_cli(workdir, "--mode=train")
    fvlm_log = _metrics(workdir / "train" / "metrics.jsonl")
    assert [r["step"] for r in fvlm_log] == [1, 2, 3, 4]
    assert all({"loss", "learning_rate", "loss/lung"} <= set(r) and np.isfinite(r["loss"]) for r in fvlm_log)
    assert (workdir / "clip" / "train" / "metrics.jsonl").exists()

    # A rerun with a longer budget resumes from the step-4 checkpoint instead of starting over.
    res = run_cli(workdir, "--mode=train", "--config.train.steps=6", "--config.train.methods=('fvlm',)")
    resumed = _metrics(workdir / "train" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed[:4] == fvlm_log
    assert "resumed from step 4" in res.stderr

    res = run_cli(workdir, "--mode=eval", "--config.train.steps=6")
    summary = json.loads((workdir / "summary.json").read_text())
    assert set(summary) == {"fvlm", "clip"}
    for method in summary.values():  # the values of fvlm's are checked against a recount below
        assert len(method["per_task"]) == 13 and "lung/Lung nodule" in method["per_task"]
    assert "mean AUC" in res.stdout
    detail = json.loads((workdir / "eval" / "fvlm.json").read_text())
    assert detail["split"] == "test" and detail["threshold_split"] == "valid"

    run_cli(workdir, "--mode=export", "--config.train.steps=6")
    from fvlm_jax.export import Predictor

    pred = Predictor(str(workdir / "export" / "fvlm"))
    scan = next((workdir / "raw" / "dataset" / "test").glob("*/*/*.nii.gz"))
    seg = workdir / "raw" / "segmentations" / "test" / scan.name
    scores = pred.score(str(scan), str(seg))
    enc = pred.encode(str(scan), str(seg))
    # Each task's prompts embedded by the exported model; a score is the two-way softmax of the similarities of its
    # anatomy's embedding to them, by hand.
    temp = float(pred.model.temp())
    prompts = {f"{t['anatomy']}/{t['label']}": (t, np.asarray(pred.model.encode_text(pred.tokenizer.encode(
        [t["negative"], t["positive"]], pred.prep["text_len"])), np.float64)) for t in pred.tasks}
    assert len(prompts) == 13 and set(scores) == set(prompts)
    for name, (t, p) in prompts.items():
        s_neg, s_pos = p @ enc["embeddings"][t["anatomy"]] / temp
        assert scores[name] == pytest.approx(1 / (1 + np.exp(s_neg - s_pos)), abs=1e-5), name
    assert set(enc["embeddings"]) == set(pred.anatomies) and all(enc["present"].values())
    np.testing.assert_allclose(np.linalg.norm(enc["embeddings"]["lung"]), 1.0, rtol=1e-4)

    # The exported model on the raw files gives the embeddings evaluation computed from the records.
    from fvlm_jax import evaluate
    from input_pipeline import tfdata

    batches = tfdata.eval_batches(str(workdir / "records"), "test", batch_size=4, size_zyx=(32, 48, 64))
    from_records = evaluate.encode_images(pred.model, batches)
    row = from_records["ids"].index(scan.name.removesuffix(".nii.gz"))
    for i, anatomy in enumerate(pred.anatomies):
        np.testing.assert_allclose(enc["embeddings"][anatomy], from_records["emb"][row, i], atol=1e-4)

    # The evaluation's AUCs (same step-6 weights), recounted from these embeddings of the test split: scores by hand
    # as above, AUC as the share of (positive, negative) pairs ranked right (ties 1/2), unlabelled scans (-1) out.
    columns = json.loads((workdir / "records" / "manifest.json").read_text())["label_columns"]
    want = {}
    for name, (t, p) in prompts.items():
        logits = from_records["emb"][:, list(pred.anatomies).index(t["anatomy"])].astype(np.float64) @ p.T / temp
        s = 1 / (1 + np.exp(logits[:, 0] - logits[:, 1]))
        y = from_records["targets"][:, columns.index(t["label"])]
        pos, neg = s[y == 1], s[y == 0]
        pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg]
        want[name] = float(np.mean(pairs)) if pairs else None
    assert summary["fvlm"]["per_task"] == pytest.approx(want, abs=1e-6)
    assert summary["fvlm"]["mean_auc"] == pytest.approx(np.mean([v for v in want.values() if v is not None]))


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
