"""Backbones: what `--model SPEC` resolves to, loaded and ready to give features.

    backbone = load_backbone("toto-tiny")              # checkpoints/toto-tiny
    backbone = load_backbone("random-init:toto-tiny")  # same config + tokenizer, seed-0 random weights
    backbone = load_backbone("/path/to/checkpoint")    # any checkpoint folder
    feats = backbone.forward_frames(frames, layers=[0, -1], kind="video")   # 2 x [B, T, h*w, D]

A SPEC is "FAMILY:REST" when FAMILY is a model family of `totobench.registry.MODELS`, else a
bundled name or a checkpoint folder (family "checkpoint"). Each family is a loader
`load(rest, device) -> Backbone`; the two of this module are registered there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from totobench.errors import CheckpointError, ConfigError, DataError
from totobench.model.checkpoint import (load_tokenizer, read_config, read_training, read_weights,
                                         sha256_bytes, weights_bytes)
from totobench.model.config import TotoConfig
from totobench.model.tokenizer import VisualTokenizer
from totobench.model.toto import Toto
from totobench.paths import checkpoints_dir
from totobench.registry import MODELS, did_you_mean

RANDOM_INIT = "random-init:"
BUNDLED = ("toto-tiny",)          # names that always resolve to checkpoints/<name>
ENCODE_BATCH = 256                # frames per tokenizer call, to bound the conv activations' memory


@dataclass
class Backbone:
    name: str
    model: Toto
    tokenizer: VisualTokenizer
    sha256: str
    path: Path | None
    tokenizer_sha256: str = ""

    @property
    def features_id(self) -> str:
        """What features depend on: the transformer's weights and the tokenizer's (a retrained
        tokenizer with unchanged transformer weights must never reuse cached features)."""
        return self.sha256 if not self.tokenizer_sha256 else f"{self.sha256}+tok:{self.tokenizer_sha256}"

    @property
    def config(self) -> TotoConfig:
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.model.config.n_layers

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _check_frames(self, frames: torch.Tensor) -> None:
        """Frames of any size whose sides are multiples of the patch size: the tokenizer is
        convolutional and RoPE positions extend, so a model trained at config.resolution also reads
        larger frames (the paper evaluates DAVIS at a higher resolution than it pre-trains at)."""
        p = self.config.patch_size
        if (frames.ndim != 5 or frames.shape[2] != 3 or frames.shape[3] % p or frames.shape[4] % p
                or frames.shape[3] == 0 or frames.shape[4] == 0):
            r = self.config.resolution
            raise DataError(f"{self.name}: frames must be [B, T, 3, H, W] in [0, 1] with H and W "
                            f"multiples of the patch size {p} (the model's resolution is {r}), "
                            f"got {list(frames.shape)}")

    @torch.no_grad()
    def tokenize(self, frames: torch.Tensor) -> torch.Tensor:
        """frames FloatTensor [B, T, 3, H, W] in [0, 1], H and W multiples of the patch size
        (usually H = W = config.resolution) -> LongTensor [B, T, h*w] of codebook ids, h = H / patch,
        raster order. Each frame is tokenized alone."""
        self._check_frames(frames)
        B, T = frames.shape[:2]
        flat = frames.reshape(B * T, *frames.shape[2:]).to(self.device, torch.float32)
        ids = torch.cat([self.tokenizer.encode(chunk) for chunk in flat.split(ENCODE_BATCH)])
        return ids.reshape(B, T, -1)

    @torch.no_grad()
    def forward_frames(self, frames: torch.Tensor, layers: list[int], kind: str) -> list[torch.Tensor]:
        """Features of every frame token at each requested layer, fp32.

        frames [B, T, 3, H, W] in [0, 1]. kind="video": one sequence per clip,
        [video_start, frame 0 tokens, ..., frame T-1 tokens]. kind="image": every image is its own
        sequence [image_start, image tokens], so images never see each other. One transformer pass;
        the start token's output is dropped. Returns one [B, T, h*w, D] tensor per layer, in the
        order of `layers` (negative indices count from the end).
        Raises ConfigError for a bad kind or layer, DataError for frames of the wrong shape.
        """
        if kind not in ("image", "video"):
            raise ConfigError(f"kind must be 'image' or 'video', got {kind!r}")
        ids = self.tokenize(frames)                                     # [B, T, hw]
        B, T, hw = ids.shape
        if kind == "image":
            sequences, start = ids.reshape(B * T, hw), self.config.image_start_id
        else:
            sequences, start = ids.reshape(B, T * hw), self.config.video_start_id
        starts = torch.full((sequences.shape[0], 1), start, dtype=torch.long, device=ids.device)
        feats = self.model.forward_intermediates(torch.cat([starts, sequences], dim=1), layers)
        return [f[:, 1:].reshape(B, T, hw, -1) for f in feats]


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
    return "checkpoint", spec


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
                      f"(or give a checkpoint folder)")


def load_backbone(spec: str, device: str = "cpu") -> Backbone:
    """A frozen (eval, no grad) backbone with its tokenizer. `spec`: "FAMILY:REST" for a family
    registered in MODELS (e.g. "random-init:toto-tiny"), a registered name (see list_models()) or a
    checkpoint folder. Raises ConfigError for an unknown name, CheckpointError for a bad folder."""
    family, rest = split_spec(spec)
    if not rest.strip():
        raise ConfigError(f"--model {spec!r}: expected a registered name or a checkpoint folder after {family!r}"
                          if ":" in spec else "--model: expected a registered name or a checkpoint folder, got ''")
    load = MODELS.get(family)
    with torch.random.fork_rng(devices=[]):   # building modules draws random numbers: not the caller's
        return load(rest, device)


def load_checkpoint(directory, device: str = "cpu") -> tuple[Toto, VisualTokenizer | None, str, dict]:
    """A checkpoint folder -> (Toto in eval mode, its tokenizer or None, sha256 of model.safetensors,
    training.json as a dict). Raises CheckpointError naming the file for anything missing, corrupt
    or mismatched."""
    config = read_config(directory)
    model = Toto(config)
    weights, sha = read_weights(directory, model.state_dict())
    model.load_state_dict(weights)
    return model.to(device).eval(), load_tokenizer(directory, config, device), sha, read_training(directory)


def load_checkpoint_backbone(name_or_path: str, device: str) -> Backbone:
    """Family "checkpoint": a registered name or a checkpoint folder, as trained."""
    path = resolve_checkpoint(name_or_path)
    model, tokenizer, sha, _ = load_checkpoint(path, device)
    return _frozen(_name(name_or_path, path), model, tokenizer, path, sha, device)


def load_random_init_backbone(name_or_path: str, device: str) -> Backbone:
    """Family "random-init": the config and tokenizer of a checkpoint, weights from torch.manual_seed(0)."""
    path = resolve_checkpoint(name_or_path)
    config = read_config(path)
    torch.manual_seed(0)
    model = Toto(config)
    tokenizer = load_tokenizer(path, config, device)
    sha = sha256_bytes(weights_bytes(model.state_dict()))
    return _frozen(RANDOM_INIT + _name(name_or_path, path), model, tokenizer, path, sha, device, random_init=True)


def _name(name_or_path: str, path: Path) -> str:
    # a folder given by path is named after the folder, so result paths stay short
    return name_or_path if name_or_path in list_models() else path.name


def _frozen(name: str, model: Toto, tokenizer: VisualTokenizer | None, path: Path, sha: str, device: str,
            random_init: bool = False) -> Backbone:
    """The Backbone of `model` and the tokenizer of checkpoint `path`, on `device`, in eval mode,
    without gradients. Raises CheckpointError when the checkpoint has no tokenizer."""
    if tokenizer is None:
        raise CheckpointError(f"{path / 'tokenizer'}: missing (a backbone needs the visual tokenizer: "
                              f"tokenizer/config.json and tokenizer/model.safetensors)")
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = tokenizer.to(device).eval().requires_grad_(False)
    return Backbone(name=name, model=model, tokenizer=tokenizer, sha256=sha,
                    tokenizer_sha256=sha256_bytes(weights_bytes(tokenizer.state_dict())),
                    path=None if random_init else path)
