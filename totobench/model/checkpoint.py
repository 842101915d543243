"""Checkpoint folders: write and read a Toto's config and weights (+ its visual tokenizer).

A folder holds (CONTRACTS.md):
    config.json              TotoConfig.to_dict() + {"architecture": "toto"}
    model.safetensors        the transformer weights; sha256 of these bytes identifies the model
    tokenizer/               VisualTokenizer.save() (config.json + model.safetensors), optional here
    training.json            facts about the run (command, wall time, steps, losses, ...), optional
    loss_curve.csv/.png, README.md   written by pre-training

This module works on configs and state dicts and never builds a model: `Toto.from_pretrained`
(toto.py) and `load_checkpoint` (tokens.py) do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from totobench.errors import CheckpointError, ConfigError
from totobench.io import atomic_write, atomic_write_json
from totobench.model.config import TotoConfig
from totobench.model.tokenizer import VisualTokenizer

ARCHITECTURE = "toto"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes and fp32 bytes of a state dict, streamed tensor by tensor."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{key}:{list(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def frozen(module: torch.nn.Module, device) -> torch.nn.Module:
    return module.to(device).eval().requires_grad_(False)


def weights_bytes(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """The exact bytes of model.safetensors for a state dict (as fp32); their sha256 names the weights."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    return save_safetensors_bytes(tensors, metadata={"format": "pt"})


def save_checkpoint(directory, model: torch.nn.Module, tokenizer: VisualTokenizer | None = None,
                    training: dict | None = None) -> str:
    """Write config.json, model.safetensors (fp32), tokenizer/ (if given) and training.json
    (if given) into `directory` (created), each file atomically. `model` is a Toto: anything with
    a `.config` (TotoConfig) and a `.state_dict()`. Returns the sha256 of model.safetensors."""
    directory = Path(directory)
    data = weights_bytes(model.state_dict())
    atomic_write(directory / "model.safetensors", data)
    atomic_write_json(directory / "config.json", {**model.config.to_dict(), "architecture": ARCHITECTURE})
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer")
    if training is not None:
        atomic_write_json(directory / "training.json", training)
    return sha256_bytes(data)


def read_json(path: Path):
    """The content of a JSON file. Raises CheckpointError naming the file if it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def read_config(directory) -> TotoConfig:
    """The TotoConfig of a checkpoint folder. Raises CheckpointError naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected the Toto config as JSON)")
    d = read_json(path)
    if not isinstance(d, dict) or d.get("architecture") != ARCHITECTURE:
        found = d.get("architecture") if isinstance(d, dict) else type(d).__name__
        raise CheckpointError(f"{path}: architecture is {found!r}, expected {ARCHITECTURE!r}")
    try:
        return TotoConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights(directory, like: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """model.safetensors checked against the names and shapes of `like` (the state dict of a model
    built from config.json): (state dict, sha256 of the file bytes).
    Raises CheckpointError for a missing or unreadable file, a missing or unexpected tensor,
    or a tensor whose shape differs from what config.json implies."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected the transformer weights as safetensors)")
    data = path.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    expected = {k: tuple(v.shape) for k, v in like.items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match config.json "
                              f"(missing: {', '.join(missing[:3]) or 'none'}{' ...' if len(missing) > 3 else ''}; "
                              f"unexpected: {', '.join(unexpected[:3]) or 'none'}{' ...' if len(unexpected) > 3 else ''})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{path}: {name} has shape {list(tensors[name].shape)}, "
                                  f"config.json implies {list(shape)}")
    return tensors, sha256_bytes(data)


def read_training(directory) -> dict:
    """training.json as a dict, {} if absent."""
    path = Path(directory) / "training.json"
    if not path.is_file():
        return {}
    return read_json(path)


def read_tokenizer(directory, config: TotoConfig, device="cpu") -> VisualTokenizer | None:
    """The tokenizer/ sub-folder as a VisualTokenizer, or None if the folder is absent.
    Raises CheckpointError if its codebook or downsampling does not fit `config`."""
    tok_dir = Path(directory) / "tokenizer"
    if not tok_dir.exists():
        return None
    tokenizer = VisualTokenizer.load(tok_dir, device=device)
    if tokenizer.codebook_size != config.codebook_size:
        raise CheckpointError(f"{tok_dir}: tokenizer codebook_size is {tokenizer.codebook_size}, "
                              f"config.json expects {config.codebook_size}")
    if tokenizer.downsample != config.patch_size:
        raise CheckpointError(f"{tok_dir}: tokenizer downsample is {tokenizer.downsample}, "
                              f"config.json expects patch_size {config.patch_size}")
    return tokenizer
