"""`totobench davis-eval` and `totobench sta-eval`: the official metrics of a folder or file of
predictions, printed as tables and optionally written as JSON."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from totobench.data.ego4d import load_sta
from totobench.io import atomic_write_json
from totobench.metrics.davis import METRIC_KEYS, evaluate_davis
from totobench.metrics.ego4d_sta import (TOP_K, VARIANTS, check_ground_truth, load_sta_predictions,
                                         sta_top5_map)


def cli_davis_eval(args) -> int:
    """`totobench davis-eval --davis-root DIR --results DIR [--set val] [--json FILE]`."""
    scores = evaluate_davis(args.davis_root, args.results, args.split, show_progress=True)
    console = Console()

    overall = Table(title=f"DAVIS-2017 semi-supervised, {args.split} ({len(scores['per_object'])} objects)")
    for key in METRIC_KEYS:
        overall.add_column(key, justify="right")
    overall.add_row(*(f"{scores[key]:.4f}" for key in METRIC_KEYS))
    console.print(overall)

    # the per-object table leaves out Decay to fit 80 columns; --json has every value
    columns = ("J&F-Mean", "J-Mean", "J-Recall", "F-Mean", "F-Recall")
    per_object = Table(title="Per sequence and object")
    per_object.add_column("Sequence", no_wrap=True)
    per_object.add_column("Obj", justify="right")
    for key in columns:
        per_object.add_column(key, justify="right")
    for name, values in scores["per_object"].items():
        sequence, object_id = name.rsplit("_", 1)
        per_object.add_row(sequence, object_id, *(f"{values[key]:.3f}" for key in columns))
    console.print(per_object)

    if args.json:
        atomic_write_json(args.json, scores)
        console.print(f"wrote {args.json}")
    return 0


def cli_sta_eval(args) -> int:
    """`totobench sta-eval ANNOTATIONS PREDICTIONS [--json FILE]`: validate, score, print a table."""
    annotations = load_sta(args.annotations)  # v1 or v2; one-line DataError on a bad file
    check_ground_truth(annotations, args.annotations)  # a test split (no ground truth) fails here
    predictions = load_sta_predictions(args.predictions, annotations)
    metrics = sta_top5_map(annotations, predictions)

    entries = annotations.annotations
    results = predictions["results"]
    with_preds = sum(1 for e in entries if results.get(e["uid"]))
    table = Table(title=f"Ego4D STA Top-{TOP_K} mAP (%)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in VARIANTS:
        label = f"{name} (challenge metric)" if name == "Overall" else name
        table.add_row(label, f"{metrics[name]:.2f}")
    console = Console()
    console.print(table)
    console.print(f"{len(entries)} annotated frames, {with_preds} with predictions "
                  f"(frames without predictions are not counted, as in the official code)")
    if args.json:
        atomic_write_json(args.json, {k: (None if math.isnan(v) else v) for k, v in metrics.items()})
    return 0
