"""Stages 1 and 2: train the VQ-VAE tokenizer on frames of the training files, then tokenize every
frame of the corpus once into the token cache (tokens.npz). And `totobench tokenize`: files into
token shards (shards.py) that pre-training streams from instead."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch

from totobench import parallel
from totobench.data.preprocess import resize_and_crop
from totobench.data.video import read_frames, video_info
from totobench.errors import ConfigError, DataError
from totobench.io import atomic_path, atomic_write_json
from totobench.model.backbone import load_tokenizer
from totobench.model.tokenizer import VisualTokenizer, evaluate_tokenizer
from totobench.model.tokens import tokenizer_sha256
from totobench.model.toto import TotoConfig
from totobench.pretrain.config import CALIBRATION_STEPS, RunPaths, budget_seconds, tokenizer_cfg
from totobench.pretrain.corpus import (IMAGE_SUFFIXES, VIDEO_SUFFIXES, heldout_bucket, load_frames, load_image,
                                       pooled, source_files)
from totobench.pretrain.shards import ShardWriter, token_dtype, write_index
from totobench.progress import progress_bar

def prepare_tokens(cfg: dict, mc: TotoConfig, sources: list[dict], root: Path, paths: RunPaths,
                   facts: dict, console, device: torch.device | str = "cpu") -> None:
    """Stages 1 and 2 (rank 0, on `device`): each runs unless `facts` (of a resumed run) says it is done.
    Adds their facts and wall times to `facts` and saves them to paths.facts after each stage."""
    has_tokenizer = "tokenizer" in facts and (paths.tokenizer / "model.safetensors").is_file()
    if has_tokenizer and "tokens_file" in facts:
        return
    t0 = time.time()
    if console:
        console.print(f"{sum(len(s['train']) for s in sources)} training files, "
                      f"{sum(len(s['heldout']) for s in sources)} held-out under {root}")
    frames = load_frames(sources, root, mc.resolution, console)
    facts["decode_wall_time_s"] = round(time.time() - t0, 1)
    if not has_tokenizer:
        facts["tokenizer"] = train_tokenizer(cfg, mc, frames, paths.out, console, device)
        facts.pop("tokens_file", None)
        atomic_write_json(paths.facts, facts)
        if console:
            h = facts["tokenizer"]["heldout"]
            console.print(f"tokenizer held-out PSNR {h['psnr_db']:.2f} dB, codebook usage "
                          f"{h['codebook_usage']:.1%} ({h['codes_used']}/{mc.codebook_size})")
    if "tokens_file" not in facts:
        tok = VisualTokenizer.load(paths.tokenizer, device=str(device))
        t0 = time.time()
        tokenize_corpus(tok, frames, paths.tokens, console)
        facts["tokens_file"] = paths.tokens.name
        facts["tokenize_wall_time_s"] = round(time.time() - t0, 1)
        atomic_write_json(paths.facts, facts)


def train_tokenizer(cfg: dict, mc: TotoConfig, frames: dict, out: Path, console,
                    device: torch.device | str = "cpu") -> dict:
    """Train on `device` on frames of the training files, evaluate on the CPU on frames of the
    held-out files, save to out/tokenizer/. Returns its facts."""
    tc = cfg["tokenizer"]
    seed = int(cfg["seed"])
    t0 = time.time()
    train_x = pooled(frames, "train")
    held_x = pooled(frames, "heldout", int(tc["heldout_frames"]), seed)
    torch.manual_seed(seed)
    tok = VisualTokenizer(tokenizer_cfg(cfg, mc)).to(device)  # drawn on the CPU: same init anywhere
    steps_done, steps_planned, restarts = _fit_tokenizer(tok, train_x, tc, seed, t0, console)
    tok.cpu().eval()
    facts = {
        "heldout": evaluate_tokenizer(tok, held_x.float() / 255),
        "train_subset": evaluate_tokenizer(tok, train_x[:len(held_x)].float() / 255),
        "steps": steps_done, "steps_planned": steps_planned, "batch_size": int(tc["batch_size"]),
        "crop": tc.get("crop"), "train_frames": int(len(train_x)),
        "code_restarts": int(restarts), "wall_time_s": round(time.time() - t0, 1),
        "config": tok.config.to_dict(),
    }
    tok.save(out / "tokenizer")
    return facts


def _fit_tokenizer(tok: VisualTokenizer, train_x: torch.Tensor, tc: dict, seed: int, t0: float,
                   console) -> tuple[int, int, int]:
    """Adam with a cosine decay to 0 on seeded batches of `train_x` (uint8), within the time budget
    `tokenizer.max_minutes` counted from `t0`. Returns (steps done, steps planned, code restarts)."""
    opt = torch.optim.Adam(tok.parameters(), lr=tc["lr"])
    gen = torch.Generator().manual_seed(seed)
    steps, bs = int(tc["steps"]), int(tc["batch_size"])
    budget_s = budget_seconds(tc)
    restarts, step = 0, 0
    with progress_bar(console, fields="loss {task.fields[loss]:.4f} {task.fields[speed]}",
                      disable=console is None) as progress:
        task = progress.add_task("tokenizer", total=steps, loss=float("nan"), speed="")
        t_loop = time.time()
        while step < steps:
            if budget_s is not None and time.time() - t0 > budget_s:
                break  # the machine is slower than planned: keep the codebook we have
            if budget_s is not None and step == CALIBRATION_STEPS:  # re-plan once so the cosine ends in budget
                per_step = (time.time() - t_loop) / CALIBRATION_STEPS
                remaining = int((budget_s - (time.time() - t0)) / per_step)
                steps = max(CALIBRATION_STEPS + 1, min(steps, remaining + CALIBRATION_STEPS))
                progress.update(task, total=steps)
            for g in opt.param_groups:
                g["lr"] = tc["lr"] * 0.5 * (1 + math.cos(math.pi * step / steps))
            x = tokenizer_batch(train_x, np.random.default_rng([seed, 1, step]), bs, tc.get("crop"))
            x = x.to(tok.quantizer.codebook.device, non_blocking=True)
            out = tok.training_step(x, gen)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            restarts += out["restarts"]
            psnr = 10 * math.log10(1 / max(float(out["recon_mse"]), 1e-10))
            progress.update(task, advance=1, loss=float(out["loss"].detach()), speed=f"{psnr:.1f} dB")
            step += 1
    return step, steps, restarts


def tokenizer_batch(frames: torch.Tensor, rng: np.random.Generator, batch_size: int,
                    crop: int | None) -> torch.Tensor:
    """float [B,3,c,c] in [0,1]: frames drawn with `rng`, one random `crop` x `crop` window for the
    batch (none when crop is None), half of them flipped left-right."""
    x = frames[torch.from_numpy(rng.integers(0, len(frames), batch_size))]
    if crop:  # the tokenizer is convolutional: random crops train it at a fraction of the cost
        c = int(crop)
        top, left = (int(v) for v in rng.integers(0, x.shape[-1] - c + 1, 2))
        x = x[..., top:top + c, left:left + c]
    x = x.float() / 255
    flip = torch.from_numpy(rng.random(batch_size) < 0.5)
    x[flip] = x[flip].flip(-1)
    return x


@torch.no_grad()
def tokenize_corpus(tok: VisualTokenizer, frames: dict, path: Path, console) -> None:
    """Encode every frame once; write path (npz): per source and split, int16 ids [frames, h*w]
    of all its files concatenated ("<i>_<split>_ids") and their frame offsets ("<i>_<split>_offsets").
    Encodes on the device of `tok`."""
    arrays, device = {}, tok.quantizer.codebook.device
    total = sum(len(f) for f, _ in frames.values())
    with progress_bar(console, fields="", disable=console is None) as progress:
        task = progress.add_task("tokenize corpus", total=total)
        for (i, split), (x, offsets) in sorted(frames.items()):
            ids = []
            for j in range(0, len(x), 256):
                ids.append(tok.encode(x[j:j + 256].to(device).float() / 255).flatten(1).to(torch.int16).cpu())
                progress.update(task, advance=len(ids[-1]))
            n = tok.encode(torch.zeros(1, 3, x.shape[2], x.shape[3], device=device)).numel()
            arrays[f"{i}_{split}_ids"] = torch.cat(ids).numpy() if ids else np.zeros((0, n), np.int16)
            arrays[f"{i}_{split}_offsets"] = offsets
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: np.savez would add ".npz" to a temporary name


# Stored frames of a video decoded and encoded at a time: bounds the memory of long videos.
VIDEO_CHUNK = 32


def tokenize_to_shards(spec: str, sources: list[str], out: Path, *, resolution: int, frames: int, stride: int,
                       shard_tokens: int = 1 << 26, batch_files: int = 32, device: str = "cpu",
                       console=None) -> dict:
    """`totobench tokenize`: every image and video of `sources` (folders or file lists, see
    corpus.source_files) encoded by the tokenizer `spec` into token shards in `out` (shards.py).

    Images: short side to `resolution`, centre crop; videos: every `stride`-th frame the same way,
    videos with fewer than `frames` such frames skipped. Files go in batches of `batch_files`
    (batch b to rank b % world size under torchrun); a rerun continues after the last batch
    recorded, and gives the same bytes as an uninterrupted run. Unreadable files are skipped and
    listed. Returns the index (index.json). Raises ConfigError when `out` holds shards made with
    other settings, files or number of processes, or the resolution does not suit the tokenizer."""
    dist, dev = parallel.init_from_env(parallel.parse_device(device))
    t0 = time.time()
    tok = load_tokenizer(spec, device=str(dev))
    if resolution % tok.downsample:
        raise ConfigError(f"--resolution {resolution}: must be a multiple of the tokenizer's downsampling "
                          f"{tok.downsample}")
    files = [(i, key, path) for i, src in enumerate(sources) for key, path in source_files(src)]
    grid = resolution // tok.downsample
    family, _, rest = spec.partition(":")  # pre-training may run elsewhere: the index names the file absolutely
    header = {"tokenizer": {"spec": f"{family}:{Path(rest).expanduser().resolve()}", "sha256": tokenizer_sha256(tok),
                            "codebook_size": tok.codebook_size, "downsample": tok.downsample},
              "codebook_size": tok.codebook_size, "dtype": token_dtype(tok.codebook_size).str,
              "resolution": resolution, "tokens_per_frame": grid * grid, "grid": [grid, grid], "frames": frames,
              "stride": stride, "shard_tokens": shard_tokens, "batch_files": batch_files,
              "world_size": dist.world_size,
              "sources": [{"path": str(s), "files": sum(f[0] == i for f in files)} for i, s in enumerate(sources)]}
    states = [out / "progress.json"] if not dist.active else \
        [out / f"progress_r{r}.json" for r in range(dist.world_size)]
    writer = _open_writer(out, header, files, states)
    batches = [b for b in range(math.ceil(len(files) / batch_files)) if b % dist.world_size == dist.rank]
    _encode_batches(tok, files, batches, writer, header, dev, console if dist.is_main else None)
    writer.finish()
    parallel.barrier()
    if dist.is_main:
        write_index(out, header, states)
    parallel.barrier()
    index = json.loads((out / "index.json").read_text())
    if console and dist.is_main:
        _report(console, index, out, time.time() - t0)
    if dist.active:
        parallel.shutdown()
    return index


def _open_writer(out: Path, header: dict, files: list, states: list[Path]) -> ShardWriter:
    """This rank's writer, continuing its state when the folder holds one of the same settings."""
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out.glob("progress*.json") if p not in states)
    if foreign:
        raise ConfigError(f"--out {out}: holds token shards made by another number of processes ({foreign[0]}); "
                          "choose another --out")
    settings = hashlib.sha256(json.dumps([header, [(i, k) for i, k, _ in files]]).encode()).hexdigest()
    rank = parallel.info().rank
    prefix = "shard" if len(states) == 1 else f"shard_r{rank}"
    writer = ShardWriter(out, prefix, np.dtype(header["dtype"]), header["shard_tokens"], states[rank])
    if writer.state.setdefault("settings", settings) != settings:
        raise ConfigError(f"--out {out}: holds token shards made with other settings or files; "
                          "choose another --out")
    return writer


def _report(console, index: dict, out: Path, seconds: float) -> None:
    """The closing lines: totals, and one line for the skipped files."""
    t = index["totals"]
    console.print(f"{t['sequences']:,} files ({t['images']:,} images, {t['videos']:,} videos) -> "
                  f"{t['tokens']:,} tokens in {len(index['shards'])} shard(s), {seconds:.1f} s: {out}", soft_wrap=True)
    if index["skipped"]:
        shown = "; ".join(f"{s['path']} ({s['error']})" for s in index["skipped"][:3])
        console.print(f"[yellow]skipped {len(index['skipped'])} file(s), listed in {out / 'index.json'}: "
                      f"{shown}{' ...' if len(index['skipped']) > 3 else ''}[/yellow]", soft_wrap=True)


def _encode_batches(tok, files: list, batches: list[int], writer: ShardWriter, header: dict, device,
                    console) -> None:
    """Encode this rank's batches from the writer's next batch on, a checkpoint after each."""
    # TOTOBENCH_TOKENIZE_KILL_AFTER_FILES=N: SIGKILL this process after its N-th file (tests only)
    kill_after = int(os.environ.get("TOTOBENCH_TOKENIZE_KILL_AFTER_FILES", "-1"))
    n = header["batch_files"]
    sizes = {b: len(files[b * n:(b + 1) * n]) for b in batches}
    todo = [b for b in batches if b >= writer.state["next_batch"]]
    appended = 0
    with progress_bar(console, fields="", disable=console is None) as progress:
        task = progress.add_task("tokenize", total=sum(sizes.values()),
                                 completed=sum(sizes.values()) - sum(sizes[b] for b in todo))
        for b in todo:
            batch = files[b * n:(b + 1) * n]
            results, skipped = _encode_files(tok, batch, header, device)
            for (i, key, _), (kind, ids) in zip(batch, results):
                if ids is not None:
                    writer.append(ids, kind, i, heldout_bucket(key))
                appended += 1
                if appended == kill_after:
                    writer.flush()  # the bytes past the last checkpoint reach the file
                    os.kill(os.getpid(), signal.SIGKILL)
            writer.checkpoint(b + 1, skipped)
            progress.update(task, advance=len(batch))


@torch.no_grad()
def _encode_files(tok, batch: list, header: dict, device) -> tuple[list, list[dict]]:
    """([(kind, uint codes [frames * tokens per frame] or None when skipped)] in file order,
    [{"path", "error"}] of the skipped files). The images of a batch are encoded together."""
    res, results, skipped, images = header["resolution"], [], [], []
    for _, key, path in batch:
        suffix = path.suffix.lower()
        try:
            if suffix in IMAGE_SUFFIXES:
                images.append(load_image(path, res))
                results.append(["image", len(images) - 1])
            elif suffix in VIDEO_SUFFIXES:
                results.append(["video", _video_codes(tok, path, header, device)])
            else:
                raise DataError(f"{path}: not an image or video ({', '.join(IMAGE_SUFFIXES + VIDEO_SUFFIXES)})")
        except DataError as err:
            results.append([None, None])
            skipped.append({"path": key, "error": str(err).removeprefix(f"{path}: ")})
    if images:
        codes = _encode(tok, torch.cat(images), device)
        for r in results:
            if r[0] == "image":
                r[1] = codes[r[1]]
    return [tuple(r) for r in results], skipped


def _video_codes(tok, path: Path, header: dict, device) -> np.ndarray:
    """Codes [stored frames * tokens per frame] of every `stride`-th frame of a video.
    Raises DataError when it is unreadable or has fewer than `frames` such frames."""
    keep = list(range(0, video_info(path).num_frames, header["stride"]))
    if len(keep) < header["frames"]:
        raise DataError(f"{path}: {len(keep)} frames at stride {header['stride']}, fewer than a clip's "
                        f"{header['frames']}")
    parts = [_encode(tok, resize_and_crop(read_frames(path, keep[j:j + VIDEO_CHUNK]), header["resolution"]), device)
             for j in range(0, len(keep), VIDEO_CHUNK)]
    return np.concatenate(parts).reshape(-1)


def _encode(tok, frames: torch.Tensor, device) -> np.ndarray:
    """uint8 frames [N,3,R,R] -> int64 codes [N, tokens per frame] (as tokenize_corpus encodes)."""
    return tok.encode(frames.to(device).float() / 255).flatten(1).cpu().numpy()
