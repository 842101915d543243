"""`pretrain()`: the four stages in order, each resumable, on one process or under torchrun."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from totobench import parallel
from totobench.errors import ConfigError, DataError
from totobench.io import atomic_write_json
from totobench.model.backbone import resolve_precision
from totobench.model.checkpoint import save_checkpoint
from totobench.model.tokenizer import VisualTokenizer
from totobench.model.tokens import tokenizer_sha256
from totobench.model.toto import Toto
from totobench.pretrain.card import read_loss_curve, write_card
from totobench.pretrain.config import RunPaths, model_cfg
from totobench.pretrain.corpus import TokenCorpus, data_facts, data_root, list_sources
from totobench.pretrain.shards import ShardCorpus
from totobench.pretrain.tokenizer_stage import prepare_tokens
from totobench.pretrain.train import TrainState, heldout_losses, train_transformer


def pretrain(cfg: dict, out: Path, resume: bool = False, console=None, command: str = "") -> dict:
    """Run all stages on the config's `device` (cpu when unset); returns the training facts written
    to out/training.json. Under torchrun each rank joins the group (gloo on the CPU, NCCL on CUDA,
    each rank on cuda:LOCAL_RANK). An unset `train.precision` becomes bf16 on CUDA, fp32 on the CPU.

    Raises ConfigError when `out` holds a run already and `resume` is False, or the device is not
    available."""
    dist, device = parallel.init_from_env(parallel.parse_device(cfg.get("device") or "cpu"))
    cfg["train"]["precision"] = resolve_precision(cfg["train"]["precision"], device)
    torch.set_num_threads(int(cfg.get("threads") or max(1, (os.cpu_count() or 1) // dist.world_size)))
    console = console if dist.is_main else None
    if console:
        ranks = f" x {dist.world_size} processes" if dist.active else ""
        console.print(f"[dim]pre-training on {device}{ranks}, forward in {cfg['train']['precision']}[/]")
    mc = model_cfg(cfg)
    paths = RunPaths.of(cfg, out)
    if dist.is_main:
        _make_dirs(paths, resume)
    parallel.barrier()
    facts = json.loads(paths.facts.read_text()) if resume and paths.facts.is_file() else {}
    corpus, data = _corpus(cfg, mc, paths, facts, device, console)
    model, state, steps = train_transformer(cfg, corpus, paths, facts, resume, console, device)
    if dist.is_main:  # stage 4
        losses = heldout_losses(model.to(device), corpus, cfg, paths.out)
        sha = save_checkpoint(paths.out, model)  # fp32 CPU tensors: loadable without a GPU
        training = training_facts(cfg, command=command, data=data, stages=facts, model=model,
                                  state=state, steps=steps, losses=losses, sha=sha,
                                  rows=read_loss_curve(paths.loss_curve), device=device)
        write_card(paths.out, training, cfg)
        if console:
            console.print(f"held-out next-token loss {losses[0]:.4f} (random init {losses[1]:.4f}); "
                          f"wrote {paths.out}")
    parallel.barrier()
    if dist.active:
        parallel.shutdown()
    return json.loads((paths.out / "training.json").read_text())


def _corpus(cfg: dict, mc, paths: RunPaths, facts: dict, device: torch.device, console) -> tuple:
    """(corpus, its facts for training.json): stages 1-2 (on `device`) then the token cache, or
    with `data.shards` the shards as they are, their tokenizer recorded in `facts` as stage 1's is."""
    dist, d = parallel.info(), cfg["data"]
    if d["shards"] is not None:
        corpus = ShardCorpus(Path(d["shards"]).expanduser(), mc, float(d["heldout_fraction"]), d["shard_weights"])
        if dist.is_main and "tokenizer" not in facts:
            facts["tokenizer"] = shard_tokenizer(corpus.index, paths.tokenizer)
            atomic_write_json(paths.facts, facts)
        if console:
            t = corpus.index["totals"]
            console.print(f"token shards {corpus.folder}: {t['sequences']:,} files, {t['tokens']:,} tokens")
        return corpus, corpus.facts()
    root = data_root(cfg)
    sources = list_sources(cfg, root)
    if dist.is_main:  # stages 1 and 2 on rank 0; the other ranks wait for the token cache
        prepare_tokens(cfg, mc, sources, root, paths, facts, console, device)
    parallel.barrier()
    return TokenCorpus(paths.tokens, sources, mc), data_facts(root, sources)


def shard_tokenizer(index: dict, directory: Path) -> dict:
    """The tokenizer facts of a run on token shards: the index's tokenizer record; a vqvae
    tokenizer is copied to `directory` (the checkpoint's tokenizer/), as stage 1 saves its own."""
    tk = dict(index["tokenizer"], wall_time_s=0.0)
    family, _, rest = tk["spec"].partition(":")
    if family == "vqvae":
        tok = VisualTokenizer.load(Path(rest).expanduser())
        if tokenizer_sha256(tok) != tk["sha256"]:
            raise DataError(f"{rest}: the tokenizer changed since the shards were made (sha256 differs "
                            "from their index.json)")
        tok.save(directory)
    return tk


def _make_dirs(paths: RunPaths, resume: bool) -> None:
    paths.out.mkdir(parents=True, exist_ok=True)
    paths.state.mkdir(parents=True, exist_ok=True)
    if not resume and paths.last_checkpoint.exists():
        raise ConfigError(f"{paths.out}: holds a run already (train_state/last.pt); pass --resume to "
                          "continue it or choose another --out")


def training_facts(cfg: dict, *, command: str, data: dict, stages: dict, model: Toto, state: TrainState,
                   steps: int, losses: tuple[float, float], sha: str, rows: list[dict],
                   device: torch.device | None = None) -> dict:
    """The content of training.json. `stages`: the facts stages 1-3 recorded; `steps`: the planned
    steps; `losses`: held-out (trained, random init); `rows`: the loss curve; `device`: rank 0's."""
    last = rows[-5:]
    return {
        "command": command,
        "config_file": cfg["_path"],
        "config": {k: v for k, v in cfg.items() if not k.startswith("_")},
        "processes": parallel.info().world_size,
        "device": str(device or "cpu"),
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
