"""Raw CTs + segmentations + reports -> tokenizer, sharded TFRecords, manifest, statistics, rejects.

Run through `python run.py --config=... --mode=prepare`. Image work runs in a process pool; report splitting,
tokenisation and writing happen in the parent, in input order, so the records are deterministic.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import zlib

import ml_collections
import numpy as np
from tqdm.auto import tqdm

from input_pipeline import ct_rate, preprocess, records, report_split
from input_pipeline.tokenizer import Tokenizer, normalize, train_tokenizer
from input_pipeline.totalseg_classes import CLASS_TABLES

log = logging.getLogger(__name__)


def disease_list(anatomies, vocabulary) -> list[str]:
    """Global disease axis of the per-anatomy disease vectors: every disease the vocabulary knows for them."""
    return sorted({d for a in anatomies for d in vocabulary.get(a, {})})


def text_id(text: str) -> int:
    """Stable id of a normalised text (equal ids = identical texts, for the same-text correction)."""
    return zlib.crc32(normalize(text).encode()) & 0x7FFFFFFF


_PREP_KW: dict = {}


def _init_worker(kw: dict) -> None:
    _PREP_KW.update(kw)


def _process(scan: ct_rate.Scan):
    try:
        out = preprocess.preprocess_scan(scan.image, scan.segmentation, **_PREP_KW)
        return scan.id, {"image": out["image"], "labels": out["labels"], "present": out["present"]}, None
    except Exception as e:  # a bad scan is reported in rejects.jsonl and the run goes on
        return scan.id, None, f"{type(e).__name__}: {e}"


def prepare(cfg: ml_collections.ConfigDict, raw_root: str, out_dir: str, *, progress: bool = True) -> dict:
    """Prepares every split of a CT-RATE-style data set under `raw_root` into `out_dir`. Returns the manifest."""
    p = cfg.prep
    anatomies = list(p.anatomies)
    vocabulary = report_split.DEFAULT_VOCABULARY
    diseases = disease_list(anatomies, vocabulary)
    os.makedirs(out_dir, exist_ok=True)
    splits = list(dict.fromkeys([cfg.data.train_split, cfg.data.threshold_split, cfg.data.eval_split]))
    seg_root = cfg.data.segmentation_root or None
    scans, columns, rejects, seen = {}, [], [], set()
    for split in splits:
        listed, cols = ct_rate.list_scans(raw_root, split, seg_root)
        columns = columns or cols
        scans[split] = []
        for s in listed:
            if s.id in seen:
                rejects.append({"id": s.id, "split": split, "reason": "duplicate id"})
                continue
            seen.add(s.id)
            scans[split].append(s)

    # Reports -> per-anatomy texts. Only counts reach the log: reports can carry patient data.
    texts = {}
    for split in splits:
        kept = []
        for s in scans[split]:
            if not (s.findings.strip() or s.impression.strip()):
                rejects.append({"id": s.id, "split": split, "reason": "missing or empty report"})
                continue
            parts = {a: t for a, t in report_split.split_report(s.findings, s.impression).items() if a in anatomies}
            if not parts:
                rejects.append({"id": s.id, "split": split, "reason": "no anatomy text could be taken from the report"})
                continue
            texts[s.id] = parts
            kept.append(s)
        scans[split] = kept

    tok_path = os.path.join(out_dir, "tokenizer.model")
    train_texts = [t.text for s in scans[cfg.data.train_split] for t in texts[s.id].values()]
    train_texts += [f"{s.findings} {s.impression}" for s in scans[cfg.data.train_split]]
    if not train_texts:
        raise ValueError(f"no usable training scans in {raw_root}")
    train_tokenizer(train_texts, tok_path, p.vocab_size)
    tok = Tokenizer(tok_path)

    spec = records.features(len(anatomies), len(diseases), p.text_len, p.report_len, len(columns))
    prep_kw = dict(class_table=CLASS_TABLES[p.class_table], anatomies=dict(p.anatomies),
                   spacing_xyz=tuple(p.spacing_xyz), hu_window=tuple(p.hu_window), margin_zyx=tuple(p.margin_zyx),
                   min_size_zyx=tuple(p.min_size_zyx))
    split_infos, stats = [], {"splits": {}, "anatomies": anatomies}
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(max(1, cfg.data.workers), initializer=_init_worker, initargs=(prep_kw,)) as pool:
        for split in splits:
            writer = records.ShardedWriter(out_dir, split, cfg.data.num_shards, spec)
            present_n = np.zeros(len(anatomies))
            abnormal_n = np.zeros(len(anatomies))
            described_n = np.zeros(len(anatomies))
            shapes = []
            by_id = {s.id: s for s in scans[split]}
            results = pool.imap(_process, scans[split], chunksize=2)
            for sid, out, err in tqdm(results, total=len(scans[split]), desc=f"prepare {split}",
                                      disable=not progress, dynamic_ncols=True):
                if err:
                    rejects.append({"id": sid, "split": split, "reason": err})
                    continue
                s, parts = by_id[sid], texts[sid]
                row_texts = [parts[a].text if a in parts else "" for a in anatomies]
                has_text = np.array([a in parts for a in anatomies])
                normal = np.array([parts[a].normal if a in parts else True for a in anatomies])
                disease = np.array([[d in parts[a].diseases if a in parts else False for d in diseases]
                                    for a in anatomies], bool).reshape(len(anatomies), len(diseases))
                writer.write({
                    "id": sid, "image": out["image"], "labels": out["labels"],
                    "text_tokens": tok.encode(row_texts, p.text_len), "has_text": has_text, "normal": normal,
                    "disease": disease,
                    "text_id": np.array([text_id(t) if t else 0 for t in row_texts], np.int32),
                    "report_tokens": tok.encode([f"{s.findings} {s.impression}"], p.report_len)[0],
                    "targets": np.array([s.labels.get(c, 0) for c in columns], np.int32),
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
    if not any(i.num_examples for i in split_infos):
        raise RuntimeError(f"nothing could be written; see {out_dir}/rejects.jsonl")
    records.write_metadata(out_dir, spec, split_infos, "fVLM prepared CT scans and anatomy texts")

    lengths = tok.lengths(train_texts[: len(train_texts) - len(scans[cfg.data.train_split])])
    report_lengths = tok.lengths([f"{s.findings} {s.impression}" for s in scans[cfg.data.train_split]])
    pct = (50, 90, 95, 99, 100)
    stats["anatomy_text_tokens"] = dict(zip([f"p{q}" for q in pct], np.percentile(lengths, pct).tolist()))
    stats["report_tokens"] = dict(zip([f"p{q}" for q in pct], np.percentile(report_lengths, pct).tolist()))
    for name, pcts, limit in (("anatomy", stats["anatomy_text_tokens"], p.text_len),
                              ("report", stats["report_tokens"], p.report_len)):
        if pcts["p99"] > limit:
            log.warning("%s texts: p99 length %d tokens > configured %d: they will be truncated", name,
                            pcts["p99"], limit)
    manifest = {
        "anatomies": anatomies, "diseases": diseases, "label_columns": columns,
        "splits": {i.name: i.num_examples for i in split_infos}, "rejected": len(rejects),
        "tokenizer": "tokenizer.model", "vocab_size": tok.vocab_size, "prep": prep_kw | {"class_table": p.class_table},
        "text_len": p.text_len, "report_len": p.report_len,
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1)
    with open(os.path.join(out_dir, "rejects.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rejects)
    return manifest
