"""Family "llama": a transformers Llama checkpoint over visual tokens.

    totobench run --model llama:DIR --tokenizer dvae:encoder.pkl

DIR is what `save_pretrained` writes for a `LlamaForCausalLM` or a `LlamaModel` (config.json +
safetensors or a .bin). The model runs in transformers itself (grouped-query attention, biases and
scaled RoPE included); layer i is the output of decoder layer i, taken by a forward hook before the
final norm, and the pass stops after the deepest requested layer.

How frames become a sequence comes from an optional DIR/totobench.json:

    {"tokenizer": "dvae:encoder.pkl",      # relative to DIR; --tokenizer overrides it
     "resolution": 128, "num_frames": 16, "frame_stride": 4,
     "image_start_id": 8192, "video_start_id": 8193}

Missing keys default to the paper's layout over the tokenizer's vocabulary: 128 px frames, 16
frames every 4th, image start = codebook size, video start = codebook size + 1. The layout used
is printed at start (the backbone's notes) and recorded in the result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from totobench.errors import CheckpointError, ConfigError
from totobench.model.backbone import load_tokenizer, num_params
from totobench.model.checkpoint import frozen, state_sha256
from totobench.model.tokens import TokenBackbone, TokenLayout

LAYOUT_FILE = "totobench.json"
LAYOUT_KEYS = ("tokenizer", "resolution", "num_frames", "frame_stride", "image_start_id", "video_start_id")
PAPER_LAYOUT = {"resolution": 128, "num_frames": 16, "frame_stride": 4}


class _Stop(Exception):
    """Raised by the hook of the deepest requested layer: the rest of the model is not needed."""


class HFLlama(torch.nn.Module):
    """A transformers LlamaModel with Toto's `forward_intermediates` (per-layer outputs, pre-norm)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward_intermediates(self, tokens: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """tokens LongTensor [B, L] -> [B, L, D] per requested (non-negative) layer, in order."""
        got: dict[int, torch.Tensor] = {}
        deepest = max(layers)

        def keep(index):
            def hook(module, args, output):
                got[index] = output[0] if isinstance(output, tuple) else output
                if index == deepest:
                    raise _Stop
            return hook

        handles = [self.model.layers[i].register_forward_hook(keep(i)) for i in set(layers)]
        try:
            self.model(input_ids=tokens, use_cache=False)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return [got[i] for i in layers]


def read_layout_file(directory: Path) -> dict:
    path = directory / LAYOUT_FILE
    if not path.is_file():
        return {}
    try:
        layout = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(layout, dict):
        raise CheckpointError(f"{path}: expected a JSON object with keys {', '.join(LAYOUT_KEYS)}")
    unknown = sorted(set(layout) - set(LAYOUT_KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(LAYOUT_KEYS)}")
    for key, value in layout.items():
        if key != "tokenizer" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CheckpointError(f"{path}: {key} must be a non-negative integer, got {value!r}")
    return layout


def read_llama(directory: Path, random_init: bool) -> torch.nn.Module:
    """The LlamaModel of DIR (the `.model` of a LlamaForCausalLM), fp32."""
    from transformers import AutoConfig, LlamaForCausalLM, LlamaModel
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: missing (expected the config.json of a transformers Llama)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{config_path}: not a transformers config ({str(e).splitlines()[0]})") from None
    if config.model_type != "llama":
        raise CheckpointError(f"{config_path}: model_type is {config.model_type!r}, expected 'llama'")
    causal = "LlamaModel" not in (getattr(config, "architectures", None) or [])
    if random_init:
        return LlamaModel(config)
    weights = [directory / n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                                       "pytorch_model.bin.index.json")]
    if not any(w.is_file() for w in weights):
        raise CheckpointError(f"{directory}: no weights (expected model.safetensors or pytorch_model.bin)")
    cls = LlamaForCausalLM if causal else LlamaModel
    try:
        model, info = cls.from_pretrained(directory, local_files_only=True, dtype=torch.float32,
                                          output_loading_info=True)
    except (ValueError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: cannot load the Llama weights ({str(e).splitlines()[0]})") from None
    problems = [k for k in info.get("missing_keys", []) if "lm_head" not in k] + list(info.get("mismatched_keys", []))
    if problems:
        raise CheckpointError(f"{directory}: weights do not fit config.json (first: {problems[0]})")
    return model.model if causal else model


def load_llama_backbone(rest: str, *, device="cpu", tokenizer=None, random_init: bool = False) -> TokenBackbone:
    """Family "llama": DIR with a tokenizer (--tokenizer, else totobench.json's "tokenizer")."""
    directory = Path(rest).expanduser()
    if not directory.is_dir():
        raise ConfigError(f"--model llama:{rest}: {directory} is not a folder")
    layout_file = read_layout_file(directory)
    if tokenizer is None and "tokenizer" in layout_file:
        tok_spec = layout_file["tokenizer"]
        family, _, path = tok_spec.partition(":")
        tokenizer = f"{family}:{directory / Path(path).expanduser()}"
    if tokenizer is None:
        raise ConfigError(f"--model llama:{rest}: a Llama over visual tokens needs its tokenizer: give "
                          f"--tokenizer dvae:FILE (or vqvae:DIR), or name it in {directory / LAYOUT_FILE}")
    tok = load_tokenizer(tokenizer, device)
    model = read_llama(directory, random_init)
    codes = int(tok.codebook_size)
    values = {**PAPER_LAYOUT, "image_start_id": codes, "video_start_id": codes + 1,
              **{k: v for k, v in layout_file.items() if k != "tokenizer"}}
    layout = TokenLayout(values["image_start_id"], values["video_start_id"], values["resolution"],
                         values["num_frames"], values["frame_stride"])
    if layout.resolution % tok.downsample or not layout.resolution or not layout.num_frames or not layout.frame_stride:
        raise ConfigError(f"{directory / LAYOUT_FILE}: resolution {layout.resolution} must be a positive multiple "
                          f"of the tokenizer's downsampling {tok.downsample}; frames and stride >= 1")
    source = "totobench.json" if layout_file else "defaults (no totobench.json)"
    note = (f"sequence layout from {source}: {layout.resolution} px, {layout.num_frames} frames every "
            f"{layout.frame_stride}, image start id {layout.image_start_id}, video start id {layout.video_start_id}")
    c = model.config
    return TokenBackbone(name=f"llama:{directory.name}", family="llama", transformer=frozen(HFLlama(model), device),
                         tokenizer=frozen(tok, device), layout=layout, num_layers=c.num_hidden_layers,
                         dim=c.hidden_size, num_heads=c.num_attention_heads, params=num_params(model),
                         vocab_size=c.vocab_size, sha256=state_sha256(model.state_dict()),
                         path=None if random_init else directory, notes=(note,))
