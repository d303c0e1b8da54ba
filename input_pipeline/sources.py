"""Where scans come from: the CT-RATE layout (data.source "ct_rate" / "demo"), a generic JSONL manifest
(data.source "manifest"), and optionally report decompositions made elsewhere (fVLM's published JSON files,
RadGenome-ChestCT's region sentences, a generic JSONL).

JSONL manifest (one JSON object per line, UTF-8):
  {"id": "patient7_ct1", "image": "ct/p7.nii.gz", "segmentation": "seg/p7/", "findings": "...",
   "impression": "...", "labels": {"Emphysema": 1}, "split": "train"}
`image` is a NIfTI file or a DICOM series folder, `segmentation` TotalSegmentator's multi-label file or its folder
of one file per class; relative paths resolve against the manifest's folder. `labels` ({name: 0 or 1}) and `split`
(default "train") are optional; the label columns are the sorted union of all label names, a missing label is 0.
Blank lines are skipped. A line that is not UTF-8 or not a valid object is a reject, the other lines are kept.
Report placeholders ("Not given.") count as empty.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import os
import re

from input_pipeline import ct_rate, report_split
from input_pipeline.ct_rate import Scan

log = logging.getLogger(__name__)


def read_manifest(path: str) -> tuple[list[Scan], list[str], list[dict]]:
    """Scans of a JSONL manifest (all splits), its label columns and its rejected lines ({"id", "split",
    "reason"})."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    scans, rejects, names = [], [], set()
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{os.path.basename(path)} line {n}"
        try:
            obj = json.loads(raw.decode("utf-8-sig" if n == 1 else "utf-8"))
        except UnicodeDecodeError:
            rejects.append({"id": where, "split": "", "reason": f"{where}: not valid UTF-8 text"})
            continue
        except json.JSONDecodeError as e:
            rejects.append({"id": where, "split": "", "reason": f"{where}: not valid JSON ({e.msg})"})
            continue
        if not isinstance(obj, dict):
            rejects.append({"id": where, "split": "", "reason": f"{where}: not a JSON object"})
            continue
        sid = obj.get("id")
        split = obj.get("split", "train")
        sid_ok = isinstance(sid, (str, int)) and str(sid).strip()
        sid = str(sid).strip() if sid_ok else where
        problems = []
        if not sid_ok:
            problems.append("no id")
        if not isinstance(split, str) or not split:
            problems.append("split must be a non-empty string")
            split = ""
        for key in ("image", "segmentation"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                problems.append(f"no {key} path")
        for key in ("findings", "impression"):
            if obj.get(key) is not None and not isinstance(obj[key], str):
                problems.append(f"{key} must be text")
        labels = obj.get("labels") or {}
        if not isinstance(labels, dict):
            problems.append("labels must be an object {name: 0 or 1}")
            labels = {}
        bad = [k for k, v in labels.items() if isinstance(v, bool) or v not in (0, 1)]
        if bad:
            problems.append(f"label(s) {', '.join(map(str, bad))} must be 0 or 1")
        if problems:
            rejects.append({"id": sid, "split": split, "reason": f"{where}: " + "; ".join(problems)})
            continue
        names |= set(labels)
        scans.append(Scan(id=sid, split=split, image=os.path.join(base, obj["image"]),
                          segmentation=os.path.join(base, obj["segmentation"]),
                          findings=report_split.report_text(obj.get("findings")),
                          impression=report_split.report_text(obj.get("impression")),
                          labels={str(k): int(v) for k, v in labels.items()}))
    return scans, sorted(names), rejects


def list_all(cfg, raw_root: str, splits: list[str]) -> tuple[dict[str, list[Scan]], list[str], list[dict]]:
    """{split: scans} of the configured source, the label columns, and the inputs rejected while listing."""
    source = cfg.data.source
    if source == "manifest":
        listed, columns, rejects = read_manifest(raw_root)
        by_split = {s: [] for s in splits}
        for s in listed:
            if s.split in by_split:
                by_split[s.split].append(s)
            else:
                rejects.append({"id": s.id, "split": s.split,
                                "reason": f"split {s.split!r} is not one of the configured splits {splits}"})
        return by_split, columns, rejects
    seg_root = cfg.data.segmentation_root or None
    by_split, columns, rejects = {}, [], []
    for split in splits:
        listed, cols, bad = ct_rate.list_split(raw_root, split, seg_root, cfg.data.use_metadata)
        by_split[split] = listed
        columns = columns or cols
        rejects += bad
    return by_split, columns, rejects


# ---------------------------------------------------------------------------------------------------------------
# Report decompositions made elsewhere: fVLM's JSON files, RadGenome-ChestCT's region sentences, a generic JSONL
# ---------------------------------------------------------------------------------------------------------------
DECOMPOSITION_FILES = ("desc_info.json", "conc_info.json")  # findings part, impression part
RADGENOME_COLUMNS = ("Volumename", "Anatomy", "Sentence")
DECOMPOSITION_JSONL_KEYS = ("id", "anatomy", "text", "abnormal")
_MARK = "fvlmanatomymark"  # a word no report contains: makes every sentence belong to the anatomy being labelled


def load_decomposition(path: str, anatomies) -> tuple[dict, dict, dict]:
    """(findings, impression, abnormal) tables of a decomposition made elsewhere: {scan id: {anatomy: text}} twice,
    and {scan id: {anatomy: bool}} of the anatomies a JSONL states a flag for (true when any of its lines is
    abnormal; fVLM's files and RadGenome-ChestCT's state none). `path` is a folder with fVLM's desc_info.json /
    conc_info.json (a missing one is an empty table), a RadGenome-ChestCT CSV (.csv), a generic JSONL (.jsonl), or
    a folder of .csv / .jsonl files (their tables are merged). Raises FileNotFoundError when nothing usable is
    there, ValueError for a malformed file (naming the file and line)."""
    if os.path.isdir(path):
        fvlm = [n for n in DECOMPOSITION_FILES if os.path.exists(os.path.join(path, n))]
        others = sorted(n for n in os.listdir(path) if n.endswith((".csv", ".jsonl")))
        if fvlm and others:
            raise ValueError(f"data.decomposition_dir={path} holds both fVLM's {fvlm} and {others}: "
                             "point it at one of them")
        if fvlm:
            return (*_load_fvlm(path), {})
        if not others:
            raise FileNotFoundError(f"data.decomposition_dir={path} holds neither of {DECOMPOSITION_FILES} nor "
                                    "any .csv (RadGenome-ChestCT) or .jsonl file")
        files = [os.path.join(path, n) for n in others]
    elif os.path.isfile(path) and path.endswith((".csv", ".jsonl")):
        files = [path]
    elif os.path.isfile(path):
        raise ValueError(f"data.decomposition_dir={path}: expected a folder, a .csv (RadGenome-ChestCT) or a .jsonl "
                         "file")
    else:
        raise FileNotFoundError(f"data.decomposition_dir={path} does not exist")
    findings, impression, flags = {}, {}, {}
    for f in files:
        jsonl = f.endswith(".jsonl")
        rows = _jsonl_rows(f, anatomies) if jsonl else _radgenome_rows(f, anatomies)
        for scan, anatomy, text, abnormal in rows:
            parts = (impression if abnormal else findings).setdefault(scan, {}).setdefault(anatomy, [])
            if text not in parts:  # reconstructions of one scan repeat its sentences
                parts.append(text)
            if jsonl:
                scan_flags = flags.setdefault(scan, {})
                scan_flags[anatomy] = scan_flags.get(anatomy, False) or abnormal
    findings, impression = ({k: {a: " ".join(v) for a, v in t.items()} for k, t in table.items()}
                            for table in (findings, impression))
    return findings, impression, flags


def _load_fvlm(folder: str) -> tuple[dict, dict]:
    tables = []
    for name in DECOMPOSITION_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected an object {{scan id: {{anatomy: text}}}}")
            tables.append(data)
        else:
            tables.append({})
    return tables[0], tables[1]


def _decomposition_key(name: str) -> str:
    """The table key of a scan or volume name: "train_1_a_1.nii.gz" -> "train_1_a", as fVLM's files key scans."""
    name = name.strip()
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[:-len(ext)]
    return ct_rate.scan_key(name)


def region_anatomies(region: str, anatomies) -> list[str]:
    """The configured anatomies a RadGenome region belongs to: those whose name is a word of the region name
    ("left lung" -> ["lung"], "trachea and bronchie" -> ["trachea"] when "trachea" is configured)."""
    region = region.strip().lower()
    return [a for a in anatomies if re.search(rf"(?<![a-z0-9]){re.escape(a.lower())}(?![a-z0-9])", region)]


def _log_ignored(path: str, ignored: collections.Counter, what: str) -> None:
    if ignored:
        log.info("%s: %d rows ignored (%s: %s)", os.path.basename(path), sum(ignored.values()), what,
                 ", ".join(f"{k or '(none)'!r} {n}" for k, n in ignored.most_common()))


def _radgenome_rows(path: str, anatomies):
    """(scan key, anatomy, sentence, False) of a RadGenome-ChestCT region CSV (Volumename, Anatomy, Sentence).
    Rows whose region maps to no configured anatomy (or that have no region: whole-report sentences) are ignored,
    counted and logged."""
    rows, ignored = [], collections.Counter()
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in RADGENOME_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} line 1: no column {', '.join(missing)} (RadGenome-ChestCT needs "
                             f"{', '.join(RADGENOME_COLUMNS)}; found {reader.fieldnames})")
        for row in reader:
            volume, region, sentence = ((row.get(c) or "").strip() for c in RADGENOME_COLUMNS)
            if not volume:
                raise ValueError(f"{path} line {reader.line_num}: empty Volumename")
            if not sentence:
                continue
            matched = region_anatomies(region, anatomies) if region else []
            if not matched:
                ignored[region] += 1
            rows += [(_decomposition_key(volume), a, sentence, False) for a in matched]
    _log_ignored(path, ignored, "region in no configured anatomy")
    return rows


def _jsonl_rows(path: str, anatomies):
    """(scan key, anatomy, text, abnormal) of a JSONL decomposition, one {"id", "anatomy", "text", "abnormal"} per
    line. An abnormal text goes to the impression table, as fVLM's conc_info.json holds the abnormal part, and the
    flag decides the anatomy's normal flag (`decomposed_texts`). Lines with an anatomy that is not configured are
    ignored, counted and logged."""
    rows, ignored, configured = [], collections.Counter(), set(anatomies)
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {n}: not a JSON object")
            missing = [k for k in DECOMPOSITION_JSONL_KEYS if k not in obj]
            if missing:
                raise ValueError(f"{path} line {n}: no key {', '.join(missing)} (each line needs "
                                 f"{', '.join(DECOMPOSITION_JSONL_KEYS)})")
            if not isinstance(obj["id"], (str, int)) or not str(obj["id"]).strip():
                raise ValueError(f"{path} line {n}: id must be a non-empty string")
            if not isinstance(obj["anatomy"], str) or not isinstance(obj["text"], str):
                raise ValueError(f"{path} line {n}: anatomy and text must be strings")
            if not isinstance(obj["abnormal"], bool):
                raise ValueError(f"{path} line {n}: abnormal must be true or false")
            anatomy, text = obj["anatomy"].strip(), " ".join(obj["text"].split())
            if anatomy not in configured:
                ignored[anatomy] += 1
            elif text:
                rows.append((_decomposition_key(str(obj["id"])), anatomy, text, obj["abnormal"]))
    _log_ignored(path, ignored, "anatomy not configured")
    return rows


def label_anatomy_text(text: str, anatomy: str, vocabulary=report_split.DEFAULT_VOCABULARY,
                       ) -> report_split.AnatomyText:
    """Normal/diseases of a text already known to be about `anatomy`, with report_split's negation-aware rules
    (every sentence counts, whether or not it names the anatomy)."""
    sentences = report_split.split_sentences(text)
    if not sentences:
        return report_split.AnatomyText(text="", normal=True, diseases=())
    marked = " ".join(f"{_MARK} {s}" for s in sentences)
    parts = report_split.split_report(marked, "", lexicon={anatomy: (_MARK,)},
                                      vocabulary={anatomy: vocabulary.get(anatomy, {})})
    found = parts.get(anatomy)
    diseases = found.diseases if found else ()
    return report_split.AnatomyText(text=" ".join(text.split()), normal=not diseases, diseases=diseases)


def _scan_tables(scan_id: str, *tables: dict) -> list[dict] | None:
    """Each table's entry {anatomy: ...} for a scan, looked up by its id, then by its CT-RATE scan ("train_1_a_1" ->
    "train_1_a"); None when the scan is in none of them."""
    keys = [k for k in (scan_id, ct_rate.scan_key(scan_id)) if any(k in t for t in tables)]
    if not keys:
        return None
    return [t.get(keys[0]) or {} for t in tables]


def decomposed_texts(scan_id: str, findings: dict, impression: dict, abnormal: dict, anatomies,
                     vocabulary=report_split.DEFAULT_VOCABULARY) -> dict | None:
    """{anatomy: AnatomyText} of a scan from the decomposition tables of `load_decomposition` (findings text, then
    impression text), or None when the scan is in neither text table. Diseases come from `vocabulary` (anatomy ->
    disease -> trigger phrases); an anatomy is normal when none is found, unless the `abnormal` table (a JSONL's
    flags) states it: then normal = not abnormal."""
    found = _scan_tables(scan_id, findings, impression, abnormal)
    if found is None:
        return None
    desc, conc, flags = found
    out = {}
    for a in anatomies:
        pieces = [t.strip() for t in (desc.get(a), conc.get(a)) if isinstance(t, str) and t.strip()]
        if pieces:
            labelled = label_anatomy_text(" ".join(pieces), a, vocabulary)
            if labelled.text:
                if a in flags:
                    labelled = dataclasses.replace(labelled, normal=not flags[a])
                out[a] = labelled
    return out


def decomposed_parts(scan_id: str, findings: dict, impression: dict, anatomies,
                     vocabulary=report_split.DEFAULT_VOCABULARY) -> tuple[dict, dict] | None:
    # The JSONL's flags need no table here: its abnormal lines are the impression part, and the impression part
    # decides normal under prep.normal_from_impression.
    """({anatomy: AnatomyText} of the findings part, the same of the impression part) of a scan, each labelled on
    its own (input_pipeline.captions.anatomy_texts joins them the public code's way), or None when the scan is in
    neither table."""
    found = _scan_tables(scan_id, findings, impression)
    if found is None:
        return None
    return tuple({a: labelled for a in anatomies if isinstance(part.get(a), str)
                  and (labelled := label_anatomy_text(part[a], a, vocabulary)).text} for part in found)
