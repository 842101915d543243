"""Stages 1 and 2: train the VQ-VAE tokenizer on frames of the training files, then tokenize every
frame of the corpus once into the token cache (tokens.npz)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from totobench.io import atomic_path, atomic_write_json
from totobench.model.tokenizer import VisualTokenizer, evaluate_tokenizer
from totobench.model.toto import TotoConfig
from totobench.pretrain.config import CALIBRATION_STEPS, RunPaths, budget_seconds, tokenizer_cfg
from totobench.pretrain.corpus import load_frames, pooled
from totobench.progress import progress_bar

def prepare_tokens(cfg: dict, mc: TotoConfig, sources: list[dict], root: Path, paths: RunPaths,
                   facts: dict, console) -> None:
    """Stages 1 and 2 (rank 0): each runs unless `facts` (of a resumed run) says it is done.
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
        facts["tokenizer"] = train_tokenizer(cfg, mc, frames, paths.out, console)
        facts.pop("tokens_file", None)
        atomic_write_json(paths.facts, facts)
        if console:
            h = facts["tokenizer"]["heldout"]
            console.print(f"tokenizer held-out PSNR {h['psnr_db']:.2f} dB, codebook usage "
                          f"{h['codebook_usage']:.1%} ({h['codes_used']}/{mc.codebook_size})")
    if "tokens_file" not in facts:
        tok = VisualTokenizer.load(paths.tokenizer)
        t0 = time.time()
        tokenize_corpus(tok, frames, paths.tokens, console)
        facts["tokens_file"] = paths.tokens.name
        facts["tokenize_wall_time_s"] = round(time.time() - t0, 1)
        atomic_write_json(paths.facts, facts)


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
    steps_done, steps_planned, restarts = _fit_tokenizer(tok, train_x, tc, seed, t0, console)
    tok.eval()
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
    of all its files concatenated ("<i>_<split>_ids") and their frame offsets ("<i>_<split>_offsets")."""
    arrays = {}
    total = sum(len(f) for f, _ in frames.values())
    with progress_bar(console, fields="", disable=console is None) as progress:
        task = progress.add_task("tokenize corpus", total=total)
        for (i, split), (x, offsets) in sorted(frames.items()):
            ids = []
            for j in range(0, len(x), 256):
                ids.append(tok.encode(x[j:j + 256].float() / 255).flatten(1).to(torch.int16))
                progress.update(task, advance=len(ids[-1]))
            n = tok.encode(torch.zeros(1, 3, x.shape[2], x.shape[3])).numel()
            arrays[f"{i}_{split}_ids"] = torch.cat(ids).numpy() if ids else np.zeros((0, n), np.int16)
            arrays[f"{i}_{split}_offsets"] = offsets
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: np.savez would add ".npz" to a temporary name
