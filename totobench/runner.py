"""`totobench run`: tasks x one model -> one result file per task.

The runner loads the model once, resolves the layers, and for each task builds its context,
runs it and writes the result JSON atomically. A task whose result file already exists and is
valid is skipped (re-run the same command to continue an interrupted run; `--overwrite` redoes);
features already extracted, down to the last committed chunk of a split, are reused.
Under `torchrun --nproc_per_node=N -m totobench run ...` rank 0 runs the tasks and all ranks
share the feature extraction (totobench.features.distributed); the result equals one process's.

Before extracting, each task prints its estimate (bytes it will store, forward TFLOPs, whether its
probe trains streamed under --cache-budget; totobench.features.estimate), recorded in the result
as `protocol.estimate` with `protocol.precision` (`--dry-run`: totobench.commands.run).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console

from totobench import __version__, parallel
from totobench.errors import ConfigError, TotobenchError
from totobench.features.estimate import default_cache_budget, format_bytes, parse_size
from totobench.io import lock_beside
from totobench.model.backbone import resolve_precision
from totobench.paths import cache_home, portable_path
from totobench.registry import TASKS
from totobench.results.schema import build_result, load_result, result_path, safe_name, write_result_atomic
from totobench.tasks.base import RunContext, Task, TaskConfig, TaskOutput, numbers_settings
from totobench.tasks.config import FORMAT_FOLDERS, load_task_config, resolve_task_names


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """`all` | `START:STOP[:STEP]` (Python slice rules over 0..num_layers-1) | `i,j,-1` -> sorted
    unique non-negative layer indices (a layer named twice is read once).

    Raises ConfigError naming --layers for a malformed spec, a zero step, a range that selects no
    layer, or an index outside [-num_layers, num_layers)."""
    spec = spec.strip()
    usage = f"--layers {spec!r}: expected `all`, START:STOP:STEP (e.g. 0:8:2) or a list like 0,4,-1"
    if spec == "all":
        return list(range(num_layers))
    try:
        if ":" in spec:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) > 3:
                raise ConfigError(usage)
            if len(parts) == 3 and parts[2] == 0:
                raise ConfigError(f"--layers {spec!r}: the step must not be 0")
            layers = sorted(set(range(num_layers)[slice(*parts)]))
            if not layers:
                raise ConfigError(f"--layers {spec!r}: the range selects no layer of a model with {num_layers} "
                                  f"layers (0..{num_layers - 1})")
            return layers
        raw = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(usage) from None
    if not raw:
        raise ConfigError(f"--layers {spec!r}: no layer given")
    out = set()
    for i in raw:
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"--layers: layer {i} is out of range for a model with {num_layers} "
                              f"layers (valid: 0..{num_layers - 1} or -{num_layers}..-1)")
        out.add(i % num_layers)
    return sorted(out)


def resolve_data_root(cfg: TaskConfig, data_root: str | None) -> Path | None:
    """Dataset root: `--set`/YAML `dataset.root`, else `--data-root`/<format folder>, else
    $TOTOBENCH_DATA_ROOT/<format folder>, else the generated data world; None for a format with
    no folder there (a simulator, a task that makes its own data) and no explicit root."""
    fmt = cfg.dataset.format
    folder = FORMAT_FOLDERS.get(fmt)
    explicit = cfg.dataset.root
    if folder is None and not explicit:
        return None  # a format with no dataset folder: the task makes or renders its own data
    if explicit:
        root = Path(os.path.expanduser(str(explicit)))
        where = f"dataset.root of {cfg.path}"
    elif data_root or os.environ.get("TOTOBENCH_DATA_ROOT"):
        base = data_root or os.environ["TOTOBENCH_DATA_ROOT"]
        where = "--data-root" if data_root else "$TOTOBENCH_DATA_ROOT"
        root = Path(base).expanduser() / folder
    else:
        if fmt == "metaworld":
            return None  # simulator task, demos are rendered on demand
        from totobench.data.world import ensure_data_world
        return ensure_data_world() / folder
    if not root.exists():
        raise ConfigError(f"{where}: dataset root {root} does not exist (format {fmt})")
    return root


def _env_info(device: torch.device) -> dict:
    """The machine a result was made on. The CPU model and the kernels torch picked for it are in:
    float results can differ in their last bits from one CPU to another, which a closed-loop task
    (robot rollouts) can turn into other episodes."""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_count": os.cpu_count(), "device": str(device), "torch_threads": torch.get_num_threads(),
            "hostname": platform.node()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def result_document(backbone, task: Task, out: TaskOutput, data_root: Path | None, layers: list[int],
                    device: torch.device, timing: dict, quick: bool) -> dict:
    """The result document of one task run (built by results.schema.build_result)."""
    cfg = task.cfg
    model = {"name": backbone.name, "checkpoint_sha256": backbone.sha256, "tokenizer_sha256": backbone.tokenizer_sha256,
             "num_layers": backbone.num_layers, "dim": backbone.dim, "params": backbone.params,
             "path": portable_path(backbone.path) if backbone.path else None, "family": backbone.family,
             "num_heads": backbone.num_heads, "tokenizer": backbone.tokenizer_name,
             "inputs": backbone.inputs.as_dict(), "notes": list(backbone.notes)}
    info = {"name": task.name, "kind": cfg.kind, "dataset_format": cfg.dataset.format,
            "dataset_root": portable_path(data_root) if data_root else None,
            "dataset_fingerprint": out.dataset_fingerprint, "main_metric": cfg.main_metric}
    rows = [{"layer": r.layer, "metrics": r.metrics, "best_hparams": r.best_hparams, "select_score": r.select_score}
            for r in out.per_layer]
    return build_result(model=model, task=info, protocol=out.protocol, per_layer=rows, config=cfg.record(),
                        env=_env_info(device), timing_s={**out.timing_s, **timing},
                        run={"layers": layers, "quick": bool(quick)}, extra=out.extra, version=__version__)


def run_command(args) -> int:
    """`totobench run`; under torchrun, rank 0 runs the tasks and the other ranks extract."""
    from totobench.features import distributed

    console = Console(stderr=False)
    device = parallel.parse_device(args.device)
    rank_info, device = parallel.init_from_env(device)  # under torchrun: join the group
    if not rank_info.is_main:
        return _serve_as_worker(args, device)
    workers = {"serving": False}
    try:
        return _run_tasks(args, device, console, workers)
    finally:
        if workers["serving"]:
            distributed.send_job(distributed.STOP)  # also when rank 0 failed: the others exit 0
        parallel.shutdown()


def _serve_as_worker(args, device: torch.device) -> int:
    """A torchrun rank > 0: the same checks as rank 0 (errors are rank 0's to print), then
    extract the chunks rank 0 hands out until it says stop."""
    from totobench.features import distributed
    from totobench.features.extract import serve_extraction
    from totobench.model import load_backbone
    try:
        try:
            for name in resolve_task_names(args.tasks):
                load_task_config(name, args.overrides)
            backbone = load_backbone(args.model, tokenizer=getattr(args, "tokenizer", None), device=device)
            parse_layers(args.layers, backbone.num_layers)
            backbone.precision = resolve_precision(getattr(args, "precision", None), device)
        except TotobenchError:
            return 2  # rank 0 fails the same way and says why
        if parallel.broadcast_object(None) == distributed.STOP:  # handshake (carries rank 0's --no-cache folder)
            return 0
        return serve_extraction(backbone, device)
    finally:
        parallel.shutdown()


def _run_tasks(args, device: torch.device, console: Console, workers: dict) -> int:
    """Rank 0's (or the only process's) part of `run`: every task, one result file each."""
    from totobench.features.cache import FeatureCache
    from totobench.model import load_backbone

    configs = [load_task_config(name, args.overrides) for name in resolve_task_names(args.tasks)]  # fail fast
    for cfg in configs:
        if cfg.dataset.size is not None:
            raise ConfigError(f"{cfg.path}: dataset.size is for planning with --dry-run only; remove it "
                              f"(--set {cfg.name}.dataset.size=...) for a real run")
    precision, budget = resolve_precision(getattr(args, "precision", None), device), resolve_budget(args)
    for cfg in configs:   # a dataset root the user named must exist before any work (the data world is made later)
        if cfg.dataset.root or args.data_root or os.environ.get("TOTOBENCH_DATA_ROOT"):
            resolve_data_root(cfg, args.data_root)
    out_dir = Path(args.out)
    _check_writable(out_dir)
    t_load = time.perf_counter()
    backbone = load_backbone(args.model, tokenizer=getattr(args, "tokenizer", None), device=device)
    layers = parse_layers(args.layers, backbone.num_layers)
    backbone.precision = precision
    load_s = time.perf_counter() - t_load
    console.print(f"[bold]{backbone.name}[/] ({backbone.family}, {backbone.num_layers} layers, dim {backbone.dim}, "
                  f"sha256 {backbone.sha256[:12]}) - layers {layers} - tasks {', '.join(c.name for c in configs)}")
    for note in backbone.notes:
        console.print(f"[dim]{backbone.name}: {note}[/]")
    print_run_settings(console, device, precision, budget)
    tmp_cache = tempfile.TemporaryDirectory(prefix="totobench-features-") if args.no_cache else None
    if parallel.info().active:
        parallel.broadcast_object(tmp_cache.name if tmp_cache else None)  # pairs with the workers' handshake
        workers["serving"] = True
    cache = FeatureCache(Path(tmp_cache.name) if tmp_cache else cache_home())
    started = time.time()
    written = {}
    try:
        pending, wait = configs, False
        while pending:  # first the tasks no other process is running, then wait for the others' results
            for cfg in pending:
                path = result_path(out_dir, backbone.name, cfg.name)
                with _result_lock(path, cfg.name, console, wait) as mine:
                    if not mine:
                        continue
                    done = _finished(path, layers, backbone, cfg, args.quick,
                                     newer_than=started if args.overwrite else None)
                    if done is None:
                        done = _run_one(args, cfg, backbone, layers, device, cache, console, path, load_s, budget)
                    else:
                        console.print(f"[dim]{cfg.name}: result exists at {path}, skipped (use --overwrite to redo)[/]")
                    written[cfg.name] = done
            pending, wait = [cfg for cfg in configs if cfg.name not in written], True
    finally:
        if tmp_cache:
            tmp_cache.cleanup()
    _write_plots([written[cfg.name] for cfg in configs], out_dir / safe_name(backbone.name), console)
    return 0


@contextmanager
def _result_lock(path: Path, task_name: str, console: Console, wait: bool) -> Iterator[bool]:
    """Hold the lock `.<task>.json.lock` beside a result file while its task runs: one process at a
    time runs a task into one file. Yields True once held; when another live process holds it,
    yields False at once (`wait` False: run the other tasks first) or waits for it to finish."""
    lock = lock_beside(path)

    def tell(owner: dict) -> None:
        then = "waiting for its result" if wait else "running the other tasks first"
        console.print(f"[dim]{task_name}: process {owner.get('pid', '?')} on {owner.get('host', '?')} "
                      f"is running it into {path}; {then}[/]")
    if wait:
        lock.acquire(on_wait=tell)
    elif not lock.try_acquire():
        tell(lock.owner())
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _run_one(args, cfg: TaskConfig, backbone, layers: list[int], device: torch.device, cache, console: Console,
             path: Path, load_s: float, budget: int | None = None) -> dict:
    """Run one task (its estimate printed first) and write its result file atomically."""
    task = TASKS.get(cfg.kind)(cfg)
    data_root = resolve_data_root(cfg, args.data_root)
    ctx = task_context(cfg, backbone, layers, device, args.quick, data_root, path.with_suffix(""), cache, console,
                       budget, strict=args.strict)
    console.rule(f"[bold]{cfg.name}")
    t0 = time.perf_counter()
    estimate = estimate_task(task, ctx)
    if estimate is not None:
        console.print(f"estimate: {estimate.summary()}", soft_wrap=True)
    out = task.run(ctx)
    out.protocol["precision"] = backbone.precision
    if estimate is not None:
        out.protocol["estimate"] = estimate.as_dict()
    result = result_document(backbone, task, out, data_root, layers, device,
                             {"total": time.perf_counter() - t0, "model_load": load_s}, args.quick)
    result["env"]["cache_budget"] = budget   # follows the free disk: a host fact, not the protocol's
    try:
        write_result_atomic(path, result)
    except OSError as err:  # e.g. the disk filled up: the temp file is already gone
        raise TotobenchError(f"cannot write the result file {path} ({err.strerror or err})") from None
    _print_table(result, console)
    console.print(f"wrote {path}")
    return result


def _finished(path: Path, layers: list[int], backbone, cfg: TaskConfig, quick: bool,
              newer_than: float | None = None) -> dict | None:
    """The existing result at `path` when it answers this command (same checkpoint and tokenizer,
    layers, resolved task config and --quick) and, with `newer_than` (--overwrite: a time.time()),
    was written after it; else None (then the task is recomputed)."""
    try:
        if newer_than is not None and path.stat().st_mtime < newer_than:
            return None
    except FileNotFoundError:
        return None
    try:
        done = load_result(path)
    except TotobenchError:
        return None  # unreadable: recompute
    return done if answers(done, layers, backbone, cfg, quick) else None


def answers(done: dict, layers: list[int], backbone, cfg: TaskConfig, quick: bool) -> bool:
    """Whether result `done` holds what this run would compute: same weights and tokenizer, layers,
    --precision, --quick and task settings (those that can change numbers: a new description does not count)."""
    return (done.get("run", {}).get("layers") == layers
            and done["model"]["checkpoint_sha256"] == backbone.sha256
            and done["model"].get("tokenizer_sha256") == backbone.tokenizer_sha256
            and done.get("protocol", {}).get("precision", "fp32") == getattr(backbone, "precision", "fp32")
            and numbers_settings(done.get("config") or {}) == numbers_settings(json.loads(json.dumps(cfg.record())))
            and done.get("run", {}).get("quick", False) == bool(quick))


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out_dir}: folder is not writable ({err.strerror})") from None


def _print_table(result: dict, console: Console) -> None:
    try:
        from totobench.results.table import print_layer_table
    except ImportError:
        return
    print_layer_table(result, console)


def _write_plots(results: list[dict], out_dir: Path, console: Console) -> None:
    if not results:
        return
    try:
        from totobench.results.plots import write_sweep_plots
    except ImportError:
        return
    for path in write_sweep_plots(results, out_dir) or []:
        console.print(f"wrote {path}")


# ---------------------------------------------------------------------- run settings and --dry-run
GPU_WORKERS = 8   # DataLoader workers decoding for a CUDA run whose task sets none (num_workers: 0)


def resolve_budget(args) -> int:
    """Bytes one task may add to the feature cache: --cache-budget SIZE, 0 with --no-cache, else
    half the free disk under the cache folder (features.estimate.default_cache_budget)."""
    given = getattr(args, "cache_budget", None)
    if getattr(args, "no_cache", False):
        if given is not None and parse_size(given) != 0:
            raise ConfigError(f"--no-cache means a cache budget of 0; drop --cache-budget {given}")
        return 0
    return parse_size(given) if given is not None else default_cache_budget(cache_home())


def print_run_settings(console: Console, device: torch.device, precision: str, budget: int | None) -> None:
    budget_text = "no limit" if budget is None else format_bytes(budget)
    console.print(f"[dim]forward in {precision} on {device}; feature cache budget {budget_text} per task[/]")
    if device.type == "cpu" and precision != "fp32" and not _cpu_has(CPU_FLAGS[precision]):
        console.print(f"[yellow]warning: {precision} on a CPU without {' or '.join(CPU_FLAGS[precision])} "
                      f"instructions runs the forward many times slower than fp32[/]")


# CPU instructions that make a reduced-precision forward fast (measured with toto-tiny on this machine's
# AMD EPYC, which has avx512_bf16 but no avx512_fp16: bf16 ~1.5x faster than fp32, fp16 ~7x slower)
CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def _cpu_has(flags: tuple[str, ...]) -> bool:
    try:
        words = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False  # not Linux: unknown, so warn
    return any(flag in words for flag in flags)


def task_context(cfg: TaskConfig, backbone, layers: list[int], device: torch.device, quick: bool,
                 data_root: Path | None, artifacts_dir: Path, cache, console: Console, budget: int | None,
                 strict: bool = False) -> RunContext:
    """The RunContext of one task (decoding workers: the task's num_workers, else GPU_WORKERS on CUDA)."""
    workers = cfg.num_workers or (min(GPU_WORKERS, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0)
    return RunContext(backbone=backbone, layers=layers, device=device, quick=quick, data_root=data_root,
                      artifacts_dir=artifacts_dir, cache=cache, console=console, seed=cfg.seed, num_workers=workers,
                      batch_size=cfg.batch_size, strict=strict, cache_budget=budget,
                      precision=getattr(backbone, "precision", "fp32"))


def estimate_task(task: Task, ctx: RunContext):
    """The task's TaskEstimate, or None for a task class that cannot estimate (no `splits`)."""
    try:
        return task.estimate(ctx, task.resolve_input(ctx.backbone), task.probe_spec(ctx.quick))
    except NotImplementedError:
        return None

