"""`totobench nll SPEC [--data ROOT_OR_SHARDS] [--out DIR]`: held-out next-token loss of a Toto, per
token position of a video clip and per frame (the paper's redundancy figure: the first frame costs
the most, later frames, mostly predictable from the previous one, far less).

Clips: the centred clip of each video of a Kinetics-format split (default: the data world's
kinetics400/ val), `num_frames` frames every `frame_stride`-th at the model's resolution, laid out
as in pre-training: [video_start, frame 0 tokens, ..., frame T-1 tokens]; or, when --data is a
token shard folder (`totobench tokenize`), the centred clip of each video sequence in it (the
files pre-training held out at --heldout FRACTION, the fraction its config used; 0: every file),
its tokens as stored (no tokenizer runs). Token k of the clip is predicted from the start token and
tokens 0..k-1. Writes nll.csv (per frame), nll_positions.csv (per position) and nll.png to --out;
prints the per-frame table.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from totobench.errors import ConfigError, DataError
from totobench.io import atomic_write


@torch.no_grad()
def position_nll(model, ids: torch.Tensor, start_id: int) -> torch.Tensor:
    """ids LongTensor [B, N] (a clip's tokens, frame after frame) -> nll float [B, N] in nats:
    -log p(ids[:, k] | start, ids[:, :k]) under `model` (tokens [B, L] -> logits [B, L, V])."""
    seq = torch.cat([torch.full((ids.shape[0], 1), start_id, dtype=torch.long, device=ids.device), ids], dim=1)
    logits = model(seq[:, :-1]).float()
    return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")


def clip_nll(backbone, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames float [B, T, 3, R, R] in [0, 1] -> (nll [B, T, h*w], changed [B, T, h*w]: the
    token differs from the same place in the previous frame; all False in frame 0)."""
    codes = backbone.tokenize(frames)
    return token_nll(backbone, codes.reshape(*codes.shape[:2], -1))


def token_nll(backbone, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids long [B, T, h*w] of clips -> (nll [B, T, h*w], changed [B, T, h*w]) as clip_nll."""
    B, T = ids.shape[:2]
    nll = position_nll(backbone.model, ids.reshape(B, -1), backbone.config.video_start_id).reshape(ids.shape)
    changed = torch.zeros_like(ids, dtype=torch.bool)
    changed[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return nll, changed


def kinetics_clips(root: Path, split: str, config, max_clips: int | None) -> tuple[torch.Tensor, int]:
    """The centred clip of each usable video of the split (`config.num_frames` frames every
    `config.frame_stride`-th, short side to the resolution, centre crop): (uint8 [N, T, 3, R, R],
    videos skipped). Raises DataError when no clip can be read."""
    from totobench.data.kinetics import KineticsIndex
    from totobench.data.preprocess import resize_and_crop
    from totobench.data.video import read_frames, video_info
    from totobench.model.sequence import clip_frame_indices, clip_span
    span = clip_span(config.num_frames, config.frame_stride)
    index = KineticsIndex(root, split, min_frames=span)
    clips, skipped = [], sum(len(v) for v in index.skipped.values())
    for path, _ in index.videos[:max_clips]:
        start = ((index.info.get(path) or video_info(path)).num_frames - span) // 2
        try:
            frames = read_frames(path, clip_frame_indices(start, config.num_frames, config.frame_stride))
        except DataError:
            skipped += 1
            continue
        clips.append(resize_and_crop(frames, config.resolution))
    if not clips:
        raise DataError(f"{root}: no readable {split} clip of {config.num_frames} frames every {config.frame_stride}")
    return torch.stack(clips), skipped


def shard_clips(folder: Path, config, heldout: float, max_clips: int | None) -> torch.Tensor:
    """Token ids long [N, T, h*w]: the centred clip of each video of a token shard folder that is
    held out at `heldout` (0: every video). ConfigError when the shards do not fit the model,
    DataError when no video gives a clip."""
    from totobench.pretrain.shards import ShardCorpus
    if not 0.0 <= heldout < 1.0:
        raise ConfigError(f"--heldout: expected a fraction in [0, 1), got {heldout}")
    corpus = ShardCorpus(folder, config, heldout)
    try:
        ids, _ = corpus.centred_clips("heldout" if heldout else "all", max_clips)
    finally:
        corpus.close()
    return torch.from_numpy(ids)


def nll_tables(nll: torch.Tensor, changed: torch.Tensor, grid: int) -> tuple[list[dict], list[dict]]:
    """nll, changed [N, T, h*w] -> (per-frame rows: mean nll, of unchanged and changed tokens, share
    changed (None for frame 0); per-position rows: position, frame, row, col, mean nll over clips)."""
    frames = [{"frame": 0, "nll": float(nll[:, 0].mean()), "nll_unchanged": None, "nll_changed": None,
               "changed_share": None}]  # frame 0 has no previous frame to compare with
    for t in range(1, nll.shape[1]):
        n, ch = nll[:, t], changed[:, t]
        frames.append({"frame": t, "nll": float(n.mean()),
                       "nll_unchanged": float(n[~ch].mean()) if (~ch).any() else None,
                       "nll_changed": float(n[ch].mean()) if ch.any() else None,
                       "changed_share": float(ch.float().mean())})
    per_pos = nll.mean(0).reshape(-1)
    hw = nll.shape[2]
    positions = [{"position": k, "frame": k // hw, "row": (k % hw) // grid, "col": k % grid,
                  "nll": float(v)} for k, v in enumerate(per_pos)]
    return frames, positions


def cli_nll(args) -> int:
    """Per-frame and per-position next-token loss of SPEC on the clips of --data."""
    from totobench.data.world import ensure_data_world
    from totobench.model import load_backbone
    backbone = load_backbone(args.checkpoint)
    if getattr(backbone, "config", None) is None or not hasattr(backbone, "tokenize"):
        raise ConfigError(f"nll {args.checkpoint}: expected a Toto over visual tokens (toto-tiny, a checkpoint "
                          "folder, random-init:SPEC), not a model without a next-token head")
    c = backbone.config
    root = Path(args.data).expanduser() if args.data else ensure_data_world() / "kinetics400"
    nll, changed = [], []
    if (root / "index.json").is_file():  # a token shard folder: its stored tokens
        clips, skipped, what = shard_clips(root, c, args.heldout, args.max_clips), 0, f"held-out {args.heldout}"
        for part in clips.split(16):
            n, ch = token_nll(backbone, part)
            nll.append(n), changed.append(ch)
    else:
        clips, skipped = kinetics_clips(root, args.split, c, args.max_clips)
        what = args.split
        for part in clips.split(16):
            n, ch = clip_nll(backbone, part.float() / 255)
            nll.append(n), changed.append(ch)
    frames, positions = nll_tables(torch.cat(nll), torch.cat(changed), c.grid)
    out = Path(args.out or Path("runs") / "nll" / backbone.name.replace(":", "_").replace("/", "_"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "nll.csv", _csv(frames))
    atomic_write(out / "nll_positions.csv", _csv(positions))
    atomic_write(out / "nll.png", nll_png(frames, positions, backbone.name, len(clips)))
    print(f"{backbone.name}: {len(clips)} clips of {root} ({what}), {c.num_frames} frames every "
          f"{c.frame_stride}, {c.resolution} px, {c.tokens_per_frame} tokens per frame"
          + (f"; {skipped} videos skipped" if skipped else ""))
    print(nll_table(frames))
    print(f"wrote {out / 'nll.csv'}, {out / 'nll_positions.csv'} and {out / 'nll.png'}")
    return 0


def nll_table(frames: list[dict]) -> str:
    """The per-frame rows as a console table (nats per token)."""
    def cell(v, width: int, fmt: str) -> str:
        return f"{v:>{width}{fmt}}" if v is not None else f"{'-':>{width}}"
    lines = [f"{'frame':>5} {'nll':>7} {'unchanged':>9} {'changed':>8} {'changed share':>13}"]
    for r in frames:
        lines.append(f"{r['frame']:>5} {r['nll']:>7.3f} {cell(r['nll_unchanged'], 9, '.3f')} "
                     f"{cell(r['nll_changed'], 8, '.3f')} {cell(r['changed_share'], 13, '.1%')}")
    return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}
                     for r in rows)
    return buffer.getvalue()


def nll_png(frames: list[dict], positions: list[dict], name: str, clips: int) -> bytes:
    """Mean nll per token position (thin) and per frame (steps) across the clip."""
    from matplotlib.figure import Figure

    from totobench.results.plots import figure_png_bytes
    fig = Figure(figsize=(7.0, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot([p["position"] for p in positions], [p["nll"] for p in positions], lw=0.6, color="#1f77b4",
            label="per token position")
    hw = len(positions) // len(frames)
    edges = np.arange(len(frames) + 1) * hw
    ax.stairs([f["nll"] for f in frames], edges, baseline=None, color="#d62728", lw=2, label="per frame (mean)")
    for e in edges[1:-1]:
        ax.axvline(e, color="0.8", lw=0.5)
    ax.set_xlabel(f"token position in the clip ({hw} tokens per frame)")
    ax.set_ylabel("next-token loss (nats)")
    ax.set_title(f"{name}: held-out next-token loss over {clips} clips")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return figure_png_bytes(fig)
