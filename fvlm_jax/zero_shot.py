"""`--mode=eval`: checkpoint selection on the valid split, zero-shot scores with patient-bootstrap intervals,
retrieval both ways, and the files every number can be recomputed from (docs/evaluation.md).

For each method of cfg.train.methods, the same way:
1. Candidate checkpoints (eval.checkpoints: "latest", "all" or steps "200,400") are each scored on
   data.threshold_split (the valid split); the one with the best valid macro AUC is chosen (a tie: the later step).
   Only then is data.eval_split scored, at that step, with thresholds from the valid split at that step.
2. The records that count (eval.count): one reconstruction per scan (`eval_stats.one_per_scan`) or every one.
3. Each task's score averages its prompt pairs (eval.tasks and eval.prompt_variants; `evaluate.mean_prompts`).
4. Bootstrap intervals over patients (`eval_stats.bootstrap_report`): one set of draws per split, shared by every
   task and method, so the methods' intervals and their paired difference are comparable.
5. Retrieval on data.eval_split (`retrieval`): report -> volume and volume -> report.

Reading records is the caller's: `evaluate_all` takes `batches(split)`, so this module needs no TensorFlow.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from sklearn import metrics as skm

from fvlm_jax import checkpoint, eval_stats, evaluate, text_lengths
from fvlm_jax.layout import train_dir

log = logging.getLogger(__name__)

COUNTS = ("scan", "reconstruction")
# eval.protocol: "project" (this project's: one centre crop of model.input_zyx per scan, prompt pairs averaged,
# retrieval) or "public" (fVLM's public eval.py: one crop per anatomy, its prompts; docs/evaluation.md).
PROTOCOLS = ("project", "public")


@dataclasses.dataclass
class TaskSpec:
    """The zero-shot tasks of a config against a label table."""
    names: list[str]  # "anatomy/label", as in summary.json's per_task
    anatomies: list[str]  # each task's anatomy
    columns: list[int]  # each task's column of the label table (the records' targets)
    pairs: list[tuple[int, str, str]]  # (task index, negative, positive); each task's eval.tasks pair first


def protocol_tasks(cfg: ml_collections.ConfigDict) -> tuple[list[tuple], list[tuple]]:
    """(tasks, prompt variants) of cfg.eval.protocol: "project" takes eval.tasks and eval.prompt_variants; "public"
    takes eval.public_tasks (eval.tasks where that is empty) with one prompt pair per task, as eval.py scores."""
    if cfg.eval.protocol not in PROTOCOLS:
        raise ValueError(f"eval.protocol={cfg.eval.protocol!r}: choose one of {PROTOCOLS}")
    if cfg.eval.protocol == "public":
        return [tuple(t) for t in (cfg.eval.public_tasks or cfg.eval.tasks)], []
    return [tuple(t) for t in cfg.eval.tasks], [tuple(v) for v in cfg.eval.prompt_variants]


def task_spec(cfg: ml_collections.ConfigDict, label_columns: Sequence[str]) -> TaskSpec:
    tasks, variants = protocol_tasks(cfg)
    missing = [t[1] for t in tasks if t[1] not in label_columns]
    if missing:
        raise ValueError(f"eval.tasks labels {missing} are not columns of the label table {list(label_columns)}")
    key = {(a, label): i for i, (a, label, _, _) in enumerate(tasks)}
    pairs = [(i, neg, pos) for i, (_, _, neg, pos) in enumerate(tasks)]
    for a, label, neg, pos in variants:
        if (a, label) not in key:
            raise ValueError(f"eval.prompt_variants entry ({a!r}, {label!r}) is not a task of eval.tasks")
        pairs.append((key[a, label], neg, pos))
    return TaskSpec([f"{a}/{label}" for a, label, _, _ in tasks], [t[0] for t in tasks],
                    [list(label_columns).index(t[1]) for t in tasks], pairs)


def saved_steps(directory: str) -> list[int]:
    """The steps of the checkpoints in a run's checkpoints/ folder, ascending ([] when there is none)."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        return []
    with ocp.CheckpointManager(directory) as mngr:
        return sorted(int(s) for s in mngr.all_steps())


def candidate_steps(spec, saved: Sequence[int]) -> list[int]:
    """eval.checkpoints ("latest", "all", or steps as "200,400" or a sequence) -> the steps to score on the valid
    split, among the saved ones."""
    if not saved:
        raise FileNotFoundError("no checkpoint saved: run --mode=train first")
    if isinstance(spec, str) and spec.strip() in ("latest", "all"):
        return [max(saved)] if spec.strip() == "latest" else sorted(saved)
    try:
        steps = sorted({int(s) for s in (spec.replace(",", " ").split() if isinstance(spec, str) else spec)})
    except ValueError:
        raise ValueError(f"eval.checkpoints={spec!r}: choose 'latest', 'all' or steps such as '200,400'") from None
    absent = [s for s in steps if s not in saved]
    if absent or not steps:
        raise ValueError(f"eval.checkpoints={spec!r}: steps {absent} are not saved (saved: {sorted(saved)})")
    return steps


def counted(enc: dict, count: str) -> dict:
    """The rows of `encode_images`' output that count: one reconstruction per scan ("scan") or all
    ("reconstruction"); adds "patients" and "num_records"."""
    if count not in COUNTS:
        raise ValueError(f"eval.count={count!r}: choose one of {COUNTS}")
    keep = eval_stats.one_per_scan(enc["ids"]) if count == "scan" else np.arange(len(enc["ids"]))
    out = {k: v[keep] for k, v in enc.items() if k != "ids"}
    out["ids"] = [enc["ids"][i] for i in keep]
    out["patients"] = [eval_stats.patient_of(i) for i in out["ids"]]
    out["num_records"] = len(enc["ids"])
    return out


def pair_scores(img_emb: np.ndarray, pair_emb: np.ndarray, spec: TaskSpec, anatomies: Sequence[str], method: str,
                temperature: float, scored: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [N, T] of the tasks, each from the mean of its pairs; scores [N, P] of each pair alone).

    img_emb [N, A, E] (the CLIP baseline's [N, 1, E], except under the public protocol, where each anatomy has its
    own window and so its own global embedding). scored [N, A] (public protocol): a task whose anatomy has no
    window in a scan scores 0 there (`evaluate.zero_unscored`)."""
    task_of_pair = [p[0] for p in spec.pairs]
    index = [0 if method == "clip" and scored is None else list(anatomies).index(a) for a in spec.anatomies]
    mean = evaluate.mean_prompts(pair_emb, task_of_pair, len(spec.names))
    pair_index = [index[t] for t in task_of_pair]
    scores = evaluate.task_scores(img_emb, mean, index, temperature)
    per_pair = evaluate.task_scores(img_emb, pair_emb, pair_index, temperature)
    if scored is not None:
        scores, per_pair = evaluate.zero_unscored(scores, scored, index), evaluate.zero_unscored(per_pair, scored,
                                                                                                  pair_index)
    return scores, per_pair


def retrieval(img_emb: np.ndarray, txt_emb: np.ndarray, has_text: np.ndarray | None,
              anatomies: Sequence[str]) -> dict:
    """Report <-> volume retrieval over the scans of a split: {embedding: {"report_to_volume": metrics,
    "volume_to_report": metrics, "ranks": {direction: [N] (0 where the scan is not in the gallery)}}}.

    CLIP: img_emb [N, 1, E] against its whole-report embeddings txt_emb [N, E] ("global"). fVLM: img_emb and
    txt_emb [N, A, E] with has_text [N, A]: "concatenated" (`eval_stats.concatenated`: a report's missing
    anatomies are zeros; reports with no anatomy text are left out) and one entry per anatomy over the scans whose
    report describes it. Similarity is the dot product of the L2-normalised embeddings.
    """
    def both_ways(img, txt, rows):
        sim = img[rows] @ txt[rows].T  # [volumes, reports]
        out = {}
        for direction, s in (("report_to_volume", sim.T), ("volume_to_report", sim)):
            ranks = eval_stats.retrieval_ranks(s)
            full = np.zeros(len(img), np.int64)
            full[rows] = ranks
            out[direction] = eval_stats.retrieval_metrics(ranks)
            out.setdefault("ranks", {})[direction] = full
        return out

    n = len(img_emb)
    if has_text is None:
        return {"global": both_ways(img_emb[:, 0], txt_emb, np.arange(n))}
    img_cat, txt_cat = eval_stats.concatenated(img_emb, txt_emb, has_text)
    out = {"concatenated": both_ways(img_cat, txt_cat, np.flatnonzero(has_text.any(1)))}
    for a, name in enumerate(anatomies):
        rows = np.flatnonzero(has_text[:, a])
        if len(rows) > 1:
            out[name] = both_ways(img_emb[:, a], txt_emb[:, a], rows)
    return out


def evaluate_method(cfg: ml_collections.ConfigDict, method: str, workdir: str, spec: TaskSpec, tokenizer,
                    anatomies: Sequence[str], batches: Callable[[str], Iterable[dict]], mesh) -> dict:
    """One method: checkpoint selection on the valid split, then the reported split. Returns per split
    {"ids", "patients", "scores", "targets", ...} and the method's selection and retrieval results."""
    valid, test = cfg.data.threshold_split, cfg.data.eval_split
    ckdir = os.path.join(train_dir(workdir, method), "checkpoints")
    steps = candidate_steps(cfg.eval.checkpoints, saved_steps(ckdir))
    tokens = tokenizer.encode([p for _, neg, pos in spec.pairs for p in (neg, pos)],
                              cfg.prep.text_len).reshape(len(spec.pairs), 2, -1)
    image_enc = prompt_enc = None
    best, selection = None, {}
    for step in steps:
        model = checkpoint.restore_model(cfg, method, ckdir, mesh, step)
        if image_enc is None:  # compiled once per method, reused for every checkpoint and split
            image_enc = evaluate.image_encoder(model, mesh, cfg.sharding.rules)
            prompt_enc = evaluate.TextEmbedder(model)
        else:
            image_enc.load(model)
            prompt_enc.load(model)
        data = score_split(image_enc, prompt_enc(tokens), float(model.temp()), batches(valid), cfg, spec,
                           anatomies, method, f"encode {method} {valid} step {step}")
        auc = evaluate.zero_shot_report(data["scores"], data["targets"], spec.names)["mean_auc"]
        selection[step] = auc
        log.info("%s step %d: %s macro AUC %.4f", method, step, valid, auc)
        ranked = auc if np.isfinite(auc) else -np.inf  # NaN (no task with both classes) never wins over a number
        if best is None or ranked >= best[0]:  # ties go to the later step
            best = (ranked, step, model, data)
    _, step, model, valid_data = best
    image_enc.load(model)
    prompt_enc.load(model)
    pair_emb, temp = prompt_enc(tokens), float(model.temp())
    test_data = valid_data if test == valid else score_split(image_enc, pair_emb, temp, batches(test), cfg, spec,
                                                             anatomies, method, f"encode {method} {test}")
    if cfg.eval.protocol == "public":  # eval.py has no retrieval, and its windows embed one anatomy each
        test_data["retrieval"] = {}
    elif method == "clip":
        txt = evaluate.text_embeddings(model, test_data["report_tokens"], batch_size=cfg.eval.batch_size)
        test_data["retrieval"] = retrieval(test_data["emb"], txt, None, anatomies)
    else:
        lengths = text_lengths.parse(cfg.model.text.anatomy_len, cfg.prep.anatomies, cfg.prep.text_len)
        txt = evaluate.text_embeddings(model, test_data["text_tokens"], lengths, batch_size=cfg.eval.batch_size)
        test_data["retrieval"] = retrieval(test_data["emb"], txt, test_data["has_text"], anatomies)
    return {"step": step, "selection": {"split": valid, "candidates": selection, "chosen": step},
            "valid": valid_data, "test": test_data}


def score_split(image_enc, pair_emb, temperature, batches, cfg, spec, anatomies, method, desc) -> dict:
    if cfg.eval.protocol == "public":
        task_anatomies = sorted({list(anatomies).index(a) for a in spec.anatomies})
        encoded = evaluate.encode_public(image_enc, batches, task_anatomies, len(anatomies), cfg.eval.public_crop_zyx,
                                         cfg.model.vision.patch_zyx, global_pool=method == "clip", desc=desc)
    else:
        encoded = evaluate.encode_images(image_enc, batches, ahead=cfg.data.prefetch_to_device, desc=desc)
    enc = counted(encoded, cfg.eval.count)
    enc["scores"], enc["pair_scores"] = pair_scores(enc["emb"], pair_emb, spec, anatomies, method, temperature,
                                                    enc.get("scored"))
    enc["targets"] = enc["targets"][:, spec.columns]
    return enc


def method_result(cfg: ml_collections.ConfigDict, spec: TaskSpec, run: dict,
                  weights: np.ndarray) -> tuple[dict, np.ndarray]:
    """(eval/<method>.json: zero_shot_report's numbers on data.eval_split, their bootstrap intervals (`weights`:
    the split's patient draws), the checkpoint selection, each prompt pair's valid AUC, retrieval, calibration;
    the macro AUC of each draw, for paired differences)."""
    valid, test = run["valid"], run["test"]
    result = evaluate.zero_shot_report(test["scores"], test["targets"], spec.names, valid["scores"],
                                       valid["targets"])
    thresholds = {k: v["threshold"] for k, v in result.get("thresholded", {}).items()}
    ci = eval_stats.bootstrap_report(test["scores"], test["targets"], spec.names, weights, thresholds)
    result["mean_auc_ci"] = ci["mean_auc"]
    result["ci"] = {k: v for k, v in ci.items() if k != "mean_auc_draws"} | {"seed": cfg.eval.bootstrap_seed}
    result["split"], result["threshold_split"] = cfg.data.eval_split, cfg.data.threshold_split
    result["count"] = cfg.eval.count
    result["protocol"] = cfg.eval.protocol
    result["num_records"] = test["num_records"]
    result["num_patients"] = len(set(test["patients"]))
    result["step"], result["selection"] = run["step"], run["selection"]
    result["selection"]["on_reported_split"] = (len(run["selection"]["candidates"]) > 1
                                                and cfg.data.threshold_split == cfg.data.eval_split)
    prompts = {}
    for p, (t, neg, pos) in enumerate(spec.pairs):
        known = valid["targets"][:, t] >= 0
        y = valid["targets"][known, t]
        auc = float(skm.roc_auc_score(y, valid["pair_scores"][known, p])) if 0 < y.sum() < len(y) else None
        prompts.setdefault(spec.names[t], []).append({"negative": neg, "positive": pos, "valid_auc": auc})
    result["prompts"] = prompts
    result["retrieval"] = {emb: {k: v for k, v in r.items() if k != "ranks"} for emb, r in test["retrieval"].items()}
    known = test["targets"] >= 0
    result["calibration"] = eval_stats.reliability_bins(test["targets"][known], test["scores"][known])
    return result, ci["mean_auc_draws"]


def write_scores_csv(path: str, data: dict, names: Sequence[str]) -> None:
    """One row per counted scan: id, patient, score:<task> and label:<task> (-1: no label) for every task, and
    where retrieval ran on the split, each scan's rank in every direction (empty: not in that gallery)."""
    ranks = [(f"rank:{emb}:{d}", r) for emb, res in data.get("retrieval", {}).items()
             for d, r in res["ranks"].items()]
    header = (["id", "patient"] + [f"score:{n}" for n in names] + [f"label:{n}" for n in names]
              + [name for name, _ in ranks])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i, (rid, patient) in enumerate(zip(data["ids"], data["patients"])):
            w.writerow([rid, patient] + [repr(float(s)) for s in data["scores"][i]]
                       + [int(y) for y in data["targets"][i]] + [int(r[i]) or "" for _, r in ranks])


def evaluate_all(cfg: ml_collections.ConfigDict, workdir: str, manifest: dict, tokenizer,
                 batches: Callable[[str], Iterable[dict]], mesh) -> tuple[dict, dict, dict]:
    """Every method of cfg.train.methods: (summary, {method: eval/<method>.json}, {method: {"valid", "test"}
    split data}). Writes nothing."""
    spec = task_spec(cfg, manifest["label_columns"])
    runs = {m: evaluate_method(cfg, m, workdir, spec, tokenizer, manifest["anatomies"], batches, mesh)
            for m in cfg.train.methods}
    ids = [r["test"]["ids"] for r in runs.values()]
    if any(i != ids[0] for i in ids):
        raise RuntimeError("the methods were scored on different scans of the same split")
    weights = eval_stats.scan_weights(next(iter(runs.values()))["test"]["patients"], cfg.eval.bootstrap_draws,
                                      cfg.eval.bootstrap_seed)
    results, draws = {}, {}
    for method, run in runs.items():
        results[method], draws[method] = method_result(cfg, spec, run, weights)
    first = next(iter(results))
    for method in list(results)[1:]:  # paired: the same draws for both methods
        diff = draws[first] - draws[method]
        results[first].setdefault("mean_auc_difference", {})[method] = {
            "estimate": results[first]["mean_auc"] - results[method]["mean_auc"],
            "ci": eval_stats.percentile_ci(diff)}
    summary = {m: {"mean_auc": r["mean_auc"], "per_task": r["per_task"], "mean_auc_ci": r["mean_auc_ci"]}
               for m, r in results.items()}
    return summary, results, {m: {"valid": r["valid"], "test": r["test"]} for m, r in runs.items()}


def fmt_ci(value, ci, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def markdown_report(results: dict) -> str:
    """eval/report.md: the tables of eval/<method>.json with their 95 % intervals."""
    methods = list(results)
    r0 = results[methods[0]]
    ci = r0["ci"]
    lines = [
        "# Zero-shot evaluation", "",
        f"Split `{r0['split']}`: {r0['num_scans']} scans of {r0['num_patients']} patients "
        f"({r0['num_records']} records; counted per {r0['count']}). Thresholds from `{r0['threshold_split']}`. "
        f"Intervals: {int(100 * ci['level'])} % percentile bootstrap over patients, {ci['draws']} draws, "
        f"seed {ci['seed']}, the same draws for every task and method. Per-scan scores and labels: "
        f"`scores_<method>_<split>.csv`.", ""]
    if r0["protocol"] == "public":
        lines += ["Protocol `public` (fVLM's eval.py): one window per anatomy around it, its prompts, one pair per "
                  "task; a task whose anatomy the scan lacks scores 0; no retrieval (docs/evaluation.md).", ""]
    lines += [
        "## Checkpoints", "",
        "| method | candidates (valid macro AUC) | chosen |", "| --- | --- | --- |"]
    for m in methods:
        sel = results[m]["selection"]
        cands = ", ".join(f"{s}: {a:.3f}" for s, a in sel["candidates"].items())
        lines.append(f"| {m} | {cands} | {sel['chosen']} |")
    if any(results[m]["selection"]["on_reported_split"] for m in methods):
        lines += ["", "**The checkpoint was chosen on the reported split** (no separate valid split)."]
    lines += ["", "## AUC per task", "",
              "| task | positives | " + " | ".join(methods) + " |", "| --- | --- |" + " --- |" * len(methods)]
    for task in r0["per_task"]:
        n_pos = r0["positives"][task]
        n = r0["num_scans"] - r0["unlabelled"][task]
        cells = [fmt_ci(results[m]["per_task"][task], results[m]["ci"]["per_task"][task]) for m in methods]
        lines.append(f"| {task} | {n_pos}/{n} | " + " | ".join(cells) + " |")
    lines.append("| **mean AUC** | | " + " | ".join(
        f"**{fmt_ci(results[m]['mean_auc'], results[m]['mean_auc_ci'])}**" for m in methods) + " |")
    for other, d in r0.get("mean_auc_difference", {}).items():
        lines += ["", f"Mean AUC {methods[0]} - {other}: {fmt_ci(d['estimate'], d['ci'])} (paired: the same draws)."]
    if all("macro" in results[m] for m in methods):
        metrics = list(r0["macro"])
        lines += ["", "## Thresholded metrics (macro over tasks)", "",
                  "| method | " + " | ".join(metrics) + " |", "| --- |" + " --- |" * len(metrics)]
        for m in methods:
            r = results[m]
            lines.append(f"| {m} | " + " | ".join(fmt_ci(r["macro"][k], r["ci"]["macro"][k]) for k in metrics) + " |")
    lines += ["", "## Retrieval", "",
              "Report -> volume and volume -> report among the split's scans (the match is the scan's own report).",
              "", "| method | embedding | direction | R@1 | R@5 | R@10 | R@50 | R@100 | mean rank | queries |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        for emb, res in results[m]["retrieval"].items():
            for d in ("report_to_volume", "volume_to_report"):
                x = res[d]
                recalls = " | ".join(f"{x[f'recall@{k}']:.3f}" for k in eval_stats.RECALL_AT)
                lines.append(f"| {m} | {emb} | {d.replace('_', ' ')} | {recalls} | {x['mean_rank']:.1f} | "
                             f"{x['queries']} |")
    lines += ["", "## Prompt pairs", "", "Each task's score averages its pairs; AUC of each pair alone on "
              f"`{r0['threshold_split']}` at the chosen step.", "",
              "| task | negative | positive | " + " | ".join(methods) + " |",
              "| --- | --- | --- |" + " --- |" * len(methods)]
    for task, pairs in r0["prompts"].items():
        for i, p in enumerate(pairs):
            aucs = [results[m]["prompts"][task][i]["valid_auc"] for m in methods]
            lines.append(f"| {task} | {p['negative']} | {p['positive']} | "
                         + " | ".join("n/a" if a is None else f"{a:.3f}" for a in aucs) + " |")
    lines += ["", "## Calibration", "", "Expected calibration error over all tasks' scores (10 bins): "
              + ", ".join(f"{m} {results[m]['calibration']['ece']:.3f}" for m in methods)
              + ". Figures: `roc.png` (ROC per anatomy), `reliability.png`, `auc.png`, `training.png`.", ""]
    return "\n".join(lines)
