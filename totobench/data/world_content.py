"""What the embedded data world is made of: sprites, textured backgrounds, a hand, and the renderer.

Sprites are real handwritten digits (scikit-learn's `load_digits`, 8x8 scans upscaled) and simple
shapes, drawn as an alpha mask on a 32x32 canvas and coloured with a two-colour gradient. A pose
(centre, size, angle, aspect) places a sprite on a frame; `render` composites sprites back to front
over a background and can also return the per-pixel object id (for segmentation masks).
All randomness comes from the numpy Generator passed in, so a scene is a pure function of it.
"""

from __future__ import annotations

import colorsys
import importlib.util
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

CANVAS = 32  # side of a sprite's own canvas, in sprite pixels
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
DIGITS = tuple(str(d) for d in range(10))


def stream_rng(seed: int, stream: str, index: int = 0) -> np.random.Generator:
    """The random stream of item `index` of `stream` (e.g. "imagenet/val"): independent per name.

    Items of different streams never share a state, which is what keeps evaluation items out of the
    pre-training corpus.
    """
    return np.random.default_rng([seed, zlib.crc32(stream.encode()), index])


# ----------------------------------------------------------------------------- sprites

@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 scikit-learn digits as alpha masks [N, 32, 32] in [0, 1] and their labels [N].

    Reads the file `sklearn.datasets.load_digits` reads (shipped with scikit-learn), without
    importing scikit-learn, whose import costs seconds in every worker process.
    """
    package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    table = np.loadtxt(Path(package) / "datasets" / "data" / "digits.csv.gz", delimiter=",", dtype=np.int64)
    images, labels = table[:, :64].reshape(-1, 8, 8), table[:, 64]
    alphas = np.zeros((len(images), CANVAS, CANVAS), np.float32)
    for i, img in enumerate(images):
        big = Image.fromarray((img * (255 / 16)).astype(np.uint8)).resize((26, 26), Image.BICUBIC)
        a = np.asarray(big, np.float32) / 255
        alphas[i, 3:29, 3:29] = np.clip((a - 0.25) / 0.35, 0, 1)  # sharpen the blurry upscale
    return alphas, labels


@lru_cache(maxsize=2)
def digit_pool(part: str) -> tuple[np.ndarray, ...]:
    """Indices of the digit scans per digit value, for `part` "train" (70%) or "eval" (30%).

    Evaluation splits draw from "eval", everything else (training splits, pre-training) from
    "train", so no handwritten sample seen in pre-training appears in an evaluation split.
    """
    _, labels = _digits()
    order = np.random.default_rng(20240).permutation(len(labels))
    cut = int(0.7 * len(order))
    chosen = order[:cut] if part == "train" else order[cut:]
    return tuple(np.sort(chosen[labels[chosen] == d]) for d in range(10))


def digit_alpha(digit: int, rng: np.random.Generator, part: str) -> np.ndarray:
    """Alpha [32, 32] of a random scan of `digit` from pool `part`."""
    pool = digit_pool(part)[digit]
    return _digits()[0][pool[rng.integers(len(pool))]]


@lru_cache(maxsize=None)
def shape_alpha(name: str) -> np.ndarray:
    """Anti-aliased alpha [32, 32] of a shape, drawn analytically with 4x supersampling."""
    n = CANVAS * 4
    c = (np.arange(n) + 0.5) / n * 2 - 1  # [-1, 1]
    x, y = np.meshgrid(c, c)
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    if name == "circle":
        inside = r < 0.8
    elif name == "square":
        inside = np.maximum(abs(x), abs(y)) < 0.68
    elif name == "triangle":  # pointing up, centred on its bounding box
        inside = (y < 0.7) & (y > -0.8 + 1.732 * abs(x) - 0.05)
    elif name == "star":  # five points, one pointing up
        k = np.cos(2 * np.pi / 5 * np.floor((theta + np.pi / 2) * 5 / (2 * np.pi) + 0.5) - (theta + np.pi / 2))
        inside = r < 0.9 * (0.45 + 0.55 * np.clip((k - np.cos(np.pi / 5)) / (1 - np.cos(np.pi / 5)), 0, 1) ** 1.5)
    elif name == "cross":
        inside = ((abs(x) < 0.24) & (abs(y) < 0.8)) | ((abs(y) < 0.24) & (abs(x) < 0.8))
    elif name == "ring":
        inside = (r < 0.82) & (r > 0.48)
    else:
        raise ValueError(f"unknown shape {name!r}; known: {SHAPES}")
    return inside.reshape(CANVAS, 4, CANVAS, 4).mean(axis=(1, 3)).astype(np.float32)


def sprite_alpha(kind: str, rng: np.random.Generator, part: str) -> np.ndarray:
    """Alpha of a digit ("0".."9", a random scan from `part`) or of a shape name."""
    return digit_alpha(int(kind), rng, part) if kind in DIGITS else shape_alpha(kind)


def random_colour(rng: np.random.Generator, avoid: np.ndarray | None = None, min_dist: float = 0.4) -> np.ndarray:
    """An RGB colour in [0, 1] at least `min_dist` (Euclidean) from `avoid` when possible."""
    for _ in range(20):
        c = rng.random(3).astype(np.float32)
        if avoid is None or np.linalg.norm(c - avoid) >= min_dist:
            break
    return c


def hue_colour(rng: np.random.Generator, hue: float, avoid: np.ndarray | None = None,
               min_dist: float = 0.3) -> np.ndarray:
    """A saturated, bright RGB colour within a few degrees of `hue` (in [0, 1)), far from `avoid`
    when possible."""
    for _ in range(20):
        c = np.array(colorsys.hsv_to_rgb((hue + rng.normal(0, 0.03)) % 1, rng.uniform(0.6, 1), rng.uniform(0.6, 1)),
                     np.float32)
        if avoid is None or np.linalg.norm(c - avoid) >= min_dist:
            break
    return c


@dataclass
class Sprite:
    """A coloured sprite on its own 32x32 canvas: RGB (defined everywhere, so edges do not bleed) and alpha."""

    rgba: np.ndarray  # [32, 32, 4], RGB in [0, 1] then alpha

    @property
    def image(self) -> Image.Image:
        """The sprite as an 8-bit RGBA PIL image (what `paste` warps), built once."""
        if getattr(self, "_image", None) is None:
            self._image = Image.fromarray(to_uint8(self.rgba), "RGBA")
        return self._image

    @staticmethod
    def coloured(alpha: np.ndarray, rng: np.random.Generator, avoid: np.ndarray | None = None,
                 hue: float | None = None) -> "Sprite":
        """Paint `alpha` with a linear gradient between two colours far from `avoid` (the background);
        the first colour is random, or near `hue` when given."""
        c1 = random_colour(rng, avoid) if hue is None else hue_colour(rng, hue, avoid)
        c2 = np.clip(c1 + rng.normal(0, 0.25, 3), 0, 1).astype(np.float32)
        a = rng.uniform(0, 2 * np.pi)
        g = np.linspace(-1, 1, CANVAS, dtype=np.float32)
        t = (np.cos(a) * g[None, :] + np.sin(a) * g[:, None]) * 0.5 + 0.5
        rgb = c1 * (1 - t[..., None]) + c2 * t[..., None]
        return Sprite(np.concatenate([rgb, alpha[..., None]], axis=-1).astype(np.float32))


@dataclass
class Pose:
    """Where a sprite is drawn: centre (px), side of its 32-px canvas on the frame (px),
    clockwise rotation on screen (degrees), and width/height stretch."""

    cx: float
    cy: float
    size: float
    angle: float = 0.0
    aspect: float = 1.0


# ----------------------------------------------------------------------------- rendering

def paste(canvas: Image.Image, sprite: Sprite, pose: Pose, ids: np.ndarray | None = None, obj_id: int = 0) -> None:
    """Composite `sprite` at `pose` onto the RGB image `canvas` in place (bilinear warp, alpha blend).

    When `ids` [H, W] is given, pixels where the sprite's alpha exceeds 0.5 get `obj_id`
    (later pastes occlude earlier ones, as in the image).
    """
    w, h = canvas.size
    half = pose.size * 0.75 * max(pose.aspect, 1 / pose.aspect)  # covers the rotated canvas
    x0, x1 = max(int(pose.cx - half), 0), min(int(np.ceil(pose.cx + half)), w)
    y0, y1 = max(int(pose.cy - half), 0), min(int(np.ceil(pose.cy + half)), h)
    if x0 >= x1 or y0 >= y1:
        return
    cos, sin = np.cos(np.radians(pose.angle)), np.sin(np.radians(pose.angle))
    # inverse map, frame pixel -> sprite canvas point: undo translation, rotation, stretch and scale
    ku = pose.size / CANVAS * np.sqrt(pose.aspect)
    kv = pose.size / CANVAS / np.sqrt(pose.aspect)
    ox, oy = x0 - pose.cx, y0 - pose.cy
    affine = (cos / ku, sin / ku, (ox * cos + oy * sin) / ku + CANVAS / 2,
              -sin / kv, cos / kv, (-ox * sin + oy * cos) / kv + CANVAS / 2)
    patch = sprite.image.transform((x1 - x0, y1 - y0), Image.AFFINE, affine, resample=Image.BILINEAR)
    canvas.paste(patch, (x0, y0), patch)
    if ids is not None:
        ids[y0:y1, x0:x1][np.asarray(patch)[..., 3] > 127] = obj_id


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_image(image: np.ndarray) -> Image.Image:
    """float [H, W, 3] in [0, 1] -> an RGB PIL image to paste sprites on."""
    return Image.fromarray(to_uint8(image), "RGB")


# ----------------------------------------------------------------------------- backgrounds

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    f = np.asarray(img)
    return (f - f.min()) / max(float(f.max() - f.min()), 1e-6)


def texture(rng: np.random.Generator, h: int, w: int, grain: float = 0.0) -> np.ndarray:
    """A textured background [h, w, 3] in [0, 1]: smooth noise, stripes, checks, blobs or a mix,
    shaded between two or three random colours; `grain` adds per-pixel noise (still images only)."""
    kind = rng.choice(["noise", "stripes", "checks", "blobs", "mix"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, np.pi)
    along = xx * np.cos(a) + yy * np.sin(a)
    across = -xx * np.sin(a) + yy * np.cos(a)
    if kind == "noise":
        f = _smooth_noise(rng, h, w, int(rng.integers(3, 9)))
    elif kind == "stripes":
        f = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(6, 20) + rng.uniform(0, 6.3))
    elif kind == "checks":
        cell = rng.uniform(6, 18)
        f = ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float32)
        f = 0.15 + 0.7 * f
    elif kind == "blobs":
        f = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(3, 7))):
            cx, cy, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 20)
            f += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        f = np.clip(f, 0, 1)
    else:
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * along / rng.uniform(8, 24))
        f = 0.6 * _smooth_noise(rng, h, w, int(rng.integers(3, 7))) + 0.4 * stripes
    c1, c2 = rng.random(3), rng.random(3)
    if np.linalg.norm(c1 - c2) < 0.25:  # keep some contrast so the texture is visible
        c2 = np.clip(1 - c1 + rng.normal(0, 0.1, 3), 0, 1)
    img = c1 * (1 - f[..., None]) + c2 * f[..., None]
    if rng.random() < 0.4:  # a third colour as a slow tint gradient
        img = img * 0.75 + 0.25 * rng.random(3) * (yy / h)[..., None]
    if grain:
        img = img + rng.normal(0, grain, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- the hand

def _capsule_distance(xx, yy, p, q, radius):
    """Distance from pixel centres to a segment p-q minus `radius` (negative inside)."""
    d = np.asarray(q, np.float32) - np.asarray(p, np.float32)
    t = np.clip(((xx - p[0]) * d[0] + (yy - p[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    return np.hypot(xx - p[0] - t * d[0], yy - p[1] - t * d[1]) - radius


def hand_alpha(h: int, w: int, tip: tuple[float, float], direction: tuple[float, float],
               shape: str, scale: float) -> np.ndarray:
    """Alpha [h, w] of an arm and hand whose front point is `tip`, pointing along `direction`.

    The arm runs back from the wrist off the frame. `shape` ("open", "point", "fist", "pinch")
    sets the fingers, so the kind of interaction is visible in every frame; `scale` ~ palm width (px).
    """
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    d = np.asarray(direction, np.float32)
    d /= max(float(np.linalg.norm(d)), 1e-6)
    n = np.array([-d[1], d[0]], np.float32)  # across the hand
    tip = np.asarray(tip, np.float32)
    finger = {"open": 0.75, "point": 0.9, "fist": 0.0, "pinch": 0.7}[shape] * scale
    palm = tip - d * (finger + 0.5 * scale)
    dist = [_capsule_distance(xx, yy, palm, palm - d * (h + w), 0.3 * scale),  # arm
            np.hypot(xx - palm[0], yy - palm[1]) - (0.62 if shape == "fist" else 0.5) * scale]
    if shape == "open":
        for k in (-1.5, -0.5, 0.5, 1.5):
            base = palm + n * k * 0.22 * scale + d * 0.3 * scale
            dist.append(_capsule_distance(xx, yy, base, base + d * finger * (1 - 0.12 * abs(k)), 0.09 * scale))
        thumb = palm + n * 0.45 * scale
        dist.append(_capsule_distance(xx, yy, thumb, thumb + (n * 0.8 + d * 0.5) * 0.6 * scale, 0.1 * scale))
    elif shape == "point":
        base = palm + d * 0.3 * scale
        dist.append(_capsule_distance(xx, yy, base, base + d * finger, 0.1 * scale))
    elif shape == "pinch":  # thumb and index finger open like a V
        for side in (-1, 1):
            base = palm + n * side * 0.25 * scale + d * 0.3 * scale
            dist.append(_capsule_distance(xx, yy, base, base + (d + n * side * 0.45) * finger, 0.1 * scale))
    return np.clip(0.5 - np.min(dist, axis=0), 0, 1).astype(np.float32)


def skin_colour(rng: np.random.Generator) -> np.ndarray:
    light = rng.uniform(0.3, 1.0)
    return np.clip(np.array([0.95, 0.72, 0.55]) * light + rng.normal(0, 0.03, 3), 0, 1).astype(np.float32)
