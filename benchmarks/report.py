"""Run every benchmark of benchmarks/ and the end-to-end suite; write benchmarks/REPORT.md.

    .venv/bin/python benchmarks/report.py                  # everything (about an hour on 2 busy cores)
    .venv/bin/python benchmarks/report.py --skip-full      # benchmarks + the --quick end-to-end run only
    .venv/bin/python benchmarks/report.py --skip-e2e       # benchmark scripts only
    .venv/bin/python benchmarks/report.py --only-e2e       # end-to-end runs only
    .venv/bin/python benchmarks/report.py --benchmarks layer_sweep,extract_memory

Each benchmark script runs in its own process with a time limit; its printed figures are kept
(a script that fails or times out is reported as such, with its error, and the report goes on).
The end-to-end part times `totobench run --model MODEL --tasks all --layers all` (and the same
with `--quick`) with a fresh, empty feature cache: TOTOBENCH_HOME is a temporary folder whose
`data/` is a symlink to the default home's data folder, so the generated data world is reused
and its generation is not timed. Wall time, CPU time and peak RSS come from the run's process
(`resource.getrusage(RUSAGE_CHILDREN)` of a wrapper process around it).

Every section is also stored in benchmarks/REPORT.json with the time it was measured; a partial
run (--skip-*, --benchmarks, --only-e2e) keeps the other sections from the previous run and
REPORT.md says when each was measured. --fresh starts from nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = sys.executable
SKIP_SCRIPTS = {"report.py"}
# arguments per benchmark script: "full" for the report, "smoke" for --smoke (checking report.py itself)
SCRIPT_ARGS = {
    "forward.py": {"full": ["--repeats", "3"], "smoke": ["--models", "toto-tiny", "--repeats", "1"]},
    "forward_microbatch.py": {"full": ["--repeats", "3"], "smoke": ["--clips", "16", "--repeats", "1"]},
    "layer_sweep.py": {"full": ["--repeats", "3"], "smoke": ["--models", "toto-tiny", "--repeats", "1"]},
    "extract_memory.py": {"full": ["--n", "128"], "smoke": ["--n", "16", "--pooling", "tokens"]},
    "probe_grid.py": {"full": [], "smoke": ["--layers", "2", "--n", "400", "--epochs", "2"]},
    "probe_grid_real.py": {"full": [], "smoke": ["--epochs", "1"]},
    "label_propagation.py": {"full": [], "smoke": ["--frames", "6", "--grid", "16", "--context", "3", "--repeats", "1"]},
    "kinetics_decode.py": {"full": [], "smoke": ["--videos", "2", "--frames", "120", "--repeats", "1"]},
    "copy_emergence.py": {"full": [], "smoke": ["--layers", "1", "--dim", "64", "--steps", "4", "--eval-every", "2",
                                                "--codebooks", "64"]},
    "change_readout.py": {"full": [], "smoke": ["--clips", "8"]},
}
# scripts whose figures are a plain-text table at the end of their output: its last lines
FIGURES_TAIL = {"raw_pixel_baselines.py": 7}
TARGETS_S = {"full": 15 * 60, "quick": 2 * 60}
GLANCE_LINE = re.compile(r"(?i)\bratio\b|speed-?up|\bx\s?\d+(?:\.\d+)?\s+vs\b")
FIGURE_LINE = re.compile(r"(?i)\bratio\b|speed-?up|\d(?:\.\d+)?x\b|\bx\s?\d|top-?1|[│┃]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Runs a command, then writes its wall time and the rusage of its process tree (as JSON) to a file.
WRAPPER = r"""
import json, resource, subprocess, sys, time
out_path, cmd = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
rc = subprocess.call(cmd)
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out_path, "w") as f:
    json.dump({"rc": rc, "wall_s": wall, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
               "max_rss_mb": ru.ru_maxrss / 1024}, f)
"""


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def seconds_until(hh_mm: str) -> float:
    """Seconds from now to the next HH:MM UTC (today's, or 0 if it is past by less than 12 hours)."""
    now = dt.datetime.now(dt.timezone.utc)
    hour, minute = (int(x) for x in hh_mm.split(":"))
    target = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
    left = (target - now).total_seconds()
    if left < -12 * 3600:
        left += 24 * 3600
    return max(0.0, left)


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_info() -> dict:
    """CPU model, cores, RAM, torch version and threads, Python, load average, commit."""
    import torch
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
            "ram_gb": ram_gb, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "niceness": os.nice(0), "load_average": load_average(), "commit": commit, "measured": now_utc()}


def benchmark_scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name not in SKIP_SCRIPTS and not p.name.startswith("_"))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group this report started for `proc` (its session, nothing else)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_benchmark(script: Path, args: list[str], timeout_s: float) -> dict:
    """Run one benchmark script; never raises. Returns {status: ok|failed|timeout, error, output,
    figures (the lines with ratios/speed-ups/tables), seconds, command, load before/after}."""
    cmd = [PYTHON, str(script), *args]
    env = dict(os.environ, COLUMNS="160", NO_COLOR="1", TERM="dumb", PYTHONUNBUFFERED="1")
    record = {"script": script.name, "command": " ".join([".venv/bin/python", f"benchmarks/{script.name}", *args]),
              "measured": now_utc(), "load_before": load_average(), "timeout_s": timeout_s}
    start = time.perf_counter()
    try:
        with tempfile.TemporaryFile("w+") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    text=True, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout_s)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, status = None, "timeout"
            out.seek(0)
            output = ANSI.sub("", out.read())
    except OSError as err:  # could not even start it
        rc, status, output = None, "failed", f"{type(err).__name__}: {err}"
    record.update(seconds=time.perf_counter() - start, returncode=rc, status=status, output=output,
                  load_after=load_average())
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    figures = [line for line in lines if FIGURE_LINE.search(line)]
    tail = FIGURES_TAIL.get(script.name, 0)
    figures += [line for line in lines[len(lines) - tail:] if tail and line not in figures]
    record["figures"] = figures if status == "ok" else []
    if status == "failed":
        record["error"] = lines[-1] if lines else f"exit code {rc}, no output"
    elif status == "timeout":
        record["error"] = f"did not finish within {timeout_s:.0f} s (killed)"
    return record


def prepare_home(root: Path) -> Path:
    """A fresh TOTOBENCH_HOME under `root` whose data/ is the default home's data folder (the data
    world is generated there first if missing: that is not part of the timed run)."""
    from totobench.data.world import ensure_data_world
    from totobench.paths import data_home
    saved = os.environ.pop("TOTOBENCH_HOME", None)  # the default home, whatever the caller set
    try:
        ensure_data_world()
        data = data_home()
    finally:
        if saved is not None:
            os.environ["TOTOBENCH_HOME"] = saved
    home = root / "home"
    home.mkdir(parents=True)
    (home / "data").symlink_to(data, target_is_directory=True)
    return home


def run_end_to_end(model: str, quick: bool, timeout_s: float, keep_log: Path | None = None,
                   results_out: Path | None = None) -> dict:
    """Time `totobench run --model MODEL --tasks all --layers all [--quick]` with an empty feature
    cache; never raises. Returns wall/CPU seconds, peak RSS, per-task timings and main metrics.
    results_out: write the result files there (with --overwrite) instead of a temporary folder."""
    mode = "quick" if quick else "full"
    args = ["run", "--model", model, "--tasks", "all", "--layers", "all"] + (["--quick"] if quick else [])
    if results_out is not None:
        args.append("--overwrite")
    record = {"mode": mode, "command": "totobench " + " ".join(args), "model": model, "measured": now_utc(),
              "load_before": load_average(), "target_s": TARGETS_S[mode], "timeout_s": timeout_s}
    with tempfile.TemporaryDirectory(prefix=f"totobench-report-{mode}-") as tmp:
        tmp = Path(tmp)
        try:
            home = prepare_home(tmp)
        except Exception as err:  # noqa: BLE001 - reported, not raised
            record.update(status="failed", error=f"data world: {type(err).__name__}: {err}")
            return record
        results = Path(results_out).resolve() if results_out is not None else tmp / "results"
        data_before = data_files(home / "data")
        totobench = Path(PYTHON).with_name("totobench")
        cmd = ([str(totobench)] if totobench.exists() else [PYTHON, "-m", "totobench"]) + args + ["--out", str(results)]
        stats_path, log_path = tmp / "stats.json", tmp / "run.log"
        started = time.time()
        env = dict(os.environ, TOTOBENCH_HOME=str(home), COLUMNS="160", NO_COLOR="1", TERM="dumb")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([PYTHON, "-c", WRAPPER, str(stats_path), json.dumps(cmd)], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                timed_out = True
        output = ANSI.sub("", log_path.read_text(errors="replace"))
        if keep_log is not None:
            keep_log.write_text(output)
        lines = [line.rstrip() for line in output.splitlines() if line.strip()]
        record["load_after"] = load_average()
        if timed_out:
            done = len(list(results.glob("*/*.json")))
            record.update(status="timeout", error=f"did not finish within {timeout_s:.0f} s (killed; "
                                                  f"{done} task result file(s) written by then)",
                          wall_s=timeout_s, tail=lines[-15:])
        elif not stats_path.exists():
            record.update(status="failed", error="the timing wrapper wrote no figures", tail=lines[-15:])
        else:
            stats = json.loads(stats_path.read_text())
            record.update(stats)
            record["status"] = "ok" if stats["rc"] == 0 else "failed"
            if stats["rc"] != 0:
                record.update(error=lines[-1] if lines else f"exit code {stats['rc']}", tail=lines[-15:])
        record["data_created"] = sorted(str(p) for p in data_files(home / "data") - data_before)
        # results_out may hold other result files of the model (e.g. k400-linear): only this run's count
        record["tasks"] = (task_summaries(results, f"{model_folder(model)}/*.json", since=started)
                           if results_out is not None else task_summaries(results))
        record["cache_mb"] = folder_mb(home / "features")
    return record


def model_folder(model: str) -> str:
    """The folder of results/ that `totobench run --model NAME` writes to (a registered name)."""
    from totobench.results.schema import safe_name
    return safe_name(model)


def task_summaries(results: Path, pattern: str = "*/*.json", since: float = 0.0) -> list[dict]:
    """Per result file (written after `since`, a time.time()): task, seconds (timing_s.total), best
    layer and its main metric."""
    rows = []
    for path in sorted(p for p in results.glob(pattern) if p.stat().st_mtime >= since):
        try:
            doc = json.loads(path.read_text())
            main = doc["task"]["main_metric"]
            rows.append({"task": doc["task"]["name"], "seconds": doc.get("timing_s", {}).get("total"),
                         "main_metric": main, "best_layer": doc["best_layer"]["layer"],
                         "best_value": doc["best_layer"]["metrics"].get(main), "layers": len(doc["per_layer"])})
        except (OSError, ValueError, KeyError, TypeError) as err:
            rows.append({"task": path.stem, "error": f"unreadable result: {err}"})
    return rows


def data_files(data: Path) -> set[Path]:
    """Files under the (symlinked) data folder, relative to it: to see what a run generated there."""
    if not data.exists():
        return set()
    root = data.resolve()
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def folder_mb(path: Path) -> float:
    if not path.exists():
        return 0.0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------------------- REPORT.md


def _fmt_s(seconds) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)" if seconds >= 60 else f"{seconds:.1f} s"


def render_markdown(state: dict, regenerate: str) -> str:
    """REPORT.md from the merged sections: machine, end-to-end runs, benchmark figures, outputs."""
    m = state.get("machine", {})
    out = ["# totobench performance report", ""]
    out += [f"Written {state.get('written', now_utc())} by `{regenerate}`.",
            "Regenerate everything with `.venv/bin/python benchmarks/report.py` "
            "(`--skip-full` skips the slow end-to-end run, `--skip-e2e` both end-to-end runs, "
            "`--only-e2e` the benchmark scripts; see `--help`). Sections not re-run keep the figures "
            "of their last run (from benchmarks/REPORT.json) and show when they were measured.", ""]
    if state.get("notes"):
        out += ["## Notes", "", *[f"- {n['text']} ({n['written']})" for n in state["notes"]], ""]
    glance = [(name, line.strip()) for name, b in sorted(state.get("benchmarks", {}).items())
              for line in b.get("figures", []) if GLANCE_LINE.search(line)]
    e2e = state.get("e2e", {})
    if glance or e2e:
        out += ["## At a glance", ""]
        for mode in ("full", "quick"):
            r = e2e.get(mode)
            if r is not None:
                result = (f"{_fmt_s(r.get('wall_s'))}, peak RSS {r.get('max_rss_mb', 0):.0f} MB" if r["status"] == "ok"
                          else f"{r['status']}: {r.get('error', '')}")
                out.append(f"- end to end `{mode}` ({r.get('model')}): {result} (target < {_fmt_s(r['target_s'])})")
        out += [f"- {name}: `{line}`" for name, line in glance]
        if any(b.get("figures") for b in state.get("benchmarks", {}).values()):
            out.append("- result tables (e.g. forward.py's ours/transformers ratio): under Benchmark scripts below")
        out.append("")
    out += ["## Machine", "",
            f"- CPU: {m.get('cpu')}, {m.get('cores')} cores ({m.get('cores_usable')} usable by this process)",
            f"- RAM: {m.get('ram_gb', 0) or 0:.1f} GiB",
            f"- torch {m.get('torch')} ({m.get('torch_threads')} threads), Python {m.get('python')}, {m.get('platform')}",
            f"- commit {m.get('commit')}; report process niceness {m.get('niceness')}",
            f"- load average (1/5/15 min) when the report started: {m.get('load_average')} — the machine is shared, "
            "so every figure below is slowed by other work; each section records the load around it and ratios "
            "are measured side by side in one process to cancel most of it.", ""]

    out += ["## End to end", ""]
    if not e2e:
        out += ["Not measured yet (run without `--skip-e2e`).", ""]
    else:
        out += ["Fresh feature cache for every run (TOTOBENCH_HOME is a new temporary folder); its `data/` is a "
                "symlink to the default home's data folder, so the generated data world is reused and data "
                "generation is **not** timed. Peak memory: the largest resident set of any one process of the run "
                "(`ru_maxrss` of the children of a wrapper; DataLoader workers are separate processes, not summed).",
                "", "| run | status | wall time | target | within target | CPU time (user+sys) | peak RSS | "
                    "feature cache written | load before → after | measured |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for mode in ("full", "quick"):
            r = e2e.get(mode)
            if r is None:
                out.append(f"| `{mode}` | not run | | {_fmt_s(TARGETS_S[mode])} | | | | | | |")
                continue
            within = "yes" if r["status"] == "ok" and r.get("wall_s", 1e9) < r["target_s"] else "no"
            cpu = (r.get("user_s") or 0) + (r.get("sys_s") or 0)
            rss = f"{r['max_rss_mb']:.0f} MB" if r.get("max_rss_mb") else "-"
            cache = f"{r['cache_mb']:.0f} MB" if r.get("cache_mb") is not None else "-"
            wall = ("> " if r["status"] == "timeout" else "") + _fmt_s(r.get("wall_s"))
            out.append(f"| `{r['command']}` | {r['status']} | {wall} | {_fmt_s(r['target_s'])} | "
                       f"{within} | {_fmt_s(cpu) if cpu else '-'} | {rss} | {cache} | "
                       f"{r['load_before']} → {r.get('load_after', '?')} | {r['measured']} |")
        out.append("")
        for mode in ("full", "quick"):
            r = e2e.get(mode)
            if r is None:
                continue
            if r.get("note"):
                out += [f"Note ({mode}): {r['note']}", ""]
            if r.get("data_created"):
                shown = ", ".join(f"`{p}`" for p in r["data_created"][:6])
                out += [f"Note ({mode}): this run generated {len(r['data_created'])} file(s) in the shared data folder "
                        f"(so their generation is inside its wall time): {shown}", ""]
            if r.get("error"):
                out += [f"**{mode}: {r['status']}** — {r['error']}", ""]
                if r.get("tail"):
                    out += ["```", *r["tail"], "```", ""]
            if r.get("tasks"):
                out += [f"Per task ({mode}): seconds of the task inside the run, best layer and its main metric:", "",
                        "| task | seconds | layers | best layer | main metric |", "|---|---|---|---|---|"]
                for t in r["tasks"]:
                    if "error" in t:
                        out.append(f"| {t['task']} | {t['error']} | | | |")
                        continue
                    value = f"{t['best_value']:.4f}" if isinstance(t["best_value"], (int, float)) else t["best_value"]
                    seconds = f"{t['seconds']:.0f}" if t["seconds"] is not None else "-"
                    out.append(f"| {t['task']} | {seconds} | {t['layers']} | {t['best_layer']} | "
                               f"{t['main_metric']} = {value} |")
                out.append("")

    benches = state.get("benchmarks", {})
    out += ["## Benchmark scripts", "",
            "Each script ran in its own process, one after the other, with a time limit. Figures: the lines of its "
            "output with a ratio, speed-up or result table (full output below).", "",
            "| script | status | seconds | load before → after | measured |", "|---|---|---|---|---|"]
    for name in sorted(benches):
        b = benches[name]
        status = b["status"] if b["status"] == "ok" else f"**{b['status']}**: {b.get('error', '')}"
        out.append(f"| `{b['command']}` | {status} | {b['seconds']:.0f} | {b['load_before']} → {b['load_after']} | "
                   f"{b['measured']} |")
    out.append("")
    for name in sorted(benches):
        b = benches[name]
        out += [f"### {name}", ""]
        if b["status"] != "ok":
            out += [f"**{b['status']}**: {b.get('error', '')}", ""]
        if b.get("note"):
            out += [f"Note: {b['note']}", ""]
        if b.get("figures"):
            out += ["```", *b["figures"], "```", ""]
        out += ["<details><summary>full output</summary>", "", "```", *b["output"].rstrip().splitlines()[-80:],
                "```", "", "</details>", ""]
    return "\n".join(out) + "\n"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toto-tiny", help="model of the end-to-end runs (name or checkpoint folder)")
    parser.add_argument("--skip-e2e", action="store_true", help="no end-to-end run")
    parser.add_argument("--skip-full", action="store_true", help="end to end: only the --quick run")
    parser.add_argument("--only-e2e", action="store_true", help="no benchmark scripts")
    parser.add_argument("--benchmarks", help="comma-separated script names (default: every script of benchmarks/)")
    parser.add_argument("--smoke", action="store_true", help="small arguments for every script (checks report.py)")
    parser.add_argument("--timeout", type=float, default=1500, help="seconds per benchmark script")
    parser.add_argument("--quick-timeout", type=float, default=900, help="seconds for the --quick run")
    parser.add_argument("--full-timeout", type=float, default=3600, help="seconds for the full run")
    parser.add_argument("--deadline", help="HH:MM (UTC): end-to-end runs get at most until then (killed and "
                                           "reported as not finished); a run with under 60 s left is skipped")
    parser.add_argument("--fresh", action="store_true", help="do not keep sections of the previous REPORT.json")
    parser.add_argument("--note", help="a line to add under Notes (e.g. why a part was not run)")
    parser.add_argument("--out", type=Path, default=HERE / "REPORT.md")
    parser.add_argument("--results-out", type=Path, help="the full run writes its result files here (e.g. results/, "
                                                        "with --overwrite) instead of a temporary folder")
    args = parser.parse_args(argv)

    regenerate = ".venv/bin/python benchmarks/report.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    state_path = args.out.with_suffix(".json")
    # what this run measured; merged into the file's sections at every save (under a lock), so two
    # report.py runs at once (e.g. --only-e2e next to --skip-e2e) keep each other's sections
    mine = {"benchmarks": {}, "e2e": {}, "notes": []}
    if args.note:
        mine["notes"].append({"text": args.note, "written": now_utc()})
    machine = machine_info()
    print(f"machine: {machine}", flush=True)

    def save():
        folder = os.open(args.out.parent, os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            state = {}
            if state_path.exists() and not (args.fresh and not save.done):
                try:
                    state = json.loads(state_path.read_text())
                except ValueError:
                    state = {}
            for section in ("benchmarks", "e2e"):
                state[section] = {**state.get(section, {}), **mine[section]}
            notes = state.get("notes", [])
            state["notes"] = notes + [n for n in mine["notes"] if n not in notes]
            state["machine"], state["written"] = machine, now_utc()
            write_atomic(state_path, json.dumps(state, indent=1))
            write_atomic(args.out, render_markdown(state, regenerate))
            save.done = True
        finally:
            os.close(folder)  # also releases the lock
    save.done = False

    if not args.only_e2e:
        scripts = benchmark_scripts()
        if args.benchmarks:
            wanted = {n.strip().removesuffix(".py") for n in args.benchmarks.split(",") if n.strip()}
            unknown = wanted - {s.stem for s in scripts}
            if unknown:
                print(f"unknown benchmark(s) {sorted(unknown)}; have {[s.stem for s in scripts]}", file=sys.stderr)
                return 2
            scripts = [s for s in scripts if s.stem in wanted]
        for script in scripts:
            script_args = SCRIPT_ARGS.get(script.name, {}).get("smoke" if args.smoke else "full", [])
            print(f"[{now_utc()}] {script.name} {' '.join(script_args)} (limit {args.timeout:.0f} s)", flush=True)
            record = run_benchmark(script, script_args, args.timeout)
            mine["benchmarks"][script.name] = record
            print(f"  {record['status']} in {record['seconds']:.0f} s" + (f": {record['error']}" if record.get("error") else ""))
            for line in record["figures"]:
                print("  " + line)
            save()
    if not args.skip_e2e and not args.benchmarks:  # --benchmarks NAMES: those scripts only
        modes = ["quick"] + ([] if args.skip_full else ["full"])
        for mode in modes:
            timeout = args.quick_timeout if mode == "quick" else args.full_timeout
            if args.deadline:
                left = seconds_until(args.deadline)
                if left < 60:
                    mine["notes"].append({"text": f"end to end `{mode}` not run: the --deadline {args.deadline} UTC "
                                                  f"had passed", "written": now_utc()})
                    save()
                    continue
                timeout = min(timeout, left)
            print(f"[{now_utc()}] end to end, {mode} (limit {timeout:.0f} s)", flush=True)
            record = run_end_to_end(args.model, mode == "quick", timeout,
                                    results_out=args.results_out if mode == "full" else None)
            mine["e2e"][mode] = record
            print(f"  {record['status']}: wall {_fmt_s(record.get('wall_s'))}, peak RSS "
                  f"{record.get('max_rss_mb', 0):.0f} MB" + (f"; {record['error']}" if record.get("error") else ""),
                  flush=True)
            save()
    save()
    print(f"wrote {args.out} and {state_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
