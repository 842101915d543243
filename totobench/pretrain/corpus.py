"""The pre-training corpus: source folders split into train and held-out files, their frames
decoded once, and the tokenized corpus that sequences are drawn from, keyed by (seed, step, index)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from totobench.data.preprocess import resize_and_crop
from totobench.errors import ConfigError, DataError
from totobench.model.sequence import build_sequence, clip_frame_indices, clip_span, num_clip_starts
from totobench.model.toto import TotoConfig
from totobench.progress import progress_bar

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".webm")
SPLITS = ("train", "heldout")


def heldout_bucket(relpath: str) -> int:
    """A file's held-out bucket in [0, 10000): a stable hash of its path, not its position."""
    return int(hashlib.sha1(relpath.encode()).hexdigest()[:8], 16) % 10000


def _heldout(relpath: str, fraction: float) -> bool:
    """Whether a file belongs to the held-out split: its bucket is below fraction * 10000."""
    return heldout_bucket(relpath) < fraction * 10000


def data_root(cfg: dict) -> Path:
    """The folder `data.sources` paths are relative to; "world" is the data world (generated once)."""
    d = cfg["data"]
    if d["root"] == "world":
        from totobench.data.synth import missing_roots
        from totobench.data.world import ensure_data_world, world_dir
        world = world_dir(d["world_size"], d["world_seed"])
        # only the pretrain/ root is needed: do not generate the evaluation roots here
        if world.is_dir() and "pretrain" not in missing_roots(world, d["world_seed"], d["world_size"]):
            return world
        return Path(ensure_data_world(d["world_size"], d["world_seed"]))
    root = Path(d["root"]).expanduser()
    if not root.is_dir():
        raise DataError(f"{cfg['_path']}: data.root {root} is not a folder")
    return root


def list_sources(cfg: dict, root: Path) -> list[dict]:
    """Every source with its sorted files split into train and held-out lists (relative paths)."""
    out = []
    frac = float(cfg["data"]["heldout_fraction"])
    for src in cfg["data"]["sources"]:
        folder = root / src["path"]
        suffixes = IMAGE_SUFFIXES if src["kind"] == "image" else VIDEO_SUFFIXES
        if not folder.is_dir():
            raise DataError(f"{folder}: {src['kind']} folder of data.sources not found")
        files = sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.suffix.lower() in suffixes)
        if not files:
            raise DataError(f"{folder}: no {src['kind']} files ({', '.join(suffixes)})")
        held = [f for f in files if _heldout(f, frac)]
        if frac > 0 and not held and len(files) > 1:
            held = files[-1:]  # tiny folders: still keep one file out
        train = [f for f in files if f not in set(held)]
        out.append({**src, "weight": float(src.get("weight", 1.0)), "train": train, "heldout": held})
    return out


def source_files(source: str | Path) -> list[tuple[str, Path]]:
    """(key, path) of every image and video of a `totobench tokenize` source, in a fixed order.

    A folder is searched recursively (hidden entries skipped; Kinetics, ImageNet and Ego4D roots
    are such folders), sorted by relative path; key = "<folder name>/<relative path>", the path
    corpus.list_sources hashes for a folder under a data root. A text file lists one path per line
    (relative to the list's folder; a `path label` line of a Kinetics list works; blank and `#`
    lines ignored), in its order; key = the path as written. Missing listed files stay in the list
    (the tokenizer skips and reports them). Raises ConfigError when `source` does not exist,
    DataError when a folder holds no image or video."""
    source = Path(source).expanduser()
    media = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    if source.is_dir():
        rels = sorted(str(p.relative_to(source)) for p in source.rglob("*")
                      if p.suffix.lower() in media and p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not rels:
            raise DataError(f"{source}: no image or video files ({', '.join(media)}) under this folder")
        return [(f"{source.resolve().name}/{rel}", source / rel) for rel in rels]
    if not source.is_file():
        raise ConfigError(f"--source {source}: not found; expected a folder or a text file listing files")
    out = []
    for line in source.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        path = parts[0] if len(parts) == 2 and not line.lower().endswith(media) else line
        out.append((path, source.parent / path))
    return out


def data_facts(root: Path, sources: list[dict]) -> dict:
    """The corpus as training.json records it: the root and, per source, its file counts."""
    return {"root": str(root), "sources": [
        {"kind": s["kind"], "path": s["path"], "weight": s["weight"],
         "train_files": len(s["train"]), "heldout_files": len(s["heldout"])} for s in sources]}


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """An image file as uint8 [1,3,res,res]: short side to res, centre crop."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            arr = np.array(im.convert("RGB"))
    except OSError as err:
        raise DataError(f"{path}: unreadable image ({err})") from None
    return resize_and_crop(arr[None], resolution)


def load_video(path: Path, resolution: int) -> torch.Tensor:
    """Every frame of a video as uint8 [T,3,res,res]: short side to res, centre crop."""
    from totobench.data.video import read_frames, video_info
    return resize_and_crop(read_frames(path, list(range(video_info(path).num_frames))), resolution)


def load_frames(sources: list[dict], root: Path, resolution: int, console) -> dict:
    """Decode every file once: {(source index, split): (uint8 [F,3,res,res] frames of all its files
    concatenated, int64 offsets [files + 1])}."""
    files = [(i, split, rel) for i, src in enumerate(sources) for split in SPLITS for rel in src[split]]
    parts: dict[tuple, list] = {(i, split): [] for i in range(len(sources)) for split in SPLITS}
    with progress_bar(console, fields="", disable=console is None) as progress:
        task = progress.add_task("decode corpus", total=len(files))
        for i, split, rel in files:
            load = load_image if sources[i]["kind"] == "image" else load_video
            parts[(i, split)].append(load(root / rel, resolution))
            progress.update(task, advance=1)
    pool = {}
    for key, xs in parts.items():
        offsets = np.concatenate([[0], np.cumsum([len(x) for x in xs])]).astype(np.int64)
        frames = torch.cat(xs) if xs else torch.zeros((0, 3, resolution, resolution), dtype=torch.uint8)
        pool[key] = (frames, offsets)
    return pool


def pooled(frames: dict, split: str, limit: int | None = None, seed: int = 0) -> torch.Tensor:
    """All frames of `split` over every source (uint8 [N,3,res,res]); a seeded subset of `limit`."""
    x = torch.cat([f for (i, sp), (f, _) in sorted(frames.items()) if sp == split])
    if limit is not None and len(x) > limit:
        keep = np.sort(np.random.default_rng([seed, 7]).choice(len(x), limit, replace=False))
        x = x[torch.from_numpy(keep)]
    return x


class TokenCorpus:
    """Tokenized files of every source; draws sequences as a pure function of an RNG key."""

    def __init__(self, path: Path, sources: list[dict], mc: TotoConfig):
        data = np.load(path)
        self.mc = mc
        self.sources = sources
        self.weights = np.array([s["weight"] for s in sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.ids = {}
        span = clip_span(mc.num_frames, mc.frame_stride)
        for i, src in enumerate(sources):
            for split in SPLITS:
                ids, off = data[f"{i}_{split}_ids"], data[f"{i}_{split}_offsets"]
                if src["kind"] == "video":
                    # only videos long enough for one clip can be sampled
                    items = [(int(a), int(b)) for a, b in zip(off[:-1], off[1:]) if b - a >= span]
                else:
                    items = list(range(len(ids)))
                self.ids[(i, split)] = (ids, items)
        for i, src in enumerate(sources):
            if not self.ids[(i, "train")][1]:
                raise DataError(f"{src['path']}: no training {src['kind']}s usable "
                                f"(videos need >= {span} frames)")

    def has(self, split: str) -> bool:
        """Whether any source has a usable file in `split`."""
        return any(self.ids[(i, split)][1] for i in range(len(self.sources)))

    def sample(self, key: list[int], split: str = "train") -> torch.Tensor:
        """One sequence LongTensor [L] drawn with np.random.default_rng(key)."""
        rng = np.random.default_rng(key)
        usable = [i for i in range(len(self.sources)) if self.ids[(i, split)][1]]
        w = self.weights[usable] / self.weights[usable].sum()
        i = usable[int(rng.choice(len(usable), p=w))]
        ids, items = self.ids[(i, split)]
        mc = self.mc
        if self.sources[i]["kind"] == "video":
            a, b = items[int(rng.integers(len(items)))]
            start = int(rng.integers(num_clip_starts(b - a, mc.num_frames, mc.frame_stride)))
            frames = ids[[a + j for j in clip_frame_indices(start, mc.num_frames, mc.frame_stride)]]
            kind = "video"
        else:
            pick = rng.integers(len(items), size=mc.images_per_sequence)
            frames = ids[[items[int(j)] for j in pick]]
            kind = "image"
        return build_sequence(torch.from_numpy(frames.astype(np.int64)), kind, mc)


def collate(seqs: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Pad sequences of unequal length (image vs video mixes) with pad_id into [B, L]."""
    length = max(len(s) for s in seqs)
    out = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        out[j, :len(s)] = s
    return out


def batch_for_step(corpus: TokenCorpus, seed: int, step: int, batch_size: int,
                   rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    """This rank's share of the global batch of `step`: samples g = rank, rank + world_size, ..."""
    return [corpus.sample([seed, 2, step, g]) for g in range(rank, batch_size, world_size)]
