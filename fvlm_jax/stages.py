"""The stages behind `run.py --mode`: prepare, train, eval, export (the workdir layout: fvlm_jax.layout).

TensorFlow is imported only by the stages that read records (prepare, train, eval).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from fvlm_jax import checkpoint, export, plots, pretrained, sharding, text_lengths, train, zero_shot
from fvlm_jax.layout import load_manifest, load_stats, read_json, records_dir, train_dir
from input_pipeline.prepare import text_recipe

log = logging.getLogger(__name__)


def run_prepare(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    from input_pipeline import demo_data, prepare

    if jax.process_count() > 1:
        raise RuntimeError("prepare runs on one machine (its worker pool uses all its cores): run --mode=prepare "
                           "without --distributed, then --mode=all (or train, eval, export) with it")

    raw = cfg.data.root
    if cfg.data.source == "demo":
        raw = os.path.join(workdir, "raw")
        done = os.path.join(raw, "DONE")
        params = {"num_train": cfg.data.num_train, "num_valid": cfg.data.num_valid, "num_test": cfg.data.num_test,
                  "seed": cfg.seed, "templates": cfg.data.demo_templates}
        if read_json(done) != params:  # missing, or generated with other counts, seed or report mode
            if os.path.exists(raw):
                shutil.rmtree(raw)
            log.info("generating the demo data set in %s", raw)
            demo_data.generate_demo_dataset(raw, **params)
            with open(done, "w") as f:
                json.dump(params, f)
    manifest = prepare.prepare(cfg, raw, records_dir(workdir))
    log.info("prepared %s (%d rejected)", manifest["splits"], manifest["rejected"])
    return manifest


def run_train(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    from input_pipeline import tfdata

    cfg, _ = prepared_config(cfg, workdir)
    if cfg.train.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {jax.process_count()} hosts")
    local_batch = cfg.train.batch_size // jax.process_count()

    def batches(start_step):
        return tfdata.train_batches(
            records_dir(workdir), cfg.data.train_split, batch_size=local_batch, size_zyx=cfg.model.input_zyx,
            flip_prob=cfg.train.flip_prob, seed=cfg.seed, start_step=start_step,
            shuffle_buffer=cfg.data.shuffle_buffer, block_files=cfg.data.block_files,
            reconstructions=cfg.data.reconstructions, parallel_reads=cfg.data.parallel_reads,
            process_index=jax.process_index(),
            process_count=jax.process_count())

    for method in cfg.train.methods:
        train.train(cfg, method, train_dir(workdir, method), batches)


def prepared_config(cfg: ml_collections.ConfigDict, workdir: str) -> tuple[ml_collections.ConfigDict, dict]:
    """(cfg checked against the prepared records, with model.text.anatomy_len resolved and model.text's sizes taken
    from model.text.init's BERT; the manifest). Train, eval and export all start here, so they agree on anatomies,
    vocabulary, tokenizer and text lengths."""
    manifest = load_manifest(workdir)
    cfg = pretrained.resolve(cfg)
    pretrained.check_records_tokenizer(cfg, manifest)
    if manifest["vocab_size"] > cfg.model.text.vocab_size:
        raise ValueError(f"the tokenizer has {manifest['vocab_size']} pieces but model.text.vocab_size is "
                         f"{cfg.model.text.vocab_size}")
    if manifest["anatomies"] != list(cfg.prep.anatomies):
        raise ValueError(f"records were prepared for anatomies {manifest['anatomies']}, config has "
                         f"{list(cfg.prep.anatomies)}: prepare again")
    # Records from before the text switches existed hold the project recipe's texts.
    prepared = manifest.get("texts", {"template_texts": False, "normal_from_impression": False})
    if prepared != text_recipe(cfg.prep):
        raise ValueError(f"records were prepared with the anatomy texts {prepared}, config (recipe {cfg.recipe!r}) "
                         f"has {text_recipe(cfg.prep)}: prepare again")
    return text_lengths.resolve(cfg, manifest, load_stats(workdir)), manifest


def run_eval(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Zero-shot evaluation of every method (fvlm_jax.zero_shot): checkpoint chosen on the valid split, the
    reported split scored with bootstrap intervals, retrieval; process 0 writes eval/ and summary.json."""
    from input_pipeline import tfdata
    from input_pipeline.tokenizer import load_tokenizer

    cfg, manifest = prepared_config(cfg, workdir)
    rdir = records_dir(workdir)
    tok = load_tokenizer(os.path.join(rdir, manifest["tokenizer"]))

    def batches(split):  # the public protocol crops each anatomy out of the whole stored volume
        if cfg.eval.protocol == "public":
            return tfdata.eval_batches(rdir, split, batch_size=1, size_zyx=None)
        return tfdata.eval_batches(rdir, split, batch_size=cfg.eval.batch_size, size_zyx=cfg.model.input_zyx)

    summary, results, data = zero_shot.evaluate_all(cfg, workdir, manifest, tok, batches, sharding.make_mesh(cfg))
    if jax.process_index() == 0:  # every process computed the same numbers; one writes them
        out = os.path.join(workdir, "eval")
        os.makedirs(out, exist_ok=True)
        names = list(next(iter(summary.values()))["per_task"])
        for method, result in results.items():
            with open(os.path.join(out, f"{method}.json"), "w") as f:
                json.dump(result, f, indent=1)
            for split in dict.fromkeys((cfg.data.threshold_split, cfg.data.eval_split)):
                part = "test" if split == cfg.data.eval_split else "valid"
                zero_shot.write_scores_csv(os.path.join(out, f"scores_{method}_{split}.csv"), data[method][part],
                                           names)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(zero_shot.markdown_report(results))
        plots.auc_bars(summary, os.path.join(out, "auc.png"))
        plots.roc_curves({m: (d["test"]["scores"], d["test"]["targets"]) for m, d in data.items()}, names,
                         os.path.join(out, "roc.png"))
        plots.reliability({m: r["calibration"] for m, r in results.items()}, os.path.join(out, "reliability.png"))
        plots.training_curves({m: os.path.join(train_dir(workdir, m), "metrics.jsonl") for m in cfg.train.methods},
                              os.path.join(out, "training.png"))
        print(results_table(results))
    return summary


def results_table(results: dict) -> str:
    """The console table: per-task AUC with 95 % intervals, mean AUC, the chosen step, thresholded macro metrics
    and retrieval recall, for each method (results: {method: eval/<method>.json})."""
    methods = list(results)
    r0 = results[methods[0]]
    tasks = list(r0["per_task"])
    width = max(len(t) for t in tasks + ["thresholded f1_weighted"]) + 2
    col = 23
    cell = lambda v, ci: zero_shot.fmt_ci(v, ci).rjust(col)  # noqa: E731
    lines = [f"zero-shot AUC on {r0['split']} ({r0['num_scans']} scans, {r0['num_patients']} patients, per "
             f"{r0['count']}), 95 % CI over {r0['ci']['draws']} patient draws",
             "".ljust(width) + "".join(m.rjust(col) for m in methods)]
    lines += [t.ljust(width) + "".join(cell(results[m]["per_task"][t], results[m]["ci"]["per_task"][t])
                                       for m in methods) for t in tasks]
    lines.append("mean AUC".ljust(width) + "".join(cell(results[m]["mean_auc"], results[m]["mean_auc_ci"])
                                                   for m in methods))
    for metric in ("accuracy", "sensitivity", "specificity", "f1_weighted"):
        if all("macro" in results[m] for m in methods):
            lines.append(f"thresholded {metric}".ljust(width) + "".join(
                cell(results[m]["macro"][metric], results[m]["ci"]["macro"][metric]) for m in methods))
    lines.append(f"step (best {r0['selection']['split']} AUC)".ljust(width)
                 + "".join(str(results[m]["step"]).rjust(col) for m in methods))
    for other, d in r0.get("mean_auc_difference", {}).items():
        lines.append(f"mean AUC {methods[0]} - {other}: {zero_shot.fmt_ci(d['estimate'], d['ci'])} (paired)")
    if any(results[m]["retrieval"] for m in methods):  # none under eval.protocol="public" (eval.py has none)
        lines.append("retrieval on the same scans: recall@1/5/10/50/100, mean rank")
    for m in methods:
        for emb in ("concatenated", "global"):
            if emb not in results[m]["retrieval"]:
                continue
            for d, short in (("report_to_volume", "report->volume"), ("volume_to_report", "volume->report")):
                x = results[m]["retrieval"][emb][d]
                recalls = "/".join(f"{x[f'recall@{k}']:.2f}" for k in (1, 5, 10, 50, 100))
                lines.append(f"  {m} {emb} {short}: {recalls}, mean rank {x['mean_rank']:.1f} of {x['queries']}")
    return "\n".join(lines)


def exported_step(workdir: str, method: str) -> int | None:
    """The step --mode=eval chose for `method` (eval/<method>.json), if evaluation ran and that checkpoint is still
    saved; else None (the latest). Export ships the checkpoint that the reported numbers belong to. Process 0 wrote
    the file, so its reading is given to every process (no process may read it before it is written)."""
    chosen = None
    if jax.process_index() == 0:
        chosen = (read_json(os.path.join(workdir, "eval", f"{method}.json")) or {}).get("step")
    if jax.process_count() > 1:
        chosen = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if chosen is None else chosen)))
        chosen = None if chosen < 0 else chosen
    if chosen is None:
        return None
    ckdir = os.path.join(train_dir(workdir, method), "checkpoints")
    saved = {int(d) for d in os.listdir(ckdir) if d.isdigit()} if os.path.isdir(ckdir) else set()  # committed
    if chosen not in saved:
        log.warning("%s: eval chose step %d, which is no longer saved; exporting the latest step", method, chosen)
        return None
    return chosen


def run_export(cfg: ml_collections.ConfigDict, workdir: str) -> list[str]:
    from input_pipeline.totalseg_classes import CLASS_TABLES

    cfg, manifest = prepared_config(cfg, workdir)
    tok_path = os.path.join(records_dir(workdir), manifest["tokenizer"])
    mesh = sharding.make_mesh(cfg)
    out = []
    for method in cfg.train.methods:
        step = exported_step(workdir, method)
        model = checkpoint.restore_model(cfg, method, os.path.join(train_dir(workdir, method), "checkpoints"), mesh,
                                         step)
        out.append(export.export(model, method, cfg, tok_path, CLASS_TABLES[cfg.prep.class_table],
                                 os.path.join(workdir, "export", method)))
        log.info("exported %s (%s) to %s", method, "latest step" if step is None else
                 f"step {step}, chosen by --mode=eval on the valid split", out[-1])
    return out
