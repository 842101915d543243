"""The loss curve (CSV written during training, its plot) and the checkpoint folder's model card."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import yaml

from totobench.io import atomic_path, atomic_write, atomic_write_json
from totobench.model.toto import TotoConfig
from totobench.pretrain.config import model_cfg

CSV_FIELDS = ["step", "tokens", "loss", "lr", "grad_norm", "elapsed_s", "tokens_per_s"]


def read_loss_curve(path: Path) -> list[dict]:
    """The rows of loss_curve.csv (values as strings)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def restart_loss_curve(path: Path, last_step: int) -> None:
    """Start loss_curve.csv afresh, keeping only the rows up to `last_step` (the checkpoint a
    resumed run starts from): the steps after it run again."""
    rows = [r for r in read_loss_curve(path) if int(r["step"]) <= last_step] if path.is_file() else []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def append_loss_row(path: Path, *, step: int, tokens: int, loss: float, lr: float, grad_norm: float,
                    elapsed_s: float, tokens_per_s: float) -> None:
    """Append one logged step to loss_curve.csv."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, CSV_FIELDS).writerow({
            "step": step, "tokens": tokens, "loss": f"{loss:.6f}", "lr": f"{lr:.6g}",
            "grad_norm": f"{grad_norm:.4f}", "elapsed_s": f"{elapsed_s:.1f}", "tokens_per_s": f"{tokens_per_s:.1f}"})


def plot_loss_curve(csv_path: Path, png_path: Path, title: str) -> None:
    """Train loss against tokens seen; nothing is written when the curve has no rows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_loss_curve(csv_path)
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
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name does not end in .png
    plt.close(fig)


def write_card(out: Path, facts: dict, cfg: dict) -> None:
    """training.json, loss_curve.png and README.md of the checkpoint folder `out`."""
    atomic_write_json(out / "training.json", facts, allow_nan=True)  # a diverged run still gets its facts
    plot_loss_curve(out / "loss_curve.csv", out / "loss_curve.png", f"{cfg.get('name', 'toto')} pre-training")
    atomic_write(out / "README.md", model_card(facts, cfg))


def model_card(f: dict, cfg: dict) -> str:
    """README.md of the checkpoint folder, from the facts of training.json."""
    tk = f["tokenizer"]
    mc = model_cfg(cfg)
    src_lines = "\n".join(f"| {s['kind']} | `{s['path']}` | {s['weight']} | {s['train_files']} | {s['heldout_files']} |"
                          for s in f["data"]["sources"])
    cfg_text = yaml.safe_dump(f["config"], sort_keys=False).strip()
    d = cfg["data"]
    root_line = f"""Root: the data world (`totobench.data.world.ensure_data_world("{d['world_size']}", seed={d['world_seed']})`)."""
    tk_text = _shard_tokenizer(tk) if "config" not in tk else f"""A VQ-VAE (`totobench/model/tokenizer.py`): \
a {tk['config']['stem']}x{tk['config']['stem']} stem then stride-2
stages down to 8x, unit-length latents, a codebook of {mc.codebook_size} x {tk['config']['code_dim']} updated by
exponential moving averages, dead codes restarted on encoder outputs ({tk['code_restarts']} restarts in
training); {tk['steps']} of {tk.get('steps_planned', tk['steps'])} planned steps of batch {tk['batch_size']}
(crops: {tk.get('crop') or 'none'}) on {tk['train_frames']} training frames.
Files: `tokenizer/config.json`, `tokenizer/model.safetensors`."""
    return f"""# {cfg.get('name', 'toto')}

A small LLaMA-style causal transformer over discrete visual tokens (the Toto recipe of
Rajasegaran et al. 2025, scaled down to a 2-core CPU), pre-trained by next-token prediction on the
`pretrain/` corpus of the totobench data world, with its own VQ-VAE tokenizer.

{_card_table(f, mc)}

Held-out loss is the mean next-token cross-entropy over {f['heldout_sequences']} fixed sequences drawn
from files no training step saw (a stable hash of each file path puts ~{cfg['data']['heldout_fraction']:.0%}
of each folder out).

## Command

```
{f['command']}
```

## Data

{f"Token shards: `{f['data']['shards']}` (`totobench tokenize`)." if f['data'].get('shards') else root_line}

| kind | folder | weight | train files | held-out files |
|---|---|---|---|---|
{src_lines}

## Tokenizer

{tk_text}

## Loss curve

![loss curve](loss_curve.png)

`loss_curve.csv` holds every logged step (tokens seen, loss, learning rate, gradient norm, tokens/s).

## Config

```yaml
{cfg_text}
```
"""


def _shard_tokenizer(tk: dict) -> str:
    """The tokenizer section of a run on token shards: the tokenizer they were made with."""
    return (f"`{tk['spec']}` (sha256 `{tk['sha256']}`), the tokenizer the token shards were made with"
            + (": copied to `tokenizer/`." if tk['spec'].startswith("vqvae:") else "."))


def _card_table(f: dict, mc: TotoConfig) -> str:
    """The model card's summary table: architecture, data, training, losses, tokenizer quality."""
    tk = f["tokenizer"]
    h = tk.get("heldout")
    tk_rows = (f"""| tokenizer held-out PSNR | {h['psnr_db']:.2f} dB on {h['num_frames']} frames of held-out files |
| tokenizer codebook usage | {h['codebook_usage']:.1%} ({h['codes_used']} of {mc.codebook_size} codes) on the same frames |"""
               if h else f"| tokenizer | `{tk['spec']}`, the token shards' (not measured here) |")
    mins = f["total_wall_time_s"] / 60
    return f"""| | |
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
{tk_rows}
| weights sha256 | `{f['sha256']}` |"""
