"""The discrete visual tokenizer: a small VQ-VAE that turns each frame into a grid of codebook ids.

Every frame is tokenized on its own, with 8x downsampling: a 64 px frame becomes 8x8 = 64 ids,
flattened in raster order (row after row) by the sequence builder. The codebook is learned with
exponential moving averages (van den Oord et al. 2017, appendix) instead of a codebook loss, and
codes that stop being used are restarted on random encoder outputs of the current batch, so that
nearly the whole vocabulary stays in use (the reason the Toto paper preferred the dVAE).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from totobench.errors import CheckpointError, ConfigError
from totobench.model.config import check_positive_fields
from totobench.io import atomic_path, atomic_write_json


@dataclass
class TokenizerConfig:
    codebook_size: int = 1024
    downsample: int = 8          # must be a power of two; one stride-2 stage per factor 2
    stem: int = 1                # patchify factor of the first layer (k = stride = stem); 1: a 3x3 conv
    channels: int = 32           # conv width after the stem
    max_channels: int = 64       # width doubles at every downsampling stage up to this
    code_dim: int = 32           # dimension of a codebook vector
    num_res_blocks: int = 1      # residual blocks at the lowest resolution, in encoder and decoder
    ema_decay: float = 0.99
    commitment: float = 0.25     # weight of ||z_e - sg(z_q)||^2
    dead_code_threshold: float = 1.0  # restart a code whose EMA count of assigned vectors drops below this

    def __post_init__(self):
        check_positive_fields(self, ("codebook_size", "downsample", "stem", "channels", "max_channels", "code_dim",
                                     "num_res_blocks"), (), "TokenizerConfig")
        for name in ("downsample", "stem"):
            value = getattr(self, name)
            if value & (value - 1):
                raise ConfigError(f"TokenizerConfig: {name} must be a power of two, got {value}")
        if self.downsample % self.stem:
            raise ConfigError(f"TokenizerConfig: stem {self.stem} must divide downsample {self.downsample}")
        for name, low, high in (("ema_decay", 0.0, 1.0), ("commitment", 0.0, math.inf),
                                ("dead_code_threshold", 0.0, math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
                raise ConfigError(f"TokenizerConfig: {name} must be a number in [{low}, {high}), got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class EMAQuantizer(nn.Module):
    """Nearest-neighbour lookup in a codebook updated by exponential moving averages.

    Buffers (saved with the weights): codebook [K, D], cluster_size [K] (EMA count of vectors per
    code), embed_sum [K, D] (EMA sum of those vectors).
    """

    def __init__(self, codebook_size: int, code_dim: int, decay: float, dead_code_threshold: float):
        super().__init__()
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        codebook = torch.randn(codebook_size, code_dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z [M, D] -> ids [M] of the closest codebook vectors (squared L2)."""
        dist = (z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t()
                + self.codebook.pow(2).sum(1)[None, :])
        return dist.argmin(1)

    @torch.no_grad()
    def initialize(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Data-dependent start: every code begins on a random vector of z [M, D]."""
        pick = torch.randint(0, z.shape[0], (self.codebook.shape[0],), generator=generator)
        self.codebook.copy_(z[pick])
        self.embed_sum.copy_(z[pick])
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """EMA codebook step on the vectors z [M, D] assigned to ids [M]; restarts dead codes.

        Returns the number of restarted codes. (Pre-training fits the tokenizer in one process.)
        """
        k = self.codebook.shape[0]
        onehot = F.one_hot(ids, k).type(z.dtype)
        counts = onehot.sum(0)
        sums = onehot.t() @ z
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps rarely used codes from dividing by ~0
        n = self.cluster_size.sum()
        size = (self.cluster_size + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.embed_sum / size[:, None])

        dead = self.cluster_size < self.dead_code_threshold
        num_dead = int(dead.sum())
        if num_dead:
            pick = torch.randint(0, z.shape[0], (num_dead,), generator=generator)
            fresh = z[pick].clone()
            self.codebook[dead] = fresh
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
        return num_dead


class VisualTokenizer(nn.Module):
    """VQ-VAE frame tokenizer.

    encode(frames [N,3,H,W] float in [0,1]) -> ids [N, H/8, W/8] int64
    decode(ids [N,h,w]) -> frames [N,3,8h,8w] float in [0,1]
    H and W must be multiples of `downsample`.
    """

    def __init__(self, config: TokenizerConfig | None = None, **kwargs):
        super().__init__()
        self.config = config or TokenizerConfig(**kwargs)
        c = self.config
        stages = int(math.log2(c.downsample // c.stem)) if c.stem <= c.downsample else -1
        if stages < 0 or 2 ** stages * c.stem != c.downsample:
            raise ValueError(f"downsample ({c.downsample}) must be stem ({c.stem}) times a power of two")
        # widths[s] = channels at 1/(stem * 2**s) resolution: thin where pixels are many, wide where few
        widths = [min(c.channels * 2 ** s, max(c.max_channels, c.channels)) for s in range(stages + 1)]
        # a patchifying stem makes the tokenizer cheap: no convolution runs at full resolution
        enc = [nn.Conv2d(3, widths[0], c.stem, stride=c.stem) if c.stem > 1 else nn.Conv2d(3, widths[0], 3, padding=1)]
        for s in range(stages):
            enc += [nn.ReLU(), nn.Conv2d(widths[s], widths[s + 1], 4, stride=2, padding=1)]
        enc += [ResBlock(widths[-1]) for _ in range(c.num_res_blocks)]
        enc += [nn.ReLU(), nn.Conv2d(widths[-1], c.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        dec = [nn.Conv2d(c.code_dim, widths[-1], 3, padding=1)]
        dec += [ResBlock(widths[-1]) for _ in range(c.num_res_blocks)]
        for s in reversed(range(stages)):
            dec += [nn.ReLU(), nn.ConvTranspose2d(widths[s + 1], widths[s], 4, stride=2, padding=1)]
        dec += [nn.ReLU(), nn.ConvTranspose2d(widths[0], 3, c.stem, stride=c.stem) if c.stem > 1
                else nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.quantizer = EMAQuantizer(c.codebook_size, c.code_dim, c.ema_decay, c.dead_code_threshold)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def _check_frames(self, frames: torch.Tensor) -> None:
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [N,3,H,W], got {tuple(frames.shape)}")
        if frames.shape[2] % self.downsample or frames.shape[3] % self.downsample:
            raise ValueError(f"frame size {tuple(frames.shape[2:])} is not a multiple of {self.downsample}")

    def encode_latents(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N,3,H,W] in [0,1] -> continuous latents [N, code_dim, h, w]."""
        self._check_frames(frames)
        # unit-length latents: code distances stay on one scale, so restarts and EMA keep codes in use
        return F.normalize(self.encoder(frames * 2 - 1), dim=1)

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N,3,H,W] float in [0,1] -> ids LongTensor [N, H/8, W/8]."""
        z = self.encode_latents(frames)
        n, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)

    def decode_codes(self, zq: torch.Tensor) -> torch.Tensor:
        """Quantized latents [N, code_dim, h, w] -> frames [N,3,8h,8w] (unclamped, ~[0,1])."""
        return (self.decoder(zq) + 1) / 2

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """ids LongTensor [N,h,w] -> frames FloatTensor [N,3,8h,8w] in [0,1]."""
        if ids.ndim != 3:
            raise ValueError(f"ids must be [N,h,w], got {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size:
            raise ValueError(f"ids must be in [0, {self.codebook_size}), got [{int(ids.min())}, {int(ids.max())}]")
        zq = self.quantizer.codebook[ids].permute(0, 3, 1, 2)
        return self.decode_codes(zq).clamp(0, 1)

    def training_step(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """One VQ-VAE step's loss on frames [N,3,H,W] in [0,1]; updates the codebook by EMA.

        Returns {"loss" (differentiable), "recon_mse", "commit", "restarts", "ids" [N,h,w]}.
        """
        z = self.encode_latents(frames)
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        if self.training and not bool(self.quantizer.initialized):
            self.quantizer.initialize(flat.detach(), generator)
        ids = self.quantizer.nearest(flat.detach())
        restarts = self.quantizer.update(flat.detach(), ids, generator) if self.training else 0
        zq = self.quantizer.codebook[ids].view(n, h, w, d).permute(0, 3, 1, 2)
        commit = F.mse_loss(z, zq.detach())
        zq = z + (zq - z).detach()   # straight-through estimator: decoder gradient flows to the encoder
        recon = self.decode_codes(zq)
        recon_mse = F.mse_loss(recon, frames)
        loss = recon_mse + self.config.commitment * commit
        return {"loss": loss, "recon_mse": recon_mse.detach(), "commit": commit.detach(),
                "restarts": restarts, "ids": ids.view(n, h, w)}

    # ---- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors into `directory` (created), each atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        atomic_write_json(directory / "config.json", {"architecture": "vqvae-ema", **self.config.to_dict()})
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(directory / "model.safetensors") as tmp:
            save_file(state, str(tmp))

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "cpu") -> "VisualTokenizer":
        """Read a tokenizer folder written by `save`. Raises CheckpointError naming the bad file."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, weights_path = directory / "config.json", directory / "model.safetensors"
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise CheckpointError(f"{p}: missing tokenizer file (expected config.json and model.safetensors)")
        try:
            cfg = json.loads(cfg_path.read_text())
            config = TokenizerConfig.from_dict(cfg)
        except (json.JSONDecodeError, TypeError, AttributeError, ConfigError) as err:
            raise CheckpointError(f"{cfg_path}: not a valid tokenizer config ({err})") from None
        tokenizer = cls(config)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{weights_path}: unreadable safetensors file ({err})") from None
        expected = tokenizer.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{weights_path}: missing tensor {missing[0]!r} "
                                  f"({len(missing)} missing) for the config in {cfg_path.name}")
        for name, tensor in expected.items():
            if state[name].shape != tensor.shape:
                raise CheckpointError(f"{weights_path}: tensor {name!r} has shape {tuple(state[name].shape)}, "
                                      f"expected {tuple(tensor.shape)} from {cfg_path.name}")
        tokenizer.load_state_dict(state, strict=False)
        return tokenizer.to(device).eval()


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0,1], from the mean squared error over all pixels."""
    return _psnr_db(float(F.mse_loss(reconstruction.clamp(0, 1), reference)))


def _psnr_db(mse: float) -> float:
    """10 log10(1 / mse) for pixel values in [0, 1]; infinite for a perfect reconstruction."""
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: VisualTokenizer, frames: torch.Tensor, batch_size: int = 64) -> dict:
    """Reconstruction PSNR (dB, over all pixels) and codebook usage (fraction of codes used at least
    once) of `tokenizer` on frames [N,3,H,W] in [0,1]."""
    tokenizer.eval()
    se, used = 0.0, torch.zeros(tokenizer.codebook_size, dtype=torch.bool)
    for i in range(0, len(frames), batch_size):
        x = frames[i:i + batch_size]
        ids = tokenizer.encode(x)
        used[ids.flatten().unique()] = True
        se += float(F.mse_loss(tokenizer.decode(ids), x, reduction="sum"))
    mse = se / frames.numel()
    return {"psnr_db": _psnr_db(mse),
            "codebook_usage": float(used.float().mean()),
            "codes_used": int(used.sum()), "num_frames": int(len(frames))}
