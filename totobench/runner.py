"""`totobench run` and `totobench ls`: tasks x one model -> one result file per task.

The runner loads the model once, resolves the layers, and for each task builds its context,
runs it and writes the result JSON atomically. A task whose result file already exists and is
valid is skipped (re-run the same command to continue an interrupted run; `--overwrite` redoes);
features already extracted, down to the last committed chunk of a split, are reused.
Under `torchrun --nproc_per_node=N -m totobench run ...` rank 0 runs the tasks and all ranks
share the feature extraction (totobench.features.distributed); the result equals one process's.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from totobench import __version__
from totobench.errors import ConfigError, TotobenchError
from totobench.paths import cache_home
from totobench.tasks.base import RunContext, TaskOutput, task_class
from totobench.tasks.config import FORMAT_FOLDERS, available_tasks, load_task_config, resolve_task_names


def parse_layers(spec: str, num_layers: int) -> list[int]:
    """`all` | `START:STOP:STEP` | `i,j,-1` -> sorted unique non-negative layer indices.

    Raises ConfigError for an index outside [-num_layers, num_layers)."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    try:
        if ":" in spec:
            parts = [int(p) if p.strip() else None for p in spec.split(":")]
            if len(parts) > 3:
                raise ValueError
            return sorted(set(range(num_layers)[slice(*parts)]))
        raw = [int(p) for p in spec.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--layers {spec!r}: expected `all`, START:STOP:STEP or a list like 0,4,-1") from None
    if not raw:
        raise ConfigError(f"--layers {spec!r}: no layer given")
    out = set()
    for i in raw:
        if not -num_layers <= i < num_layers:
            raise ConfigError(f"--layers: layer {i} is out of range for a model with {num_layers} "
                              f"layers (valid: 0..{num_layers - 1} or -{num_layers}..-1)")
        out.add(i % num_layers)
    return sorted(out)


def resolve_data_root(cfg: dict, data_root: str | None) -> Path | None:
    """Dataset root: `--set`/YAML `dataset.root`, else `--data-root`/<format folder>, else
    $TOTOBENCH_DATA_ROOT/<format folder>, else the generated data world."""
    fmt = cfg["dataset"]["format"]
    folder = FORMAT_FOLDERS.get(fmt)
    explicit = cfg["dataset"].get("root")
    if explicit:
        root = Path(os.path.expanduser(str(explicit)))
        where = f"dataset.root of {cfg['_path']}"
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
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "device": str(device), "torch_threads": torch.get_num_threads(),
            "hostname": platform.node()}


def build_result(backbone, task, cfg: dict, out: TaskOutput, data_root: Path | None, layers: list[int],
                 device: torch.device, timing: dict) -> dict:
    """Assemble the result document of DESIGN.md from a task's per-layer rows."""
    n = backbone.num_layers
    main = task.main_metric
    per_layer = [{"layer": r.layer, "depth": (r.layer + 1) / n, "metrics": r.metrics,
                  "best_hparams": r.best_hparams, "select_score": r.select_score} for r in out.per_layer]
    missing = [r["layer"] for r in per_layer if main not in r["metrics"]]
    if missing:
        raise RuntimeError(f"task {task.name} returned no '{main}' for layers {missing}")
    best = max(per_layer, key=lambda r: (r["metrics"][main], -r["layer"]))
    return {
        "schema_version": "1",
        "totobench_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"name": backbone.name, "checkpoint_sha256": backbone.sha256,
                  "tokenizer_sha256": backbone.tokenizer_sha256, "num_layers": n,
                  "dim": backbone.dim, "params": backbone.model.num_params(),
                  "path": str(backbone.path) if backbone.path else None},
        "task": {"name": task.name, "kind": task.kind, "dataset_format": cfg["dataset"]["format"],
                 "dataset_root": str(data_root) if data_root else None,
                 "dataset_fingerprint": out.dataset_fingerprint, "main_metric": main},
        "protocol": out.protocol,
        "per_layer": per_layer,
        "best_layer": {"layer": best["layer"], "depth": best["depth"], "metrics": best["metrics"]},
        "layers_requested": layers,
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
        "extra": out.extra,
        "env": _env_info(device),
        "timing_s": {**out.timing_s, **timing},
    }


def cli_run(args) -> int:
    """`totobench run`; under torchrun, rank 0 runs the tasks and the other ranks extract."""
    from totobench.features import distributed

    console = Console(stderr=False)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    rank_info, device = distributed.init_from_env(device)  # under torchrun: join the group
    if not rank_info.is_main:
        return _serve_as_worker(args, device)
    workers = {"serving": False}
    try:
        return _run_tasks(args, device, console, workers)
    finally:
        if workers["serving"]:
            distributed.send_job(distributed.STOP)  # also when rank 0 failed: the others exit 0
        distributed.shutdown()


def _serve_as_worker(args, device: torch.device) -> int:
    """A torchrun rank > 0: the same checks as rank 0 (errors are rank 0's to print), then
    extract the chunks rank 0 hands out until it says stop."""
    from totobench.features import distributed
    from totobench.model.registry import load_backbone
    try:
        try:
            for name in resolve_task_names(args.tasks):
                load_task_config(name, args.overrides)
            backbone = load_backbone(args.model, device=device)
            parse_layers(args.layers, backbone.num_layers)
        except TotobenchError:
            return 2  # rank 0 fails the same way and says why
        if distributed.broadcast_object(None) == distributed.STOP:  # handshake (carries rank 0's --no-cache folder)
            return 0
        return distributed.serve_extraction(backbone, device)
    finally:
        distributed.shutdown()


def _run_tasks(args, device: torch.device, console: Console, workers: dict) -> int:
    """Rank 0's (or the only process's) part of `run`: every task, one result file each."""
    from totobench.features import distributed
    from totobench.model.registry import load_backbone
    from totobench.results.schema import load_result, result_path, write_result_atomic

    names = resolve_task_names(args.tasks)
    configs = {name: load_task_config(name, args.overrides) for name in names}  # fail fast on any bad YAML
    out_dir = Path(args.out)
    _check_writable(out_dir)
    t_load = time.perf_counter()
    backbone = load_backbone(args.model, device=device)
    layers = parse_layers(args.layers, backbone.num_layers)
    load_s = time.perf_counter() - t_load
    console.print(f"[bold]{backbone.name}[/] ({backbone.num_layers} layers, dim {backbone.dim}, "
                  f"sha256 {backbone.sha256[:12]}) - layers {layers} - tasks {', '.join(names)}")
    tmp_cache = None
    if args.no_cache:
        tmp_cache = tempfile.TemporaryDirectory(prefix="totobench-features-")
    if distributed.info().active:
        distributed.broadcast_object(tmp_cache.name if tmp_cache else None)  # pairs with the workers' handshake
        workers["serving"] = True
    from totobench.features.cache import FeatureCache
    cache = FeatureCache(Path(tmp_cache.name) if tmp_cache else cache_home())
    written = []
    try:
        for name in names:
            cfg = configs[name]
            path = result_path(out_dir, backbone.name, name)
            if path.exists() and not args.overwrite:
                try:
                    done = load_result(path)
                    if _same_run(done, layers, backbone, cfg, args):
                        console.print(f"[dim]{name}: result exists at {path}, skipped (use --overwrite to redo)[/]")
                        written.append(done)
                        continue
                except (TotobenchError, KeyError):
                    pass  # unreadable or different run: recompute
            task = task_class(cfg["class"])(name, cfg)
            data_root = resolve_data_root(cfg, args.data_root)
            ctx = RunContext(backbone=backbone, layers=layers, device=device, quick=args.quick,
                             data_root=data_root, artifacts_dir=path.with_suffix(""), cache=cache,
                             console=console, seed=int(cfg.get("seed", 0)),
                             num_workers=int(cfg.get("num_workers", 0)),
                             batch_size=int(cfg.get("batch_size", 64)))
            console.rule(f"[bold]{name}")
            t0 = time.perf_counter()
            out = task.run(ctx)
            result = build_result(backbone, task, cfg, out, data_root, layers, device,
                                  {"total": time.perf_counter() - t0, "model_load": load_s})
            result["extra"] = {**result.get("extra", {}), "quick": bool(args.quick)}  # for _same_run
            try:
                write_result_atomic(path, result)
            except OSError as err:  # e.g. the disk filled up: the temp file is already gone
                raise TotobenchError(f"cannot write the result file {path} ({err.strerror or err})") from None
            written.append(result)
            _print_table(result, console)
            console.print(f"wrote {path}")
    finally:
        if tmp_cache:
            tmp_cache.cleanup()
    _write_plots(written, out_dir / _safe(backbone.name), console)
    return 0


def _same_run(done: dict, layers: list[int], backbone, cfg: dict, args) -> bool:
    """Whether an existing result file answers this command: same checkpoint, layers, resolved
    task config and --quick (then a re-run skips it; anything else is recomputed)."""
    return (done["layers_requested"] == layers
            and done["model"]["checkpoint_sha256"] == backbone.sha256
            and done["model"].get("tokenizer_sha256") == backbone.tokenizer_sha256
            and done.get("config") == json.loads(json.dumps({k: v for k, v in cfg.items() if not k.startswith("_")},
                                                            default=str))
            and done.get("extra", {}).get("quick", False) == bool(args.quick))


def _safe(name: str) -> str:
    from totobench.results.schema import safe_name
    return safe_name(name)


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


def cli_ls(args) -> int:
    console = Console()
    if args.what == "tasks":
        from rich.table import Table
        table = Table()
        for column in ("task", "class", "format", "probe", "main metric"):
            table.add_column(column, no_wrap=True)
        table.add_column("description", ratio=1, overflow="fold")
        for name in available_tasks():
            try:
                cfg = load_task_config(name)
            except TotobenchError as err:
                table.add_row(name, "[red]invalid[/]", "", "", "", str(err))
                continue
            table.add_row(name, cfg["class"], cfg["dataset"]["format"], cfg.get("probe", {}).get("name", ""),
                          cfg["main_metric"], cfg.get("description", ""))
        console.print(table)
    elif args.what == "models":
        from totobench.model.registry import list_models
        for name in list_models():
            console.print(name)
    else:
        from totobench.probes import PROBES
        for name, desc in PROBES.items():
            console.print(f"[bold]{name}[/]: {desc}")
    return 0
