"""The stages behind `run.py --mode`: prepare, train, eval, export. Workdir layout:

  raw/        the generated demo data set (data.source = "demo")
  records/    prepared TFRecords (tfds folder), tokenizer.model, manifest.json, stats.json, rejects.jsonl
  train/      fVLM checkpoints/, metrics.jsonl and tensorboard/ (event files, with train.tensorboard)
  clip/train/ the whole-volume CLIP baseline, same layout
  eval/       <method>.json zero-shot results, auc.png, training.png;  summary.json at the top
  export/<method>/  self-contained inference folders (fvlm_jax.export.Predictor)

TensorFlow is imported only by the stages that read records (prepare, train, eval).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np

from fvlm_jax import evaluate, export, plots, text_lengths, train

log = logging.getLogger(__name__)


def train_dir(workdir: str, method: str) -> str:
    return os.path.join(workdir, "train") if method == "fvlm" else os.path.join(workdir, method, "train")


def records_dir(workdir: str) -> str:
    return os.path.join(workdir, "records")


def _manifest_path(workdir: str) -> str:
    return os.path.join(records_dir(workdir), "manifest.json")


def is_prepared(workdir: str) -> bool:
    """Whether `--mode=prepare` finished in this workdir (it writes the manifest last)."""
    return os.path.exists(_manifest_path(workdir))


def load_manifest(workdir: str) -> dict:
    path = _manifest_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: run --mode=prepare first")
    with open(path) as f:
        return json.load(f)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


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
        if _read_json(done) != params:  # missing, or generated with other counts or seed
            if os.path.exists(raw):
                shutil.rmtree(raw)
            log.info("generating the demo data set in %s", raw)
            demo_data.generate_demo_dataset(raw, **params)
            with open(done, "w") as f:
                json.dump(params, f)
    manifest = prepare.prepare(cfg, raw, records_dir(workdir))
    log.info("prepared %s (%d rejected)", manifest["splits"], manifest["rejected"])
    return manifest


def _check_vocab(cfg, manifest):
    if manifest["vocab_size"] > cfg.model.text.vocab_size:
        raise ValueError(f"the tokenizer has {manifest['vocab_size']} pieces but model.text.vocab_size is "
                         f"{cfg.model.text.vocab_size}")


def run_train(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    from input_pipeline import tfdata

    manifest = load_manifest(workdir)
    _check_vocab(cfg, manifest)
    if manifest["anatomies"] != list(cfg.prep.anatomies):
        raise ValueError(f"records were prepared for anatomies {manifest['anatomies']}, config has "
                         f"{list(cfg.prep.anatomies)}: prepare again")
    if cfg.train.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by {jax.process_count()} hosts")
    local_batch = cfg.train.batch_size // jax.process_count()
    cfg = resolve_anatomy_text_len(cfg, manifest, _read_json(os.path.join(records_dir(workdir), "stats.json")))

    def batches(start_step):
        return tfdata.train_batches(
            records_dir(workdir), cfg.data.train_split, batch_size=local_batch, size_zyx=cfg.model.input_zyx,
            flip_prob=cfg.train.flip_prob, seed=cfg.seed, start_step=start_step,
            shuffle_buffer=cfg.data.shuffle_buffer, block_files=cfg.data.get("block_files", 8),
            reconstructions=cfg.data.get("reconstructions", "all"), parallel_reads=cfg.data.get("parallel_reads", 1),
            process_index=jax.process_index(),
            process_count=jax.process_count())

    for method in cfg.train.methods:
        train.train(cfg, method, train_dir(workdir, method), batches)


def resolve_anatomy_text_len(cfg: ml_collections.ConfigDict, manifest: dict, stats: dict | None):
    """cfg with model.text.anatomy_len as explicit lengths ("lung=112,..."; a percentile there is taken from the
    records' stats.json), checked against the stored text length; logs what each anatomy gets."""
    spec = str(cfg.model.text.get("anatomy_len", "") or "").strip()
    if not spec:
        return cfg
    stored = int(manifest.get("text_len", cfg.prep.text_len))
    if stored != cfg.prep.text_len:
        raise ValueError(f"records hold {stored} tokens per anatomy text, config has prep.text_len="
                         f"{cfg.prep.text_len}: prepare again or set it back")
    explicit = text_lengths.from_stats(spec, cfg.prep.anatomies, stored, stats) if text_lengths.is_percentile(
        spec) else spec
    lengths = text_lengths.parse(explicit, cfg.prep.anatomies, stored)
    by_anatomy = (stats or {}).get("anatomy_text_tokens_by_anatomy", {})
    log.info("tokens per anatomy text (model.text.anatomy_len=%r; stored %d): %s", spec, stored, ", ".join(
        f"{a} {n}" + (f" (p95 {by_anatomy[a]['p95']:.0f})" if a in by_anatomy else "")
        for a, n in zip(cfg.prep.anatomies, lengths or [stored] * len(cfg.prep.anatomies))))
    cfg = copy.deepcopy(cfg)
    cfg.model.text.anatomy_len = explicit
    return cfg


def run_eval(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    from input_pipeline import tfdata
    from input_pipeline.tokenizer import Tokenizer

    manifest = load_manifest(workdir)
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
    mesh = train.make_mesh(cfg)
    for method in cfg.train.methods:
        model = train.restore_params(cfg, method, train_dir(workdir, method))
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

    manifest = load_manifest(workdir)
    tok_path = os.path.join(records_dir(workdir), manifest["tokenizer"])
    out = []
    for method in cfg.train.methods:
        model = train.restore_params(cfg, method, train_dir(workdir, method))
        out.append(export.export(model, method, cfg, tok_path, CLASS_TABLES[cfg.prep.class_table],
                                 os.path.join(workdir, "export", method)))
        log.info("exported %s to %s", method, out[-1])
    return out
