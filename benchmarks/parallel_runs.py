"""Concurrent `totobench run` processes over one feature cache and one results folder.

A round starts these processes at the same moment on one $TOTOBENCH_HOME (so one feature cache)
and one --out, the way a job array does:

    A  --model M --tasks T                   --out OUT
    B  the same command as A                 --out OUT        (the same result files)
    C  --model M --tasks T --layers 0:2      --out OUT-layers (the same features, another layer set)
    D  --model random-init:M --tasks T       --out OUT        (with --procs 4)

and checks that every process exits 0, that every result file equals the one a sequential run of
the same command writes (all but `created`, `env`, `timing_s` and `extra.feature_cache`), and that
no temporary or lock file is left in the cache or the results. With --symlink, B and D reach the
cache and the results through a second path, a symlink (what one shared mount looks like to two
jobs); with --kill, B is SIGKILLed at a random moment of its run, the others must still finish,
and B's command run again afterwards must complete with the same results. Each round starts from
an empty cache; the data world (size tiny) and the sequential results are made once.

    .venv/bin/python benchmarks/parallel_runs.py --rounds 20 [--symlink] [--kill] [--procs 4]

Prints one line per round; exits 1 at the first round that fails, saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = "imagenet,davis"
VOLATILE = ("created", "env", "timing_s")  # what legitimately differs between two runs of one command


def commands(model: str, procs: int = 3) -> list[tuple[str, list[str], str]]:
    """(name, `totobench run` arguments without --out and --data-root, results folder name) per process."""
    every = [("A", ["--model", model], "out"),
             ("B", ["--model", model], "out"),
             ("C", ["--model", model, "--layers", "0:2"], "out-layers"),
             ("D", ["--model", f"random-init:{model}"], "out")]
    return [(name, ["run", *args, "--tasks", TASKS, "--quick"], out) for name, args, out in every[:procs]]


def comparable(result: dict) -> dict:
    """A result document without what differs between two runs of one command."""
    out = {k: v for k, v in result.items() if k not in VOLATILE}
    out["extra"] = {k: v for k, v in result.get("extra", {}).items() if k != "feature_cache"}
    return out


def read_results(folder: Path) -> dict[str, dict]:
    """{relative path: comparable document} of the result files under `folder`; the folder's own
    path in them (e.g. where DAVIS masks went), also as reached through its symlink, reads <out>."""
    def text(p: Path) -> str:
        return p.read_text().replace(f"{folder}-link", "<out>").replace(str(folder), "<out>")
    return {str(p.relative_to(folder)): comparable(json.loads(text(p))) for p in sorted(folder.glob("*/*.json"))}


def leftovers(*folders: Path) -> list[str]:
    """Temporary and lock files under `folders` (a run that finished cleanly leaves none)."""
    found = []
    for folder in folders:
        for pattern in (".*.tmp", ".*.lock"):
            found += [str(p) for p in folder.rglob(pattern)]
    return found


def _env(home: Path) -> dict:
    """One thread each, a chunk per batch (more chunks to contend for), logs unbuffered lines that do not wrap."""
    return {**os.environ, "TOTOBENCH_HOME": str(home), "OMP_NUM_THREADS": "1", "TOTOBENCH_CHUNK_BATCHES": "1",
            "COLUMNS": "400", "PYTHONUNBUFFERED": "1"}


def _start(args: list[str], home: Path, out: Path, data_root: Path, log: Path) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "totobench", *args, "--out", str(out),
                                 "--data-root", str(data_root)], env=_env(home), stdout=f, stderr=subprocess.STDOUT)


def sequential(model: str, data_root: Path, work: Path, procs: int = 3) -> tuple[dict, float]:
    """The reference: each distinct command run alone, one after another, on its own empty cache,
    in `work` (emptied first). Returns ({results folder: read_results}, seconds B's command took)."""
    shutil.rmtree(work, ignore_errors=True)
    reference, seconds = {}, 0.0
    for name, args, out in commands(model, procs):
        if name == "B":
            continue  # A's command
        t0 = time.perf_counter()
        proc = _start(args, work / f"home-{name}", work / out, data_root, work / f"sequential-{name}.log")
        if proc.wait() != 0:
            raise RuntimeError(f"sequential run {name} failed, see {work / f'sequential-{name}.log'}")
        seconds = seconds or time.perf_counter() - t0
    for out in {out for _, _, out in commands(model, procs)}:
        reference[out] = read_results(work / out)
    return reference, seconds


def run_round(model: str, data_root: Path, work: Path, reference: dict, procs: int = 3,
              symlink: bool = False, kill_after: float | None = None) -> tuple[list[str], list[str] | None]:
    """One round in `work` (emptied first): (the problems found, [] when it passed; with `kill_after`,
    the locks B held when it was SIGKILLed `kill_after` seconds after it first held one, else None)."""
    shutil.rmtree(work, ignore_errors=True)
    home = work / "home"
    home.mkdir(parents=True)
    if symlink:
        (work / "home-link").symlink_to(home, target_is_directory=True)
        (work / "out").mkdir()
        (work / "out-link").symlink_to(work / "out", target_is_directory=True)
    started = {}
    for name, args, out in commands(model, procs):
        second_path = symlink and name in ("B", "D")
        started[name] = _start(args, work / ("home-link" if second_path else "home"),
                               work / (f"{out}-link" if second_path and out == "out" else out),
                               data_root, work / f"{name}.log")
    problems, held = [], None
    if kill_after is not None:
        held = kill_mid_run(started["B"], [home, work / "out"], kill_after)
        if held is None:
            problems.append("B finished before it could be killed (lower the kill delay)")
    for name, proc in started.items():
        code = proc.wait()
        if code != 0 and not (kill_after is not None and name == "B"):
            problems.append(f"process {name} exited {code} (log {work / f'{name}.log'})")
    if kill_after is not None:
        _, args, out = commands(model, procs)[1]
        rerun = _start(args, home, work / out, data_root, work / "B-rerun.log")
        if rerun.wait() != 0:
            problems.append(f"B's command run again after the kill exited {rerun.returncode} "
                            f"(log {work / 'B-rerun.log'})")
    for out, expected in reference.items():
        got = read_results(work / out) if (work / out).is_dir() else {}
        for path in sorted(set(expected) | set(got)):
            if got.get(path) != expected.get(path):
                problems.append(f"{out}/{path} differs from the sequential run's")
    if kill_after is None:
        problems += [f"left behind: {p}" for p in leftovers(home, *(work / out for out in reference))]
    return problems, held


def _locks_of(pid: int, folders: list[Path]) -> list[str]:
    """Names of the lock files under `folders` that process `pid` holds."""
    held = []
    for folder in folders:
        for lock in folder.rglob(".*.lock"):
            try:
                if json.loads(lock.read_text()).get("pid") == pid:
                    held.append(lock.name)
            except (OSError, ValueError):
                continue  # released or being written meanwhile
    return held


def kill_mid_run(proc: subprocess.Popen, folders: list[Path], delay: float) -> list[str] | None:
    """SIGKILL `proc` `delay` seconds after it is first seen holding a lock (it is running a task),
    then reap it (a zombie still answers kill(pid, 0)). Returns the locks it held when killed
    (result locks read `.<task>.json.lock`), or None when it had finished before."""
    deadline = time.monotonic() + 600
    while proc.poll() is None and not _locks_of(proc.pid, folders) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return None
    held = _locks_of(proc.pid, folders)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", default="toto-tiny")
    parser.add_argument("--procs", type=int, default=4, choices=(3, 4))
    parser.add_argument("--symlink", action="store_true", help="B and D see the cache and results through a symlink")
    parser.add_argument("--kill", action="store_true", help="SIGKILL B mid-run, then run its command again")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args()

    from totobench.data.synth import synth
    work = Path(args.work or tempfile.mkdtemp(prefix="totobench-parallel-"))
    world = work / "world"
    if not (world / "world.json").exists():
        synth(world, seed=0, size="tiny")
    t0 = time.perf_counter()
    reference, b_seconds = sequential(args.model, world, work / "sequential", args.procs)
    print(f"sequential reference: {len(reference)} folders, {time.perf_counter() - t0:.0f} s "
          f"(B's command alone: {b_seconds:.1f} s)")
    rng = random.Random(args.seed)
    for i in range(1, args.rounds + 1):
        kill_after = rng.uniform(0.0, 0.5) * b_seconds if args.kill else None
        t0 = time.perf_counter()
        problems, held = run_round(args.model, world, work / "round", reference, args.procs, args.symlink,
                                   kill_after)
        what = ""
        if held is not None:  # result locks by name (".imagenet.json.lock"), cache locks counted
            kinds = sorted({n for n in held if n.endswith(".json.lock")})
            kinds.append(f"{sum(not n.endswith('.json.lock') for n in held)} cache")
            what = f", B killed {kill_after:.1f} s into its work, holding {', '.join(kinds)}"
        print(f"round {i}: {'FAIL' if problems else 'ok'} ({time.perf_counter() - t0:.0f} s{what})", flush=True)
        if problems:
            print("\n".join(f"  {p}" for p in problems))
            print(f"{i - 1} rounds in a row passed; the failing round is kept in {work / 'round'}")
            return 1
    print(f"{args.rounds} of {args.rounds} rounds passed ({args.procs} processes"
          f"{', symlinked cache' if args.symlink else ''}{', one SIGKILLed and rerun' if args.kill else ''})")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
