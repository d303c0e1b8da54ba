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

from fvlm_jax import checkpoint, evaluate, export, plots, sharding, text_lengths, train
from fvlm_jax.layout import load_manifest, load_stats, read_json, records_dir, train_dir

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
                  "seed": cfg.seed}
        if read_json(done) != params:  # missing, or generated with other counts or seed
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
    """(cfg checked against the prepared records, with model.text.anatomy_len resolved; the manifest). Train, eval
    and export all start here, so they agree on anatomies, vocabulary and text lengths."""
    manifest = load_manifest(workdir)
    if manifest["vocab_size"] > cfg.model.text.vocab_size:
        raise ValueError(f"the tokenizer has {manifest['vocab_size']} pieces but model.text.vocab_size is "
                         f"{cfg.model.text.vocab_size}")
    if manifest["anatomies"] != list(cfg.prep.anatomies):
        raise ValueError(f"records were prepared for anatomies {manifest['anatomies']}, config has "
                         f"{list(cfg.prep.anatomies)}: prepare again")
    return text_lengths.resolve(cfg, manifest, load_stats(workdir)), manifest


def run_eval(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    from input_pipeline import tfdata
    from input_pipeline.tokenizer import Tokenizer

    cfg, manifest = prepared_config(cfg, workdir)
    rdir = records_dir(workdir)
    tok = Tokenizer(os.path.join(rdir, manifest["tokenizer"]))
    anatomies = manifest["anatomies"]
    columns = manifest["label_columns"]
    tasks = list(cfg.eval.tasks)
    missing = [t[1] for t in tasks if t[1] not in columns]
    if missing:
        raise ValueError(f"eval.tasks labels {missing} are not columns of the label table {columns}")
    names = [f"{a}/{label}" for a, label, _, _ in tasks]
    cols = [columns.index(t[1]) for t in tasks]
    prompts = tok.encode([p for t in tasks for p in (t[2], t[3])], cfg.prep.text_len).reshape(len(tasks), 2, -1)
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    summary, results = {}, {}
    mesh = sharding.make_mesh(cfg)
    for method in cfg.train.methods:
        model = checkpoint.restore_model(cfg, method, os.path.join(train_dir(workdir, method), "checkpoints"), mesh)
        index = [0 if method == "clip" else anatomies.index(t[0]) for t in tasks]
        prompt_emb = evaluate.prompt_embeddings(model, prompts)
        temp = float(model.temp())
        per_split = {}
        encoder = evaluate.image_encoder(model, mesh, cfg.sharding.rules)  # compiled once for both splits
        for split in dict.fromkeys((cfg.data.threshold_split, cfg.data.eval_split)):
            enc = evaluate.encode_images(encoder, tfdata.eval_batches(
                rdir, split, batch_size=cfg.eval.batch_size, size_zyx=cfg.model.input_zyx),
                ahead=cfg.data.prefetch_to_device, desc=f"encode {method} {split}")
            per_split[split] = (evaluate.task_scores(enc["emb"], prompt_emb, index, temp), enc["targets"][:, cols])
        scores, targets = per_split[cfg.data.eval_split]
        thr_scores, thr_targets = per_split[cfg.data.threshold_split]
        result = evaluate.zero_shot_report(scores, targets, names, thr_scores, thr_targets)
        result["split"], result["threshold_split"] = cfg.data.eval_split, cfg.data.threshold_split
        results[method] = result
        summary[method] = {"mean_auc": result["mean_auc"], "per_task": result["per_task"]}
    if jax.process_index() == 0:  # every process computed the same numbers; one writes them
        for method, result in results.items():
            with open(os.path.join(workdir, "eval", f"{method}.json"), "w") as f:
                json.dump(result, f, indent=1)
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        plots.auc_bars(summary, os.path.join(workdir, "eval", "auc.png"))
        plots.training_curves({m: os.path.join(train_dir(workdir, m), "metrics.jsonl") for m in cfg.train.methods},
                              os.path.join(workdir, "eval", "training.png"))
        print(results_table(summary))
    return summary


def results_table(summary: dict) -> str:
    methods = list(summary)
    tasks = list(next(iter(summary.values()))["per_task"])
    width = max(len(t) for t in tasks + ["mean AUC"]) + 2
    fmt = lambda v: "   n/a" if v is None or np.isnan(v) else f"{v:6.3f}"  # noqa: E731
    lines = ["zero-shot AUC".ljust(width) + "".join(f"{m:>8}" for m in methods)]
    lines += [t.ljust(width) + "".join(f"  {fmt(summary[m]['per_task'][t])}" for m in methods) for t in tasks]
    lines.append("mean AUC".ljust(width) + "".join(f"  {fmt(summary[m]['mean_auc'])}" for m in methods))
    return "\n".join(lines)


def run_export(cfg: ml_collections.ConfigDict, workdir: str) -> list[str]:
    from input_pipeline.totalseg_classes import CLASS_TABLES

    cfg, manifest = prepared_config(cfg, workdir)
    tok_path = os.path.join(records_dir(workdir), manifest["tokenizer"])
    mesh = sharding.make_mesh(cfg)
    out = []
    for method in cfg.train.methods:
        model = checkpoint.restore_model(cfg, method, os.path.join(train_dir(workdir, method), "checkpoints"), mesh)
        out.append(export.export(model, method, cfg, tok_path, CLASS_TABLES[cfg.prep.class_table],
                                 os.path.join(workdir, "export", method)))
        log.info("exported %s to %s", method, out[-1])
    return out
