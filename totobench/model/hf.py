"""Hugging Face interop: a Toto is a `LlamaForCausalLM` with multi-head attention and no biases.

Our RoPE already uses the "rotate half" layout of transformers' Llama, so weights map name for name
with no permutation. The export also keeps our full TotoConfig under the `"totobench"` key of
config.json (transformers ignores it), so a round trip restores the tokenizer-side fields
(resolution, frames per clip, ...), which a plain Llama config has no place for.

This module works on configs and state dicts; `Toto.save_hf_llama` and `Toto.from_hf_llama`
(toto.py) are the model-level API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from totobench.errors import CheckpointError, ConfigError
from totobench.io import atomic_write, atomic_write_json
from totobench.model.checkpoint import read_json, weights_bytes
from totobench.model.config import TotoConfig

# our parameter name -> transformers' LlamaForCausalLM parameter name
_HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
_HF_BLOCK_NAMES = {"attention_norm.weight": "input_layernorm.weight",
                   "attention.wq.weight": "self_attn.q_proj.weight",
                   "attention.wk.weight": "self_attn.k_proj.weight",
                   "attention.wv.weight": "self_attn.v_proj.weight",
                   "attention.wo.weight": "self_attn.o_proj.weight",
                   "mlp_norm.weight": "post_attention_layernorm.weight",
                   "mlp.w1.weight": "mlp.gate_proj.weight",
                   "mlp.w3.weight": "mlp.up_proj.weight",
                   "mlp.w2.weight": "mlp.down_proj.weight"}


def _hf_name(ours: str) -> str:
    """Our parameter name -> transformers': layers.3.mlp.w1.weight -> model.layers.3.mlp.gate_proj.weight."""
    if ours in _HF_NAMES:
        return _HF_NAMES[ours]
    _, block, name = ours.split(".", 2)
    return f"model.layers.{block}.{_HF_BLOCK_NAMES[name]}"


def hf_llama_config(config: TotoConfig) -> dict:
    """The config.json of the equivalent LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "rope_theta": config.rope_base,  # transformers 4.x reads this key
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": config.video_start_id,
        "eos_token_id": config.end_id,
        "dtype": "float32",
        "totobench": config.to_dict(),
    }


def save_hf_llama(directory, config: TotoConfig, state_dict: Mapping[str, torch.Tensor]) -> Path:
    """Write `config.json` + `model.safetensors` (fp32, each file atomically) that
    `LlamaForCausalLM.from_pretrained` loads, from a Toto's config and state dict. Returns the folder.
    Raises ConfigError for a muP model: Llama has no logit multiplier nor 1/head_dim attention scale."""
    if config.mup_base_dim:
        raise ConfigError(f"save_hf_llama: a muP model (mup_base_dim {config.mup_base_dim}) scales its logits and "
                          f"attention scores in ways a transformers Llama config cannot express")
    directory = Path(directory)
    atomic_write(directory / "model.safetensors", weights_bytes({_hf_name(k): v for k, v in state_dict.items()}))
    atomic_write_json(directory / "config.json", hf_llama_config(config))
    return directory


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected a transformers LlamaForCausalLM config.json)")
    hf = read_json(path)
    if hf.get("model_type") != "llama":
        raise CheckpointError(f"{path}: model_type is {hf.get('model_type')!r}, expected 'llama'")
    unsupported = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
    for key, expected in unsupported.items():
        if hf.get(key, expected) != expected:
            raise CheckpointError(f"{path}: {key}={hf[key]!r} is not supported, expected {expected!r}")
    n_kv = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    if n_kv != hf["num_attention_heads"]:
        raise CheckpointError(f"{path}: num_key_value_heads={n_kv} (grouped-query attention) is not "
                              f"supported, expected {hf['num_attention_heads']}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"{path}: rope_type {rope.get('rope_type')!r} is not supported, expected 'default'")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
        raise CheckpointError(f"{path}: head_dim={head_dim} x heads != hidden_size={hf['hidden_size']}")
    return hf


def read_hf_llama_config(directory) -> TotoConfig:
    """The TotoConfig of a LlamaForCausalLM folder. Raises CheckpointError for a missing or bad
    config.json or an unsupported variant (biases, grouped-query attention, scaled RoPE)."""
    hf = _read_hf_config(Path(directory))
    rope = hf.get("rope_parameters") or {}
    shape = dict(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                 n_heads=hf["num_attention_heads"], mlp_hidden=hf["intermediate_size"],
                 vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                 rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
                 norm_eps=hf.get("rms_norm_eps", 1e-6))
    extra = hf.get("totobench") or {"codebook_size": hf["vocab_size"] - 3}  # a foreign Llama
    return TotoConfig.from_dict({**extra, **shape})


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise CheckpointError(f"{single}: missing (expected the weights as safetensors)")
    tensors = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def read_hf_llama_weights(directory, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM folder's weights as a Toto state dict (our names, fp32), checked against
    the names and shapes of `like` (the state dict of a Toto built from its config.json).
    Raises CheckpointError for a missing file or a missing or mis-shaped weight."""
    directory = Path(directory)
    tensors = _read_hf_weights(directory)
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied embeddings
    state = {}
    for ours, reference in like.items():
        theirs = _hf_name(ours)
        if theirs not in tensors:
            raise CheckpointError(f"{directory}: weight {theirs} is missing")
        expected = tuple(reference.shape)
        if tuple(tensors[theirs].shape) != expected:
            raise CheckpointError(f"{directory}: weight {theirs} has shape {list(tensors[theirs].shape)}, "
                                  f"config.json implies {list(expected)}")
        state[ours] = tensors[theirs].float()
    return state
