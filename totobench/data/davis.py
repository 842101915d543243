"""DAVIS 2017 (semi-supervised) in its real on-disk layout.

`JPEGImages/<resolution>/<seq>/00000.jpg`, `Annotations/<resolution>/<seq>/00000.png` (indexed
PNG: 0 background, 1..K objects, 255 ignored; PASCAL VOC palette), `ImageSets/2017/<split>.txt`.
The resolution folder may have any name (480p, Full-Resolution, ...).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from totobench.data.fingerprint import dataset_fingerprint
from totobench.errors import DataError

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
IGNORE_INDEX = 255


def resolution_folders(root: Path) -> list[str]:
    """Sorted names of the resolution folders under `JPEGImages/` ([] when it is missing)."""
    images = root / "JPEGImages"
    if not images.is_dir():
        return []
    return sorted(p.name for p in images.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_set(path: Path) -> list[str]:
    """Sequence names, one per line, from `ImageSets/2017/<split>.txt`; raises DataError."""
    if not path.is_file():
        raise DataError(f"{path}: missing sequence list")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class DavisDataset:
    """Frames and indexed masks of the DAVIS-2017 sequences of one split.

    `resolution=None` picks the only resolution folder under `JPEGImages/` (DataError when there
    are several: pass one, e.g. "480p"). Raises DataError (one line) for a
    missing folder or sequence list; with `strict=False` the problems go to `.problems`
    [(path, message)] and the dataset keeps the sequences it can read.
    """

    def __init__(self, root: str | os.PathLike, split: str = "val", resolution: str | None = None,
                 strict: bool = True):
        self.root = Path(root)
        self.split = split
        self.problems: list[tuple[str, str]] = []
        self.resolution = resolution or self._only_resolution()
        self.image_dir = self.root / "JPEGImages" / (self.resolution or "")
        self.mask_dir = self.root / "Annotations" / (self.resolution or "")
        self.image_set = self.root / "ImageSets" / "2017" / f"{split}.txt"
        self.sequences: list[str] = []
        self._files: dict[str, list[str]] = {}  # frame file names, sorted = time order
        if self.resolution is not None:
            self._scan()
        if strict and self.problems:
            path, message = self.problems[0]
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise DataError(f"{path}: {message}{more}")

    def _only_resolution(self) -> str | None:
        found = resolution_folders(self.root)
        if len(found) == 1:
            return found[0]
        if not found:
            self.problems.append((str(self.root / "JPEGImages"), "missing JPEGImages/<resolution>/ folder"))
        else:
            self.problems.append((str(self.root / "JPEGImages"),
                                  f"several resolutions ({', '.join(found)}): choose one with resolution="))
        return None

    def _scan(self) -> None:
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                self.problems.append((str(folder), "missing folder"))
        try:
            listed = read_image_set(self.image_set)
        except DataError as err:
            self.problems.append((str(self.image_set), str(err).removeprefix(f"{self.image_set}: ")))
            return
        for seq in listed:
            seq_dir = self.image_dir / seq
            if not seq_dir.is_dir():
                self.problems.append((str(seq_dir), f"sequence {seq} listed in {self.image_set.name} has no frame folder"))
                continue
            files = sorted(p.name for p in seq_dir.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
            if not files:
                self.problems.append((str(seq_dir), "no frames"))
                continue
            first_mask = self.mask_dir / seq / f"{Path(files[0]).stem}.png"
            if not first_mask.is_file():
                self.problems.append((str(first_mask), "missing first-frame annotation"))
                continue
            self.sequences.append(seq)
            self._files[seq] = files

    def frame_names(self, seq: str) -> list[str]:
        """Frame names without extension, in time order (e.g. ["00000", "00001", ...])."""
        return [Path(name).stem for name in self._sequence_files(seq)]

    def _sequence_files(self, seq: str) -> list[str]:
        if seq not in self._files:
            raise DataError(f"{self.image_set}: unknown sequence {seq!r}")
        return self._files[seq]

    def frame_path(self, seq: str, i: int) -> Path:
        return self.image_dir / seq / self._sequence_files(seq)[i]

    def mask_path(self, seq: str, i: int) -> Path:
        return self.mask_dir / seq / f"{Path(self._sequence_files(seq)[i]).stem}.png"

    def load_frame(self, seq: str, i: int) -> np.ndarray:
        """Frame i of `seq` as uint8 [H, W, 3]; raises DataError when unreadable."""
        path = self.frame_path(seq, i)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{path}: unreadable frame ({err})") from None

    def load_mask(self, seq: str, i: int) -> np.ndarray:
        """Annotation of frame i as uint8 [H, W] palette indices (0 background, 255 ignored).

        Raises DataError when the PNG is missing, unreadable or not an indexed (mode P) image.
        """
        return load_indexed_png(self.mask_path(seq, i))

    def has_mask(self, seq: str, i: int) -> bool:
        return self.mask_path(seq, i).is_file()

    def num_objects(self, seq: str) -> int:
        """K = the largest object id in the first frame's annotation (255 ignored)."""
        ids = np.unique(self.load_mask(seq, 0))
        ids = ids[ids != IGNORE_INDEX]
        return int(ids.max()) if ids.size else 0

    def fingerprint(self) -> str:
        """Hash of relative paths and sizes of this split's frames, masks and sequence list."""
        paths = [self.image_set]
        for seq in self.sequences:
            for i in range(len(self._files[seq])):
                paths.append(self.frame_path(seq, i))
                if self.has_mask(seq, i):
                    paths.append(self.mask_path(seq, i))
        return dataset_fingerprint(self.root, paths)


def load_indexed_png(path: Path) -> np.ndarray:
    """An indexed PNG as uint8 [H, W] palette indices; raises DataError unless mode P."""
    try:
        with Image.open(path) as image:
            if image.mode != "P":
                raise DataError(f"{path}: mask is mode {image.mode}, expected an indexed PNG (mode P)")
            return np.array(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: missing annotation") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable annotation ({err})") from None


def voc_palette() -> list[int]:
    """The PASCAL VOC colour palette DAVIS annotations use: 256 RGB triplets, flattened."""
    palette = []
    for index in range(256):
        r = g = b = 0
        code = index
        for bit in range(8):
            r |= ((code >> 0) & 1) << (7 - bit)
            g |= ((code >> 1) & 1) << (7 - bit)
            b |= ((code >> 2) & 1) << (7 - bit)
            code >>= 3
        palette += [r, g, b]
    return palette
