"""Where scans come from: the CT-RATE layout (data.source "ct_rate" / "demo"), a generic JSONL manifest
(data.source "manifest"), and optionally fVLM's published report decomposition files.

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

import json
import os

from input_pipeline import ct_rate, report_split
from input_pipeline.ct_rate import Scan


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
# fVLM's published decomposition files
# ---------------------------------------------------------------------------------------------------------------
DECOMPOSITION_FILES = ("desc_info.json", "conc_info.json")  # findings part, impression part
_MARK = "fvlmanatomymark"  # a word no report contains: makes every sentence belong to the anatomy being labelled


def load_decomposition(folder: str) -> tuple[dict, dict]:
    """(findings, impression) tables {scan id: {anatomy: text}} from desc_info.json and conc_info.json (a missing
    file is an empty table; neither present raises FileNotFoundError)."""
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
    if not any(os.path.exists(os.path.join(folder, n)) for n in DECOMPOSITION_FILES):
        raise FileNotFoundError(f"data.decomposition_dir={folder} holds neither of {DECOMPOSITION_FILES}")
    return tables[0], tables[1]


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


def decomposed_texts(scan_id: str, findings: dict, impression: dict, anatomies,
                     vocabulary=report_split.DEFAULT_VOCABULARY) -> dict | None:
    """{anatomy: AnatomyText} of a scan from the decomposition tables (findings text, then impression text), or
    None when the scan is in neither table. The scan is looked up by its id, then by its CT-RATE scan
    ("train_1_a_1" -> "train_1_a"); diseases come from `vocabulary` (anatomy -> disease -> trigger phrases)."""
    keys = [k for k in (scan_id, ct_rate.scan_key(scan_id)) if k in findings or k in impression]
    if not keys:
        return None
    desc, conc = findings.get(keys[0]) or {}, impression.get(keys[0]) or {}
    out = {}
    for a in anatomies:
        pieces = [t.strip() for t in (desc.get(a), conc.get(a)) if isinstance(t, str) and t.strip()]
        if pieces:
            labelled = label_anatomy_text(" ".join(pieces), a, vocabulary)
            if labelled.text:
                out[a] = labelled
    return out
