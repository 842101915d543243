"""Backbones: what `--model SPEC` resolves to, one contract for every model family.

    backbone = load_backbone("toto-tiny")                          # checkpoints/toto-tiny
    backbone = load_backbone("random-init:toto-tiny")              # same shape + tokenizer, seed-0 weights
    backbone = load_backbone("llama:DIR", tokenizer="dvae:encoder.pkl")
    backbone = load_backbone("timm:vit_small_patch16_224")         # random init, never a download
    feats = backbone.forward_frames(frames, layers=[0, -1], kind="video")   # 2 x [B, T', h, w, D]

A SPEC is "FAMILY:REST" when FAMILY is a model family of `totobench.registry.MODELS`, else a
bundled name or a checkpoint folder (family "checkpoint"). Each family is a loader
`load(rest, device, tokenizer, random_init) -> Backbone`. A tokenizer SPEC ("dvae:FILE",
"vqvae:DIR") goes through `load_tokenizer`, dispatched on `totobench.registry.TOKENIZERS`.

Every family implements `Backbone._forward`; the base class checks the frames, the kind and the
layers, and the shape of what comes back. Layer i is the output of block i before any final norm.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from totobench.errors import CheckpointError, ConfigError, DataError
from totobench.model.config import resolve_layers
from totobench.paths import checkpoints_dir
from totobench.registry import MODELS, TOKENIZERS, did_you_mean

KINDS = ("image", "video")
RANDOM_INIT = "random-init:"
# The clip of the paper's video tasks (16 frames, every 4th): the default clip of a model that does not
# define one (image models read its frames one by one; VideoMAE-style models have no stride of their own)
PAPER_CLIP = {"num_frames": 16, "frame_stride": 4}
# --precision: the autocast dtype of the forward (None: plain fp32)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(choice: str | None, device: torch.device) -> str:
    """--precision: fp32, bf16 or fp16; None: bf16 on CUDA, fp32 on CPU. ConfigError otherwise."""
    precision = choice or ("bf16" if device.type == "cuda" else "fp32")
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision


def full_precision(device: torch.device):
    """A context with autocast off on `device`: for discrete steps such as a tokenizer's nearest-code
    lookup (under bf16 ~3% of toto-tiny's codes flip and its features move by ~9%; in fp32 by 0.3%)."""
    return torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext()


@dataclass(frozen=True)
class ModelInputs:
    """The frames a backbone reads; a task's `input:` values left null are taken from here."""
    resolution: int               # the square frame size it was trained at (pixels)
    patch_size: int               # pixels per token side: h = H / patch_size
    num_frames: int = 1           # clip length of a video task
    frame_stride: int = 1         # every k-th frame of the video
    tubelet: int = 1              # frames per token in time: T' = T / tubelet (video models)
    fixed_size: bool = False      # True: only resolution x resolution frames (fixed position table)
    fixed_frames: bool = False    # True: a video clip must have exactly num_frames frames

    def as_dict(self) -> dict:
        return asdict(self)


class Backbone:
    """One model, frozen, ready to give per-layer token grids.

    A family sets the attributes below in its constructor and implements `_forward`.
    `sha256` identifies the weights (and `tokenizer_sha256` the tokenizer's): cached features
    are keyed by both (`features_id`)."""

    family: str = ""
    name: str
    num_layers: int
    dim: int
    num_heads: int | None
    params: int
    inputs: ModelInputs
    sha256: str
    tokenizer_sha256: str = ""
    tokenizer_name: str | None = None     # the tokenizer spec, for token models
    path: Path | None = None
    notes: tuple[str, ...] = ()           # how the family reads frames, for `info` and the result
    precision: str = "fp32"               # forward under autocast in this dtype (PRECISIONS; the runner sets it)

    # ------------------------------------------------------------------ what each family supplies
    def _forward(self, frames: torch.Tensor, layers: list[int], kind: str) -> list[torch.Tensor]:
        """frames [B, T, 3, H, W] in [0, 1] on self.device, checked; layers non-negative, checked
        -> one [B, T', h, w, D] float tensor per layer."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def token_grid(self, frames: int, height: int, width: int, kind: str = "video") -> tuple[int, int, int]:
        """(T', h, w) of the features of `frames` frames of height x width pixels."""
        p, t = self.inputs.patch_size, self.inputs.tubelet
        return (frames if kind == "image" or t == 1 else frames // t, height // p, width // p)

    # ------------------------------------------------------------------ shared
    @property
    def features_id(self) -> str:
        """What features depend on: the weights and the tokenizer's (a retrained tokenizer with
        unchanged transformer weights must never reuse cached features)."""
        out = self.sha256 if not self.tokenizer_sha256 else f"{self.sha256}+tok:{self.tokenizer_sha256}"
        return out if self.precision == "fp32" else f"{out}+{self.precision}"  # bf16 features differ

    def resolve_layers(self, layers) -> list[int]:
        """Layer indices (negatives count from the end) -> non-negative indices, same order.
        Raises ConfigError naming the valid range for an index out of range."""
        return resolve_layers(layers, self.num_layers)

    def check_frames(self, frames: torch.Tensor, kind: str) -> None:
        """DataError unless frames are [B, T, 3, H, W] with sides this model reads."""
        p, r = self.inputs.patch_size, self.inputs.resolution
        ok = (frames.ndim == 5 and frames.shape[2] == 3 and frames.shape[3] > 0 and frames.shape[4] > 0
              and not frames.shape[3] % p and not frames.shape[4] % p)
        if not ok:
            raise DataError(f"{self.name}: frames must be [B, T, 3, H, W] in [0, 1] with H and W "
                            f"multiples of the patch size {p} (the model's resolution is {r}), "
                            f"got {list(frames.shape)}")
        if self.inputs.fixed_size and tuple(frames.shape[3:]) != (r, r):
            raise DataError(f"{self.name}: reads {r}x{r} frames only (a fixed position table), got "
                            f"{frames.shape[3]}x{frames.shape[4]}; set input.resolution to {r}")
        t = self.inputs.tubelet
        if kind == "video" and self.inputs.fixed_frames and frames.shape[1] != self.inputs.num_frames:
            raise DataError(f"{self.name}: reads clips of exactly {self.inputs.num_frames} frames, got "
                            f"{frames.shape[1]}; set input.frames to {self.inputs.num_frames}")
        if kind == "video" and frames.shape[1] % t:
            raise DataError(f"{self.name}: a clip must have a multiple of {t} frames (its tubelet), "
                            f"got {frames.shape[1]}")

    @torch.no_grad()
    def forward_frames(self, frames: torch.Tensor, layers, kind: str) -> list[torch.Tensor]:
        """Features of every token at each requested layer: frames [B, T, 3, H, W] in [0, 1]
        -> one [B, T', h, w, D] fp32 tensor per layer, in the order of `layers` (negative indices
        count from the end), from one forward pass (under autocast when `precision` is bf16 or
        fp16; the features come back fp32 either way). kind="image": every frame is read alone
        (T' = T); kind="video": a clip is read as one sequence (T' = T / tubelet).
        Raises ConfigError for a bad kind or layer, DataError for frames this model cannot read."""
        if kind not in KINDS:
            raise ConfigError(f"kind must be 'image' or 'video', got {kind!r}")
        take = self.resolve_layers(layers)
        self.check_frames(frames, kind)
        frames = frames.to(self.device, torch.float32)
        dtype = PRECISIONS[self.precision]
        with torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            out = self._forward(frames, take, kind)
        grid = (frames.shape[0], *self.token_grid(frames.shape[1], frames.shape[3], frames.shape[4], kind), self.dim)
        for f in out:
            if tuple(f.shape) != grid:
                raise RuntimeError(f"{self.name}: {type(self).__name__}._forward gave {list(f.shape)}, "
                                   f"expected {list(grid)}")
        return [f.float() for f in out]

    def flops_per_token(self) -> int:
        """Forward FLOPs (2 x multiply-accumulates) per output token of one default input: a clip
        of inputs.num_frames frames at inputs.resolution through every layer, counted by
        totobench.model.flops.count_flops."""
        from totobench.model.flops import count_flops
        i = self.inputs
        kind = "video" if i.num_frames > 1 else "image"
        frames = torch.zeros(1, i.num_frames, 3, i.resolution, i.resolution, device=self.device)
        flops = count_flops(lambda: self._forward(frames, list(range(self.num_layers)), kind))
        t, h, w = self.token_grid(i.num_frames, i.resolution, i.resolution, kind)
        return round(flops / (t * h * w))

    def describe(self) -> dict[str, Any]:
        """What `totobench info` prints and a result records of the model."""
        r = self.inputs.resolution
        return {"name": self.name, "family": self.family, "num_layers": self.num_layers, "dim": self.dim,
                "num_heads": self.num_heads, "params": self.params, "tokenizer": self.tokenizer_name,
                "inputs": self.inputs.as_dict(),
                "token_grid": list(self.token_grid(self.inputs.num_frames, r, r)),
                "notes": list(self.notes)}


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------- names and loaders
BUNDLED = ("toto-tiny",)          # names that always resolve to checkpoints/<name>


def list_models() -> list[str]:
    """Registered names: the bundled checkpoints, every folder of checkpoints/ with a config.json,
    and the random-init baseline of each."""
    names = set(BUNDLED)
    root = checkpoints_dir()
    if root.is_dir():
        names |= {p.name for p in root.iterdir() if (p / "config.json").is_file()}
    names = sorted(names)
    return names + [RANDOM_INIT + n for n in names]


def split_spec(spec: str) -> tuple[str, str]:
    """`FAMILY:REST` -> (FAMILY, REST) when FAMILY is registered in MODELS, else ("checkpoint", spec)."""
    family, sep, rest = spec.partition(":")
    if sep and family in MODELS:
        return family, rest
    if spec in MODELS:   # a family that needs nothing after it: "pixels"
        return spec, ""
    return "checkpoint", spec


def load_backbone(spec: str, tokenizer=None, device: str = "cpu") -> Backbone:
    """A frozen (eval, no grad) backbone. `spec`: "FAMILY:REST" for a family registered in MODELS
    ("llama:DIR", "timm:ARCH", "hf:DIR", "preset:NAME", "random-init:SPEC", "pixels", ...), a
    registered name (see list_models()) or a checkpoint folder. `tokenizer`: a tokenizer spec or
    object for the families over visual tokens (None: the model's own, where it has one).
    Raises ConfigError for an unknown name, CheckpointError for a bad folder or file."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError("--model: expected a model spec (`totobench ls models`), got ''")
    random_init = spec.startswith(RANDOM_INIT)
    inner = spec[len(RANDOM_INIT):] if random_init else spec
    if random_init and inner.startswith(RANDOM_INIT):
        raise ConfigError(f"--model {spec!r}: random-init: is given twice")
    family, rest = split_spec(inner)
    if family == "pixels" or (family != "checkpoint" and rest.strip()) or (family == "checkpoint" and inner.strip()):
        load = MODELS.get(family)
    else:
        raise ConfigError(f"--model {spec!r}: expected {MODELS.description(family)}" if family != "checkpoint"
                          else f"--model {spec!r}: expected a model spec (`totobench ls models`)")
    # building modules draws random numbers: not the caller's; and a model without weights (random-init:,
    # timm:ARCH, preset:) gets the same ones in every process, so its cached features are reused
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = load(rest, device=device, tokenizer=tokenizer, random_init=random_init)
    if random_init:
        backbone.name = RANDOM_INIT + backbone.name
        backbone.path = None
    return backbone


def load_tokenizer(spec, device: str = "cpu"):
    """A tokenizer: `encode(frames [N, 3, H, W] floats in [0, 1]) -> codes [N, H/d, W/d]` (long,
    d = its `downsample`: 8 for the dVAE), with `codebook_size`, `downsample`, `name` and `sha256`.
    `spec`: "dvae:FILE" (the DALL-E dVAE encoder: its official encoder.pkl, a state dict or a
    safetensors file), "vqgan:PATH" (a taming VQGAN) or "vqvae:DIR" (a totobench tokenizer
    folder). An object that already has `encode` is returned as it is."""
    if spec is None or (not isinstance(spec, str) and hasattr(spec, "encode")):
        return spec
    family, sep, rest = str(spec).partition(":")
    if not sep or family not in TOKENIZERS:
        raise ConfigError(f"--tokenizer {spec!r}: expected FAMILY:PATH with FAMILY one of "
                          f"{', '.join(TOKENIZERS.names())}{did_you_mean(family, TOKENIZERS.names())}")
    if not rest.strip():
        raise ConfigError(f"--tokenizer {spec!r}: expected a path after {family + ':'!r}")
    return TOKENIZERS.get(family)(rest, device=device)


def resolve_checkpoint(name_or_path: str) -> Path:
    """A registered name or a checkpoint folder path -> the folder.
    Raises ConfigError with the closest name for an unknown one, CheckpointError if a registered
    checkpoint has not been produced yet."""
    if not name_or_path.strip():
        raise ConfigError("model '': expected a registered name or a checkpoint folder")
    registered = [n for n in list_models() if not n.startswith(RANDOM_INIT)]
    if name_or_path in registered:
        path = checkpoints_dir() / name_or_path
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: the {name_or_path} checkpoint is missing; produce it with "
                                  f"`totobench pretrain --config FILE --out {path}`")
        return path
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"model {name_or_path!r} is a file; expected a checkpoint folder or a registered name")
    family, sep, _ = name_or_path.partition(":")
    if sep and "/" not in family:
        raise ConfigError(f"unknown model family {family!r} in {name_or_path!r}{did_you_mean(family, MODELS.names())}")
    raise ConfigError(f"unknown model {name_or_path!r}{did_you_mean(name_or_path, list_models())} "
                      f"(or give a checkpoint folder, or FAMILY:... with a family of `totobench ls models`)")
