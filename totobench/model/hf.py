"""Hugging Face interop: a Toto is a `LlamaForCausalLM` with multi-head attention and no biases.

Our RoPE already uses the "rotate half" layout of transformers' Llama, so weights map name for name
with no permutation. The export also keeps our full TotoConfig under the `"totobench"` key of
config.json (transformers ignores it), so a round trip restores the tokenizer-side fields
(resolution, frames per clip, ...), which a plain Llama config has no place for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from totobench.errors import CheckpointError
from totobench.model.toto import Toto, TotoConfig


def _hf_names(n_layers: int) -> dict[str, str]:
    """Our parameter name -> transformers' LlamaForCausalLM parameter name."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per_layer = {"attention_norm.weight": "input_layernorm.weight",
                 "attention.wq.weight": "self_attn.q_proj.weight",
                 "attention.wk.weight": "self_attn.k_proj.weight",
                 "attention.wv.weight": "self_attn.v_proj.weight",
                 "attention.wo.weight": "self_attn.o_proj.weight",
                 "mlp_norm.weight": "post_attention_layernorm.weight",
                 "mlp.w1.weight": "mlp.gate_proj.weight",
                 "mlp.w3.weight": "mlp.up_proj.weight",
                 "mlp.w2.weight": "mlp.down_proj.weight"}
    for i in range(n_layers):
        for ours, theirs in per_layer.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


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


def save_hf_llama(model: Toto, directory) -> Path:
    """Write `config.json` + `model.safetensors` that `LlamaForCausalLM.from_pretrained` loads.
    Returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = _hf_names(model.config.n_layers)
    tensors = {names[k]: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in model.state_dict().items()}
    tmp = directory / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "model.safetensors")
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(hf_llama_config(model.config), indent=2) + "\n")
    os.replace(tmp, directory / "config.json")
    return directory


def _read_hf_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected a transformers LlamaForCausalLM config.json)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
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


def _toto_config(hf: dict) -> TotoConfig:
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


def load_hf_llama(directory) -> Toto:
    """Read a LlamaForCausalLM folder into a Toto (fp32). Raises CheckpointError for a missing
    file, an unsupported architecture variant, or missing/mis-shaped weights."""
    directory = Path(directory)
    config = _toto_config(_read_hf_config(directory))
    tensors = _read_hf_weights(directory)
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied embeddings
    model = Toto(config)
    state = {}
    for ours, theirs in _hf_names(config.n_layers).items():
        if theirs not in tensors:
            raise CheckpointError(f"{directory}: weight {theirs} is missing")
        expected = tuple(model.state_dict()[ours].shape)
        if tuple(tensors[theirs].shape) != expected:
            raise CheckpointError(f"{directory}: weight {theirs} has shape {list(tensors[theirs].shape)}, "
                                  f"config.json implies {list(expected)}")
        state[ours] = tensors[theirs].float()
    model.load_state_dict(state)
    return model
