"""A tiny pre-training corpus and the micro config, shared by the pre-training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from totobench.data.video import write_mp4
from totobench.model.tokenizer import TokenizerConfig, VisualTokenizer
from totobench.pretrain.corpus import load_video

REPO = Path(__file__).resolve().parent.parent
MICRO_CONFIG = REPO / "configs" / "pretrain" / "micro.yaml"


def _scene(rng: np.random.Generator, t: int, size: int) -> np.ndarray:
    """uint8 [t, size, size, 3]: a coloured square moving over a flat background."""
    bg, fg = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    x0, y0 = rng.integers(0, size // 2, 2)
    vx, vy = rng.integers(-1, 2, 2)
    frames = np.empty((t, size, size, 3), np.uint8)
    for i in range(t):
        frames[i] = bg
        x, y = (x0 + vx * i) % (size // 2), (y0 + vy * i) % (size // 2)
        frames[i, y:y + size // 2, x:x + size // 2] = fg
    return frames


def make_corpus(root: Path, images: int = 8, videos: int = 5, frames: int = 12, size: int = 16) -> Path:
    """Write root/images/*.JPEG and root/videos/*.mp4; returns root."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "videos").mkdir(parents=True)
    for i in range(images):
        Image.fromarray(_scene(rng, 1, 24)[0]).save(root / "images" / f"img_{i:03d}.JPEG", quality=95)
    for i in range(videos):
        write_mp4(root / "videos" / f"vid_{i:03d}.mp4", _scene(rng, frames, size), fps=10)
    return root


def micro_config(tmp: Path, data_root: Path, **train) -> Path:
    """The micro config with data.root set (and train.* overridden); returns its path."""
    cfg = yaml.safe_load(MICRO_CONFIG.read_text())
    cfg["data"]["root"] = str(data_root)
    cfg["train"].update(train)
    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_tokenizer(videos: list[Path], folder: Path) -> str:
    """A random-init VQ-VAE (16 codes, 8x down, seed 0) whose codes start on the latents of the
    videos' frames at 16 px (as training does, so that files get different codes), saved to
    `folder`; returns its spec `vqvae:FOLDER`."""
    import torch
    torch.manual_seed(0)
    tok = VisualTokenizer(TokenizerConfig(codebook_size=16, downsample=8, channels=8, max_channels=16, code_dim=8))
    frames = torch.cat([load_video(p, 16) for p in videos])
    z = tok.encode_latents(frames.float() / 255).permute(0, 2, 3, 1).reshape(-1, 8)
    tok.quantizer.initialize(z.detach(), torch.Generator().manual_seed(0))
    tok.save(folder)
    return f"vqvae:{folder}"
