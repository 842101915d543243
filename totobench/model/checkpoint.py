"""Checkpoint folders: save, load and describe a Toto (+ its visual tokenizer).

A folder holds (CONTRACTS.md):
    config.json              TotoConfig.to_dict() + {"architecture": "toto"}
    model.safetensors        the transformer weights; sha256 of these bytes identifies the model
    tokenizer/               VisualTokenizer.save() (config.json + model.safetensors), optional here
    training.json            facts about the run (command, wall time, steps, losses, ...), optional
    loss_curve.csv/.png, README.md   written by pre-training
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from totobench.errors import CheckpointError, ConfigError
from totobench.model.toto import Toto, TotoConfig

ARCHITECTURE = "toto"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_bytes(model: Toto) -> bytes:
    """The exact bytes of model.safetensors for `model` (fp32); their sha256 names the weights."""
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    return save_safetensors_bytes(tensors, metadata={"format": "pt"})


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(directory, model: Toto, tokenizer=None, training: dict | None = None) -> str:
    """Write config.json, model.safetensors (fp32), tokenizer/ (if given) and training.json
    (if given) into `directory` (created). Each file is written to a temp name then renamed.
    Returns the sha256 of model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = weights_bytes(model)
    tmp = directory / "model.safetensors.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, directory / "model.safetensors")
    _write_json(directory / "config.json", {**model.config.to_dict(), "architecture": ARCHITECTURE})
    if tokenizer is not None:
        tokenizer.save(directory / "tokenizer")
    if training is not None:
        _write_json(directory / "training.json", training)
    return sha256_bytes(data)


def read_config(directory) -> TotoConfig:
    """The TotoConfig of a checkpoint folder. Raises CheckpointError naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint folder not found")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected the Toto config as JSON)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or d.get("architecture") != ARCHITECTURE:
        found = d.get("architecture") if isinstance(d, dict) else type(d).__name__
        raise CheckpointError(f"{path}: architecture is {found!r}, expected {ARCHITECTURE!r}")
    try:
        return TotoConfig.from_dict(d)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def read_weights(directory, config: TotoConfig) -> tuple[dict[str, torch.Tensor], str]:
    """model.safetensors checked against `config`: (state dict, sha256 of the file bytes).
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
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Toto(config).state_dict().items()}
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
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(directory, config: TotoConfig, device="cpu"):
    """The tokenizer/ sub-folder as a VisualTokenizer, or None if the folder is absent."""
    tok_dir = Path(directory) / "tokenizer"
    if not tok_dir.exists():
        return None
    from totobench.model.tokenizer import VisualTokenizer
    tokenizer = VisualTokenizer.load(tok_dir, device=device)
    if tokenizer.codebook_size != config.codebook_size:
        raise CheckpointError(f"{tok_dir}: tokenizer codebook_size is {tokenizer.codebook_size}, "
                              f"config.json expects {config.codebook_size}")
    if tokenizer.downsample != config.patch_size:
        raise CheckpointError(f"{tok_dir}: tokenizer downsample is {tokenizer.downsample}, "
                              f"config.json expects patch_size {config.patch_size}")
    return tokenizer


def load_model(directory, device="cpu") -> tuple[Toto, str]:
    """(Toto in eval mode with the folder's weights, sha256 of model.safetensors)."""
    config = read_config(directory)
    tensors, sha = read_weights(directory, config)
    model = Toto(config)
    model.load_state_dict(tensors)
    return model.to(device).eval(), sha


def load_checkpoint(directory, device="cpu"):
    """-> (model: Toto in eval mode, tokenizer: VisualTokenizer | None, sha256: str, training: dict).
    Raises CheckpointError naming the file for anything missing, corrupt or mismatched."""
    model, sha = load_model(directory, device)
    tokenizer = load_tokenizer(directory, model.config, device)
    return model, tokenizer, sha, read_training(directory)


def cli_info(args) -> int:
    """`totobench info CHECKPOINT`: config, parameter count, sha256 and training facts."""
    from rich.console import Console
    from rich.table import Table

    from totobench.model.registry import load_backbone, resolve_checkpoint

    name = args.checkpoint
    backbone = load_backbone(name) if name.startswith("random-init:") else None
    directory = resolve_checkpoint(name.removeprefix("random-init:"))
    config = read_config(directory)
    with torch.device("meta"):
        meta = Toto(config)
    sha = backbone.sha256 if backbone else file_sha256(directory / "model.safetensors")

    console = Console()
    console.print(f"[bold]{name}[/bold]  ({directory})")
    if backbone:
        console.print("weights: random (torch.manual_seed(0)); config and tokenizer from the checkpoint; "
                      "sha256 below is of those random weights serialised as model.safetensors")
    console.print(f"parameters: {meta.num_params():,} (+ {meta.tok_embeddings.weight.numel():,} in the "
                  f"input embedding table = {meta.num_params(non_embedding=False):,})")
    console.print(f"sha256: {sha}", soft_wrap=True)

    table = Table(title="config", show_header=False)
    for k, v in config.to_dict().items():
        table.add_row(k, str(v))
    table.add_row("tokens_per_frame", str(config.tokens_per_frame))
    console.print(table)

    tok_cfg = directory / "tokenizer" / "config.json"
    if tok_cfg.is_file():
        tok = json.loads(tok_cfg.read_text())
        console.print("tokenizer: " + ", ".join(f"{k}={v}" for k, v in tok.items()), soft_wrap=True)
    else:
        console.print("tokenizer: [yellow]none[/yellow] (no tokenizer/ folder)")

    training = read_training(directory)
    if training and not backbone:
        table = Table(title="training", show_header=False)
        for k, v in training.items():
            table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
        console.print(table)
    elif not backbone:
        console.print("training: [yellow]no training.json[/yellow]")
    return 0
