"""`totobench export RESULTS --format md|csv|json|html [--out FILE]`: leaderboard and per-layer tables."""

from __future__ import annotations

import sys

from totobench.io import atomic_write
from totobench.results.export import collect_results, export, merge_notes


def cli_export(args) -> int:
    """The export on standard output, or written atomically to --out; merge notes go to stderr."""
    results = collect_results(args.results)
    for note in merge_notes(results):
        print(f"totobench: merged runs: {note}", file=sys.stderr)
    text = export(results, args.format)
    if args.out:
        atomic_write(args.out, text)
        print(f"wrote {args.out} ({len(results)} results, format {args.format})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
