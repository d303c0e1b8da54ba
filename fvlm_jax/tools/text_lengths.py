"""python -m fvlm_jax.tools.text_lengths WORKDIR [p95]: each anatomy's token counts in WORKDIR/records/stats.json
and the explicit model.text.anatomy_len that the percentile gives."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fvlm_jax import layout, text_lengths


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workdir")
    ap.add_argument("percentile", nargs="?", default="p95", choices=text_lengths.PERCENTILES)
    args = ap.parse_args(argv)
    try:
        manifest = layout.load_manifest(args.workdir)
        stats = layout.load_stats(args.workdir)
        anatomies, stored = manifest["anatomies"], int(manifest["text_len"])
        spec = text_lengths.from_stats(args.percentile, anatomies, stored, stats)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(f"stored tokens per anatomy text (prep.text_len): {stored}")
    for a, n in zip(anatomies, text_lengths.parse(spec, anatomies, stored) or [stored] * len(anatomies)):
        s = stats["anatomy_text_tokens_by_anatomy"][a]
        print(f"  {a:<12} p50 {s['p50']:5.0f}  p95 {s['p95']:5.0f}  p99 {s['p99']:5.0f}  max {s['p100']:5.0f}"
              f"  -> {n}")
    print(f'model.text.anatomy_len="{spec}"')


if __name__ == "__main__":
    main()
