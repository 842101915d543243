"""Streamed probe training (`--cache-budget 0`) against the cached run, side by side (issue 19).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/streamed_vs_cached.py \
        --data-root ~/.cache/totobench/data/world-default-seed0 --out /tmp/streamed-vs-cached

For each task (default imagenet and k400; toto-tiny, every layer, epochs reduced for both runs) it
runs `totobench run` twice into its own TOTOBENCH_HOME under --out: first with `--cache-budget 0`
(the probe reads the train split through the backbone every epoch; val is streamed too), then
with the default budget (features extracted once into the cache). It prints the best layer's
main metric of both, the wall time of both, and the feature-cache folder's bytes before and after
each run. The cache folder is deleted at the end unless --keep (k400 all layers is ~8 GB). On a loaded
2-core machine the full k400 takes over an hour: `--per-class k400=30,10` runs it on a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

EPOCHS = {"imagenet": 3, "k400": 2}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def run(task: str, args, out: Path, home: Path, extra: list[str]) -> tuple[dict, float]:
    """One `totobench run` of `task` into `out`; (its result, wall seconds)."""
    epochs = args.epochs.get(task, 2)
    cmd = [sys.executable, "-m", "totobench", "run", "--model", args.model, "--tasks", task, "--layers", args.layers,
           "--data-root", str(args.data_root), "--set", f"{task}.probe.epochs={epochs}", "--out", str(out), *extra]
    if task in args.per_class:  # a subset: the first N train and M val entries of each class (the quick settings)
        train_n, val_n = args.per_class[task]
        cmd += ["--quick", "--set", f"{task}.quick.epochs={epochs}",
                "--set", f"{task}.quick.max_train_per_class={train_n}", "--set", f"{task}.quick.max_val_per_class={val_n}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "TOTOBENCH_HOME": str(home)}, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    name = json.loads(next(out.glob(f"*/{task}.json")).read_text())
    return name, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, required=True, help="the data world (or real data) folder")
    parser.add_argument("--out", type=Path, default=Path("/tmp/streamed-vs-cached"))
    parser.add_argument("--model", default="toto-tiny")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--tasks", default="imagenet,k400")
    parser.add_argument("--per-class", action="append", default=[], metavar="TASK=TRAIN,VAL",
                        help="run TASK on the first TRAIN / VAL entries of each class only (e.g. k400=30,10)")
    parser.add_argument("--keep", action="store_true", help="keep the feature cache folder")
    args = parser.parse_args()
    args.per_class = {t: tuple(int(n) for n in v.split(",")) for t, v in (p.split("=") for p in args.per_class)}
    args.epochs = EPOCHS
    home = args.out / "home"
    features = home / "features"
    print(f"{'task':<10} {'metric':<6} {'cached best':>18} {'streamed best':>18} {'streamed @ cached L':>20} "
          f"{'cached s':>9} {'streamed s':>10} {'ratio':>6}  cache bytes: before / after streamed / after cached",
          flush=True)
    for task in args.tasks.split(","):
        before = folder_bytes(features)
        streamed, t_streamed = run(task, args, args.out / "streamed", home, ["--cache-budget", "0"])
        after_streamed = folder_bytes(features)
        cached, t_cached = run(task, args, args.out / "cached", home, [])
        after_cached = folder_bytes(features)
        metric = cached["task"]["main_metric"]
        c, s = cached["best_layer"], streamed["best_layer"]
        s_at_c = {r["layer"]: r["metrics"][metric] for r in streamed["per_layer"]}[c["layer"]]
        print(f"{task:<10} {metric:<6} {c['metrics'][metric]:>12.4f} (L{c['layer']}) {s['metrics'][metric]:>12.4f} "
              f"(L{s['layer']}) {s_at_c:>20.4f} {t_cached:>9.1f} {t_streamed:>10.1f} {t_streamed / t_cached:>6.2f}  "
              f"{before} / {after_streamed} / {after_cached}"
              f"{'' if streamed['protocol'].get('streamed') else '  (the streamed run did NOT stream)'}", flush=True)
    if not args.keep:
        shutil.rmtree(features, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
