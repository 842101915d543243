"""The raw-pixel baseline: each patch's pixels are its token, one layer, nothing learned.

    pixels                                      # patch 8, toto-tiny's input: 64 px, 8 frames, stride 4
    pixels:patch=16,resolution=224,frames=16,stride=4

Token (t, i, j) of layer 0 is the 3 x p x p pixels of patch (i, j) of frame t, channel-major, in
[0, 1]: the floor every layer of a model should beat. Its defaults are the bundled toto-tiny's
input so that its row of the default suite reads the same frames.
"""

from __future__ import annotations

import hashlib

import torch

from totobench.errors import ConfigError
from totobench.model.backbone import Backbone, ModelInputs

DEFAULTS = {"patch": 8, "resolution": 64, "frames": 8, "stride": 4}


class PixelsBackbone(Backbone):
    family = "pixels"

    def __init__(self, patch: int, resolution: int, frames: int, stride: int, name: str, device="cpu"):
        self.name, self.num_layers, self.dim, self.num_heads, self.params = name, 1, 3 * patch * patch, None, 0
        self.inputs = ModelInputs(resolution=resolution, patch_size=patch, num_frames=frames, frame_stride=stride)
        self.sha256 = hashlib.sha256(f"pixels:patch={patch}".encode()).hexdigest()
        self.notes = ("raw patch pixels in [0, 1] as tokens (one layer, no weights)",)
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def _forward(self, frames, layers, kind):
        B, T, C, H, W = frames.shape
        p = self.inputs.patch_size
        patches = frames.reshape(B, T, C, H // p, p, W // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return [patches.reshape(B, T, H // p, W // p, C * p * p)] * len(layers)

    def flops_per_token(self) -> int:
        return 0


def parse_options(rest: str) -> dict[str, int]:
    """"patch=16,resolution=224" -> DEFAULTS updated. ConfigError names a bad key or value."""
    options = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in DEFAULTS:
            raise ConfigError(f"--model pixels:{rest}: expected KEY=INT pairs with KEY one of "
                              f"{', '.join(DEFAULTS)}, got {part!r}")
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--model pixels:{rest}: {key} must be an integer >= 1, got {value!r}")
        options[key] = int(value)
    if options["resolution"] % options["patch"]:
        raise ConfigError(f"--model pixels:{rest}: resolution {options['resolution']} is not a multiple of "
                          f"patch {options['patch']}")
    return options


def load_pixels_backbone(rest: str, *, device="cpu", tokenizer=None, random_init: bool = False) -> PixelsBackbone:
    """Family "pixels" (a tokenizer or random-init changes nothing: there are no weights)."""
    if tokenizer is not None:
        raise ConfigError("--model pixels reads raw pixels; --tokenizer does not apply")
    o = parse_options(rest)
    name = "pixels" if o == DEFAULTS else "pixels:" + ",".join(f"{k}={v}" for k, v in o.items())
    return PixelsBackbone(o["patch"], o["resolution"], o["frames"], o["stride"], name, device)
