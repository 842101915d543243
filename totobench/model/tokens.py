"""Backbones over discrete visual tokens: a tokenizer + a causal transformer (Toto, or a Llama).

Each frame is tokenized on its own (codes [h, w]); a video clip is one sequence
[video_start, frame 0 codes, ..., frame T-1 codes], an image its own [image_start, codes]
(model/sequence.py, the layout of pre-training). The start token's output is dropped and the rest
is reshaped to the token grid [T, h, w].

Families here: "checkpoint" (a totobench folder or a bundled name), "random-init" of it,
"preset" (the paper's shapes with random weights), and the "vqvae" tokenizer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from totobench.errors import CheckpointError, ConfigError
from totobench.model.backbone import (RANDOM_INIT, Backbone, ModelInputs, full_precision, list_models, load_backbone,
                                       load_tokenizer, resolve_checkpoint)
from totobench.model.checkpoint import (frozen, read_config, read_tokenizer, read_training, read_weights,
                                         sha256_bytes, state_sha256, weights_bytes)
from totobench.model.config import PRESETS, TotoConfig
from totobench.model.flops import transformer_flops_per_token
from totobench.model.tokenizer import TokenizerConfig, VisualTokenizer
from totobench.model.toto import Toto
from totobench.registry import did_you_mean

ENCODE_BATCH = 256                # frames per tokenizer call, to bound the conv activations' memory
# On CPU the transformer runs on sequences of at most this many tokens at a time: a batch of 64
# clips (32k tokens, 33 MB per activation) streams every activation through memory, 7 clips' stay
# in cache; toto-tiny's clips/s 1.62x, the same values bit for bit (benchmarks/forward_microbatch.py).
CPU_FORWARD_TOKENS = 4096


@dataclass(frozen=True)
class TokenLayout:
    """How frames become a sequence: the special ids and the frames the model was trained on."""
    image_start_id: int
    video_start_id: int
    resolution: int
    num_frames: int
    frame_stride: int

    @classmethod
    def of(cls, config: TotoConfig) -> "TokenLayout":
        return cls(config.image_start_id, config.video_start_id, config.resolution, config.num_frames,
                   config.frame_stride)


class TokenBackbone(Backbone):
    """`transformer.forward_intermediates(tokens [B, L], layers) -> [B, L, D] per layer` over the
    codes of `tokenizer`; `config` is the TotoConfig when the transformer is a Toto."""

    def __init__(self, *, name: str, family: str, transformer: torch.nn.Module, tokenizer, layout: TokenLayout,
                 num_layers: int, dim: int, num_heads: int, params: int, vocab_size: int, sha256: str,
                 path: Path | None = None, config: TotoConfig | None = None, notes: tuple[str, ...] = ()):
        check_vocabulary(tokenizer, layout, vocab_size, name)
        self.name, self.family, self.model, self.tokenizer, self.layout = name, family, transformer, tokenizer, layout
        self.num_layers, self.dim, self.num_heads, self.params = num_layers, dim, num_heads, params
        self.sha256, self.path, self.config, self.notes = sha256, path, config, notes
        self.tokenizer_sha256 = tokenizer_sha256(tokenizer)
        self.tokenizer_name = getattr(tokenizer, "name", None) or "vqvae"
        self.inputs = ModelInputs(resolution=layout.resolution, patch_size=tokenizer.downsample,
                                  num_frames=layout.num_frames, frame_stride=layout.frame_stride)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def tokenize(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [B, T, 3, H, W] in [0, 1] -> codes LongTensor [B, T, h, w]; each frame alone.
        Raises DataError for frames of the wrong shape."""
        self.check_frames(frames, "image")
        B, T = frames.shape[:2]
        flat = frames.reshape(B * T, *frames.shape[2:]).to(self.device, torch.float32)
        ids = torch.cat([self.tokenizer.encode(chunk) for chunk in flat.split(ENCODE_BATCH)])
        return ids.reshape(B, T, *ids.shape[1:])

    def _forward(self, frames, layers, kind):
        with full_precision(frames.device):                             # codes flip under bf16
            ids = self.tokenize(frames)                                 # [B, T, h, w]
        B, T, h, w = ids.shape
        if kind == "image":
            sequences, start = ids.reshape(B * T, h * w), self.layout.image_start_id
        else:
            sequences, start = ids.reshape(B, T * h * w), self.layout.video_start_id
        starts = torch.full((sequences.shape[0], 1), start, dtype=torch.long, device=ids.device)
        feats = forward_in_parts(self.model, torch.cat([starts, sequences], dim=1), layers)
        return [f[:, 1:].reshape(B, T, h, w, -1) for f in feats]

    def flops_per_token(self) -> int:
        """Transformer forward FLOPs per frame token of one default clip (tokenizer excluded)."""
        i = self.inputs
        seq_len = 1 + i.num_frames * (i.resolution // i.patch_size) ** 2
        return transformer_flops_per_token(self.model, seq_len, self.num_layers)


def forward_in_parts(model, sequences: torch.Tensor, layers, max_tokens: int = CPU_FORWARD_TOKENS):
    """model.forward_intermediates(sequences, layers), run on CPU in near-equal parts of whole
    sequences, at most `max_tokens` tokens each (on a GPU in one go). A sequence's outputs do not
    depend on the others in its batch, so the parts give the values of one pass."""
    n, rows = len(sequences), max(1, max_tokens // sequences.shape[1])
    if sequences.device.type != "cpu" or n <= rows:
        return model.forward_intermediates(sequences, layers)
    num_parts = -(-n // rows)
    outputs = [model.forward_intermediates(part, layers) for part in sequences.split(-(-n // num_parts))]
    return [torch.cat(per_layer) for per_layer in zip(*outputs)]


def check_vocabulary(tokenizer, layout: TokenLayout, vocab_size: int, name: str) -> None:
    """ConfigError unless every code of `tokenizer` and both start ids are rows of the embedding."""
    codes = int(tokenizer.codebook_size)
    largest = max(codes - 1, layout.image_start_id, layout.video_start_id)
    if largest >= vocab_size:
        raise ConfigError(f"{name}: the tokenizer {getattr(tokenizer, 'name', '')} has {codes} codes and the "
                          f"start ids are {layout.image_start_id}/{layout.video_start_id}, but the model's "
                          f"embedding has {vocab_size} rows")
    if codes > min(layout.image_start_id, layout.video_start_id):
        raise ConfigError(f"{name}: the tokenizer's {codes} codes overlap the start ids "
                          f"{layout.image_start_id}/{layout.video_start_id} of the model's sequence layout")


def tokenizer_sha256(tokenizer) -> str:
    sha = getattr(tokenizer, "sha256", None)
    return sha if isinstance(sha, str) else sha256_bytes(weights_bytes(tokenizer.state_dict()))


def toto_backbone(name: str, family: str, model: Toto, tokenizer, sha: str, path: Path | None, device,
                  notes: tuple[str, ...] = ()) -> TokenBackbone:
    c = model.config
    return TokenBackbone(name=name, family=family, transformer=frozen(model, device),
                         tokenizer=frozen(tokenizer, device), layout=TokenLayout.of(c), num_layers=c.n_layers,
                         dim=c.dim, num_heads=c.n_heads, params=model.num_params(non_embedding=False)
                         - model.output.weight.numel(), vocab_size=c.vocab_size, sha256=sha, path=path,
                         config=c, notes=notes)


def load_checkpoint(directory, device: str = "cpu") -> tuple[Toto, VisualTokenizer | None, str, dict]:
    """A checkpoint folder -> (Toto in eval mode, its tokenizer or None, sha256 of model.safetensors,
    training.json as a dict). Raises CheckpointError naming the file for anything missing, corrupt
    or mismatched."""
    config = read_config(directory)
    model = Toto(config)
    weights, sha = read_weights(directory, model.state_dict())
    model.load_state_dict(weights)
    return model.to(device).eval(), read_tokenizer(directory, config, device), sha, read_training(directory)


# ---------------------------------------------------------------------- families
def load_checkpoint_backbone(name_or_path: str, *, device="cpu", tokenizer=None,
                             random_init: bool = False) -> TokenBackbone:
    """Family "checkpoint": a registered name or a checkpoint folder; random_init: its config and
    tokenizer with the weights torch draws now (load_backbone seeds 0). `tokenizer` replaces the
    folder's own."""
    path = resolve_checkpoint(name_or_path)
    config = read_config(path)
    model = Toto(config)
    if random_init:
        sha = sha256_bytes(weights_bytes(model.state_dict()))
    else:
        weights, sha = read_weights(path, model.state_dict())
        model.load_state_dict(weights)
    tok = load_tokenizer(tokenizer, device) if tokenizer is not None else read_tokenizer(path, config, device)
    if tok is None:
        raise CheckpointError(f"{path / 'tokenizer'}: missing (a backbone needs the visual tokenizer: "
                              f"tokenizer/config.json and tokenizer/model.safetensors, or --tokenizer)")
    name = name_or_path if name_or_path in list_models() else path.name  # short result paths
    return toto_backbone(name, "checkpoint", model, tok, sha, path, device)


def load_random_init_backbone(rest: str, *, device="cpu", tokenizer=None, random_init: bool = True):
    """Family "random-init": `load_backbone` handles the prefix; this entry re-dispatches."""
    return load_backbone(RANDOM_INIT + rest, tokenizer=tokenizer, device=device)


def load_preset_backbone(name: str, *, device="cpu", tokenizer=None, random_init: bool = True) -> TokenBackbone:
    """Family "preset": the paper's architecture `name` with random weights and, unless
    `tokenizer` is given, a random VQ-VAE of the preset's vocabulary. device="meta" builds it
    without memory (parameter counts, FLOPs, dry runs)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}{did_you_mean(name, PRESETS)}")
    config = TotoConfig.preset(name)
    with torch.device("meta" if str(device) == "meta" else "cpu"):
        model = Toto(config)
        tok = load_tokenizer(tokenizer, device) if tokenizer is not None else VisualTokenizer(
            TokenizerConfig(codebook_size=config.codebook_size, downsample=config.patch_size))
    meta = str(device) == "meta"
    sha = hashlib.sha256(f"preset:{name}:meta".encode()).hexdigest() if meta else state_sha256(model.state_dict())
    if meta:
        tok.sha256 = hashlib.sha256(f"preset:{name}:meta-tokenizer".encode()).hexdigest()
    notes = ("random weights (seed 0) and a random tokenizer: for shapes, parameter counts and FLOPs",)
    return toto_backbone(f"preset:{name}", "preset", model, tok, sha, None, device, notes)


def load_vqvae_tokenizer(rest: str, *, device="cpu") -> VisualTokenizer:
    """Tokenizer family "vqvae": a totobench tokenizer folder (config.json + model.safetensors)."""
    path = Path(rest).expanduser()
    tok = VisualTokenizer.load(path, device=device)
    tok.name = f"vqvae:{rest}"
    return tok
