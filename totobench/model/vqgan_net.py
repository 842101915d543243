"""The VQGAN encoder network and its hyper-parameters (loading files: model/vqgan.py).

The network (taming's "diffusionmodules" encoder, its quant_conv and codebook): a 3x3 conv to `ch`
channels, then one level per entry of `ch_mult`, level i working at 1/2**i of the input size with
`ch * ch_mult[i]` channels: `num_res_blocks` residual blocks (GroupNorm, swish, 3x3 conv, twice;
a 1x1 shortcut where the width changes), each followed by a self-attention block on the levels
with attention, and a stride-2 conv after every level but the last. Then a middle block (residual,
attention, residual), GroupNorm, swish, a 3x3 conv to `z_channels`, a 1x1 conv (quant_conv) to
`embed_dim`, and at each cell the index of the nearest of the `n_embed` codebook vectors.
Pixels go in mapped to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from totobench.errors import DataError


NORM_GROUPS = 32
NORM_EPS = 1e-6
ENCODER_PREFIXES = ("encoder.", "quant_conv.", "quantize.")   # the VQModel keys a tokenizer reads
METADATA_KEY = "vqgan"                                         # hyper-parameters in a converted file


@dataclass(frozen=True)
class VQGANConfig:
    """The encoder's hyper-parameters: taming's ddconfig (ch, ch_mult, num_res_blocks, z_channels)
    and the VQModel's embed_dim and n_embed. Attention is given by level (0 = input size), not by
    taming's attn_resolutions, which need `resolution` to say the same. The defaults are those of
    vqgan_imagenet_f16_1024."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = (4,)
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024

    @property
    def downsample(self) -> int:
        """Input pixels per code along each side: one stride-2 conv between consecutive levels."""
        return 2 ** (len(self.ch_mult) - 1)

    def problem(self) -> str:
        """What makes the encoder unbuildable, as one phrase ('' if nothing)."""
        sizes = {"ch": self.ch, "num_res_blocks": self.num_res_blocks, "z_channels": self.z_channels,
                 "embed_dim": self.embed_dim, "n_embed": self.n_embed}
        for field, value in sizes.items():
            if not positive_int(value):
                return f"{field} is {value!r}, expected a positive integer"
        if not (isinstance(self.ch_mult, tuple) and self.ch_mult and all(map(positive_int, self.ch_mult))):
            return f"ch_mult is {self.ch_mult!r}, expected positive integers"
        if not (isinstance(self.attn_levels, tuple)
                and all(isinstance(i, int) and 0 <= i < len(self.ch_mult) for i in self.attn_levels)):
            return f"attn_levels is {self.attn_levels!r}, expected levels in 0..{len(self.ch_mult) - 1}"
        if self.ch % NORM_GROUPS:
            return f"ch is {self.ch}, expected a multiple of {NORM_GROUPS} (the GroupNorm groups)"
        return ""


def positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------- the network
def swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), written as taming writes it: F.silu rounds differently, which can flip a near tie."""
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS)


class ResnetBlock(nn.Module):
    """shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x)))))): [N, n_in, H, W] -> [N, n_out, H, W]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.norm1 = group_norm(n_in)
        self.conv1 = nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2 = group_norm(n_out)
        self.conv2 = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """x + proj_out(single-head self-attention over the H*W cells of norm(x)): [N, C, H, W] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        normed = self.norm(x)
        q = self.q(normed).reshape(n, c, h * w).permute(0, 2, 1)           # [N, HW, C]
        k = self.k(normed).reshape(n, c, h * w)                            # [N, C, HW]
        v = self.v(normed).reshape(n, c, h * w)                            # [N, C, HW]
        # two bmm and a softmax, as taming computes them (a fused attention rounds differently)
        weights = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)        # [N, HW queries, HW keys]
        attended = torch.bmm(v, weights.permute(0, 2, 1)).reshape(n, c, h, w)
        return x + self.proj_out(attended)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv: [N, C, H, W] -> [N, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class EncoderLevel(nn.Module):
    """One resolution level: residual blocks (each followed by attention if `attention`), then a
    Downsample unless it is the last level: [N, n_in, H, W] -> [N, n_out, H/2, W/2] (or H, W)."""

    def __init__(self, n_in: int, n_out: int, num_blocks: int, attention: bool, last: bool):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(n_in if i == 0 else n_out, n_out) for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(n_out) for _ in range(num_blocks if attention else 0))
        self.downsample = nn.Identity() if last else Downsample(n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return self.downsample(x)


class MidBlock(nn.Module):
    """Residual, attention, residual at the lowest resolution: [N, C, h, w] -> same."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class VQGANEncoder(nn.Module):
    """Pixels in [-1, 1] [N, 3, H, W] -> latents [N, z_channels, H/d, W/d], d = config.downsample."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(3, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(config.ch if i == 0 else widths[i - 1], width, config.num_res_blocks,
                         attention=i in config.attn_levels, last=i == len(widths) - 1)
            for i, width in enumerate(widths))
        self.mid = MidBlock(widths[-1])
        self.norm_out = group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(pixels)
        for level in self.down:
            x = level(x)
        return self.conv_out(swish(self.norm_out(self.mid(x))))


class Codebook(nn.Module):
    """The n_embed code vectors (`embedding.weight` [n_embed, embed_dim]) and the nearest-code lookup."""

    def __init__(self, n_embed: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, embed_dim, h, w] -> LongTensor [N, h, w]: the index of the code vector at the
        least squared distance, computed as taming does (|z|^2 + |e|^2 - 2 z.e over all cells in one
        matmul, first index on ties), so that rounding picks the same codes."""
        n, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.embedding.weight
        distances = (flat ** 2).sum(1, keepdim=True) + (codes ** 2).sum(1) - 2 * torch.matmul(flat, codes.t())
        return distances.argmin(1).view(n, h, w)


class VQGANTokenizer(nn.Module):
    """The VQGAN encoder as a frame tokenizer: frames -> one code in [0, n_embed) per d x d pixels,
    d = `downsample`. `name` is the tokenizer spec and `sha256` identifies the weights (the sha256
    of `weights_bytes(state_dict())`); `load_vqgan_tokenizer` sets both."""

    def __init__(self, config: VQGANConfig, name: str = "vqgan"):
        super().__init__()
        self.config = config
        self.encoder = VQGANEncoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.quantize = Codebook(config.n_embed, config.embed_dim)
        self.downsample = config.downsample
        self.codebook_size = config.n_embed
        self.name = name
        self.sha256 = ""

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames FloatTensor [N, 3, H, W] in [0, 1], H and W multiples of `downsample` ->
        LongTensor [N, H/d, W/d] of codes, on the weights' device, computed in fp32.
        Raises DataError for frames of another shape or a non-float dtype."""
        check_frames(frames, self.downsample, self.name)
        pixels = frames.to(self.quant_conv.weight.device, torch.float32) * 2 - 1
        return self.quantize.nearest(self.quant_conv(self.encoder(pixels)))


def check_frames(frames: torch.Tensor, downsample: int, name: str) -> None:
    """DataError (naming the tokenizer `name`) unless frames are a float [N, 3, H, W] with H, W
    positive multiples of `downsample`."""
    ok = (frames.is_floating_point() and frames.ndim == 4 and frames.shape[1] == 3
          and frames.shape[2] > 0 and frames.shape[3] > 0
          and not frames.shape[2] % downsample and not frames.shape[3] % downsample)
    if not ok:
        raise DataError(f"{name}: frames must be a float tensor [N, 3, H, W] in [0, 1] with H and W "
                        f"multiples of {downsample}, got {frames.dtype} {list(frames.shape)}")


# ---------------------------------------------------------------------- hyper-parameters
