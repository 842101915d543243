"""The pre-training YAML: defaults, validation, the Toto and tokenizer configs it describes, and
the folders a run writes."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from totobench.errors import ConfigError
from totobench.model.tokenizer import TokenizerConfig
from totobench.model.toto import TotoConfig

DEFAULTS = {
    "seed": 0,
    "threads": None,  # torch threads per process; None: all cores split over the processes
    "device": None,   # cpu, cuda or cuda:N (under torchrun: cuda:LOCAL_RANK); None: cpu. --device overrides
    "model": {"preset": "toto-tiny"},
    "data": {"root": "world", "world_size": "default", "world_seed": 0, "heldout_fraction": 0.05,
             "sources": [], "shards": None,  # shards: a `totobench tokenize` folder, instead of sources
             "shard_weights": None},  # {source: weight} over the shards' sources; None: every stream equal
    "tokenizer": {"steps": 400, "batch_size": 64, "lr": 1e-3, "crop": None, "heldout_frames": 512,
                  "max_minutes": None},
    "train": {"steps": 500, "batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "min_lr": 1e-4,
              "warmup_steps": 50, "weight_decay": 0.1, "grad_clip": 1.0, "checkpoint_every": 50,
              "log_every": 5, "max_minutes": None, "output_init": "random",
              "tokens_per_step": None, "precision": None, "activation_checkpointing": False,
              "sharding": "ddp", "init_from": None},
    "eval": {"heldout_sequences": 32, "batch_size": 8},
}

# Top-level fields without a default: the run's name, its checkpoint folder and its state folder.
OPTIONAL_FIELDS = ("name", "out", "state_dir")

# How the output head starts: "random" (normal, std 0.02, as every other matrix) or "embedding" (a copy
# of the input embedding; still a separate parameter, so input and output embeddings stay untied).
OUTPUT_INITS = ("random", "embedding")

# Autocast dtype of the forward pass and loss (weights and optimizer stay fp32); fp16 adds a GradScaler.
# Unset: bf16 on CUDA, fp32 on the CPU, where bf16 is only as fast as the processor's bf16 support
# (benchmarks/pretrain_precision.py).
PRECISIONS = ("fp32", "bf16", "fp16")

# How the model is spread over torchrun's processes (pretrain/distributed_train.py).
SHARDINGS = ("ddp", "fsdp")


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def read_yaml_mapping(path: Path, what: str) -> dict:
    """The mapping a YAML file holds ({} when empty); ConfigError naming the file when it is
    missing (`what` says which config), not YAML, or not a mapping at the top level."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_pretrain_config(path: str | os.PathLike) -> dict:
    """Read a pre-training YAML and fill in defaults. Raises ConfigError naming the bad field."""
    path = Path(path)
    raw = read_yaml_mapping(path, "pre-training config")
    for key in raw:
        if key not in DEFAULTS and key not in OPTIONAL_FIELDS:
            raise ConfigError(f"{path}: unknown top-level field {key!r} "
                              f"(expected {', '.join(OPTIONAL_FIELDS)}, {', '.join(DEFAULTS)})")
    cfg = _merge(DEFAULTS, raw)
    cfg["_path"] = str(path)
    if cfg["data"]["shards"] is None:
        _check_sources(path, cfg["data"]["sources"])
        if cfg["data"]["shard_weights"] is not None:
            raise ConfigError(f"{path}: data.shard_weights weighs the sources of data.shards, which is not set")
    elif not isinstance(cfg["data"]["shards"], str) or cfg["data"]["sources"]:
        raise ConfigError(f"{path}: data.shards must be a folder path (from `totobench tokenize`), "
                          "and data.sources empty: the shards are the corpus")
    else:
        _check_shard_weights(path, cfg["data"]["shard_weights"])
    if cfg["device"] is not None and not (isinstance(cfg["device"], str)
                                          and re.fullmatch(r"cpu|cuda(:\d+)?", cfg["device"])):
        raise ConfigError(f"{path}: device must be cpu, cuda or cuda:N, got {cfg['device']!r}")
    _check_train(path, cfg["train"])
    model_cfg(cfg)  # validate early
    return cfg


def _check_shard_weights(path: Path, weights) -> None:
    if weights is None:
        return
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"{path}: data.shard_weights must map source names to weights, "
                          f"e.g. {{videos: 0.6, images: 0.4}}; got {weights!r}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            raise ConfigError(f"{path}: data.shard_weights.{name} must be a number > 0, got {w!r}")


def _check_train(path: Path, t: dict) -> None:
    if t["precision"] is not None and t["precision"] not in PRECISIONS:  # None: chosen by the device
        raise ConfigError(f"{path}: train.precision must be one of {', '.join(PRECISIONS)}, got {t['precision']!r}")
    for key, allowed in (("output_init", OUTPUT_INITS), ("sharding", SHARDINGS)):
        if t[key] not in allowed:
            raise ConfigError(f"{path}: train.{key} must be one of {', '.join(allowed)}, got {t[key]!r}")
    if not isinstance(t["activation_checkpointing"], bool):
        raise ConfigError(f"{path}: train.activation_checkpointing must be true or false, "
                          f"got {t['activation_checkpointing']!r}")
    for key in ("steps", "batch_size", "micro_batch_size", "tokens_per_step"):
        if key == "tokens_per_step" and t[key] is None:  # None: the batch is train.batch_size sequences
            continue
        if isinstance(t[key], bool) or not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"{path}: train.{key} must be an integer >= 1, got {t[key]!r}")
    if t["init_from"] is not None and not isinstance(t["init_from"], str):
        raise ConfigError(f"{path}: train.init_from must be a checkpoint folder, got {t['init_from']!r}")


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


def sequence_tokens(mc: TotoConfig) -> int:
    """Predicted tokens of the longest sequence `mc` makes (start + frames or images + end, minus
    one: the first token is never a target)."""
    return max(mc.num_frames, mc.images_per_sequence) * mc.tokens_per_frame + 1


def global_batch_size(cfg: dict, mc: TotoConfig, world_size: int) -> int:
    """Sequences per optimizer step, summed over the ranks: `train.batch_size`, or when
    `train.tokens_per_step` is set the nearest multiple of `world_size` to tokens_per_step /
    sequence_tokens(mc) (each rank then accumulates its share over micro-batches of
    `train.micro_batch_size`). Raises ConfigError when batch_size does not split over the ranks."""
    t = cfg["train"]
    if t["tokens_per_step"]:
        return world_size * max(1, round(int(t["tokens_per_step"]) / sequence_tokens(mc) / world_size))
    if int(t["batch_size"]) % world_size:
        raise ConfigError(f"{cfg['_path']}: train.batch_size={t['batch_size']} must be a multiple of the "
                          f"{world_size} processes")
    return int(t["batch_size"])


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
