"""Stage 3: Toto by next-token prediction on sequences of the token corpus.

AdamW (0.9, 0.95), linear warmup then cosine decay, gradient clipping. The batch of a step is a pure
function of (seed, step): under torchrun each rank takes its share of the same global batch
(`train.batch_size` sequences, or `train.tokens_per_step` tokens) and accumulates it over
micro-batches, the loss normalised so that the gradient is the whole batch's. Optional: autocast
(`train.precision`), activation checkpointing, DDP or FSDP (`train.sharding`, distributed_train.py),
starting from a trained checkpoint (`train.init_from`). A resumed run (last.pt: weights, optimizer,
grad scaler, TrainState) repeats the uninterrupted one.

Model, optimizer state, batches and loss live on the run's device (the CPU, or cuda:LOCAL_RANK per
rank); last.pt and the checkpoint folder hold CPU tensors, so either loads without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from totobench import parallel
from totobench.errors import ConfigError
from totobench.io import atomic_path, atomic_write_json
from totobench.model import checkpoint
from totobench.model.toto import Toto, TotoConfig
from totobench.pretrain.card import append_loss_row, restart_loss_curve
from totobench.pretrain.config import CALIBRATION_STEPS, RunPaths, budget_seconds, global_batch_size
from totobench.pretrain.corpus import TokenCorpus, batch_for_step, collate
from totobench.pretrain.distributed_train import (as_local, full_state, gathered_model, gradient_sync,
                                                  load_full_state, wrap_for_training)
from totobench.progress import progress_bar

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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


def load_init_weights(model: Toto, directory, where: str) -> None:
    """Copy the weights of the checkpoint folder `directory` into `model` (`train.init_from`). The
    config may differ from the checkpoint's where no weight depends on it (rope_base, resolution,
    frames, max_seq_len). Raises ConfigError naming the first parameter whose shape differs or
    that is missing, CheckpointError for an unreadable checkpoint."""
    saved_cfg = checkpoint.read_config(directory)
    with torch.device("meta"):  # the checkpoint's shapes, without allocating its weights
        like = Toto(saved_cfg).state_dict()
    weights, _ = checkpoint.read_weights(directory, like)
    for name, param in model.state_dict().items():
        if name not in weights:
            raise ConfigError(f"{where}: train.init_from {directory} has no parameter {name}")
        if weights[name].shape != param.shape:
            raise ConfigError(f"{where}: train.init_from {directory}: parameter {name} has shape "
                              f"{list(weights[name].shape)} there, {list(param.shape)} in this config")
    model.load_state_dict({name: weights[name] for name in model.state_dict()})


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
    logits = model(inputs).float()  # the softmax in fp32 under autocast
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
    """Mean next-token loss (nats per token, fp32) over n fixed held-out sequences (training
    sequences when no file is held out), on the device of `model`."""
    model.eval()
    split = "heldout" if corpus.has("heldout") else "train"
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        seqs = collate([corpus.sample([seed, 3, g], split) for g in range(b, min(n, b + batch_size))],
                       corpus.mc.end_id).to(device)
        loss = next_token_loss(model, seqs, corpus.mc.end_id, reduction="sum")
        total += float(loss)
        count += int((next_token_targets(seqs, corpus.mc.end_id)[1] != -100).sum())
    model.train()
    return total / count


def heldout_losses(model: Toto, corpus: TokenCorpus, cfg: dict, checkpoint_dir) -> tuple[float, float]:
    """(held-out loss of `model`, of random-init:<checkpoint_dir>) on the sequences `eval.*` sets,
    both on the device of `model`."""
    from totobench.model import load_backbone
    ev, seed = cfg["eval"], int(cfg["seed"])
    n, batch_size = int(ev["heldout_sequences"]), int(ev["batch_size"])
    trained = heldout_loss(model, corpus, seed, n, batch_size)
    # token shards name their tokenizer: the checkpoint holds it only when it is a vqvae folder
    tokenizer = getattr(corpus, "tokenizer_spec", None)
    random_model = load_backbone(f"random-init:{checkpoint_dir}", tokenizer=tokenizer,  # the registry's baseline
                                 device=str(next(model.parameters()).device)).model
    return trained, heldout_loss(random_model, corpus, seed, n, batch_size)


@dataclass
class TrainState:
    """How far the transformer run is; last.pt holds it beside the weights and the optimizer."""
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    steps_planned: int | None = None  # fixed once, from the measured step time, when train.max_minutes is set


def load_state(paths: RunPaths, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None) -> TrainState:
    """Restore weights, optimizer (and fp16 grad scaler) from last.pt on every rank, whatever
    sharding and device wrote it (read to the CPU, copied to the parameters' device); returns where
    the run stopped."""
    saved = torch.load(paths.last_checkpoint, map_location="cpu", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):  # last.pt of before FSDP
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    else:
        load_full_state(model, optimizer, saved["model"], saved["optimizer"])
    if scaler is not None and saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return TrainState(saved["step"], saved["tokens"], saved["elapsed_s"], saved.get("steps_planned"))


def save_state(paths: RunPaths, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler | None, state: TrainState, facts: dict) -> None:
    """Rank 0 writes last.pt (full state dicts, gathered from every rank under FSDP), refreshes
    the checkpoint folder (a partial model is always usable) and records progress in the run's
    facts; every rank waits for it."""
    model_state, optimizer_state = full_state(model, optimizer)  # collective under FSDP
    plain = gathered_model(model, model_state)
    if parallel.info().is_main:
        with atomic_path(paths.last_checkpoint) as tmp:
            torch.save({"model": model_state, "optimizer": optimizer_state,
                        "scaler": scaler.state_dict() if scaler is not None else None, **asdict(state)}, tmp)
        checkpoint.save_checkpoint(paths.out, plain)
        facts.update({"steps_done": state.step, "tokens_seen": state.tokens,
                      "train_wall_time_s": round(state.elapsed_s, 1)})
        atomic_write_json(paths.facts, facts)
    parallel.barrier()


def train_transformer(cfg: dict, corpus: TokenCorpus, paths: RunPaths, facts: dict, resume: bool,
                      console, device: torch.device | None = None) -> tuple[Toto, TrainState, int]:
    """Stage 3 on `device` (this rank's; the CPU when None) from scratch (or from
    `train.init_from`), or from last.pt when `resume`. Returns (model, final state, planned steps);
    under FSDP the model is an unsharded CPU copy that holds the trained weights on rank 0 only
    (the only rank that saves and evaluates it)."""
    dist, t, device = parallel.info(), cfg["train"], torch.device(device or "cpu")
    global_batch_size(cfg, corpus.mc, dist.world_size)  # a batch that does not split over the ranks fails here
    model = initial_model(corpus.mc, int(cfg["seed"]), t["output_init"])  # drawn on the CPU: same init anywhere
    if t["init_from"] and not (resume and paths.last_checkpoint.is_file()):
        load_init_weights(model, Path(t["init_from"]).expanduser(), cfg["_path"])
    model.activation_checkpointing = bool(t["activation_checkpointing"])
    train_model = wrap_for_training(model.to(device), t["sharding"], device)
    optimizer = make_optimizer(model, t)
    scaler = torch.amp.GradScaler(device.type) if t["precision"] == "fp16" else None
    state = TrainState()
    if resume and paths.last_checkpoint.is_file():
        state = load_state(paths, model, optimizer, scaler)
        if console:
            console.print(f"resuming at step {state.step} ({state.tokens:,} tokens seen)")
    if console and t["precision"] != "fp32" and device.type == "cpu":  # a CPU without bf16/fp16 units emulates them
        console.print(f"[yellow]train.precision={t['precision']} on a CPU: as fast as its {t['precision']} "
                      "support allows (fp32 is the CPU default)[/yellow]")
    if dist.is_main:
        restart_loss_curve(paths.loss_curve, state.step)
    model.train()
    steps = _train_loop(train_model, model, optimizer, scaler, corpus, cfg, paths, state, facts, console)
    return gathered_model(model, full_state(model, optimizer)[0]), state, steps


def _train_loop(train_model: torch.nn.Module, model: Toto, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, corpus: TokenCorpus, cfg: dict, paths: RunPaths,
                state: TrainState, facts: dict, console) -> int:
    """Steps from state.step (updating `state`) to the planned end or the time budget, logging to
    loss_curve.csv and saving every train.checkpoint_every steps. `train_model` is what the step
    calls (DDP wrapper or the model), `model` what is saved. Returns the planned steps."""
    dist, t, seed, end_id = parallel.info(), cfg["train"], int(cfg["seed"]), corpus.mc.end_id
    batch_size = global_batch_size(cfg, corpus.mc, dist.world_size)
    device = next(model.parameters()).device  # this rank's (a DTensor's local device under FSDP)
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
                           end_id).to(device, non_blocking=True)
            loss, grad_norm = train_step(train_model, optimizer, seqs, end_id, lr, int(t["micro_batch_size"]),
                                         t["grad_clip"], t["precision"], scaler)
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
                save_state(paths, model, optimizer, scaler, state, facts)
            if kill_at == state.step and dist.is_main:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the kill-and-resume test
            if stop:
                if console:
                    console.print(f"[yellow]train.max_minutes reached: stopping at step {state.step}/{steps}[/yellow]")
                break
    return steps


def autocast(precision: str, device_type: str = "cpu"):
    """The autocast context of `precision` (fp32: none)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])


def train_step(model, optimizer: torch.optim.Optimizer, seqs: torch.Tensor, pad_id: int, lr: float,
               micro_batch_size: int, grad_clip: float, precision: str = "fp32",
               scaler: torch.amp.GradScaler | None = None) -> tuple[float, float]:
    """One optimizer step on this rank's share seqs [B, L] (on the model's device) of the global
    batch at learning rate `lr`, accumulated over micro-batches of micro_batch_size sequences (the
    ranks sync gradients on the last); autocast on the device type of `seqs`. Each micro-batch's loss is its summed token cross-entropy divided by the valid
    target tokens of the whole global batch (times the world size, which DDP/FSDP divide by
    again), so the gradient is that of the global batch's mean loss, however it is split.
    Returns (that mean loss in nats per token, gradient norm before clipping; inf when the fp16
    scaler skips the step)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    world = parallel.info().world_size
    total = _all_ranks_total((next_token_targets(seqs, pad_id)[1] != -100).sum().float())  # the global batch's
    loss_total = torch.zeros((), device=seqs.device)
    starts = list(range(0, len(seqs), micro_batch_size))
    for j, a in enumerate(starts):
        part = seqs[a:a + micro_batch_size]
        with gradient_sync(model, sync=j == len(starts) - 1):
            with autocast(precision, seqs.device.type):
                part_sum = next_token_loss(model, part, pad_id, reduction="sum")
            loss = part_sum * world / total
            (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += part_sum.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = as_local(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return float(_all_ranks_total(loss_total) / total), float(grad_norm)


def _all_ranks_total(value: torch.Tensor) -> torch.Tensor:
    """The sum of a scalar over the ranks (the value itself on one process)."""
    value = value.detach().clone()
    if parallel.info().active:
        torch.distributed.all_reduce(value)
    return value


def _plan_steps(state: TrainState, steps: int, budget_s: float) -> int:
    """Fit the run to the time budget from the mean step time so far, so that the cosine schedule
    ends where training ends; every rank takes rank 0's estimate. Sets state.steps_planned."""
    estimate = max(state.step, min(steps, int(budget_s / (state.elapsed_s / state.step))))
    state.steps_planned = parallel.broadcast_object(estimate)
    return state.steps_planned
