"""The report splitter measured on real chest CT reports (tests/fixtures/real_reports/, its README gives the rules).

Run: python bench/report_split_accuracy.py [--fixture PATH] [--errors]

Splits each report of the fixture with the shipped vocabulary (`report_split.chest_ct_vocabulary()`) and compares,
per part of the fixture (tuning, held-out 1, held-out 2, all), with the hand-checked gold split and the published
labels:

* sentences, per anatomy (lung, heart, esophagus, aorta): recall = gold sentences of the anatomy that the splitter
  gives it, precision = sentences the splitter gives it that the gold gives it too (a gold and a splitter sentence
  match when one contains the other, whitespace normalised, so a boundary drawn differently is not an error);
* found: anatomies the gold describes (has sentences for) that the splitter gives a text;
* flag: the normal/abnormal flag of each (report, anatomy) pair, an anatomy not described being normal on both
  sides; abnormal caught = gold-abnormal pairs the splitter flags abnormal;
* labels: CT-RATE's 18 labels, the diseases the splitter finds (any anatomy) against the published labels, micro
  precision and recall over all (report, label) pairs.

--errors lists the disagreements of the tuning part only: the held-out parts are never looked at while tuning.
A benchmark that prints figures, not a test (tests/test_report_split.py runs `measure` as a regression guard).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from input_pipeline import report_split  # noqa: E402

ANATOMIES = ("lung", "heart", "esophagus", "aorta")
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "real_reports" / "reports.jsonl"
PARTS = ("tuning", "held-out 1", "held-out 2")


def hash_part(report_id: str) -> str:
    """The rule that split the first 35 reports: "held-out 1" for a third of the ids (first 8 hex digits of the id's
    SHA-256, modulo 3, equal 0), fixed before the splitter's output on them was seen; "tuning" for the rest."""
    return "held-out 1" if int(hashlib.sha256(report_id.encode()).hexdigest()[:8], 16) % 3 == 0 else "tuning"


def part_of(report: dict) -> str:
    """The report's part, its fixture field `part`: "tuning", "held-out 1" (hash_part of the first 35 reports) or
    "held-out 2" (the reports added later, all held out, their gold written before the splitter was run on them)."""
    return report["part"]


def load_fixture(path: str | Path = FIXTURE) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _norm(s: str) -> str:
    return " ".join(s.split())


def _overlap(a: str, b: str) -> bool:
    a, b = _norm(a), _norm(b)
    return a in b or b in a


def split_one(report: dict, lexicon, vocabulary) -> tuple[dict, dict[str, list[str]]]:
    """The splitter's result for one fixture report and, per anatomy, its sentences."""
    findings = report_split.report_text(report["findings"])
    impression = report_split.report_text(report["impression"])
    result = report_split.split_report(findings, impression, lexicon, vocabulary)
    sentences = report_split.split_sentences(findings) + report_split.split_sentences(impression)
    assigned = {a: [s for s in sentences if a in result and _norm(s) in _norm(result[a].text)] for a in ANATOMIES}
    return result, assigned


def measure(reports: list[dict], lexicon=None, vocabulary=None) -> dict:
    """Figures (see the module docstring) of `reports` as {name: (numerator, denominator)}, and the
    disagreements as a list of strings."""
    if lexicon is None:
        lexicon, vocabulary = report_split.parse_vocabulary(report_split.chest_ct_vocabulary())
    counts: dict[str, list[int]] = {}
    errors: list[str] = []

    def add(name, hit, n=1):
        c = counts.setdefault(name, [0, 0])
        c[0] += hit
        c[1] += n

    for r in reports:
        result, assigned = split_one(r, lexicon, vocabulary)
        for a in ANATOMIES:
            gold = r["gold"].get(a)
            gold_sents = gold["sentences"] if gold else []
            pred_sents = assigned[a]
            for g in gold_sents:
                hit = any(_overlap(g, p) for p in pred_sents)
                add(f"recall {a}", hit)
                if not hit:
                    errors.append(f"{r['id']} {a}: sentence missed: {g}")
            for p in pred_sents:
                hit = any(_overlap(g, p) for g in gold_sents)
                add(f"precision {a}", hit)
                if not hit:
                    errors.append(f"{r['id']} {a}: sentence given wrongly: {p}")
            if gold_sents:
                add("found", a in result)
            gold_normal = gold["normal"] if gold else True
            pred_normal = result[a].normal if a in result else True
            add("flag", gold_normal == pred_normal)
            if not gold_normal:
                add("abnormal caught", not pred_normal)
            if gold_normal != pred_normal:
                errors.append(f"{r['id']} {a}: flag {'normal' if pred_normal else 'abnormal'} "
                              f"{result[a].diseases if a in result else ()}, gold "
                              f"{'normal' if gold_normal else 'abnormal'}")
        found = {d for t in result.values() for d in t.diseases}
        for label, value in r["labels"].items():
            if value:
                add("label recall", label in found)
            if label in found:
                add("label precision", bool(value))
            if bool(value) != (label in found):
                errors.append(f"{r['id']} label {label}: {'missed' if value else 'found but not published'}")
    return {"counts": {k: tuple(v) for k, v in counts.items()}, "errors": errors}


def rate(counts: dict, name: str) -> float:
    hit, n = counts.get(name, (0, 0))
    return hit / n if n else float("nan")


COLUMNS = ([f"recall {a}" for a in ANATOMIES] + [f"precision {a}" for a in ANATOMIES]
           + ["found", "flag", "abnormal caught", "label precision", "label recall"])


def table(reports: list[dict]) -> str:
    """A Markdown table: one row per part of the fixture and all, one column per figure (rate, count)."""
    rows = [("part", "reports", *COLUMNS), tuple("---" for _ in range(len(COLUMNS) + 2))]
    for part in (*PARTS, "all"):
        subset = [r for r in reports if part in ("all", part_of(r))]
        counts = measure(subset)["counts"]
        rows.append((part, str(len(subset)), *(f"{rate(counts, c):.2f} ({counts.get(c, (0, 0))[0]}/"
                                                f"{counts.get(c, (0, 0))[1]})" for c in COLUMNS)))
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default=str(FIXTURE))
    ap.add_argument("--errors", action="store_true", help="list the tuning part's disagreements")
    args = ap.parse_args(argv)
    reports = load_fixture(args.fixture)
    print(table(reports))
    if args.errors:
        tuning = [r for r in reports if part_of(r) == "tuning"]
        print("\n".join(measure(tuning)["errors"]))


if __name__ == "__main__":
    main()
