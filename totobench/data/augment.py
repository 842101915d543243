"""Training-time augmentation of probe inputs (`probe.augment`), deterministic per (seed, epoch, item).

The reference probes train on augmented inputs; a streamed probe epoch reads its training set through
these, so a resumed epoch sees the very same pixels:

- ImageNet (`augment_image`): RandomResizedCrop, area scale (0.08, 1), aspect ratio (3/4, 4/3), bicubic,
  to the model's resolution, then a horizontal flip with probability 0.5: the MAE linear-probe recipe
  (facebookresearch/mae `main_linprobe.py`), which AIM's attentive probe follows (apple/ml-aim ships
  no train transform: `aim-v1/aim/v1/torch/data.py` raises NotImplementedError for it).
- Kinetics (`augment_clip`): one RandomResizedCrop box, scale (0.08, 1), ratio (3/4, 4/3), bilinear, for
  every frame of a clip; no flip: V-JEPA and V-JEPA 2's `video_classification_frozen` build their
  training transform with `random_horizontal_flip=False`. Their RandAugment (rand-m7-n4-mstd0.5-inc1)
  and random erasing (p 0.25) are left out (tasks record it as a deviation). The random clip
  position is drawn by the task's clip sampler from the same generator.

Every op runs on uint8 tensors with torch / torchvision and an explicit torch.Generator: no PIL
randomness, no global random state.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

SCALE = (0.08, 1.0)          # RandomResizedCrop area fraction (torchvision's default, MAE's and V-JEPA's)
RATIO = (3 / 4, 4 / 3)       # RandomResizedCrop aspect ratio (width / height)


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch.Generator that depends only on (seed, epoch, index): the item's draws, whatever the
    order, the worker or the process that reads it."""
    digest = hashlib.sha256(f"totobench-augment:{seed}:{epoch}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def random_resized_crop_box(height: int, width: int, generator: torch.Generator, scale=SCALE,
                            ratio=RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box in a height x width frame.

    torchvision's sampling: up to 10 draws of an area fraction in `scale` and a log-uniform aspect
    ratio in `ratio`; the first box that fits is placed uniformly. If none fits, the largest centred
    box whose aspect ratio is clamped into `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    frame_ratio = width / height
    if frame_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif frame_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def augment_image(image: torch.Tensor, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [1, 3, R, R]: RandomResizedCrop (bicubic, antialiased) to R x R, then a
    horizontal flip with probability 0.5."""
    top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator)
    out = TF.resized_crop(image, top, left, h, w, [resolution, resolution],
                          interpolation=InterpolationMode.BICUBIC, antialias=True)
    if float(torch.rand((), generator=generator)) < 0.5:
        out = out.flip(-1)
    return out.unsqueeze(0)


def augment_clip(frames: torch.Tensor, resolution: int, generator: torch.Generator) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, R, R]: one RandomResizedCrop box for every frame of the clip
    (bilinear, antialiased), so motion inside the clip is kept; no flip (V-JEPA's setting)."""
    x = frames.permute(0, 3, 1, 2)
    top, left, h, w = random_resized_crop_box(x.shape[-2], x.shape[-1], generator)
    return TF.resized_crop(x, top, left, h, w, [resolution, resolution],
                           interpolation=InterpolationMode.BILINEAR, antialias=True)


def image_to_uint8(image) -> torch.Tensor:
    """A PIL RGB image -> uint8 [3, H, W]."""
    return TF.pil_to_tensor(image)
