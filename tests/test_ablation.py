"""bench/ablation.py: the table's statistics against slow references, the rows, the plan and the run.py flags.
(The runner itself was smoke-run end to end; docs/benchmarks.md, "Ablation".)"""

import importlib.util
import math
import statistics
import sys

import numpy as np
import pytest
from conftest import ROOT, tiny_config
from scipy import stats

spec = importlib.util.spec_from_file_location("ablation", ROOT / "bench" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
sys.modules["ablation"] = ablation  # its dataclasses look their module up there
spec.loader.exec_module(ablation)


def slow_stats(values):
    """Mean, sample standard deviation and 95 % t-interval written out term by term (scipy's t.interval)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, stats.t.interval(0.95, n - 1, loc=mean, scale=std / math.sqrt(n))


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_seed_stats_equal_slow_reference(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        values = list(rng.normal(0.8, 0.05, n))
        got = ablation.seed_stats(values)
        mean, std, (lo, hi) = slow_stats(values)
        assert got["n"] == n
        np.testing.assert_allclose([got["mean"], got["std"], *got["ci"]], [mean, std, lo, hi], rtol=1e-12)
        assert got["std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
        assert (got["min"], got["max"]) == (min(values), max(values))


def test_seed_stats_one_seed_and_paired_difference():
    one = ablation.seed_stats([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["std"]) and all(math.isnan(c) for c in one["ci"])
    row, base = {0: 0.80, 1: 0.85, 2: 0.83, 5: 0.9}, {0: 0.78, 1: 0.80, 2: 0.82}
    d = ablation.paired_difference(row, base)  # seeds 0-2 only
    want = ablation.seed_stats([0.02, 0.05, 0.01])
    assert d["n"] == 3 and d["mean"] == pytest.approx(want["mean"]) and d["ci"] == pytest.approx(want["ci"])
    assert ablation.paired_difference({3: 0.5}, base) is None


def test_rows_plan_and_flags(tmp_path):
    cfg = tiny_config()
    rows, notes = ablation.select_rows("issue", cfg)
    assert set(ablation.ISSUE_ROWS) - set(rows) <= {"coteach"}
    if "coteach" not in rows:  # until loss.coteach exists, the row is left out with a note
        assert "loss" in cfg and "coteach" not in cfg.loss
        assert any("coteach" in n and "loss.coteach" in n for n in notes)
    recipe, notes = ablation.select_rows("recipe", cfg)
    assert "reference" in recipe and "public:loss.disease_pairs" in recipe
    assert "public:loss.normal_pairs" not in recipe and any("loss.normal_pairs" in n for n in notes)
    with pytest.raises(SystemExit, match="unknown row"):
        ablation.select_rows("fine,nope", cfg)

    chosen = {k: ablation.ISSUE_ROWS[k] for k in ("clip", "fine", "bert")} | {"public:prep.template_texts":
                                                                              recipe["public:prep.template_texts"]}
    preps, runs = ablation.plan(chosen, [0, 1], ["free", "templates"], 40)
    assert len(runs) == 4 * 2 * 2 and len(preps) == 2 * 3  # per mode: its own, the BERT's, template_texts'
    by = {(r.mode, r.row, r.seed): r for r in runs}
    clip, fine = by[("templates", "clip", 1)], by[("templates", "fine", 1)]
    assert clip.prep == fine.prep == "templates" and by[("free", "bert", 0)].prep.startswith("free-")
    assert clip.overrides["train.methods"] == ("clip",) and fine.overrides["train.methods"] == ("fvlm",)
    assert fine.overrides["seed"] == 1 and fine.overrides["data.demo_templates"] is True
    assert fine.overrides["train.steps"] == 40 and fine.overrides["train.checkpoint_every"] == 20
    assert ablation.fill(by[("free", "bert", 0)].overrides, tmp_path, "free")["model.text.init"] == str(
        tmp_path / "bert" / "free")
    assert ablation.flag("train.methods", ("clip",)) == "--config.train.methods=('clip',)"
    assert ablation.flag("loss.disease_pairs", False) == "--config.loss.disease_pairs=False"


def test_table_markdown_rows_and_baseline():
    results = [{"mode": "free", "row": row, "seed": s, "mean_auc": v}
               for row, vals in (("fine", (0.7, 0.72, 0.71)), ("disease", (0.8, 0.83, 0.81))) for s, v in
               enumerate(vals)]
    table = ablation.table_markdown(results, ablation.ISSUE_ROWS)
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    fine = ablation.seed_stats([0.7, 0.72, 0.71])
    assert lines[2].startswith("| fine-grained, no corrections | 3 | 0.710 | 0.010 | 0.700-0.720 | "
                               f"[{fine['ci'][0]:.3f}, {fine['ci'][1]:.3f}] | -0.103 [")
    assert lines[3].startswith("| + disease pairing (project recipe) | 3 | 0.813 |") and lines[3].endswith("| - |")
