"""Does a model use the previous frames? Next-token loss on the Kinetics clips, frame by frame.

Takes the k400 task's val clips (8 frames every 4th, 64 px, the first evaluation clip of every
other video), tokenizes them with the model's tokenizer and prints, for MODEL and for
random-init:MODEL side by side, the mean next-token loss (nats) of each frame's tokens, and the
loss of the tokens of frames 1.. that are unchanged from the previous frame (most of a clip: a
still background) against those that changed (the moving sprite). A model that has learned to
read the previous frame predicts unchanged tokens far better than the first frame's; a model that
has learned motion also predicts the changed ones better than random init.

    .venv/bin/python benchmarks/video_nll.py [--model toto-tiny]
"""

from __future__ import annotations

import argparse

import torch
from totobench.data.kinetics import KineticsIndex
from totobench.data.world import ensure_data_world
from totobench.model import load_backbone
from totobench.tasks.kinetics import ClipViews


def clip_losses(backbone, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """frames float [B, T, 3, R, R] -> (per-token nll [B, T, hw], changed-from-previous-frame mask)."""
    ids = backbone.tokenize(frames)
    B, T, hw = ids.shape
    start = torch.full((B, 1), backbone.config.video_start_id)
    seq = torch.cat([start, ids.reshape(B, -1)], 1)
    with torch.no_grad():
        logits = backbone.model(seq[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), seq[:, 1:].reshape(-1),
                                            reduction="none").reshape(B, T, hw)
    changed = torch.zeros(B, T, hw, dtype=torch.bool)
    changed[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return nll, changed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toto-tiny")
    args = parser.parse_args()
    torch.set_num_threads(2)
    probe = load_backbone(args.model)
    c = probe.config
    index = KineticsIndex(ensure_data_world() / "kinetics400", "val", min_frames=c.num_frames)
    views = ClipViews(index, c.num_frames, c.frame_stride, c.resolution, False, 1, 1, 0)
    frames = torch.stack([views[i]["frames"] for i in range(0, len(views), 2)]).float() / 255
    print(f"{len(frames)} k400 val clips, {c.num_frames} frames every {c.frame_stride}, {c.resolution} px")
    print(f"{'model':<28} {'frame 0':>8} {'frames 1+':>9} {'unchanged':>9} {'changed':>8} {'unchanged share':>15}")
    for name in (args.model, f"random-init:{args.model}"):
        nll, changed = [], []
        backbone = probe if name == args.model else load_backbone(name)
        for batch in frames.split(16):
            n, ch = clip_losses(backbone, batch)
            nll.append(n), changed.append(ch)
        nll, changed = torch.cat(nll), torch.cat(changed)
        later, moved = nll[:, 1:], changed[:, 1:]
        print(f"{name:<28} {nll[:, 0].mean():8.3f} {later.mean():9.3f} {later[~moved].mean():9.3f} "
              f"{later[moved].mean():8.3f} {(~moved).float().mean():15.1%}")


if __name__ == "__main__":
    main()
