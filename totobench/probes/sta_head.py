"""A trainable short-term anticipation (STA) head on frozen patch tokens of the last observed frame.

Per location of the h x w token grid the head predicts (CenterNet/YOLO style, one object per cell):
  objectness  logit that the next-active object's box centre falls in this cell,
  box         (cx, cy, w, h) normalised to [0, 1] by the frame size; the centre is the cell corner
              plus a sigmoid offset inside the cell,
  noun, verb  class logits,
  ttc         time to contact in seconds (softplus, so >= 0).
Targets put each ground-truth object on the cell holding its box centre. Category ids are used as
class indices: they must lie in [0, num_nouns) and [0, num_verbs) (Ego4D ids are 0..N-1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from totobench.errors import DataError
from totobench.probes.base import STA_OUTPUTS, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec
from totobench.progress import progress_bar

IGNORE = -100  # class target of cells without an object (cross_entropy's ignore_index)


@dataclass
class STAHeadConfig:
    dim: int            # token width D
    num_nouns: int
    num_verbs: int
    hidden: int = 256


class STAHead(nn.Module):
    """tokens [B, h, w, D] -> dict of objectness [B,h,w], box [B,h,w,4] (cx,cy,w,h in [0,1]),
    noun [B,h,w,num_nouns], verb [B,h,w,num_verbs] logits, ttc [B,h,w] seconds."""

    def __init__(self, config: STAHeadConfig):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.dim)
        # a 3x3 conv lets a cell see its neighbours: boxes usually span several cells
        self.conv = nn.Conv2d(config.dim, config.hidden, kernel_size=3, padding=1)
        self.out = nn.Conv2d(config.hidden, 1 + 4 + config.num_nouns + config.num_verbs + 1, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        B, h, w, _ = tokens.shape
        x = self.norm(tokens).permute(0, 3, 1, 2)
        x = self.out(F.gelu(self.conv(x))).permute(0, 2, 3, 1)  # [B, h, w, C]
        n, v = self.config.num_nouns, self.config.num_verbs
        obj, box, noun, verb, ttc = x.split([1, 4, n, v, 1], dim=-1)
        cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w)
        rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1)
        box = torch.stack([(cols + box[..., 0].sigmoid()) / w, (rows + box[..., 1].sigmoid()) / h,
                           box[..., 2].sigmoid(), box[..., 3].sigmoid()], dim=-1)
        return {"objectness": obj[..., 0], "box": box, "noun": noun, "verb": verb,
                "ttc": F.softplus(ttc[..., 0])}


def sta_targets(frames_objects: Sequence[Sequence[Mapping]], frame_sizes: Sequence[tuple[float, float]],
                grid: tuple[int, int], num_nouns: int, num_verbs: int) -> dict[str, torch.Tensor]:
    """Per-location targets of N frames from their ground-truth objects.

    frames_objects[i]: the annotation objects of frame i ({box: [x1,y1,x2,y2] pixels,
    noun_category_id, verb_category_id, time_to_contact}); frame_sizes[i]: (width, height) pixels;
    grid: (h, w) of the token grid. Returns objectness [N,h,w] (0/1), box [N,h,w,4] (cx,cy,w,h
    normalised), noun and verb [N,h,w] long (IGNORE where no object), ttc [N,h,w] seconds.
    Two objects centred in one cell: the larger box keeps it. Raises DataError on an id out of range.
    """
    h, w = grid
    N = len(frames_objects)
    targets = {"objectness": torch.zeros(N, h, w), "box": torch.zeros(N, h, w, 4),
               "noun": torch.full((N, h, w), IGNORE, dtype=torch.long),
               "verb": torch.full((N, h, w), IGNORE, dtype=torch.long), "ttc": torch.zeros(N, h, w)}
    for i, (objects, (width, height)) in enumerate(zip(frames_objects, frame_sizes)):
        # larger boxes last, so they overwrite smaller ones centred in the same cell
        for obj in sorted(objects, key=lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1])):
            noun, verb = obj["noun_category_id"], obj["verb_category_id"]
            if not 0 <= noun < num_nouns or not 0 <= verb < num_verbs:
                raise DataError(f"STA targets: frame {i} has noun {noun} / verb {verb}, expected ids in "
                                f"[0, {num_nouns}) / [0, {num_verbs})")
            x1, y1, x2, y2 = obj["box"]
            cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
            bw, bh = (x2 - x1) / width, (y2 - y1) / height
            col, row = min(int(cx * w), w - 1), min(int(cy * h), h - 1)
            col, row = max(col, 0), max(row, 0)
            targets["objectness"][i, row, col] = 1.0
            targets["box"][i, row, col] = torch.tensor([cx, cy, bw, bh])
            targets["noun"][i, row, col] = noun
            targets["verb"][i, row, col] = verb
            targets["ttc"][i, row, col] = float(obj["time_to_contact"])
    return targets


def sta_loss(outputs: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Objectness BCE over all cells (positives up-weighted to balance the few object cells) plus,
    on object cells, L1 on the normalised box (x5), noun and verb cross-entropy, L1 ttc (seconds)."""
    objectness = targets["objectness"]
    positive = objectness > 0
    num_pos = positive.sum().clamp(min=1)
    pos_weight = ((objectness.numel() - num_pos) / num_pos).clamp(max=100.0)
    loss = F.binary_cross_entropy_with_logits(outputs["objectness"], objectness, pos_weight=pos_weight)
    if positive.any():
        loss = loss + 5.0 * F.l1_loss(outputs["box"][positive], targets["box"][positive])
        loss = loss + F.cross_entropy(outputs["noun"][positive], targets["noun"][positive])
        loss = loss + F.cross_entropy(outputs["verb"][positive], targets["verb"][positive])
        # L1: the metric thresholds the absolute ttc error
        loss = loss + F.l1_loss(outputs["ttc"][positive], targets["ttc"][positive])
    return loss


def train_sta_head(train_tokens: torch.Tensor, train_targets: Mapping[str, torch.Tensor], num_nouns: int,
                   num_verbs: int, epochs: int = 30, lr: float = 1e-3, seed: int = 0,
                   batch_size: int = 64, weight_decay: float = 1e-4, hidden: int = 256,
                   on_epoch: Callable[[int, float], None] | None = None) -> STAHead:
    """Train an STAHead with AdamW (cosine schedule) on frozen tokens [N,h,w,D] and the targets of
    `sta_targets`; deterministic for a given seed on the CPU. on_epoch(epoch, mean loss) is called
    after each epoch (progress display). Returns the head in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = STAHead(STAHeadConfig(train_tokens.shape[-1], num_nouns, num_verbs, hidden))
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(train_tokens) // batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    head.train()
    for epoch in range(epochs):
        losses = []
        for batch in torch.randperm(len(train_tokens), generator=generator).split(batch_size):
            outputs = head(train_tokens[batch].float())
            loss = sta_loss(outputs, {k: t[batch] for k, t in train_targets.items()})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        if on_epoch is not None:
            on_epoch(epoch, sum(losses) / max(1, len(losses)))
    return head.eval()


@torch.no_grad()
def decode_sta(outputs: Mapping[str, torch.Tensor], frame_sizes: Sequence[tuple[float, float]],
               topk: int = 20) -> list[list[dict]]:
    """Ranked detections per frame in the challenge format.

    outputs: STAHead outputs for B frames; frame_sizes[i]: (width, height) in original pixels.
    Each (location, noun) pair is scored objectness probability x noun probability, so one location
    may give several nouns; the `topk` best pairs per frame are kept, highest first, each with the
    location's box (pixels, clipped to the frame), argmax verb and ttc:
    {box, noun_category_id, verb_category_id, time_to_contact, score} (ints and floats).
    """
    objectness = outputs["objectness"].sigmoid()
    B, h, w = objectness.shape
    scores = (objectness[..., None] * outputs["noun"].softmax(-1)).reshape(B, -1)
    num_nouns = outputs["noun"].shape[-1]
    verbs = outputs["verb"].argmax(-1).reshape(B, -1)
    ttcs = outputs["ttc"].reshape(B, -1)
    boxes = outputs["box"].reshape(B, -1, 4)
    frames = []
    for i, (width, height) in enumerate(frame_sizes):
        best = scores[i].topk(min(topk, scores.shape[1]))
        detections = []
        for score, pair in zip(best.values.tolist(), best.indices.tolist()):
            cell, noun = divmod(pair, num_nouns)
            cx, cy, bw, bh = boxes[i, cell].tolist()
            detections.append({
                "box": [min(max((cx - bw / 2) * width, 0.0), width), min(max((cy - bh / 2) * height, 0.0), height),
                        min(max((cx + bw / 2) * width, 0.0), width), min(max((cy + bh / 2) * height, 0.0), height)],
                "noun_category_id": int(noun), "verb_category_id": int(verbs[i, cell]),
                "time_to_contact": float(ttcs[i, cell]), "score": float(score)})
        frames.append(detections)
    return frames


@dataclass(frozen=True)
class StaHeadSpec(ProbeSpec):
    """`probe:` settings of the STA head (see train_sta_head); `topk` detections are kept per frame."""
    name: str = "sta_head"
    pooling: str = "last_frame"
    epochs: int = field(default=30, metadata={"min": 1})
    lr: float = field(default=1e-3, metadata={"gt": 0})
    weight_decay: float = field(default=1e-4, metadata={"min": 0})
    batch_size: int = field(default=64, metadata={"min": 1})
    hidden: int = field(default=256, metadata={"min": 1})
    topk: int = field(default=20, metadata={"min": 1})


class StaHeadProbe(Probe):
    """feats: {layer: last-frame tokens [N, h*w, D]} with token_grid (1, h, w); train.targets: the
    targets of `sta_targets`; num_classes = (num_nouns, num_verbs). Outputs: the head's raw
    outputs on the val rows (the task decodes them to boxes)."""
    Spec = StaHeadSpec
    produces = STA_OUTPUTS

    def deviations(self, spec: StaHeadSpec) -> list[str]:
        return ["a small detection head on one frozen layer's last-frame token grid; the paper trains "
                "StillFast on the tokens of 5 layers fused by a feature pyramid"]

    def fit(self, train: ProbeData, val: ProbeData, spec: StaHeadSpec, ctx: ProbeContext) -> dict[int, LayerResult]:
        out = {}
        with progress_bar(ctx.console, fields="layer {task.fields[layer]} loss {task.fields[loss]}",
                          disable=ctx.console is None) as shown:
            job = shown.add_task(f"{ctx.desc or 'STA'} head epochs", total=len(train.layers) * spec.epochs,
                                 layer="-", loss="-")
            for i, layer in enumerate(train.layers):
                def on_epoch(epoch, loss, i=i, layer=layer):
                    shown.update(job, completed=i * spec.epochs + epoch + 1, layer=layer, loss=f"{loss:.3f}")
                out[layer] = self._fit_layer(train, val, layer, spec, ctx, on_epoch)
        return out

    @staticmethod
    def _fit_layer(train: ProbeData, val: ProbeData, layer: int, spec: StaHeadSpec, ctx: ProbeContext,
                   on_epoch: Callable[[int, float], None]) -> LayerResult:
        """Train one layer's head; its raw outputs on the val rows."""
        _, h, w = train.token_grid
        num_nouns, num_verbs = train.num_classes
        dim = train.feats[layer].shape[-1]
        x_tr = torch.from_numpy(np.asarray(train.feats[layer]).astype(np.float32)).reshape(-1, h, w, dim)
        x_va = torch.from_numpy(np.asarray(val.feats[layer]).astype(np.float32)).reshape(-1, h, w, dim)
        model = train_sta_head(x_tr, train.targets, num_nouns, num_verbs, epochs=spec.epochs, lr=spec.lr,
                               seed=ctx.seed, batch_size=spec.batch_size, weight_decay=spec.weight_decay,
                               hidden=spec.hidden, on_epoch=on_epoch)
        with torch.no_grad():
            return LayerResult(outputs=model(x_va))
