"""Tokens per anatomy text: each anatomy's texts encoded at their own length, chosen from the data statistics.

The records store every anatomy's text at `prep.text_len` tokens. Texts about some anatomies are much longer than
others (in the demo the lung's median is 36 tokens and its 95th percentile 105; the spleen's are 10 and 25), so one
length for all either truncates the long ones or pads the short ones. `model.text.anatomy_len` sets a length per
anatomy that the model cuts the stored tokens to before the text encoder (one encoder call per distinct length):

  ""                        every anatomy at prep.text_len (no cut)
  "p90", "p95", "p99", "p100"
                            that percentile of each anatomy's token counts in records/stats.json, rounded up to a
                            multiple of 8 and at most the stored length (`resolve` turns it into explicit
                            lengths when the stages load the prepared records)
  "lung=112,heart=56"       explicit lengths; anatomies not named keep the stored length

A cut text ends in [EOS] at its last position, exactly as the tokenizer writes a text truncated at that length.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import ml_collections

log = logging.getLogger(__name__)

PERCENTILES = ("p90", "p95", "p99", "p100")
MULTIPLE = 8


def is_percentile(spec: str) -> bool:
    return spec.strip() in PERCENTILES


def parse(spec: str, anatomies: Sequence[str], stored_len: int) -> tuple[int, ...] | None:
    """An explicit `model.text.anatomy_len` ("" or "name=length,...") -> one length per anatomy, or None when
    every anatomy keeps the stored length."""
    spec = (spec or "").strip()
    if not spec:
        return None
    if is_percentile(spec):
        raise ValueError(f"model.text.anatomy_len={spec!r} is taken from records/stats.json when run.py trains "
                         "(text_lengths.resolve); without prepared records give explicit lengths, e.g. "
                         "'lung=112,heart=56', or '' for all at prep.text_len")
    lengths = dict.fromkeys(anatomies, stored_len)
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in lengths:
            raise ValueError(f"model.text.anatomy_len: {item.strip()!r} is not 'anatomy=length' with an anatomy of "
                             f"prep.anatomies {list(anatomies)}")
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"model.text.anatomy_len: length {value.strip()!r} of {name} is not an integer") from None
        if not 2 <= n <= stored_len:
            raise ValueError(f"model.text.anatomy_len: {name}={n} must lie in [2, {stored_len}] (the stored "
                             "prep.text_len; [CLS] and [EOS] take two)")
        lengths[name] = n
    out = tuple(lengths[a] for a in anatomies)
    return None if all(n == stored_len for n in out) else out


def from_stats(percentile: str, anatomies: Sequence[str], stored_len: int, stats: dict) -> str:
    """The explicit spec ("name=length,...") that a percentile spec stands for, from stats.json's per-anatomy
    token counts: the percentile rounded up to a multiple of 8, at most the stored length."""
    if not is_percentile(percentile):
        raise ValueError(f"{percentile!r} is not one of {PERCENTILES}")
    by_anatomy = (stats or {}).get("anatomy_text_tokens_by_anatomy")
    if not by_anatomy:
        raise ValueError(f"model.text.anatomy_len={percentile!r} needs the per-anatomy token counts of "
                         "records/stats.json (written by --mode=prepare); prepare again, or give explicit lengths")
    missing = [a for a in anatomies if a not in by_anatomy]
    if missing:
        raise ValueError(f"records/stats.json has no token counts for {missing}: prepare again")
    q = percentile.strip()
    lengths = {a: min(stored_len, max(MULTIPLE, MULTIPLE * math.ceil(by_anatomy[a][q] / MULTIPLE)))
               for a in anatomies}
    return ",".join(f"{a}={n}" for a, n in lengths.items())


def groups(lengths: Sequence[int]) -> list[tuple[int, list[int]]]:
    """[(length, [anatomy indices with that length])], shortest first: one text-encoder call each."""
    by_len: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(int(n), []).append(i)
    return sorted(by_len.items())


def resolve(cfg: ml_collections.ConfigDict, manifest: dict, stats: dict | None) -> ml_collections.ConfigDict:
    """cfg with model.text.anatomy_len as explicit lengths ("lung=112,..."; a percentile there is taken from the
    records' stats.json), checked against the stored text length; logs what each anatomy gets. Training,
    evaluation and export all call it, so they encode texts at the same lengths."""
    spec = str(cfg.model.text.anatomy_len or "").strip()
    if not spec:
        return cfg
    stored = int(manifest.get("text_len", cfg.prep.text_len))
    if stored != cfg.prep.text_len:
        raise ValueError(f"records hold {stored} tokens per anatomy text, config has prep.text_len="
                         f"{cfg.prep.text_len}: prepare again or set it back")
    explicit = from_stats(spec, cfg.prep.anatomies, stored, stats) if is_percentile(spec) else spec
    lengths = parse(explicit, cfg.prep.anatomies, stored)
    by_anatomy = (stats or {}).get("anatomy_text_tokens_by_anatomy", {})
    log.info("tokens per anatomy text (model.text.anatomy_len=%r; stored %d): %s", spec, stored, ", ".join(
        f"{a} {n}" + (f" (p95 {by_anatomy[a]['p95']:.0f})" if a in by_anatomy else "")
        for a, n in zip(cfg.prep.anatomies, lengths or [stored] * len(cfg.prep.anatomies))))
    cfg = copy.deepcopy(cfg)
    cfg.model.text.anatomy_len = explicit
    return cfg
