"""Frames to model input: every path resizes first (short side, or to a given size), then crops.

Used by every task and by pre-training, so a model reads frames prepared the same way in both.
Each function keeps the exact arithmetic the suite's published numbers were computed with.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T


def image_transform(resolution: int) -> T.Compose:
    """PIL image -> float [3, R, R] in [0, 1]: short side to R (antialiased), centre crop R x R."""
    return T.Compose([T.ToImage(), T.Resize(resolution, antialias=True), T.CenterCrop(resolution),
                      T.ToDtype(torch.float32, scale=True)])


def resize_and_crop(frames: torch.Tensor | np.ndarray, resolution: int, crop: int = 0, num_crops: int = 1,
                    keep_aspect: bool = True) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, R, R].

    keep_aspect: short side to R (antialiased bilinear), then crop `crop` of `num_crops` evenly
    spaced along the long side (one crop = centre). keep_aspect False: squash to R x R, no crop.
    """
    frames = torch.from_numpy(np.array(frames)) if isinstance(frames, np.ndarray) else frames
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if keep_aspect:
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    else:
        nh, nw = resolution, resolution
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    span_h, span_w = nh - resolution, nw - resolution
    frac = 0.5 if num_crops == 1 else crop / (num_crops - 1)
    top, left = round(span_h * frac), round(span_w * frac)
    x = x[..., top:top + resolution, left:left + resolution]
    return x.round().clamp(0, 255).to(torch.uint8)


def resize_to(frames: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float [T, 3, h, w] in [0, 1], (h, w) = size (or size x size), no crop
    (antialiased bilinear; the caller maps its outputs back to H x W)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2).float().div_(255)  # a writable copy
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.clamp_(0, 1)


def to_unit_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float in [0, 1]; float frames are returned as float32 unchanged."""
    if frames.dtype == torch.uint8:
        return frames.float().div_(255.0)
    return frames.float()
