"""Label propagation through feature affinities (Jabri et al. 2020, "space-time correspondence").

Each target frame t takes its soft labels from a context: the first frame (with its ground-truth
labels, all positions) and the up to `context` previous predicted frames max(1, t-context)..t-1
(with their soft labels, only positions within `radius` feature cells of the query). Affinity is
the cosine similarity of L2-normalised features divided by `temperature`; each query keeps its
`topk` best context positions, softmaxes their affinities and averages their labels.

Differences from the reference code (ajabri/videowalk, `test.py`), on purpose: videowalk pads the
video with `context` copies of the first frame, so early frames see the first frame many times
over; here the window simply holds the frames that exist (as DINO's queue does). The radius test
is videowalk's: Euclidean distance between cells strictly below `radius`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from totobench.probes.base import SOFT_MASKS, LayerResult, Probe, ProbeContext, ProbeData, ProbeSpec

# Cap on affinity entries held at once (64M floats = 256 MB): larger frames chunk their queries.
MAX_AFFINITY_ELEMENTS = 2 ** 26


def radius_mask(h: int, w: int, radius: float) -> torch.Tensor:
    """BoolTensor [h*w, h*w]: True where two cells of an h x w grid (raster order) are at
    Euclidean distance < radius. Built in row blocks so no int64 [h*w, h*w] temporary exists."""
    ys = torch.arange(h, dtype=torch.int32).repeat_interleave(w)
    xs = torch.arange(w, dtype=torch.int32).repeat(h)
    mask = torch.empty(h * w, h * w, dtype=torch.bool)
    for start in range(0, h * w, 1024):
        rows = slice(start, start + 1024)
        squared = (ys[rows, None] - ys[None, :]) ** 2 + (xs[rows, None] - xs[None, :]) ** 2
        mask[rows] = squared < radius ** 2
    return mask


@torch.no_grad()
def label_propagation(feats: torch.Tensor, first_labels: torch.Tensor, context: int = 20,
                      radius: float = 12, topk: int = 10, temperature: float = 0.05) -> torch.Tensor:
    """Propagate the first frame's labels through a video, one target frame at a time.

    feats: [T, h, w, D] features of every frame (L2-normalised here). first_labels: [K+1, h, w]
    one-hot or soft labels of frame 0 at feature resolution (channel 0 = background).
    Returns soft labels [T, K+1, h, w] (frame 0 = first_labels), in feats' float dtype.

    Vectorised over the context: one batched affinity [h*w, (1 + context) * h*w] per target frame
    (queries chunked when that exceeds MAX_AFFINITY_ELEMENTS); keys and labels of the window live in
    ring buffers, so memory grows with `context`, not with T.
    """
    num_frames, h, w, dim = _check_inputs(feats, first_labels, context, topk, temperature)
    dtype = feats.dtype if feats.is_floating_point() else torch.float32
    cells, num_labels = h * w, first_labels.shape[0]
    # additive mask for previous frames: 0 inside the radius, -inf outside (faster than masked_fill)
    outside = torch.zeros(cells, cells, dtype=dtype).masked_fill_(~radius_mask(h, w, radius), float("-inf"))

    # slot 0 = first frame; slots 1..context = ring of the previous predicted frames
    keys = torch.zeros(1 + context, cells, dim, dtype=dtype)
    key_labels = torch.zeros(1 + context, cells, num_labels, dtype=dtype)
    keys[0] = F.normalize(feats[0].reshape(cells, dim).to(dtype), dim=-1)
    key_labels[0] = first_labels.reshape(num_labels, cells).T.to(dtype)

    out = torch.empty(num_frames, num_labels, h, w, dtype=dtype)
    out[0] = first_labels
    for t in range(1, num_frames):
        window = 1 + min(context, t - 1)  # the ring fills up during the first `context` frames
        query = F.normalize(feats[t].reshape(cells, dim).to(dtype), dim=-1)
        scaled = query / temperature  # scaling the small side saves a pass over the affinity
        window_keys = keys[:window].reshape(window * cells, dim)
        window_labels = key_labels[:window].reshape(window * cells, num_labels)
        k = min(topk, window * cells)
        chunk = max(1, MAX_AFFINITY_ELEMENTS // (window * cells))
        pred = torch.empty(cells, num_labels, dtype=dtype)
        for start in range(0, cells, chunk):
            rows = slice(start, start + chunk)
            affinity = (scaled[rows] @ window_keys.T).view(-1, window, cells)
            affinity[:, 1:] += outside[rows, None, :]
            weights, index = affinity.view(affinity.shape[0], -1).topk(k, dim=1)
            weights = weights.softmax(dim=1)
            pred[rows] = torch.einsum("qk,qkc->qc", weights, window_labels[index])
        out[t] = pred.T.reshape(num_labels, h, w)
        if context > 0:
            slot = 1 + (t - 1) % context
            keys[slot], key_labels[slot] = query, pred
    return out


@torch.no_grad()
def label_propagation_loop(feats: torch.Tensor, first_labels: torch.Tensor, context: int = 20,
                           radius: float = 12, topk: int = 10, temperature: float = 0.05) -> torch.Tensor:
    """Reference of `label_propagation`, written as plainly as possible: for every target frame,
    for every context frame, one affinity block, masked by the radius when it is a previous
    frame; then top-k over the concatenated blocks. Same inputs, same output."""
    num_frames, h, w, dim = _check_inputs(feats, first_labels, context, topk, temperature)
    dtype = feats.dtype if feats.is_floating_point() else torch.float32
    num_labels = first_labels.shape[0]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cell_xy = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(dtype)

    labels = [first_labels.to(dtype)]
    for t in range(1, num_frames):
        target = F.normalize(feats[t].reshape(h * w, dim).to(dtype), dim=-1)
        blocks, block_labels = [], []
        for c in [0] + list(range(max(1, t - context), t)):
            source = F.normalize(feats[c].reshape(h * w, dim).to(dtype), dim=-1)
            affinity = target @ source.T / temperature
            if c > 0:
                far = torch.cdist(cell_xy, cell_xy) >= radius
                affinity = affinity.masked_fill(far, float("-inf"))
            blocks.append(affinity)
            block_labels.append(labels[c].reshape(num_labels, h * w).T)
        affinity, context_labels = torch.cat(blocks, dim=1), torch.cat(block_labels, dim=0)
        weights, index = affinity.topk(min(topk, affinity.shape[1]), dim=1)
        weights = weights.softmax(dim=1)
        pred = (weights[:, :, None] * context_labels[index]).sum(dim=1)
        labels.append(pred.T.reshape(num_labels, h, w))
    return torch.stack(labels)


def _check_inputs(feats, first_labels, context, topk, temperature) -> tuple[int, int, int, int]:
    if feats.ndim != 4:
        raise ValueError(f"feats must be [T, h, w, D], got shape {tuple(feats.shape)}")
    if first_labels.ndim != 3 or tuple(first_labels.shape[1:]) != tuple(feats.shape[1:3]):
        raise ValueError(f"first_labels must be [K+1, h, w] with h, w = {tuple(feats.shape[1:3])}, "
                         f"got shape {tuple(first_labels.shape)}")
    if context < 0 or topk < 1 or temperature <= 0:
        raise ValueError(f"need context >= 0, topk >= 1, temperature > 0; got {context}, {topk}, {temperature}")
    return tuple(feats.shape)


# ----------------------------------------------------------------------------- label maps

def mask_to_soft_labels(mask: np.ndarray | torch.Tensor, num_labels: int,
                        size: tuple[int, int]) -> torch.Tensor:
    """Index mask [H, W] (ids 0..num_labels-1) -> soft labels [num_labels, h, w] at feature
    resolution `size` = (h, w): one-hot, then area-averaged, so each cell holds the fraction of
    its pixels that belong to each id. Ids >= num_labels (e.g. 255) count as background."""
    mask = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    mask = torch.where(mask < num_labels, mask, torch.zeros_like(mask))
    one_hot = F.one_hot(mask, num_labels).permute(2, 0, 1).float()
    return F.interpolate(one_hot[None], size=size, mode="area")[0]


def soft_labels_to_mask(soft_labels: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Soft labels [K+1, h, w] -> index mask [H, W] uint8 at image size `size` = (H, W):
    bilinear upsampling (half-pixel centres), then argmax over the labels."""
    upsampled = F.interpolate(soft_labels[None].float(), size=size, mode="bilinear", align_corners=False)
    return upsampled[0].argmax(dim=0).to(torch.uint8).numpy()


@dataclass(frozen=True)
class LabelPropagationSpec(ProbeSpec):
    """`probe:` settings of label propagation (see label_propagation)."""
    name: str = "label_propagation"
    pooling: str = "tokens"
    context: int = field(default=20, metadata={"min": 1})       # previous frames kept (plus the first frame)
    radius: float = field(default=12, metadata={"gt": 0})        # in feature cells, for the previous frames
    topk: int = field(default=10, metadata={"min": 1})
    temperature: float = field(default=0.05, metadata={"gt": 0})


class LabelPropagationProbe(Probe):
    """No training: val.feats {layer: [T, h, w, D]} of one video, val.targets the first frame's soft
    labels [K+1, h, w] -> outputs: soft labels [T, K+1, h, w] per layer."""
    Spec = LabelPropagationSpec
    produces = SOFT_MASKS
    selection = "none (no training)"
    # the settings of the reference command of Jabri et al. (2020), which the paper's DAVIS protocol follows
    REFERENCE = {"context": 20, "radius": 12, "topk": 10, "temperature": 0.05}

    def deviations(self, spec: LabelPropagationSpec) -> list[str]:
        return [f"{key} {getattr(spec, key)} (the reference: {value})" for key, value in self.REFERENCE.items()
                if getattr(spec, key) != value]

    def fit(self, train: ProbeData | None, val: ProbeData, spec: LabelPropagationSpec,
            ctx: ProbeContext) -> dict[int, LayerResult]:
        return {layer: LayerResult(outputs=label_propagation(val.feats[layer], val.targets, context=spec.context,
                                                             radius=spec.radius, topk=spec.topk,
                                                             temperature=spec.temperature))
                for layer in val.layers}
