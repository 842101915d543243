"""The pre-training YAML: defaults, validation, the Toto and tokenizer configs it describes, and
the folders a run writes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from totobench.errors import ConfigError
from totobench.model.tokenizer import TokenizerConfig
from totobench.model.toto import TotoConfig

DEFAULTS = {
    "seed": 0,
    "threads": None,  # torch threads per process; None: all cores split over the processes
    "model": {"preset": "toto-tiny"},
    "data": {"root": "world", "world_size": "default", "world_seed": 0, "heldout_fraction": 0.05,
             "sources": []},
    "tokenizer": {"steps": 400, "batch_size": 64, "lr": 1e-3, "crop": None, "heldout_frames": 512,
                  "max_minutes": None},
    "train": {"steps": 500, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "min_lr": 1e-4,
              "warmup_steps": 50, "weight_decay": 0.1, "grad_clip": 1.0, "checkpoint_every": 50,
              "log_every": 5, "max_minutes": None, "output_init": "random"},
    "eval": {"heldout_sequences": 32, "batch_size": 8},
}

# Top-level fields without a default: the run's name, its checkpoint folder and its state folder.
OPTIONAL_FIELDS = ("name", "out", "state_dir")

# How the output head starts: "random" (normal, std 0.02, as every other matrix) or "embedding" (a copy
# of the input embedding; still a separate parameter, so input and output embeddings stay untied).
OUTPUT_INITS = ("random", "embedding")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def load_pretrain_config(path: str | os.PathLike) -> dict:
    """Read a pre-training YAML and fill in defaults. Raises ConfigError naming the bad field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: pre-training config not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for key in raw:
        if key not in DEFAULTS and key not in OPTIONAL_FIELDS:
            raise ConfigError(f"{path}: unknown top-level field {key!r} "
                              f"(expected {', '.join(OPTIONAL_FIELDS)}, {', '.join(DEFAULTS)})")
    cfg = _merge(DEFAULTS, raw)
    cfg["_path"] = str(path)
    _check_sources(path, cfg["data"]["sources"])
    if cfg["train"]["output_init"] not in OUTPUT_INITS:
        raise ConfigError(f"{path}: train.output_init must be one of {', '.join(OUTPUT_INITS)}, "
                          f"got {cfg['train']['output_init']!r}")
    model_cfg(cfg)  # validate early
    return cfg


def _check_sources(path: Path, sources: list) -> None:
    if not sources:
        raise ConfigError(f"{path}: data.sources is empty; expected a list of "
                          "{kind: image|video, path: FOLDER, weight: W}")
    for i, src in enumerate(sources):
        if src.get("kind") not in ("image", "video"):
            raise ConfigError(f"{path}: data.sources[{i}].kind must be image or video, got {src.get('kind')!r}")
        if "path" not in src:
            raise ConfigError(f"{path}: data.sources[{i}].path is missing")
        if not float(src.get("weight", 1.0)) > 0:
            raise ConfigError(f"{path}: data.sources[{i}].weight must be > 0")


def model_cfg(cfg: dict) -> TotoConfig:
    """The TotoConfig of a pre-training config: `model.preset` with the other `model.*` fields
    overriding it (codebook_size, vocab_size follow each other when only one is given)."""
    m = dict(cfg["model"])
    preset = m.pop("preset", None)
    base = TotoConfig.preset(preset).to_dict() if preset else {}
    if "codebook_size" in m and "vocab_size" not in m:
        m["vocab_size"] = m["codebook_size"] + 3
    try:
        return TotoConfig.from_dict({**base, **m})
    except TypeError as err:
        raise ConfigError(f"{cfg.get('_path', 'config')}: bad model field ({err})") from None


def tokenizer_cfg(cfg: dict, mc: TotoConfig) -> TokenizerConfig:
    """The `tokenizer.*` fields TokenizerConfig knows, with the codebook and downsampling of `mc`."""
    known = TokenizerConfig.__dataclass_fields__
    t = {k: v for k, v in cfg["tokenizer"].items() if k in known}
    return TokenizerConfig(**{**t, "codebook_size": mc.codebook_size, "downsample": mc.patch_size})


# Steps a stage with a time budget (`max_minutes`) times before it fixes how many steps it runs.
CALIBRATION_STEPS = 10


def budget_seconds(section: dict) -> float | None:
    """The section's `max_minutes` in seconds; None when it sets no time budget."""
    return 60 * float(section["max_minutes"]) if section.get("max_minutes") else None


@dataclass(frozen=True)
class RunPaths:
    """The files a run writes: in the checkpoint folder `out`, and in the state folder (optimizer
    state, token cache, stage facts; `<out>/train_state` unless the config's `state_dir` says otherwise)."""
    out: Path
    state: Path
    tokenizer: Path         # out/tokenizer/: the VQ-VAE of stage 1
    loss_curve: Path        # out/loss_curve.csv
    last_checkpoint: Path   # state/last.pt: weights, optimizer and TrainState
    facts: Path             # state/facts.json: what the stages recorded so far
    tokens: Path            # state/tokens.npz: the token cache of stage 2

    @classmethod
    def of(cls, cfg: dict, out: Path) -> "RunPaths":
        out = Path(out)
        state = Path(cfg.get("state_dir") or out / "train_state").expanduser()
        return cls(out=out, state=state, tokenizer=out / "tokenizer", loss_curve=out / "loss_curve.csv",
                   last_checkpoint=state / "last.pt", facts=state / "facts.json", tokens=state / "tokens.npz")
