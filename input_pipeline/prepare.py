"""Raw CTs + segmentations + reports -> tokenizer, sharded TFRecords, manifest, statistics, rejects.

Run through `python run.py --config=... --mode=prepare`. Phases:
1. List the scans of the source (CT-RATE layout or JSONL manifest, see `sources`); unreadable rows and duplicate
   ids become rejects, and each report is split into anatomy texts with the configured vocabulary.
2. Image work in a process pool (`data.workers`, spawn; in this process when it is 1) or an Apache Beam pipeline
   (`data.runner="beam"`). Each scan's result (image, labels, presence, or the reason it was rejected) is cached
   atomically as `<out_dir>/cache/<split>/<id>.npz`, keyed by the preprocessing parameters, the scan's geometry and
   the input files' sizes and modification times. A rerun after an interruption recomputes only missing or stale
   entries.
3. The tokenizer is trained on the training texts of the scans that survived (deterministic), or is the WordPiece
   of a pretrained BERT (model.text.init).
4. Records are written in input order from the cache, each serialized deterministically, so a rerun produces
   byte-identical record files.

Every input ends either in the records or in `rejects.jsonl` ({"id", "split", "reason"}); a scan whose image and
report both fail is rejected for its image (the report's problem follows in the same reason). Logs hold counts
only: reports and image headers can carry patient data.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import zlib

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from input_pipeline import captions, ct_rate, label_packing, preprocess, report_split, sources
from input_pipeline.tokenizer import make_tokenizer, normalize
from input_pipeline.totalseg_classes import CLASS_TABLES

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def disease_list(anatomies, vocabulary) -> list[str]:
    """Global disease axis of the per-anatomy disease vectors: every disease the vocabulary knows for them."""
    return sorted({d for a in anatomies for d in vocabulary.get(a, {})})


def text_id(text: str) -> int:
    """Stable id of a normalised text (equal ids = identical texts, for the same-text correction)."""
    return zlib.crc32(normalize(text).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------------------
# Cache of per-scan image results
# ---------------------------------------------------------------------------------------------------------------
def cache_path(out_dir: str, split: str, scan_id: str) -> str:
    """<out_dir>/cache/<split>/<id>.npz; ids with characters unsafe in file names get a checksum suffix."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", scan_id)
    if safe != scan_id or safe.startswith("."):
        safe = f"{safe}-{zlib.crc32(scan_id.encode()):08x}"
    return os.path.join(out_dir, "cache", split, f"{safe}.npz")


def _file_state(path: str):
    """Size and modification time of a file, or of every file in a folder (DICOM series, segmentation parts)."""
    try:
        if os.path.isdir(path):
            return sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return None


def cache_key(scan, prep_kw: dict) -> str:
    state = {"v": CACHE_VERSION, "prep": prep_kw, "geometry": scan.geometry, "image": os.path.abspath(scan.image),
             "segmentation": os.path.abspath(scan.segmentation), "image_state": _file_state(scan.image),
             "segmentation_state": _file_state(scan.segmentation)}
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=list).encode()).hexdigest()


def _save_atomic(path: str, **arrays) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def _cached(path: str, key: str):
    """None (missing, stale or damaged), or ("ok", None, None) / ("error", reason, category)."""
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            if "error" in z.files:
                return "error", str(z["error"]), str(z["category"])
            return "ok", None, None
    except Exception:  # missing or damaged entries are recomputed
        return None


_PREP_KW: dict = {}


def _init_worker(kw: dict) -> None:
    _PREP_KW.update(kw)


def _process(task) -> bool:
    """Preprocesses one scan into its cache entry (results or the reason it was rejected)."""
    scan, path, key = task
    try:
        out = preprocess.preprocess_scan(scan.image, scan.segmentation, geometry=scan.geometry, check_ct=True,
                                         **_PREP_KW)
    except preprocess.ScanRejected as e:
        _save_atomic(path, key=key, error=e.reason, category=e.category)
        return False
    except Exception as e:  # a bad scan is reported in rejects.jsonl and the run goes on
        _save_atomic(path, key=key, error=f"preprocessing failed ({type(e).__name__}: {e})",
                     category="preprocessing failed")
        return False
    _save_atomic(path, key=key, image=out["image"], labels=out["labels"], present=out["present"])
    return True


def _process_with(task, kw: dict) -> bool:
    """_process for workers that did not run _init_worker (Apache Beam)."""
    if _PREP_KW != kw:
        _init_worker(kw)
    return _process(task)


def beam_runner_options(options: str) -> list[str]:
    """`data.beam_options` as a Beam argument list, with what the Dask runner needs to spread the scans.

    Beam's DaskRunner (2.77) is known only by its module path (`--runner=DaskRunner` is accepted here), turns
    Reshuffle into a no-op and cuts the scans into dask.bag partitions of 128, so a few hundred scans would run on
    one or two workers. Each scan is seconds of work: unless the options choose `--dask_npartitions` or
    `--dask_partition_size`, a partition is one scan.
    """
    import shlex

    argv = []
    for a in shlex.split(options):
        if argv and argv[-1] == "--runner":  # "--runner X" as "--runner=X"
            argv[-1] = f"--runner={a}"
        else:
            argv.append(a)
    runner = next((a.split("=", 1)[1] for a in argv if a.startswith("--runner=")), "")
    if runner.endswith("DaskRunner"):
        # Beam knows it only by its module path.
        argv = ["--runner=apache_beam.runners.dask.dask_runner.DaskRunner" if a == "--runner=DaskRunner" else a
                for a in argv]
        if not any(a.startswith(("--dask_npartitions", "--dask_partition_size")) for a in argv):
            argv.append("--dask_partition_size=1")
    return argv


def run_beam(tasks: list, prep_kw: dict, options: str) -> None:
    """Phase 2 as an Apache Beam pipeline: each scan's preprocessing into its cache entry, on any Beam runner.

    `options` are Beam pipeline options as on a command line, e.g. "--runner=DirectRunner --direct_num_workers=4
    --direct_running_mode=multi_processing", "--runner=DaskRunner --dask_client_address=HOST:8786" (a
    dask.distributed cluster whose workers have fvlm-jax installed), or "--runner=DataflowRunner --project=...
    --region=... --temp_location=gs://... --setup_file=./setup.py". The cache folder (and the input files) must be
    visible to every worker at the same path (local disk for the DirectRunner; NFS/Filestore or a GCS FUSE mount on
    a cluster). The rest of the preparation (tokenizer, records, metadata) reads the cache exactly as after the
    local process pool, so every runner writes byte-identical records.
    """
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    except ImportError as e:
        raise ImportError("data.runner='beam' needs Apache Beam: pip install 'fvlm-jax[beam]'") from e

    argv = beam_runner_options(options)
    pipeline_options = PipelineOptions(argv)
    runner = pipeline_options.view_as(StandardOptions).runner or "DirectRunner (Beam's default)"
    log.info("images: running %d scans through Apache Beam, %s (%s)", len(tasks), runner, " ".join(argv))
    pipeline = beam.Pipeline(options=pipeline_options)
    # No counting step: its log lines would stay in the workers' processes (the counts are logged from the cache
    # after the pipeline), and on the DaskRunner its shuffle made 151 tasks of the 21 that 10 scans need.
    _ = (pipeline
         | "scans" >> beam.Create(tasks)
         | "spread" >> beam.Reshuffle()
         | "preprocess" >> beam.Map(_process_with, prep_kw))
    result = pipeline.run()
    client = getattr(result, "client", None)  # the DaskRunner's dask.distributed client
    try:
        if client is not None:
            threads = client.nthreads()
            log.info("beam: dask.distributed cluster at %s%s: %d workers, %d threads", client.scheduler.address,
                     " (a LocalCluster the DaskRunner started: no --dask_client_address)" if client.cluster else "",
                     len(threads), sum(threads.values()))
        result.wait_until_finish()
    finally:
        if client is not None:  # the DaskRunner leaves its client (and any LocalCluster it started) open
            client.close()


def prep_kwargs(p) -> dict:
    """The preprocessing arguments of cfg.prep (`p`) for `preprocess.process_scan`: the cache key is made of them."""
    return dict(class_table=CLASS_TABLES[p.class_table], anatomies=dict(p.anatomies),
                spacing_xyz=tuple(p.spacing_xyz), hu_window=tuple(p.hu_window), margin_zyx=tuple(p.margin_zyx),
                min_size_zyx=tuple(p.min_size_zyx))


def text_recipe(p) -> dict:
    """The recipe switches of cfg.prep (`p`) that decide the anatomy texts and normal flags. The manifest records
    them, and train, eval and export refuse records prepared with others (fvlm_jax.stages.prepared_config)."""
    return {"template_texts": bool(p.template_texts), "normal_from_impression": bool(p.normal_from_impression)}


def _listing_category(reason: str) -> str:
    if "UTF-8" in reason:
        return "undecodable text encoding"
    if "configured splits" in reason:
        return "split not configured"
    if "no row in the metadata table" in reason:
        return "metadata row missing"
    if "metadata" in reason:
        return "metadata row unusable"
    return "invalid table or manifest row"


# ---------------------------------------------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------------------------------------------
def prepare(cfg: ml_collections.ConfigDict, raw_root: str, out_dir: str, *, progress: bool = True) -> dict:
    """Prepares every configured split of the source into `out_dir` and returns the manifest.

    `raw_root`: the CT-RATE-style folder (data.source "ct_rate" / "demo") or the JSONL manifest file
    (data.source "manifest"). Raises RuntimeError when nothing could be written, or, with data.strict, when any
    input was rejected (rejects.jsonl is written first in both cases).
    """
    p = cfg.prep
    anatomies = list(p.anatomies)  # in the config's order (configs/demo.py keeps prep.anatomies a plain dict)
    lexicon, vocabulary = report_split.configured_vocabulary(p)
    problems = report_split.vocabulary_errors(p, cfg.data.decomposition_dir)
    if problems:
        raise ValueError("; ".join(problems))
    diseases = disease_list(anatomies, vocabulary)
    strict = bool(cfg.data.strict)
    os.makedirs(out_dir, exist_ok=True)
    # The manifest, written last, marks finished records (`stages.is_prepared`): none until this run finishes.
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    splits = list(dict.fromkeys([cfg.data.train_split, cfg.data.threshold_split, cfg.data.eval_split]))
    rejects: list[dict] = []
    categories: collections.Counter = collections.Counter()

    def reject(sid, split, reason, category):
        rejects.append({"id": sid, "split": split, "reason": reason})
        categories[category] += 1

    # 1. Listing, duplicates, report texts. Only counts reach the log: reports can carry patient data.
    listed, columns, listing_rejects = sources.list_all(cfg, raw_root, splits)
    for r in listing_rejects:
        reject(r["id"], r["split"], r["reason"], _listing_category(r["reason"]))
    scans, seen = {}, {}
    for split in splits:
        scans[split] = []
        for s in listed[split]:
            if s.id in seen:
                reject(s.id, split, f"duplicate id (first seen in split {seen[s.id]!r}, kept there)", "duplicate id")
                continue
            seen[s.id] = split
            scans[split].append(s)

    decomposition_dir = cfg.data.decomposition_dir or ""
    desc, conc, flags = (sources.load_decomposition(decomposition_dir, anatomies) if decomposition_dir
                         else ({}, {}, {}))
    # The recipe's text switches (input_pipeline/captions.py): with either on, the findings and the impression are
    # split apart and joined the public code's way.
    text_switches = text_recipe(p)
    apart = any(text_switches.values())

    def joined(parts):
        return captions.anatomy_texts(*parts, anatomies, **text_switches)

    from_files = fallback = 0
    texts, text_problem = {}, {}  # a scan's texts, or why its report is unusable (reported after its image)
    for split in splits:
        for s in scans[split]:
            if not (s.findings.strip() or s.impression.strip()):
                text_problem[s.id] = ("missing or empty report", "missing or empty report")
                continue
            parts = None
            if decomposition_dir and apart:
                parts = sources.decomposed_parts(s.id, desc, conc, anatomies, vocabulary)
                parts = None if parts is None else joined(parts)
            elif decomposition_dir:
                parts = sources.decomposed_texts(s.id, desc, conc, flags, anatomies, vocabulary)
            if parts is None:
                fallback += bool(decomposition_dir)
                if apart:
                    parts = joined((report_split.split_report(s.findings, "", lexicon, vocabulary),
                                    report_split.split_report("", s.impression, lexicon, vocabulary)))
                else:
                    parts = {a: t for a, t in report_split.split_report(s.findings, s.impression, lexicon,
                                                                        vocabulary).items() if a in anatomies}
            else:
                from_files += 1
            if not parts:
                text_problem[s.id] = ("no anatomy text could be taken from the report", "no anatomy text")
                continue
            texts[s.id] = parts
    if decomposition_dir:
        log.info("anatomy texts: %d scans from the decomposition files, %d not in them (built-in splitter)",
                 from_files, fallback)

    # 2. Images, through the cache.
    prep_kw = prep_kwargs(p)
    # The anatomy order sets the label values: part of the key (the key's JSON sorts dict keys).
    key_kw = prep_kw | {"class_table": p.class_table, "anatomy_order": anatomies}
    tasks, keys = [], {}
    for split in splits:
        for s in scans[split]:
            path, key = cache_path(out_dir, split, s.id), cache_key(s, key_kw)
            keys[s.id] = (path, key)
            if _cached(path, key) is None:
                tasks.append((s, path, key))
    n_scans = sum(len(v) for v in scans.values())
    log.info("images: %d to preprocess, %d already in the cache", len(tasks), n_scans - len(tasks))
    runner = cfg.data.runner
    if tasks and runner == "beam":
        run_beam(tasks, prep_kw, cfg.data.beam_options)
    elif tasks:
        workers = max(1, min(int(cfg.data.workers), len(tasks)))
        bar = {"total": len(tasks), "desc": "preprocess", "disable": not progress, "dynamic_ncols": True,
               "unit": "scan"}
        if workers == 1:  # in this process: a spawned worker would first import this module and its dependencies
            _init_worker(prep_kw)
            for _ in tqdm(map(_process, tasks), **bar):
                pass
        else:
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(prep_kw,)) as pool:
                for _ in tqdm(pool.imap_unordered(_process, tasks, chunksize=1), **bar):
                    pass
    for split in splits:
        kept = []
        for s in scans[split]:
            state = _cached(*keys[s.id])
            if state is None:  # the worker died (e.g. out of memory) before writing the entry
                state = ("error", "preprocessing did not finish (worker crashed?)", "preprocessing failed")
            if state[0] == "error":
                also = f"; the report is unusable too ({text_problem[s.id][0]})" if s.id in text_problem else ""
                reject(s.id, split, state[1] + also, state[2])
            elif s.id in text_problem:
                reject(s.id, split, *text_problem[s.id])
            else:
                kept.append(s)
        scans[split] = kept
        if not kept:
            n = len(listed[split])
            log.warning("split %r holds no scans (%s): training or evaluation on it will fail", split,
                        f"all {n} listed were rejected; see rejects.jsonl" if n else
                        "the source lists none for it" + (" (no manifest line names it)"
                                                          if cfg.data.source == "manifest" else ""))
    with open(os.path.join(out_dir, "rejects.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rejects)
    n_ok = sum(len(v) for v in scans.values())
    log.info("scans kept: %s; rejected: %d (details in %s)", {k: len(v) for k, v in scans.items()}, len(rejects),
             os.path.join(out_dir, "rejects.jsonl"))
    for category, n in sorted(categories.items()):
        log.info("  rejected %d: %s", n, category)
    if not n_ok:
        raise RuntimeError(f"nothing could be written; see {out_dir}/rejects.jsonl")
    if strict and rejects:
        raise RuntimeError(f"data.strict: {len(rejects)} input(s) rejected; see {out_dir}/rejects.jsonl")

    def encoded(anatomy, text):  # what the text encoder reads (the identity of a text is the whole of it)
        return captions.encoded_text(anatomy, text) if p.template_texts else text

    # 3. Tokenizer: sentencepiece on the surviving training texts, or the WordPiece of model.text.init's BERT.
    train_scans = scans[cfg.data.train_split]
    train_texts = [encoded(a, t.text) for s in train_scans for a, t in texts[s.id].items()]
    train_texts += [f"{s.findings} {s.impression}" for s in train_scans]
    if not train_texts:
        raise RuntimeError(f"no usable training scans in {raw_root}; see {out_dir}/rejects.jsonl")
    tok, tok_file = make_tokenizer(cfg.model.text.init, train_texts, out_dir, p.vocab_size)

    # 4. Records, in input order, from the cache. TensorFlow is imported here, not at the top: every image worker
    # (spawned) imports this module, and importing TensorFlow took each of them 10-15 s.
    from input_pipeline import records

    spec = records.features(len(anatomies), len(diseases), p.text_len, p.report_len, len(columns),
                            p.volume_encoding)
    k = label_packing.packing_factor(len(anatomies))
    split_infos, stats = [], {"splits": {}, "anatomies": anatomies}
    for split in splits:
        for old in glob.glob(os.path.join(out_dir, f"{records.DATASET_NAME}-{split}.{records.FILE_FORMAT}-*")):
            os.remove(old)
        if os.path.exists(records.record_index_path(out_dir, split)):
            os.remove(records.record_index_path(out_dir, split))
        writer = records.ShardedWriter(out_dir, split, cfg.data.num_shards, spec)
        present_n = np.zeros(len(anatomies))
        abnormal_n = np.zeros(len(anatomies))
        described_n = np.zeros(len(anatomies))
        shapes = []
        for s in tqdm(scans[split], desc=f"write {split}", disable=not progress, dynamic_ncols=True, unit="scan"):
            with np.load(keys[s.id][0]) as z:
                out = {k: z[k] for k in ("image", "labels", "present")}
            parts = texts[s.id]
            row_texts = [parts[a].text if a in parts else "" for a in anatomies]
            has_text = np.array([a in parts for a in anatomies])
            normal = np.array([parts[a].normal if a in parts else True for a in anatomies])
            disease = np.array([[d in parts[a].diseases if a in parts else False for d in diseases]
                                for a in anatomies], bool).reshape(len(anatomies), len(diseases))
            writer.write({
                "id": s.id, "image": out["image"], "labels_packed": label_packing.pack_labels(out["labels"], k),
                "text_tokens": tok.encode([encoded(a, t) for a, t in zip(anatomies, row_texts)], p.text_len),
                "has_text": has_text, "normal": normal,
                "disease": disease,
                "text_id": np.array([text_id(t) if t else 0 for t in row_texts], np.int32),
                "report_tokens": tok.encode([f"{s.findings} {s.impression}"], p.report_len)[0],
                # -1: this scan has no label for the column (not in the label table, or left out of the manifest
                # row); evaluation leaves it out of that task instead of counting it as a negative.
                "targets": np.array([s.labels.get(c, -1) for c in columns], np.int32),
            })
            present_n += out["present"]
            described_n += has_text
            abnormal_n += has_text & ~normal
            shapes.append(out["image"].shape)
        split_infos.append(writer.close())
        n = max(writer.count, 1)
        stats["splits"][split] = {
            "scans": writer.count,
            "anatomy_present_rate": dict(zip(anatomies, (present_n / n).round(4).tolist())),
            "anatomy_described_rate": dict(zip(anatomies, (described_n / n).round(4).tolist())),
            "anatomy_abnormal_rate": dict(zip(anatomies, (abnormal_n / np.maximum(described_n, 1)).round(4)
                                              .tolist())),
            "volume_shape_zyx_max": np.max(shapes, 0).tolist() if shapes else None,
        }
    records.write_metadata(out_dir, spec, split_infos, "fVLM prepared CT scans and anatomy texts")
    with open(os.path.join(out_dir, records.RECONSTRUCTIONS_FILE), "w") as f:
        json.dump({split: records.reconstruction_table([s.id for s in scans[split]], ct_rate.scan_key)
                   for split in splits}, f)

    by_anatomy = {a: tok.lengths(ts) for a in anatomies
                  if (ts := [encoded(a, texts[s.id][a].text) for s in train_scans if a in texts[s.id]])}
    report_lengths = tok.lengths([f"{s.findings} {s.impression}" for s in train_scans])
    pct = (50, 90, 95, 99, 100)

    def summary(n, limit):  # percentiles, and the share the configured length truncates
        n = np.asarray(n)
        return {**dict(zip([f"p{q}" for q in pct], np.percentile(n, pct).tolist())),
                "truncated_at_configured": round(float((n > limit).mean()), 4)}

    stats["anatomy_text_tokens"] = summary(np.concatenate(list(by_anatomy.values())), p.text_len)
    stats["anatomy_text_tokens_by_anatomy"] = {a: summary(n, p.text_len) for a, n in by_anatomy.items()}
    stats["report_tokens"] = summary(report_lengths, p.report_len)
    stats["rejected"] = dict(sorted(categories.items()))
    for name, pcts, limit, key in (("anatomy", stats["anatomy_text_tokens"], p.text_len, "prep.text_len"),
                                   ("report", stats["report_tokens"], p.report_len, "prep.report_len")):
        if pcts["p95"] > limit:
            log.warning("%s texts: %.1f %% are longer than %s=%d tokens and will be truncated (p95 %d, p99 %d "
                        "tokens; records/stats.json)", name, 100 * pcts["truncated_at_configured"], key, limit,
                        pcts["p95"], pcts["p99"])
    manifest = {
        "anatomies": anatomies, "diseases": diseases, "label_columns": columns,
        "splits": {i.name: i.num_examples for i in split_infos}, "rejected": len(rejects),
        "tokenizer": tok_file, "tokenizer_identity": tok.identity(), "vocab_size": tok.vocab_size,
        "prep": prep_kw | {"class_table": p.class_table},
        "text_len": p.text_len, "report_len": p.report_len, "texts": text_switches,
    }
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    records.write_json_atomic(manifest_path, manifest, indent=1)
    log.info("prepared %s in %s", manifest["splits"], out_dir)
    return manifest
