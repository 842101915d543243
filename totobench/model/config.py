"""TotoConfig: the shape of a Toto and of the token sequences it reads, and the named presets.

Kept apart from the model (toto.py) so that checkpoint and HF files can be read and written
without building one.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields

from totobench.errors import ConfigError


def check_positive_fields(obj, ints: tuple[str, ...], numbers: tuple[str, ...], where: str) -> None:
    """ConfigError naming the field unless each of `ints` is an integer >= 1 and each of `numbers`
    a finite number > 0 (config files are JSON: a quoted "8" is a string, not a size)."""
    for name in ints:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}: {name} must be an integer >= 1, got {value!r}")
    for name in numbers:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{where}: {name} must be a number > 0, got {value!r}")


def resolve_layers(layers, n: int) -> list[int]:
    """Layer indices (an int or a list; negatives count from the end) of a model with n layers ->
    non-negative indices, same order. Raises ConfigError naming the valid range."""
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ConfigError("no layers requested; give at least one layer index")
    resolved = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ConfigError(f"layer index {i!r} is not an integer")
        if not -n <= i < n:
            raise ConfigError(f"layer {i} is out of range for a model with {n} layers: "
                              f"valid indices are 0..{n - 1} or -{n}..-1")
        resolved.append(i % n)
    return resolved


@dataclass
class TotoConfig:
    dim: int
    n_layers: int
    n_heads: int
    mlp_hidden: int
    codebook_size: int        # visual tokenizer vocabulary; ids [0, codebook_size)
    vocab_size: int           # codebook + image start + video start + end (+ padding)
    max_seq_len: int
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    resolution: int = 128     # square frame size in pixels fed to the tokenizer
    patch_size: int = 8       # tokenizer downsampling: one token per patch_size x patch_size pixels
    num_frames: int = 16      # frames per video clip
    frame_stride: int = 4     # take every k-th frame of a video
    images_per_sequence: int = 16
    # muP (pretrain/mup.py): the width the hyper-parameters were tuned at; logits are scaled by
    # mup_base_dim / dim and attention scores by 1 / head_dim. None: standard parametrization.
    mup_base_dim: int | None = None

    def __post_init__(self):
        check_positive_fields(self, ("dim", "n_layers", "n_heads", "mlp_hidden", "codebook_size", "vocab_size",
                                     "max_seq_len", "resolution", "patch_size", "num_frames", "frame_stride",
                                     "images_per_sequence"), ("rope_base", "norm_eps"), "TotoConfig")
        if self.mup_base_dim is not None:
            check_positive_fields(self, ("mup_base_dim",), (), "TotoConfig")
        if self.dim % self.n_heads:
            raise ConfigError(f"TotoConfig: dim={self.dim} must be divisible by n_heads={self.n_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError(f"TotoConfig: head dim {self.dim // self.n_heads} must be even for RoPE")
        if self.vocab_size < self.codebook_size + 3:
            raise ConfigError(f"TotoConfig: vocab_size={self.vocab_size} must be >= codebook_size + 3 "
                              f"= {self.codebook_size + 3} (image start, video start, end tokens)")
        if self.resolution % self.patch_size:
            raise ConfigError(f"TotoConfig: resolution={self.resolution} must be a multiple of "
                              f"patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def image_start_id(self) -> int:
        return self.codebook_size

    @property
    def video_start_id(self) -> int:
        return self.codebook_size + 1

    @property
    def end_id(self) -> int:
        return self.codebook_size + 2

    @property
    def grid(self) -> int:
        """Tokens per side of one frame."""
        return self.resolution // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TotoConfig":
        """Build from a dict such as a checkpoint's config.json; extra keys (e.g. "architecture")
        are ignored, a missing field raises ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"Toto config must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [n for n in required if n not in d]
        if missing:
            raise ConfigError(f"Toto config is missing field(s) {', '.join(missing)}")
        return cls(**{k: d[k] for k in names if k in d})

    @classmethod
    def preset(cls, name: str) -> "TotoConfig":
        """`toto-base`, `toto-large`, `toto-1b` (the paper's shapes) or `toto-tiny` (ours)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown Toto preset {name!r}; expected one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


# The paper's models read 16 frames (every 4th) of 128 px video through an 8k dVAE codebook.
_PAPER = dict(codebook_size=8192, vocab_size=8192 + 3, max_seq_len=4096, resolution=128,
              num_frames=16, frame_stride=4, images_per_sequence=16)
PRESETS: dict[str, dict] = {
    "toto-base": dict(dim=768, n_layers=12, n_heads=12, mlp_hidden=3072, **_PAPER),
    "toto-large": dict(dim=1024, n_layers=16, n_heads=16, mlp_hidden=4096, **_PAPER),
    "toto-1b": dict(dim=2048, n_layers=22, n_heads=16, mlp_hidden=5632, **_PAPER),
    # Ours, for a 2-core CPU. 256 codes: with 1024 no Toto of this shape learned to copy the previous
    # frame within its 45-minute budget (benchmarks/copy_emergence.py). RoPE base 500: its sequences are
    # 513 tokens, and a lower base puts more of the 16 frequency pairs of a 32-channel head in the range
    # that tells offset 64 (same place, previous frame) from its neighbours.
    "toto-tiny": dict(dim=256, n_layers=8, n_heads=8, mlp_hidden=704, codebook_size=256,
                      vocab_size=259, max_seq_len=1024, rope_base=500.0, resolution=64, num_frames=8,
                      frame_stride=4, images_per_sequence=8),
}
