"""Stage 3: Toto by next-token prediction on sequences of the token corpus.

AdamW (0.9, 0.95), linear warmup then cosine decay, gradient clipping, micro-batches. The batch of
a step is a pure function of (seed, step): under torchrun each rank takes its share of the same
global batch, and a resumed run (last.pt: weights, optimizer, TrainState) repeats the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from totobench import parallel
from totobench.errors import ConfigError
from totobench.io import atomic_path, atomic_write_json
from totobench.model.checkpoint import save_checkpoint
from totobench.model.toto import Toto, TotoConfig
from totobench.pretrain.card import append_loss_row, restart_loss_curve
from totobench.pretrain.config import CALIBRATION_STEPS, RunPaths, budget_seconds
from totobench.pretrain.corpus import TokenCorpus, batch_for_step, collate
from totobench.progress import progress_bar

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
    """Mean next-token loss (nats per token) over n fixed held-out sequences (training sequences
    when no file is held out)."""
    model.eval()
    split = "heldout" if corpus.has("heldout") else "train"
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        seqs = collate([corpus.sample([seed, 3, g], split) for g in range(b, min(n, b + batch_size))],
                       corpus.mc.end_id)
        loss = next_token_loss(model, seqs, corpus.mc.end_id, reduction="sum")
        total += float(loss)
        count += int((next_token_targets(seqs, corpus.mc.end_id)[1] != -100).sum())
    model.train()
    return total / count


def heldout_losses(model: Toto, corpus: TokenCorpus, cfg: dict, checkpoint_dir) -> tuple[float, float]:
    """(held-out loss of `model`, of random-init:<checkpoint_dir>) on the sequences `eval.*` sets."""
    from totobench.model import load_backbone
    ev, seed = cfg["eval"], int(cfg["seed"])
    n, batch_size = int(ev["heldout_sequences"]), int(ev["batch_size"])
    trained = heldout_loss(model, corpus, seed, n, batch_size)
    random_model = load_backbone(f"random-init:{checkpoint_dir}").model  # exactly the registry's baseline
    return trained, heldout_loss(random_model, corpus, seed, n, batch_size)


@dataclass
class TrainState:
    """How far the transformer run is; last.pt holds it beside the weights and the optimizer."""
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    steps_planned: int | None = None  # fixed once, from the measured step time, when train.max_minutes is set


def load_state(paths: RunPaths, model: Toto, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore weights and optimizer from last.pt; returns where the run stopped."""
    saved = torch.load(paths.last_checkpoint, map_location="cpu", weights_only=False)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return TrainState(saved["step"], saved["tokens"], saved["elapsed_s"], saved.get("steps_planned"))


def save_state(paths: RunPaths, model: Toto, optimizer: torch.optim.Optimizer, state: TrainState,
               facts: dict) -> None:
    """Rank 0 writes last.pt, refreshes the checkpoint folder (a partial model is always usable)
    and records progress in the run's facts; every rank waits for it."""
    if parallel.info().is_main:
        with atomic_path(paths.last_checkpoint) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **asdict(state)}, tmp)
        save_checkpoint(paths.out, model)
        facts.update({"steps_done": state.step, "tokens_seen": state.tokens,
                      "train_wall_time_s": round(state.elapsed_s, 1)})
        atomic_write_json(paths.facts, facts)
    parallel.barrier()


def train_transformer(cfg: dict, corpus: TokenCorpus, paths: RunPaths, facts: dict, resume: bool,
                      console) -> tuple[Toto, TrainState, int]:
    """Stage 3 from scratch, or from last.pt when `resume`. Returns (model, final state, planned steps)."""
    dist, t = parallel.info(), cfg["train"]
    if int(t["batch_size"]) % dist.world_size:
        raise ConfigError(f"{cfg['_path']}: train.batch_size={t['batch_size']} must be a multiple of the "
                          f"{dist.world_size} processes")
    model = initial_model(corpus.mc, int(cfg["seed"]), t["output_init"])
    optimizer = make_optimizer(model, t)
    state = TrainState()
    if resume and paths.last_checkpoint.is_file():
        state = load_state(paths, model, optimizer)
        if console:
            console.print(f"resuming at step {state.step} ({state.tokens:,} tokens seen)")
    if dist.is_main:
        restart_loss_curve(paths.loss_curve, state.step)
    model.train()
    steps = _train_loop(model, optimizer, corpus, cfg, paths, state, facts, console)
    return model, state, steps


def _train_loop(model: Toto, optimizer: torch.optim.Optimizer, corpus: TokenCorpus, cfg: dict,
                paths: RunPaths, state: TrainState, facts: dict, console) -> int:
    """Steps from state.step (updating `state`) to the planned end or the time budget, logging to
    loss_curve.csv and saving every train.checkpoint_every steps. Returns the planned steps."""
    dist, t, seed, end_id = parallel.info(), cfg["train"], int(cfg["seed"]), corpus.mc.end_id
    train_model = DistributedDataParallel(model) if dist.active else model
    batch_size, micro = int(t["batch_size"]), max(1, int(t["micro_batch_size"]))
    steps, budget_s = state.steps_planned or int(t["steps"]), budget_seconds(t)
    # TOTOBENCH_PRETRAIN_KILL_AT_STEP=N: SIGKILL this process right after step N (tests only)
    kill_at = int(os.environ.get("TOTOBENCH_PRETRAIN_KILL_AT_STEP", "-1"))
    window_tokens, window_t0 = 0, time.time()  # tokens/s over the steps since the last logged row
    with progress_bar(console, fields="loss {task.fields[loss]:.4f} {task.fields[speed]}",
                      disable=console is None) as progress:
        task = progress.add_task("toto", total=steps, completed=state.step, loss=float("nan"), speed="")
        while state.step < steps:
            t_step = time.time()
            lr = lr_at(state.step, {**t, "steps": steps})
            seqs = collate(batch_for_step(corpus, seed, state.step, batch_size, dist.rank, dist.world_size),
                           end_id)
            loss, grad_norm = train_step(train_model, optimizer, seqs, end_id, lr, micro, t["grad_clip"])
            state.step += 1
            step_tokens = seqs.shape[0] * (seqs.shape[1] - 1) * dist.world_size
            state.tokens += step_tokens
            window_tokens += step_tokens
            rate = window_tokens / max(1e-9, time.time() - window_t0)
            progress.update(task, completed=state.step, loss=loss, speed=f"{rate:,.0f} tok/s")
            if dist.is_main and (state.step % int(t["log_every"]) == 0 or state.step == steps):
                append_loss_row(paths.loss_curve, step=state.step, tokens=state.tokens, loss=loss, lr=lr,
                                grad_norm=grad_norm, elapsed_s=state.elapsed_s, tokens_per_s=rate)
                window_tokens, window_t0 = 0, time.time()
            if budget_s and state.steps_planned is None and state.step >= min(CALIBRATION_STEPS, int(t["steps"])):
                steps = _plan_steps(state, steps, budget_s)
                progress.update(task, total=steps)
                if console:
                    console.print(f"{state.elapsed_s / state.step:.2f} s/step: planning {steps} steps for "
                                  f"train.max_minutes={t['max_minutes']}")
            # every rank must agree to stop at the same step
            stop = any(parallel.gather_objects(budget_s is not None and state.elapsed_s > budget_s))
            state.elapsed_s += time.time() - t_step
            if state.step % int(t["checkpoint_every"]) == 0 or state.step == steps or stop:
                save_state(paths, model, optimizer, state, facts)
            if kill_at == state.step and dist.is_main:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-and-resume test
            if stop:
                if console:
                    console.print(f"[yellow]train.max_minutes reached: stopping at step {state.step}/{steps}[/yellow]")
                break
    return steps


def train_step(model, optimizer: torch.optim.Optimizer, seqs: torch.Tensor, pad_id: int, lr: float,
               micro_batch_size: int, grad_clip: float) -> tuple[float, float]:
    """One optimizer step on seqs [B, L] at learning rate `lr`, gradients accumulated over
    micro-batches (a DDP model syncs them on the last). Returns (loss averaged over the ranks,
    gradient norm before clipping)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros(())
    starts = list(range(0, len(seqs), micro_batch_size))
    for j, a in enumerate(starts):
        part = seqs[a:a + micro_batch_size]
        defer_sync = isinstance(model, DistributedDataParallel) and j < len(starts) - 1
        with model.no_sync() if defer_sync else contextlib.nullcontext():
            loss = next_token_loss(model, part, pad_id) * len(part) / len(seqs)
            loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    dist = parallel.info()
    if dist.active:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= dist.world_size
    return float(loss_sum), float(grad_norm)


def _plan_steps(state: TrainState, steps: int, budget_s: float) -> int:
    """Fit the run to the time budget from the mean step time so far, so that the cosine schedule
    ends where training ends; every rank takes rank 0's estimate. Sets state.steps_planned."""
    estimate = max(state.step, min(steps, int(budget_s / (state.elapsed_s / state.step))))
    state.steps_planned = parallel.broadcast_object(estimate)
    return state.steps_planned
