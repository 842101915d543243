"""Do two results folders hold the same numbers? Per result file present in both: every layer's
metrics, chosen hyper-parameters and selection score, and the best layer.

    .venv/bin/python benchmarks/same_numbers.py results /tmp/rerun-results

Prints one line per file and a count; exits 1 when any number differs or a file is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def differences(reference: dict, other: dict) -> list[str]:
    """Where `other` differs from `reference` (layer, field, both values)."""
    out = []
    if [r["layer"] for r in reference["per_layer"]] != [r["layer"] for r in other["per_layer"]]:
        return ["layers differ"]
    for a, b in zip(reference["per_layer"], other["per_layer"]):
        out += [f"L{a['layer']} {key}: {a[key]} vs {b[key]}" for key in ("metrics", "best_hparams", "select_score")
                if a[key] != b[key]]
    if reference["best_layer"] != other["best_layer"]:
        out.append("best_layer differs")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference")
    parser.add_argument("other")
    args = parser.parse_args()
    files = sorted(Path(args.reference).glob("*/*.json"))
    same = 0
    for path in files:
        rel = path.relative_to(args.reference)
        twin = Path(args.other) / rel
        if not twin.is_file():
            print(f"{rel}: missing in {args.other}")
            continue
        found = differences(json.loads(path.read_text()), json.loads(twin.read_text()))
        same += not found
        rows = len(json.loads(path.read_text())["per_layer"])
        print(f"{rel}: {rows} layers, " + ("identical" if not found else f"{len(found)} differences: {found[:3]}"))
    print(f"{same} of {len(files)} result files identical in every per-layer number")
    return 0 if same == len(files) else 1


if __name__ == "__main__":
    sys.exit(main())
