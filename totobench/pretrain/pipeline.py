"""`pretrain()`: the four stages in order, each resumable, on one process or under torchrun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from totobench import parallel
from totobench.errors import ConfigError
from totobench.model.checkpoint import save_checkpoint
from totobench.model.toto import Toto
from totobench.pretrain.card import read_loss_curve, write_card
from totobench.pretrain.config import RunPaths, model_cfg
from totobench.pretrain.corpus import TokenCorpus, data_facts, data_root, list_sources
from totobench.pretrain.tokenizer_stage import prepare_tokens
from totobench.pretrain.train import TrainState, heldout_losses, train_transformer


def pretrain(cfg: dict, out: Path, resume: bool = False, console=None, command: str = "") -> dict:
    """Run all stages; returns the training facts written to out/training.json.

    Raises ConfigError when `out` holds a run already and `resume` is False."""
    dist, _ = parallel.init_from_env(torch.device("cpu"))  # gloo under torchrun
    torch.set_num_threads(int(cfg.get("threads") or max(1, (os.cpu_count() or 1) // dist.world_size)))
    console = console if dist.is_main else None
    mc = model_cfg(cfg)
    paths = RunPaths.of(cfg, out)
    if dist.is_main:
        _make_dirs(paths, resume)
    parallel.barrier()
    root = data_root(cfg)
    sources = list_sources(cfg, root)
    facts = json.loads(paths.facts.read_text()) if resume and paths.facts.is_file() else {}
    if dist.is_main:  # stages 1 and 2 on rank 0; the other ranks wait for the token cache
        prepare_tokens(cfg, mc, sources, root, paths, facts, console)
    parallel.barrier()
    corpus = TokenCorpus(paths.tokens, sources, mc)
    model, state, steps = train_transformer(cfg, corpus, paths, facts, resume, console)
    if dist.is_main:  # stage 4
        losses = heldout_losses(model, corpus, cfg, paths.out)
        sha = save_checkpoint(paths.out, model)
        training = training_facts(cfg, command=command, data=data_facts(root, sources), stages=facts, model=model,
                                  state=state, steps=steps, losses=losses, sha=sha,
                                  rows=read_loss_curve(paths.loss_curve))
        write_card(paths.out, training, cfg)
        if console:
            console.print(f"held-out next-token loss {losses[0]:.4f} (random init {losses[1]:.4f}); "
                          f"wrote {paths.out}")
    parallel.barrier()
    if dist.active:
        parallel.shutdown()
    return json.loads((paths.out / "training.json").read_text())


def _make_dirs(paths: RunPaths, resume: bool) -> None:
    paths.out.mkdir(parents=True, exist_ok=True)
    paths.state.mkdir(parents=True, exist_ok=True)
    if not resume and paths.last_checkpoint.exists():
        raise ConfigError(f"{paths.out}: holds a run already (train_state/last.pt); pass --resume to "
                          "continue it or choose another --out")


def training_facts(cfg: dict, *, command: str, data: dict, stages: dict, model: Toto, state: TrainState,
                   steps: int, losses: tuple[float, float], sha: str, rows: list[dict]) -> dict:
    """The content of training.json. `stages`: the facts stages 1-3 recorded; `steps`: the planned
    steps; `losses`: held-out (trained, random init); `rows`: the loss curve."""
    last = rows[-5:]
    return {
        "command": command,
        "config_file": cfg["_path"],
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
        "processes": parallel.info().world_size,
        "threads_per_process": torch.get_num_threads(),
        "data": data,
        "tokenizer": stages["tokenizer"],
        "decode_wall_time_s": stages.get("decode_wall_time_s"),
        "tokenize_wall_time_s": stages.get("tokenize_wall_time_s"),
        "steps": state.step, "steps_planned": steps, "steps_in_config": int(cfg["train"]["steps"]),
        "tokens_seen": state.tokens,
        "train_wall_time_s": round(state.elapsed_s, 1),
        "total_wall_time_s": round(state.elapsed_s + stages["tokenizer"]["wall_time_s"]
                                   + (stages.get("decode_wall_time_s") or 0)
                                   + (stages.get("tokenize_wall_time_s") or 0), 1),
        "final_train_loss": float(rows[-1]["loss"]) if rows else None,
        "final_train_loss_mean_last5_logged": (sum(float(r["loss"]) for r in last) / len(last)) if last else None,
        "heldout_loss": losses[0],
        "heldout_loss_random_init": losses[1],
        "heldout_sequences": int(cfg["eval"]["heldout_sequences"]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "sha256": sha,
    }
