"""`totobench pretrain`: train the visual tokenizer, then Toto by next-token prediction.

    totobench pretrain --config configs/pretrain/toto-tiny.yaml [--out DIR] [--resume]
    torchrun --standalone --nproc_per_node=2 -m totobench pretrain --config ...   # DDP, gloo on CPU

Stages, each stored under the state folder (`<out>/train_state` unless the config says otherwise):
  1. tokenizer: a VQ-VAE trained on frames of the training files (rank 0), evaluated on frames of
     the held-out files (PSNR, codebook usage), saved to <out>/tokenizer/;
  2. tokens: every training and held-out video frame and image tokenized once (tokens.npz);
  3. transformer: next-token cross-entropy on sequences sampled from a weighted mixture of image
     and video folders; AdamW (0.9, 0.95), linear warmup then cosine decay, gradient clipping.
     A checkpoint (weights + optimizer, last.pt) every `checkpoint_every` steps also refreshes the
     checkpoint folder, so a partial model is always usable.
  4. held-out next-token loss of the trained model and of random init (torch seed 0, same tokenizer).

Data order is a pure function of (seed, step, sample index): `--resume` after a kill continues
from the last checkpoint with the same batches and optimizer state, so it reproduces the
uninterrupted run; a run with N processes sees the same global batches as a single process.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from totobench.errors import ConfigError, DataError
from totobench.model.checkpoint import save_checkpoint
from totobench.model.sequence import build_sequence, clip_frame_indices, clip_span, num_clip_starts
from totobench.model.tokenizer import TokenizerConfig, VisualTokenizer, evaluate_tokenizer
from totobench.model.toto import Toto, TotoConfig

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm")

DEFAULTS = {
    "seed": 0,
    "threads": None,  # torch threads per process; None: all cores split over the processes
    "model": {"preset": "toto-tiny"},
    "data": {"root": "world", "world_size": "default", "world_seed": 0, "heldout_fraction": 0.05,
             "sources": []},
    "tokenizer": {"steps": 400, "batch_size": 64, "lr": 1e-3, "crop": None, "heldout_frames": 512,
                  "max_minutes": None},
    "train": {"steps": 500, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "min_lr": 1e-4,
              "warmup_steps": 50, "weight_decay": 0.1, "grad_clip": 1.0, "checkpoint_every": 50,
              "log_every": 5, "max_minutes": None, "output_init": "random"},
    "eval": {"heldout_sequences": 32, "batch_size": 8},
}


# How the output head starts: "random" (normal, std 0.02, as every other matrix) or "embedding" (a copy
# of the input embedding; still a separate parameter, so input and output embeddings stay untied).
OUTPUT_INITS = ("random", "embedding")

# ---------------------------------------------------------------------------------------------
# config


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_pretrain_config(path: str | os.PathLike) -> dict:
    """Read a pre-training YAML and fill in defaults. Raises ConfigError naming the bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pre-training config not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key in raw:
        if key not in DEFAULTS and key not in ("name", "out", "state_dir"):
            raise ConfigError(f"{path}: unknown top-level field {key!r} "
                              f"(expected name, out, state_dir, {', '.join(DEFAULTS)})")
    cfg = _merge(DEFAULTS, raw)
    cfg["_path"] = str(path)
    sources = cfg["data"]["sources"]
    if not sources:
        raise ConfigError(f"{path}: data.sources is empty; expected a list of "
                          "{kind: image|video, path: FOLDER, weight: W}")
    for i, src in enumerate(sources):
        if src.get("kind") not in ("image", "video"):
            raise ConfigError(f"{path}: data.sources[{i}].kind must be image or video, got {src.get('kind')!r}")
        if "path" not in src:
            raise ConfigError(f"{path}: data.sources[{i}].path is missing")
        if not float(src.get("weight", 1.0)) > 0:
            raise ConfigError(f"{path}: data.sources[{i}].weight must be > 0")
    if cfg["train"]["output_init"] not in OUTPUT_INITS:
        raise ConfigError(f"{path}: train.output_init must be one of {', '.join(OUTPUT_INITS)}, "
                          f"got {cfg['train']['output_init']!r}")
    model_cfg(cfg)  # validate early
    return cfg


def model_cfg(cfg: dict) -> TotoConfig:
    """The TotoConfig of a pre-training config: `model.preset` with the other `model.*` fields
    overriding it (codebook_size, vocab_size follow each other when only one is given)."""
    m = dict(cfg["model"])
    preset = m.pop("preset", None)
    base = TotoConfig.preset(preset).to_dict() if preset else {}
    if "codebook_size" in m and "vocab_size" not in m:
        m["vocab_size"] = m["codebook_size"] + 3
    try:
        return TotoConfig.from_dict({**base, **m})
    except TypeError as err:
        raise ConfigError(f"{cfg.get('_path', 'config')}: bad model field ({err})") from None


def tokenizer_cfg(cfg: dict, mc: TotoConfig) -> TokenizerConfig:
    known = TokenizerConfig.__dataclass_fields__
    t = {k: v for k, v in cfg["tokenizer"].items() if k in known}
    return TokenizerConfig(**{**t, "codebook_size": mc.codebook_size, "downsample": mc.patch_size})


# ---------------------------------------------------------------------------------------------
# distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def init_dist() -> Dist:
    """Join the process group when started by torchrun (gloo, CPU); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
    return Dist(torch.distributed.get_rank(), world)


# ---------------------------------------------------------------------------------------------
# data


def _heldout(relpath: str, fraction: float) -> bool:
    """Whether a file belongs to the held-out split: a stable hash of its path, not its position."""
    h = int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16)
    return h % 10000 < fraction * 10000


def data_root(cfg: dict) -> Path:
    d = cfg["data"]
    if d["root"] == "world":
        from totobench.data.synth import missing_roots
        from totobench.data.world import ensure_data_world, world_dir
        world = world_dir(d["world_size"], d["world_seed"])
        # only the pretrain/ root is needed: do not generate the evaluation roots here
        if world.is_dir() and "pretrain" not in missing_roots(world, d["world_seed"], d["world_size"]):
            return world
        return Path(ensure_data_world(d["world_size"], d["world_seed"]))
    root = Path(d["root"]).expanduser()
    if not root.is_dir():
        raise DataError(f"{cfg['_path']}: data.root {root} is not a folder")
    return root


def list_sources(cfg: dict, root: Path) -> list[dict]:
    """Every source with its sorted files split into train and held-out lists (relative paths)."""
    out = []
    frac = float(cfg["data"]["heldout_fraction"])
    for src in cfg["data"]["sources"]:
        folder = root / src["path"]
        suffixes = IMAGE_SUFFIXES if src["kind"] == "image" else VIDEO_SUFFIXES
        if not folder.is_dir():
            raise DataError(f"{folder}: {src['kind']} folder of data.sources not found")
        files = sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{folder}: no {src['kind']} files ({', '.join(suffixes)})")
        held = [f for f in files if _heldout(f, frac)]
        if frac > 0 and not held and len(files) > 1:
            held = files[-1:]  # tiny folders: still keep one file out
        train = [f for f in files if f not in set(held)]
        out.append({**src, "weight": float(src.get("weight", 1.0)), "train": train, "heldout": held})
    return out


def to_square(frames: np.ndarray, resolution: int) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float [T,3,res,res] in [0,1]: centre square crop, antialiased resize."""
    x = torch.from_numpy(np.array(frames, copy=True)).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if s != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0, 1)


def load_image(path: Path, resolution: int) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except OSError as err:
        raise DataError(f"{path}: unreadable image ({err})") from None
    return to_square(arr[None], resolution)


def load_video(path: Path, resolution: int, indices: list[int] | None = None) -> torch.Tensor:
    """All frames (or `indices`) of a video as float [T,3,res,res] in [0,1]."""
    from totobench.data.video import read_frames, video_info
    if indices is None:
        indices = list(range(video_info(path).num_frames))
    return to_square(read_frames(path, indices), resolution)


def _as_u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def load_frames(sources: list[dict], root: Path, resolution: int, console) -> dict:
    """Decode every file once: {(source index, split): (uint8 [F,3,res,res] frames of all its files
    concatenated, int64 offsets [files + 1])}."""
    pool, files = {}, [(i, split, rel) for i, src in enumerate(sources)
                       for split in ("train", "heldout") for rel in src[split]]
    with _progress(console) as progress:
        task = progress.add_task("decode corpus", total=len(files), loss=float("nan"), speed="")
        parts: dict[tuple, list] = {(i, split): [] for i in range(len(sources)) for split in ("train", "heldout")}
        for i, split, rel in files:
            load = load_image if sources[i]["kind"] == "image" else load_video
            parts[(i, split)].append(_as_u8(load(root / rel, resolution)))
            progress.update(task, advance=1)
    for key, xs in parts.items():
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64)
        frames = torch.cat(xs) if xs else torch.zeros((0, 3, resolution, resolution), dtype=torch.uint8)
        pool[key] = (frames, offsets)
    return pool


def pooled(frames: dict, split: str, limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """All frames of `split` over every source (uint8 [N,3,res,res]); a seeded subset of `limit`."""
    x = torch.cat([f for (i, sp), (f, _) in sorted(frames.items()) if sp == split])
    if limit is not None and len(x) > limit:
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(x), limit, replace=False))
        x = x[torch.from_numpy(keep)]
    return x


# ---------------------------------------------------------------------------------------------
# stage 1: tokenizer


def train_tokenizer(cfg: dict, mc: TotoConfig, frames: dict, out: Path, console) -> dict:
    """Train on frames of the training files, evaluate on frames of the held-out files, save to
    out/tokenizer/. Returns its facts."""
    tc = cfg["tokenizer"]
    seed = int(cfg["seed"])
    t0 = time.time()
    train_x = pooled(frames, "train")
    held_x = pooled(frames, "heldout", int(tc["heldout_frames"]), seed)
    torch.manual_seed(seed)
    tok = VisualTokenizer(tokenizer_cfg(cfg, mc))
    opt = torch.optim.Adam(tok.parameters(), lr=tc["lr"])
    gen = torch.Generator().manual_seed(seed)
    steps, bs = int(tc["steps"]), int(tc["batch_size"])
    restarts, steps_done = 0, 0
    budget_s = 60 * float(tc["max_minutes"]) if tc.get("max_minutes") else None
    with _progress(console) as progress:
        task = progress.add_task("tokenizer", total=steps, loss=float("nan"), speed="")
        step, t_loop = 0, time.time()
        while step < steps:
            if budget_s is not None and time.time() - t0 > budget_s:
                break  # the machine is slower than planned: keep the codebook we have
            if budget_s is not None and step == 10:  # re-plan once so the cosine schedule ends in budget
                per_step = (time.time() - t_loop) / 10
                steps = max(11, min(steps, int((budget_s - (time.time() - t0)) / per_step) + 10))
                progress.update(task, total=steps)
            steps_done = step + 1
            lr = tc["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to 0
            for g in opt.param_groups:
                g["lr"] = lr
            rng = np.random.default_rng([seed, 1, step])
            idx = torch.from_numpy(rng.integers(0, len(train_x), bs))
            x = train_x[idx]
            if tc.get("crop"):  # the tokenizer is convolutional: random crops train it at a fraction of the cost
                c = int(tc["crop"])
                top, left = (int(v) for v in rng.integers(0, x.shape[-1] - c + 1, 2))
                x = x[..., top:top + c, left:left + c]
            x = x.float() / 255
            flip = torch.from_numpy(rng.random(bs) < 0.5)
            x[flip] = x[flip].flip(-1)
            out_step = tok.training_step(x, gen)
            opt.zero_grad(set_to_none=True)
            out_step["loss"].backward()
            opt.step()
            restarts += out_step["restarts"]
            psnr = 10 * math.log10(1 / max(float(out_step["recon_mse"]), 1e-10))
            progress.update(task, advance=1, loss=float(out_step["loss"].detach()), speed=f"{psnr:.1f} dB")
            step += 1
    tok.eval()
    facts = {
        "heldout": evaluate_tokenizer(tok, held_x.float() / 255),
        "train_subset": evaluate_tokenizer(tok, train_x[:len(held_x)].float() / 255),
        "steps": steps_done, "steps_planned": steps, "batch_size": bs, "crop": tc.get("crop"),
        "train_frames": int(len(train_x)),
        "code_restarts": int(restarts), "wall_time_s": round(time.time() - t0, 1),
        "config": tok.config.to_dict(),
    }
    tok.save(out / "tokenizer")
    return facts


# ---------------------------------------------------------------------------------------------
# stage 2: tokens of the whole corpus


@torch.no_grad()
def tokenize_corpus(tok: VisualTokenizer, frames: dict, path: Path, console) -> None:
    """Encode every frame once; write path (npz): per source and split, int16 ids [frames, h*w]
    of all its files concatenated ("<i>_<split>_ids") and their frame offsets ("<i>_<split>_offsets")."""
    arrays = {}
    total = sum(len(f) for f, _ in frames.values())
    with _progress(console) as progress:
        task = progress.add_task("tokenize corpus", total=total, loss=float("nan"), speed="")
        for (i, split), (x, offsets) in sorted(frames.items()):
            ids = []
            for j in range(0, len(x), 256):
                ids.append(tok.encode(x[j:j + 256].float() / 255).flatten(1).to(torch.int16))
                progress.update(task, advance=len(ids[-1]))
            n = tok.encode(torch.zeros(1, 3, x.shape[2], x.shape[3])).numel()
            arrays[f"{i}_{split}_ids"] = torch.cat(ids).numpy() if ids else np.zeros((0, n), np.int16)
            arrays[f"{i}_{split}_offsets"] = offsets
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class TokenCorpus:
    """Tokenized files of every source; draws sequences as a pure function of an RNG key."""

    def __init__(self, path: Path, sources: list[dict], mc: TotoConfig):
        data = np.load(path)
        self.mc = mc
        self.sources = sources
        self.weights = np.array([s["weight"] for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.ids = {}
        span = clip_span(mc.num_frames, mc.frame_stride)
        for i, src in enumerate(sources):
            for split in ("train", "heldout"):
                ids, off = data[f"{i}_{split}_ids"], data[f"{i}_{split}_offsets"]
                if src["kind"] == "video":
                    # only videos long enough for one clip can be sampled
                    items = [(int(a), int(b)) for a, b in zip(off[:-1], off[1:]) if b - a >= span]
                else:
                    items = list(range(len(ids)))
                self.ids[(i, split)] = (ids, items)
        for i, src in enumerate(sources):
            if not self.ids[(i, "train")][1]:
                raise DataError(f"{src['path']}: no training {src['kind']}s usable "
                                f"(videos need >= {span} frames)")

    def sample(self, key: list[int], split: str = "train") -> torch.Tensor:
        """One sequence LongTensor [L] drawn with np.random.default_rng(key)."""
        rng = np.random.default_rng(key)
        usable = [i for i in range(len(self.sources)) if self.ids[(i, split)][1]]
        w = self.weights[usable] / self.weights[usable].sum()
        i = usable[int(rng.choice(len(usable), p=w))]
        ids, items = self.ids[(i, split)]
        mc = self.mc
        if self.sources[i]["kind"] == "video":
            a, b = items[int(rng.integers(len(items)))]
            start = int(rng.integers(num_clip_starts(b - a, mc.num_frames, mc.frame_stride)))
            frames = ids[[a + j for j in clip_frame_indices(start, mc.num_frames, mc.frame_stride)]]
            kind = "video"
        else:
            pick = rng.integers(len(items), size=mc.images_per_sequence)
            frames = ids[[items[int(j)] for j in pick]]
            kind = "image"
        return build_sequence(torch.from_numpy(frames.astype(np.int64)), kind, mc)


def collate(seqs: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Pad sequences of unequal length (image vs video mixes) with pad_id into [B, L]."""
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[j, :len(s)] = s
    return out


def batch_for_step(corpus: TokenCorpus, seed: int, step: int, batch_size: int, dist: Dist) -> list[torch.Tensor]:
    """This rank's share of the global batch of `step`: samples g = rank, rank + world, ..."""
    return [corpus.sample([seed, 2, step, g]) for g in range(dist.rank, batch_size, dist.world)]


# ---------------------------------------------------------------------------------------------
# stage 3: next-token training


def initial_model(mc: TotoConfig, seed: int, output_init: str = "random") -> Toto:
    """The model pre-training starts from: Toto(mc) drawn under torch seed `seed` (the weights of
    random-init:<checkpoint>), with the output head replaced by a copy of the input embedding when
    `output_init` is "embedding".

    Why "embedding": the model then starts out scoring "the next token is this one", so a head that
    attends to the same place in the previous frame turns into a copy of that token as soon as its
    W_o W_v approaches a multiple of the identity - one matrix for all codes, instead of one learned
    association per code between independent random input and output tables. On the synthetic copy
    task of benchmarks/copy_emergence.py copying forms in far fewer steps that way.
    """
    torch.manual_seed(seed)
    model = Toto(mc)
    if output_init == "embedding":
        with torch.no_grad():
            model.output.weight.copy_(model.tok_embeddings.weight)
    return model


def lr_at(step: int, t: dict) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to min_lr at `steps`."""
    lr, min_lr, warm, total = t["lr"], t["min_lr"], int(t["warmup_steps"]), int(t["steps"])
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def next_token_targets(seqs: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """seqs [B, L] -> (inputs [B, L-1], targets [B, L-1]). Rows are padded with pad_id (= end_id)
    after their end token: the first end token stays a target, the padding after it gets -100."""
    inputs, targets = seqs[:, :-1], seqs[:, 1:].clone()
    is_pad = (targets == pad_id) & (torch.cumsum(targets == pad_id, dim=1) > 1)
    targets[is_pad] = -100
    return inputs, targets


def next_token_loss(model, seqs: torch.Tensor, pad_id: int, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (nats) of predicting seqs[:, 1:] from seqs[:, :-1], padding ignored."""
    inputs, targets = next_token_targets(seqs, pad_id)
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)


def make_optimizer(model: Toto, t: dict) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); weight decay on matrices only (not on norms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": t["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=t["lr"], betas=(0.9, 0.95), eps=1e-8)


@torch.no_grad()
def heldout_loss(model: Toto, corpus: TokenCorpus, seed: int, n: int, batch_size: int) -> float:
    """Mean next-token loss (nats per token) over n fixed held-out sequences."""
    model.eval()
    split = "heldout" if any(corpus.ids[(i, "heldout")][1] for i in range(len(corpus.sources))) else "train"
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        seqs = collate([corpus.sample([seed, 3, g], split) for g in range(b, min(n, b + batch_size))],
                       corpus.mc.end_id)
        loss = next_token_loss(model, seqs, corpus.mc.end_id, reduction="sum")
        total += float(loss)
        count += int((next_token_targets(seqs, corpus.mc.end_id)[1] != -100).sum())
    model.train()
    return total / count


# ---------------------------------------------------------------------------------------------
# files


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]}"),
                    TimeRemainingColumn(), console=console, disable=console is None)


def _atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


CSV_FIELDS = ["step", "tokens", "loss", "lr", "grad_norm", "elapsed_s", "tokens_per_s"]


def _truncate_csv(path: Path, last_step: int) -> None:
    """Drop rows after the checkpoint we resume from: those steps run again."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_loss_curve(csv_path: Path, png_path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    tokens = [int(r["tokens"]) / 1e6 for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    ax.plot(tokens, loss, lw=1.2)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("train next-token loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


# ---------------------------------------------------------------------------------------------
# the command


def pretrain(cfg: dict, out: Path, resume: bool = False, console=None, command: str = "") -> dict:
    """Run all stages; returns the training facts written to out/training.json."""
    dist = init_dist()
    threads = cfg.get("threads") or max(1, (os.cpu_count() or 1) // dist.world)
    torch.set_num_threads(int(threads))
    console = console if dist.main else None
    mc = model_cfg(cfg)
    seed, t = int(cfg["seed"]), cfg["train"]
    state_dir = Path(cfg.get("state_dir") or out / "train_state").expanduser()
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        state_dir.mkdir(parents=True, exist_ok=True)
        if not resume and (state_dir / "last.pt").exists():
            raise ConfigError(f"{out}: holds a run already (train_state/last.pt); pass --resume to "
                              "continue it or choose another --out")
    dist.barrier()
    root = data_root(cfg)
    sources = list_sources(cfg, root)
    facts_path = state_dir / "facts.json"
    facts = json.loads(facts_path.read_text()) if resume and facts_path.is_file() else {}

    # stage 1 + 2 on rank 0; the other ranks wait and then read the results
    if dist.main and ("tokenizer" not in facts or "tokens_file" not in facts
                      or not (out / "tokenizer" / "model.safetensors").is_file()):
        t0 = time.time()
        if console:
            console.print(f"{sum(len(s['train']) for s in sources)} training files, "
                          f"{sum(len(s['heldout']) for s in sources)} held-out under {root}")
        frames = load_frames(sources, root, mc.resolution, console)
        facts["decode_wall_time_s"] = round(time.time() - t0, 1)
        if "tokenizer" not in facts or not (out / "tokenizer" / "model.safetensors").is_file():
            facts["tokenizer"] = train_tokenizer(cfg, mc, frames, out, console)
            facts.pop("tokens_file", None)
            _atomic_json(facts_path, facts)
            if console:
                h = facts["tokenizer"]["heldout"]
                console.print(f"tokenizer held-out PSNR {h['psnr_db']:.2f} dB, codebook usage "
                              f"{h['codebook_usage']:.1%} ({h['codes_used']}/{mc.codebook_size})")
        if "tokens_file" not in facts:
            tok = VisualTokenizer.load(out / "tokenizer")
            t0 = time.time()
            tokenize_corpus(tok, frames, state_dir / "tokens.npz", console)
            facts["tokens_file"] = "tokens.npz"
            facts["tokenize_wall_time_s"] = round(time.time() - t0, 1)
            _atomic_json(facts_path, facts)
    dist.barrier()
    if not dist.main:
        facts = json.loads(facts_path.read_text())
    corpus = TokenCorpus(state_dir / "tokens.npz", sources, mc)

    # stage 3
    model = initial_model(mc, seed, t["output_init"])
    optimizer = make_optimizer(model, t)
    start_step, tokens_seen, elapsed = 0, 0, 0.0
    steps_planned = None  # fixed once, from the measured step time, when train.max_minutes is set
    ckpt_path = state_dir / "last.pt"
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_step, tokens_seen, elapsed = state["step"], state["tokens"], state["elapsed_s"]
        steps_planned = state.get("steps_planned")
        if console:
            console.print(f"resuming at step {start_step} ({tokens_seen:,} tokens seen)")
    csv_path = out / "loss_curve.csv"
    if dist.main:
        if resume:
            _truncate_csv(csv_path, start_step)
        if not csv_path.is_file() or start_step == 0:
            with open(csv_path, "w", newline="") as f:
                csv.DictWriter(f, CSV_FIELDS).writeheader()
    train_model = model
    if dist.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    model.train()

    steps, bs = int(t["steps"]), int(t["batch_size"])
    if bs % dist.world:
        raise ConfigError(f"{cfg['_path']}: train.batch_size={bs} must be a multiple of the "
                          f"{dist.world} processes")
    micro = max(1, int(t["micro_batch_size"]))
    # TOTOBENCH_PRETRAIN_KILL_AT_STEP=N: SIGKILL this process right after step N (tests only)
    kill_at = int(os.environ.get("TOTOBENCH_PRETRAIN_KILL_AT_STEP", "-1"))
    budget_s = 60 * float(t["max_minutes"]) if t.get("max_minutes") else None
    calibration_steps = min(10, steps)
    if steps_planned:
        steps = steps_planned

    def save(step: int) -> None:
        if dist.main:
            tmp = ckpt_path.with_name("last.pt.tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "step": step, "tokens": tokens_seen, "elapsed_s": elapsed,
                        "steps_planned": steps_planned}, tmp)
            os.replace(tmp, ckpt_path)
            save_checkpoint(out, model)
            facts.update({"steps_done": step, "tokens_seen": tokens_seen,
                          "train_wall_time_s": round(elapsed, 1)})
            _atomic_json(facts_path, facts)
        dist.barrier()

    step = start_step
    window_tokens, window_t0 = 0, time.time()
    with _progress(console) as progress:
        task = progress.add_task("toto", total=steps, completed=start_step, loss=float("nan"), speed="")
        while step < steps:
            t_step = time.time()
            lr = lr_at(step, {**t, "steps": steps})
            for g in optimizer.param_groups:
                g["lr"] = lr
            seqs = collate(batch_for_step(corpus, seed, step, bs, dist), mc.end_id)
            local_tokens = seqs.shape[0] * (seqs.shape[1] - 1)
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros(())
            chunks = list(range(0, len(seqs), micro))
            for j, a in enumerate(chunks):
                part = seqs[a:a + micro]
                sync = j == len(chunks) - 1
                ctx = train_model.no_sync() if (dist.world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    loss = next_token_loss(train_model, part, mc.end_id) * len(part) / len(seqs)
                    loss.backward()
                loss_sum += loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
            optimizer.step()
            step += 1
            if dist.world > 1:
                torch.distributed.all_reduce(loss_sum)
                loss_sum /= dist.world
            step_tokens = local_tokens * dist.world
            tokens_seen += step_tokens
            window_tokens += step_tokens
            rate = window_tokens / max(1e-9, time.time() - window_t0)
            progress.update(task, completed=step, loss=float(loss_sum), speed=f"{rate:,.0f} tok/s")
            if dist.main and (step % int(t["log_every"]) == 0 or step == steps):
                with open(csv_path, "a", newline="") as f:
                    csv.DictWriter(f, CSV_FIELDS).writerow({
                        "step": step, "tokens": tokens_seen, "loss": f"{float(loss_sum):.6f}",
                        "lr": f"{lr:.6g}", "grad_norm": f"{float(grad_norm):.4f}",
                        "elapsed_s": f"{elapsed:.1f}", "tokens_per_s": f"{rate:.1f}"})
                window_tokens, window_t0 = 0, time.time()
            if budget_s and steps_planned is None and step >= calibration_steps:
                # fit the run to the time budget: the cosine schedule then ends where training ends
                steps = steps_planned = max(step, min(steps, int(budget_s / (elapsed / step))))
                if dist.world > 1:  # every rank uses rank 0's estimate
                    plan = torch.tensor(float(steps))
                    torch.distributed.broadcast(plan, 0)
                    steps = steps_planned = int(plan)
                progress.update(task, total=steps)
                if console:
                    console.print(f"{elapsed / step:.2f} s/step: planning {steps} steps for "
                                  f"train.max_minutes={t['max_minutes']}")
            stop = budget_s is not None and elapsed > budget_s
            if dist.world > 1:  # every rank must agree to stop at the same step
                flag = torch.tensor(float(stop))
                torch.distributed.all_reduce(flag)
                stop = bool(flag > 0)
            elapsed += time.time() - t_step
            if step % int(t["checkpoint_every"]) == 0 or step == steps or stop:
                save(step)
            if kill_at == step and dist.main:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-and-resume test
            if stop:
                if console:
                    console.print(f"[yellow]train.max_minutes reached: stopping at step {step}/{steps}[/yellow]")
                break

    # stage 4: held-out loss of the trained model vs random init, then the checkpoint folder
    if dist.main:
        ev = cfg["eval"]
        trained = heldout_loss(model, corpus, seed, int(ev["heldout_sequences"]), int(ev["batch_size"]))
        from totobench.model.registry import load_backbone
        random_model = load_backbone(f"random-init:{out}").model  # exactly the registry's baseline
        random_init = heldout_loss(random_model, corpus, seed, int(ev["heldout_sequences"]), int(ev["batch_size"]))
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        last = rows[-5:]
        sha = save_checkpoint(out, model)
        facts_out = {
            "command": command,
            "config_file": cfg["_path"],
            "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
            "processes": dist.world,
            "threads_per_process": torch.get_num_threads(),
            "data": {"root": str(root), "sources": [
                {"kind": s["kind"], "path": s["path"], "weight": s["weight"],
                 "train_files": len(s["train"]), "heldout_files": len(s["heldout"])} for s in sources]},
            "tokenizer": facts["tokenizer"],
            "decode_wall_time_s": facts.get("decode_wall_time_s"),
            "tokenize_wall_time_s": facts.get("tokenize_wall_time_s"),
            "steps": step, "steps_planned": steps, "steps_in_config": int(t["steps"]),
            "tokens_seen": tokens_seen,
            "train_wall_time_s": round(elapsed, 1),
            "total_wall_time_s": round(elapsed + facts["tokenizer"]["wall_time_s"]
                                       + (facts.get("decode_wall_time_s") or 0)
                                       + (facts.get("tokenize_wall_time_s") or 0), 1),
            "final_train_loss": float(rows[-1]["loss"]) if rows else None,
            "final_train_loss_mean_last5_logged": (sum(float(r["loss"]) for r in last) / len(last)) if last else None,
            "heldout_loss": trained,
            "heldout_loss_random_init": random_init,
            "heldout_sequences": int(ev["heldout_sequences"]),
            "parameters": sum(p.numel() for p in model.parameters()),
            "sha256": sha,
        }
        _atomic_json(out / "training.json", facts_out)
        plot_loss_curve(csv_path, out / "loss_curve.png", f"{cfg.get('name', 'toto')} pre-training")
        (out / "README.md").write_text(model_card(facts_out, cfg))
        if console:
            console.print(f"held-out next-token loss {trained:.4f} (random init {random_init:.4f}); "
                          f"wrote {out}")
    dist.barrier()
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return json.loads((out / "training.json").read_text())


def model_card(f: dict, cfg: dict) -> str:
    """README.md of the checkpoint folder, from the facts of training.json."""
    tk = f["tokenizer"]
    h = tk["heldout"]
    mc = model_cfg(cfg)
    src_lines = "\n".join(f"| {s['kind']} | `{s['path']}` | {s['weight']} | {s['train_files']} | {s['heldout_files']} |"
                          for s in f["data"]["sources"])
    cfg_text = yaml.safe_dump(f["config"], sort_keys=False).strip()
    mins = f["total_wall_time_s"] / 60
    return f"""# {cfg.get('name', 'toto')}

A small LLaMA-style causal transformer over discrete visual tokens (the Toto recipe of
Rajasegaran et al. 2025, scaled down to a 2-core CPU), pre-trained by next-token prediction on the
`pretrain/` corpus of the totobench data world, with its own VQ-VAE tokenizer.

| | |
|---|---|
| layers / dim / heads / MLP | {mc.n_layers} / {mc.dim} / {mc.n_heads} / {mc.mlp_hidden} |
| RoPE base / output head init | {mc.rope_base:g} / {f['config']['train'].get('output_init', 'random')} (untied from the input embedding) |
| parameters | {f['parameters']:,} |
| vocabulary | {mc.codebook_size} codes + image start, video start, end = {mc.vocab_size} |
| frames | {mc.resolution} px, 8x downsampling: {mc.tokens_per_frame} tokens per frame, raster order |
| sequences | video clips of {mc.num_frames} frames taken every {mc.frame_stride} frames; {mc.images_per_sequence} images per image sequence; start token per kind + end token |
| steps / tokens seen | {f['steps']} of {f['steps_planned']} planned / {f['tokens_seen']:,} |
| wall time | {mins:.1f} min in total (tokenizer {tk['wall_time_s'] / 60:.1f}, tokenizing the corpus {(f['tokenize_wall_time_s'] or 0) / 60:.1f}, transformer {f['train_wall_time_s'] / 60:.1f}); {f['processes']} process(es) x {f['threads_per_process']} thread(s), CPU fp32 |
| final train loss | {f['final_train_loss']:.4f} nats/token (mean of the last 5 logged: {f['final_train_loss_mean_last5_logged']:.4f}) |
| **held-out next-token loss** | **{f['heldout_loss']:.4f}** nats/token; random init (torch seed 0, same tokenizer): {f['heldout_loss_random_init']:.4f}; uniform over the vocabulary: {math.log(mc.vocab_size):.4f} |
| tokenizer held-out PSNR | {h['psnr_db']:.2f} dB on {h['num_frames']} frames of held-out files |
| tokenizer codebook usage | {h['codebook_usage']:.1%} ({h['codes_used']} of {mc.codebook_size} codes) on the same frames |
| weights sha256 | `{f['sha256']}` |

Held-out loss is the mean next-token cross-entropy over {f['heldout_sequences']} fixed sequences drawn
from files no training step saw (a stable hash of each file path puts ~{cfg['data']['heldout_fraction']:.0%}
of each folder out).

## Command

```
{f['command']}
```

## Data

Root: the data world (`totobench.data.world.ensure_data_world("{cfg['data']['world_size']}", seed={cfg['data']['world_seed']})`).

| kind | folder | weight | train files | held-out files |
|---|---|---|---|---|
{src_lines}

## Tokenizer

A VQ-VAE (`totobench/model/tokenizer.py`): a {tk['config']['stem']}x{tk['config']['stem']} stem then stride-2
stages down to 8x, unit-length latents, a codebook of {mc.codebook_size} x {tk['config']['code_dim']} updated by
exponential moving averages, dead codes restarted on encoder outputs ({tk['code_restarts']} restarts in
training); {tk['steps']} of {tk.get('steps_planned', tk['steps'])} planned steps of batch {tk['batch_size']}
(crops: {tk.get('crop') or 'none'}) on {tk['train_frames']} training frames.
Files: `tokenizer/config.json`, `tokenizer/model.safetensors`.

## Loss curve

![loss curve](loss_curve.png)

`loss_curve.csv` holds every logged step (tokens seen, loss, learning rate, gradient norm, tokens/s).

## Config

```yaml
{cfg_text}
```
"""


def cli_pretrain(args) -> int:
    """`totobench pretrain --config FILE [--out DIR] [--resume] [--device cpu]`."""
    from rich.console import Console
    if args.device != "cpu":
        raise ConfigError(f"--device {args.device}: pre-training runs on the CPU only in this version")
    cfg = load_pretrain_config(args.config)
    out = Path(args.out or cfg.get("out") or "")
    if not str(out) or str(out) == ".":
        raise ConfigError(f"{args.config}: no output folder; give --out or set `out:` in the config")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    command = ("" if world == 1 else f"torchrun --standalone --nproc_per_node={world} -m ") + \
        "totobench pretrain " + " ".join(shlex.quote(a) for a in _own_args(args))
    pretrain(cfg, out, resume=args.resume, console=Console(stderr=True), command=command)
    return 0


def _own_args(args) -> list[str]:
    a = ["--config", args.config]
    if args.out:
        a += ["--out", args.out]
    if args.resume:
        a.append("--resume")
    return a
