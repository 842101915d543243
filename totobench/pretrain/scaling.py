"""The scaling study: a family of Totos (a1..aN) trained with muP to compute budgets, L(C) = a * C^b.

Compute C is counted in multiply-accumulates (MACs), as the paper does: training MACs per token =
3 x the forward MACs per token of the whole model (blocks, attention, output head; counted by
torch's FLOP counter, model/flops.py; FLOPs = 2 x MACs; forward + backward = 3 x forward), times
the tokens seen. Each model trains at one learning rate (tuned on the smallest model, transferred by
muP, pretrain/mup.py), warmup then constant (so a model's loss at budget C is a run stopped at C),
and its held-out loss is measured at the budgets C_max / 2^k. The compute-optimal frontier is the
lowest held-out loss over the family at each budget; L(C) is fitted to it by least squares in
log-log space.

    cfg = load_scaling_config("configs/scaling/quick.yaml", quick=True)
    results = run_study(cfg, Path("runs/scaling/cpu-quick"))    # results["fit"] = {"a": ..., "b": ...}

A stopped study resumes: each finished run is kept in out/runs/<name>.json and read back.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from totobench.errors import ConfigError, DataError
from totobench.io import atomic_path, atomic_write_json
from totobench.model.flops import count_flops
from totobench.model.sequence import build_sequence, clip_frame_indices, clip_span, num_clip_starts
from totobench.model.toto import TotoConfig
from totobench.pretrain.config import read_yaml_mapping
from totobench.pretrain.mup import mup_model, mup_optimizer, set_lr
from totobench.pretrain.train import next_token_loss, next_token_targets
from totobench.progress import progress_bar

PAPER_FIT = {"a": 7.32, "b": -0.0378}  # Rajasegaran et al. 2025, C in MACs
MUP_RULES = ("hidden matrices: init std x sqrt(base/width), Adam lr x base/width; embedding and norms "
             "unchanged; readout zero-init, logits x base/width; attention scores 1/head_dim")

DEFAULTS = {
    "seed": 0,
    "threads": None,
    "device": "cpu",
    "tokenizer": "toto-tiny",
    "mup": True,
    "data": {"root": "world", "world_size": "default", "world_seed": 0, "heldout_fraction": 0.05,
             "max_files": None, "sources": [{"kind": "video", "path": "pretrain/videos", "weight": 0.7},
                                            {"kind": "image", "path": "pretrain/images", "weight": 0.3}]},
    "sequence": {"num_frames": 4, "frame_stride": 4, "images_per_sequence": 4, "rope_base": 500.0,
                 "resolution": None},
    "family": {"head_dim": 16, "mlp_ratio": 2.75, "models": []},
    "train": {"batch_size": 8, "warmup_steps": 10, "weight_decay": 0.1, "grad_clip": 1.0,
              "budget_macs": 1e12, "budget_points": 8},
    "lr_sweep": {"lrs": [0.0078125], "budget_macs": None},
    "fit": {"skip_budgets": 0},
    "eval": {"heldout_sequences": 32, "batch_size": 16},
}


def _merge(base: dict, over: dict, where: str) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in base:
            raise ConfigError(f"{where}: unknown field {k!r} (expected {', '.join(base)})")
        out[k] = _merge(base[k], v, f"{where}.{k}") if isinstance(base[k], dict) and isinstance(v, dict) else v
    return out


def load_scaling_config(path, quick: bool = False) -> dict:
    """Read a scaling YAML over DEFAULTS; `quick` applies its `quick:` section on top.
    Raises ConfigError naming the file and the bad field."""
    path = Path(path)
    raw = read_yaml_mapping(path, "scaling config")
    quick_over, name = raw.pop("quick", None) or {}, raw.pop("name", path.stem)
    cfg = _merge(DEFAULTS, raw, str(path))
    if quick:
        cfg = _merge(cfg, quick_over, f"{path}: quick")
    cfg["name"], cfg["_path"] = name, str(path)
    models = cfg["family"]["models"]
    if not models or not all(isinstance(m, dict) and {"name", "dim", "n_layers"} <= set(m) for m in models):
        raise ConfigError(f"{path}: family.models must list {{name, dim, n_layers}} for each model")
    if not cfg["lr_sweep"]["lrs"]:
        raise ConfigError(f"{path}: lr_sweep.lrs is empty; expected at least one learning rate")
    if int(cfg["train"]["budget_points"]) < 2:
        raise ConfigError(f"{path}: train.budget_points must be >= 2 (a fit needs two budgets)")
    return cfg


def family_configs(cfg: dict, codebook_size: int, resolution: int, patch_size: int) -> dict[str, TotoConfig]:
    """{model name: TotoConfig} of the family, smallest width first; muP's base width is the
    smallest model's. Raises ConfigError for a width that is not a multiple of family.head_dim."""
    fam, seq = cfg["family"], cfg["sequence"]
    base = min(int(m["dim"]) for m in fam["models"]) if cfg["mup"] else None
    out = {}
    for m in sorted(fam["models"], key=lambda m: (int(m["dim"]), int(m["n_layers"]))):
        dim, head_dim = int(m["dim"]), int(m.get("head_dim", fam["head_dim"]))
        if dim % head_dim:
            raise ConfigError(f"{cfg['_path']}: family model {m['name']}: dim {dim} is not a multiple of "
                              f"head_dim {head_dim}")
        hidden = int(m.get("mlp_hidden", 8 * round(float(fam["mlp_ratio"]) * dim / 8)))
        length = 2 + max(seq["num_frames"], seq["images_per_sequence"]) * (resolution // patch_size) ** 2
        out[str(m["name"])] = TotoConfig(
            dim=dim, n_layers=int(m["n_layers"]), n_heads=dim // head_dim, mlp_hidden=hidden,
            codebook_size=codebook_size, vocab_size=codebook_size + 3, max_seq_len=length,
            rope_base=float(seq["rope_base"]), resolution=resolution, patch_size=patch_size,
            num_frames=int(seq["num_frames"]), frame_stride=int(seq["frame_stride"]),
            images_per_sequence=int(seq["images_per_sequence"]), mup_base_dim=base)
    return out


def training_macs_per_token(model, seq_len: int) -> float:
    """3 x forward MACs per token (forward + backward) of `model` over one sequence of `seq_len`."""
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device=next(model.parameters()).device)
    return 3 * count_flops(lambda: model(tokens)) / 2 / seq_len


def fit_power_law(macs, losses) -> dict:
    """Least squares of log L = log a + b log C. Returns {"a", "b", "points"}.
    Raises ValueError for fewer than two points or a non-positive value."""
    c, loss = np.asarray(macs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if len(c) < 2 or (c <= 0).any() or (loss <= 0).any():
        raise ValueError("a power-law fit needs >= 2 points with positive compute and loss")
    b, log_a = np.polyfit(np.log(c), np.log(loss), 1)
    return {"a": float(np.exp(log_a)), "b": float(b), "points": int(len(c))}


def compute_frontier(curves: dict[str, list[dict]]) -> list[dict]:
    """Lowest held-out loss over the family at each budget. curves: {model: rows with "budget",
    "macs", "heldout_loss"} -> [{"budget", "model", "macs", "heldout_loss"}] by budget."""
    best: dict[float, dict] = {}
    for name, rows in curves.items():
        for r in rows:
            if r["budget"] not in best or r["heldout_loss"] < best[r["budget"]]["heldout_loss"]:
                best[r["budget"]] = {"budget": r["budget"], "model": name, "macs": r["macs"],
                                     "heldout_loss": r["heldout_loss"]}
    return [best[k] for k in sorted(best)]


def budgets(c_max: float, points: int) -> list[float]:
    """C_max / 2^k for k = points-1 .. 0, ascending."""
    return [float(c_max) / 2 ** k for k in range(points - 1, -1, -1)]


# ----------------------------------------------------------------------------- data

IMAGE_SUFFIXES, VIDEO_SUFFIXES = (".jpeg", ".jpg", ".png"), (".mp4", ".avi", ".mkv", ".webm")


@dataclass
class TokenStore:
    """The corpus tokenized once, drawn from as sequences of `mc`'s layout: per source i and split,
    `ids["<i>_<split>"]` int16 (int32 for codebooks over 32767) [frames, h*w] (its files' frames concatenated) and
    `offsets["<i>_<split>"]` [files + 1]. The same `has`/`sample` as pre-training's corpora."""
    sources: list[dict]
    ids: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    mc: TotoConfig

    def items(self, i: int, split: str) -> list[tuple[int, int]]:
        """(first, end) frame rows of each file of source i usable for one sequence (a video needs
        a clip's span of frames; an image file is one frame)."""
        off = self.offsets[f"{i}_{split}"]
        need = clip_span(self.mc.num_frames, self.mc.frame_stride) if self.sources[i]["kind"] == "video" else 1
        return [(int(a), int(b)) for a, b in zip(off[:-1], off[1:]) if b - a >= need]

    def has(self, split: str) -> bool:
        return any(self.items(i, split) for i in range(len(self.sources)))

    def sample(self, key: list[int], split: str = "train") -> torch.Tensor:
        """One sequence LongTensor [L] drawn with np.random.default_rng(key): a source by weight,
        then a clip of a video (mc.num_frames every mc.frame_stride) or mc.images_per_sequence images."""
        rng, mc = np.random.default_rng(key), self.mc
        usable = [i for i in range(len(self.sources)) if self.items(i, split)]
        w = np.array([self.sources[i]["weight"] for i in usable])
        i = usable[int(rng.choice(len(usable), p=w / w.sum()))]
        items, ids = self.items(i, split), self.ids[f"{i}_{split}"]
        if self.sources[i]["kind"] == "video":
            a, b = items[int(rng.integers(len(items)))]
            start = int(rng.integers(num_clip_starts(b - a, mc.num_frames, mc.frame_stride)))
            rows, kind = [a + j for j in clip_frame_indices(start, mc.num_frames, mc.frame_stride)], "video"
        else:
            rows, kind = [items[int(j)][0] for j in rng.integers(len(items), size=mc.images_per_sequence)], "image"
        return build_sequence(torch.from_numpy(ids[rows].astype(np.int64)), kind, mc)


def data_root(cfg: dict) -> Path:
    """data.root: "world" (the data world's folder, generated on first use) or a folder."""
    d = cfg["data"]
    if d["root"] == "world":
        from totobench.data.world import ensure_data_world
        return Path(ensure_data_world(d["world_size"], int(d["world_seed"])))
    root = Path(d["root"]).expanduser()
    if not root.is_dir():
        raise DataError(f"{cfg['_path']}: data.root {root} is not a folder")
    return root


def list_files(cfg: dict, root: Path) -> list[dict]:
    """Each data source with its sorted files (at most data.max_files) split into "train" and
    "heldout" by a stable hash of the relative path. Raises DataError for an empty folder."""
    d, out = cfg["data"], []
    for src in d["sources"]:
        folder, suffixes = root / src["path"], IMAGE_SUFFIXES if src["kind"] == "image" else VIDEO_SUFFIXES
        files = sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{folder}: no {src['kind']} files ({', '.join(suffixes)}) for data.sources")
        files = files[: d["max_files"]] if d["max_files"] else files
        held = [f for f in files if int(hashlib.sha1(f.encode()).hexdigest()[:8], 16) % 10000
                < float(d["heldout_fraction"]) * 10000] or files[-1:]
        out.append({**src, "weight": float(src.get("weight", 1.0)), "heldout": held,
                    "train": [f for f in files if f not in set(held)]})
    return out


def _decode(path: Path, kind: str, resolution: int) -> torch.Tensor:
    """A file's frames (an image: one) as uint8 [F, 3, R, R]: short side to R, centre crop."""
    from totobench.data.preprocess import resize_and_crop
    if kind == "video":
        from totobench.data.video import read_frames, video_info
        return resize_and_crop(read_frames(path, list(range(video_info(path).num_frames))), resolution)
    from PIL import Image
    try:
        with Image.open(path) as im:
            return resize_and_crop(np.array(im.convert("RGB"))[None], resolution)
    except OSError as err:
        raise DataError(f"{path}: unreadable image ({err})") from None


def corpus_tokenizer(cfg: dict):
    """(tokenizer, frame resolution) of `tokenizer:`: a tokenizer spec (vqgan:, dvae:, vqvae:; then
    sequence.resolution is required) or a model spec whose own tokenizer and resolution are taken."""
    from totobench.model import load_backbone, load_tokenizer
    from totobench.registry import TOKENIZERS
    spec, res = str(cfg["tokenizer"]), cfg["sequence"]["resolution"]
    if spec.partition(":")[0] in TOKENIZERS:
        if not res:
            raise ConfigError(f"{cfg['_path']}: tokenizer {spec}: set sequence.resolution (frame size in pixels)")
        return load_tokenizer(spec), int(res)
    backbone = load_backbone(spec)
    if getattr(backbone, "tokenizer", None) is None:
        raise ConfigError(f"{cfg['_path']}: tokenizer {spec}: this model has no visual tokenizer")
    return backbone.tokenizer, int(res or backbone.inputs.resolution)


@torch.no_grad()
def prepare_tokens(cfg: dict, tokenizer, resolution: int, mc: TotoConfig, out: Path, console) -> TokenStore:
    """Tokenize every file of the corpus once into out/tokens.npz (a later run with the same files
    and tokenizer reads it back); sequences are then drawn in `mc`'s layout."""
    from totobench.model.tokens import tokenizer_sha256
    root = data_root(cfg)
    sources = list_files(cfg, root)
    key = hashlib.sha256(json.dumps([tokenizer_sha256(tokenizer), resolution, str(root), sources]).encode()).hexdigest()
    path = out / "tokens.npz"
    if path.is_file():
        data = np.load(path)
        if str(data["key"]) == key:
            return _store(sources, data, mc)
    arrays, jobs = {"key": np.array(key)}, [(i, split) for i in range(len(sources)) for split in ("train", "heldout")]
    dtype = np.int16 if tokenizer.codebook_size <= np.iinfo(np.int16).max else np.int32
    with progress_bar(console, fields="", disable=console is None) as progress:
        task = progress.add_task("tokenize corpus", total=sum(len(sources[i][s]) for i, s in jobs))
        for i, split in jobs:
            ids, counts = [], [0]
            for rel in sources[i][split]:
                frames = _decode(root / rel, sources[i]["kind"], resolution).float() / 255
                ids.append(tokenizer.encode(frames).flatten(1).numpy().astype(dtype))
                counts.append(len(frames))
                progress.update(task, advance=1)
            arrays[f"{i}_{split}_ids"] = np.concatenate(ids) if ids else np.zeros((0, 1), dtype)
            arrays[f"{i}_{split}_offsets"] = np.cumsum(counts).astype(np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: np.savez would add ".npz" to a temporary name
    return _store(sources, arrays, mc)


def _store(sources: list[dict], data, mc: TotoConfig) -> TokenStore:
    keys = [f"{i}_{s}" for i in range(len(sources)) for s in ("train", "heldout")]
    return TokenStore(sources, {k: data[f"{k}_ids"] for k in keys}, {k: data[f"{k}_offsets"] for k in keys}, mc)


def corpus_and_family(cfg: dict, out: Path, console, shards=None) -> tuple[object, dict[str, TotoConfig]]:
    """(the corpus sequences are drawn from, the family's configs): token shards of `totobench
    tokenize` when `shards` is a folder, else data.sources tokenized once by `tokenizer:`.
    Raises DataError when the corpus has no usable held-out file."""
    if shards:
        from totobench.pretrain.shards import ShardCorpus, read_index
        ix = read_index(Path(shards))
        res, grid = int(ix["resolution"]), math.isqrt(int(ix["tokens_per_frame"]))
        family = family_configs(cfg, int(ix["codebook_size"]), res, res // grid)
        corpus = ShardCorpus(shards, next(iter(family.values())), float(cfg["data"]["heldout_fraction"]))
    else:
        tokenizer, res = corpus_tokenizer(cfg)
        family = family_configs(cfg, tokenizer.codebook_size, res, tokenizer.downsample)
        corpus = prepare_tokens(cfg, tokenizer, res, next(iter(family.values())), out, console)
    if not corpus.has("heldout"):
        raise DataError(f"{shards or data_root(cfg)}: no usable held-out file; raise data.heldout_fraction")
    return corpus, family


def batch(corpus, keys: list[list[int]], split: str) -> torch.Tensor:
    """The sequences corpus.sample(key, split) of `keys`, padded with end_id into LongTensor [B, L]."""
    seqs = [corpus.sample(k, split) for k in keys]
    out = torch.full((len(seqs), max(len(s) for s in seqs)), corpus.mc.end_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[j, :len(s)] = s
    return out


# ----------------------------------------------------------------------------- training


@torch.no_grad()
def heldout_loss(model, seqs: torch.Tensor, end_id: int, batch_size: int) -> float:
    """Mean next-token loss (nats per token, padding ignored) of `model` over seqs [N, L]."""
    model.eval()
    total, count = 0.0, 0
    for part in seqs.split(batch_size):
        part = part.to(next(model.parameters()).device)
        total += float(next_token_loss(model, part, end_id, reduction="sum"))
        count += int((next_token_targets(part, end_id)[1] != -100).sum())
    model.train()
    return total / count


def train_to_budgets(mc: TotoConfig, lr: float, corpus, heldout: torch.Tensor, cfg: dict,
                     budget_list: list[float], console=None, label: str = "") -> dict:
    """Train Toto(mc) with muP at base learning rate `lr` (linear warmup, then constant) until the
    last budget (MACs); at each budget crossed, the held-out loss. Returns {"rows": [{"budget",
    "step", "tokens", "macs", "heldout_loss"}], "macs_per_token", "params", "steps", "diverged",
    "wall_time_s"}; a run whose loss turns NaN stops there with diverged True."""
    t, seed, t0 = cfg["train"], int(cfg["seed"]), time.time()
    model = mup_model(mc, seed).to(cfg["device"])
    optimizer = mup_optimizer(model, lr, float(t["weight_decay"]))
    per_token = training_macs_per_token(model, heldout.shape[1] - 1)
    rows, pending, tokens, step, diverged = [], list(budget_list), 0, 0, False
    bs = int(cfg["eval"]["batch_size"])
    with progress_bar(console, fields="loss {task.fields[loss]:.3f}", disable=console is None) as progress:
        task = progress.add_task(label or f"dim {mc.dim}", total=len(pending), loss=float("nan"))
        while pending:
            set_lr(optimizer, lr * min(1.0, (step + 1) / max(1, int(t["warmup_steps"]))))
            seqs = batch(corpus, [[seed, 2, step, g] for g in range(int(t["batch_size"]))], "train").to(cfg["device"])
            loss = next_token_loss(model, seqs, mc.end_id)
            if not torch.isfinite(loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(t["grad_clip"]))
            optimizer.step()
            step, tokens = step + 1, tokens + seqs.shape[0] * (seqs.shape[1] - 1)
            while pending and tokens * per_token >= pending[0]:
                rows.append({"budget": pending.pop(0), "step": step, "tokens": tokens, "macs": tokens * per_token,
                             "heldout_loss": heldout_loss(model, heldout, mc.end_id, bs)})
                progress.update(task, advance=1, loss=rows[-1]["heldout_loss"])
    return {"rows": rows, "macs_per_token": per_token, "params": sum(p.numel() for p in model.parameters()),
            "steps": step, "diverged": diverged, "wall_time_s": round(time.time() - t0, 1)}


def cached_run(out: Path, label: str, key: dict, fn) -> dict:
    """fn()'s result, stored in out/runs/<label>.json with `key`; a later call with the same key
    reads it back instead (a stopped study resumes at the first unfinished run)."""
    path = out / "runs" / f"{label}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["run"]
    run = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"key": key, "run": run})
    return run


def run_study(cfg: dict, out: Path, console=None, shards=None) -> dict:
    """The whole study into `out`: tokens (or `shards`), the learning-rate sweep on the smallest
    model, every model of the family to train.budget_macs, the frontier and the fit. Returns the
    results dict (also written to out/results.json)."""
    t0 = time.time()
    torch.set_num_threads(int(cfg["threads"] or os.cpu_count() or 1))
    out.mkdir(parents=True, exist_ok=True)
    corpus, family = corpus_and_family(cfg, out, console, shards)
    held = batch(corpus, [[int(cfg["seed"]), 3, g] for g in range(int(cfg["eval"]["heldout_sequences"]))], "heldout")
    data_id = [cfg["data"], cfg["tokenizer"], str(shards)]  # in each run's key: other data, other runs
    sweep = lr_sweep(cfg, family, corpus, held, out, console, data_id)
    lr = min(sweep, key=lambda r: float("inf") if r["heldout_loss"] is None else r["heldout_loss"])["lr"]
    if sweep_edge(sweep, lr) and console is not None:
        console.print(f"[yellow]the best learning rate {lr:g} is the {sweep_edge(sweep, lr)} one swept: "
                      f"widen lr_sweep.lrs ({cfg['_path']}) to be sure of it[/]")
    grid = budgets(float(cfg["train"]["budget_macs"]), int(cfg["train"]["budget_points"]))
    runs = {}
    for name, mc in family.items():
        key = {"config": mc.to_dict(), "lr": lr, "budgets": grid, "train": cfg["train"], "seed": cfg["seed"],
               "data": data_id}
        runs[name] = cached_run(out, name, key, lambda mc=mc, name=name: train_to_budgets(
            mc, lr, corpus, held, cfg, grid, console, f"{name} (dim {mc.dim}, {mc.n_layers} layers)"))
    return summarize(cfg, family, sweep, lr, runs, time.time() - t0, out)


def sweep_edge(sweep: list[dict], lr: float) -> str | None:
    """"smallest" or "largest" when the chosen lr is at that end of a sweep of >= 2 rates, else None."""
    rates = sorted(r["lr"] for r in sweep)
    if len(rates) < 2:
        return None
    return "smallest" if lr == rates[0] else "largest" if lr == rates[-1] else None


def lr_sweep(cfg: dict, family: dict, corpus, held: torch.Tensor, out: Path, console, data_id=None) -> list[dict]:
    """Each lr_sweep.lrs on the smallest model to lr_sweep.budget_macs (default train.budget_macs):
    [{"lr", "heldout_loss" (None if it diverged)}]. One learning rate: no run."""
    lrs, (name, mc) = [float(x) for x in cfg["lr_sweep"]["lrs"]], next(iter(family.items()))
    if len(lrs) == 1:
        return [{"lr": lrs[0], "heldout_loss": None, "note": "single learning rate: no sweep"}]
    budget = float(cfg["lr_sweep"]["budget_macs"] or cfg["train"]["budget_macs"])
    results = []
    for lr in lrs:
        key = {"config": mc.to_dict(), "lr": lr, "budgets": [budget], "train": cfg["train"], "seed": cfg["seed"],
               "data": data_id}
        run = cached_run(out, f"sweep-{name}-lr{lr:g}", key, lambda lr=lr: train_to_budgets(
            mc, lr, corpus, held, cfg, [budget], console, f"lr sweep {name} lr={lr:g}"))
        results.append({"lr": lr, "heldout_loss": None if run["diverged"] else run["rows"][-1]["heldout_loss"]})
    if all(r["heldout_loss"] is None for r in results):
        raise ConfigError(f"{cfg['_path']}: every learning rate of lr_sweep.lrs diverged")
    return results


def summarize(cfg: dict, family: dict, sweep: list, lr: float, runs: dict, wall_s: float, out: Path) -> dict:
    """results.json: the family, each model's curve, the frontier and the fit on the frontier
    without its fit.skip_budgets smallest budgets. (Not on each model's final point: every model
    stops at the same C_max, so those points share one compute.)"""
    curves = {name: run["rows"] for name, run in runs.items() if run["rows"]}
    frontier = compute_frontier(curves)
    fit_points = frontier[int(cfg["fit"]["skip_budgets"]):]
    if len(fit_points) < 2:
        raise ConfigError(f"{cfg['_path']}: {len(frontier)} budgets reached, fit.skip_budgets="
                          f"{cfg['fit']['skip_budgets']} leaves fewer than the 2 points a fit needs")
    results = {
        "name": cfg["name"], "config_file": cfg["_path"], "mup": bool(cfg["mup"]),
        "mup_rules": MUP_RULES if cfg["mup"] else "standard parametrization (no muP)",
        "compute": "MACs: 3 x forward MACs per token (blocks, attention, output head) x tokens seen",
        "lr_sweep": sweep, "lr": lr, "lr_at_edge": sweep_edge(sweep, lr),
        "models": [{"name": name, "dim": mc.dim, "n_layers": mc.n_layers, "n_heads": mc.n_heads,
                    "mlp_hidden": mc.mlp_hidden, **{k: v for k, v in runs[name].items() if k != "rows"},
                    "curve": runs[name]["rows"]} for name, mc in family.items()],
        "frontier": frontier,
        "fit": {**fit_power_law([p["macs"] for p in fit_points], [p["heldout_loss"] for p in fit_points]),
                "on": f"compute-optimal frontier, the {int(cfg['fit']['skip_budgets'])} smallest budgets left out"},
        "paper": PAPER_FIT,
        "wall_time_s": round(wall_s, 1),
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
    }
    atomic_write_json(out / "results.json", results)
    return results
