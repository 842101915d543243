"""ImageNet in its real on-disk layouts.

Supported: `train/<wnid>/*.JPEG` and `val/<wnid>/*.JPEG` (class folders), a flat `val/*.JPEG` with
`LOC_val_solution.csv` (columns ImageId,PredictionString; the label is the first wnid of
PredictionString), and the Kaggle layout where images live under `ILSVRC/Data/CLS-LOC/`.
Class index = position in the sorted train wnids (so every split agrees); class names come from
`LOC_synset_mapping.txt` ("n01440764 tench, Tinca tinca") when present.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable

from PIL import Image

from totobench.data.fingerprint import dataset_fingerprint
from totobench.errors import DataError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_root(root: Path) -> Path:
    """The folder that holds train/ and val/: `root` itself, or the Kaggle `ILSVRC/Data/CLS-LOC`."""
    kaggle = root / "ILSVRC" / "Data" / "CLS-LOC"
    return kaggle if not (root / "train").is_dir() and kaggle.is_dir() else root


def class_folders(split_dir: Path) -> list[str]:
    """Sorted names of the sub-folders of `split_dir` (the wnids of a class-folder split)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_synset_mapping(path: Path) -> dict[str, str]:
    """{wnid: name} from `LOC_synset_mapping.txt`; raises DataError on a malformed line."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            wnid, _, name = line.partition(" ")
            if not wnid.startswith("n"):
                raise DataError(f"{path}:{line_number}: expected '<wnid> <name>', got {line!r}")
            names[wnid] = name.strip()
    return names


def read_val_solution(path: Path) -> dict[str, str]:
    """{ImageId: first wnid of PredictionString} from `LOC_val_solution.csv`; raises DataError."""
    labels = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"ImageId", "PredictionString"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}; "
                            "expected ImageId,PredictionString")
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not row["ImageId"] or not tokens:
                raise DataError(f"{path}:{reader.line_num}: empty ImageId or PredictionString")
            labels[row["ImageId"]] = tokens[0]
    return labels


class ImageNetFolder:
    """Images and labels of one ImageNet split.

    `samples` is a list of (path, label index); `classes` the sorted wnids; `class_names`
    {wnid: name} (empty when no `LOC_synset_mapping.txt`). `__getitem__` returns
    (PIL RGB image, or `transform(image)`, label).

    Raises DataError (one line) when the split folder is missing or empty, the val solution CSV
    is missing or malformed, or a val image has a wnid that is not a train class. With
    `strict=False` those problems are collected in `.problems` [(path, message)] instead
    (used by `totobench data check`).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 transform: Callable | None = None, strict: bool = True):
        self.root = Path(root)
        self.split = split
        self.transform = transform
        self.problems: list[tuple[str, str]] = []
        self.extra_files: list[Path] = []
        base = image_root(self.root)
        self.split_dir = base / split

        mapping_path = self.root / SYNSET_MAPPING
        self.class_names = {}
        if mapping_path.is_file():
            self.extra_files.append(mapping_path)
            self.class_names = self._try(read_synset_mapping, mapping_path) or {}

        self.classes = self._find_classes(base)
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.classes)}
        self.samples = self._find_samples() if self.split_dir.is_dir() else []
        if not self.split_dir.is_dir():
            self.problems.append((str(self.split_dir), f"missing {split}/ folder"))
        elif not self.samples and not self.problems:
            self.problems.append((str(self.split_dir), "no images found"))
        if strict and self.problems:
            path, message = self.problems[0]
            more = f" (and {len(self.problems) - 1} more problems)" if len(self.problems) > 1 else ""
            raise DataError(f"{path}: {message}{more}")

    def _try(self, read, path):
        try:
            return read(path)
        except (DataError, OSError, UnicodeDecodeError, csv.Error) as err:
            message = str(err)
            self.problems.append((str(path), message.removeprefix(f"{path}: ")))
            return None

    def _find_classes(self, base: Path) -> list[str]:
        # Train folders define the class index so that every split agrees on it.
        for folder in (base / "train", self.split_dir):
            if folder.is_dir():
                wnids = class_folders(folder)
                if wnids:
                    return wnids
        return sorted(self.class_names)

    def _find_samples(self) -> list[tuple[str, int]]:
        wnid_folders = class_folders(self.split_dir)
        if wnid_folders:
            samples = []
            for wnid in wnid_folders:
                files = sorted(p for p in (self.split_dir / wnid).iterdir() if is_image_file(p))
                if wnid not in self.class_to_idx:
                    self.problems.append((str(self.split_dir / wnid),
                                          f"class folder {wnid} is not one of the {len(self.classes)} train classes"))
                    continue
                samples += [(str(p), self.class_to_idx[wnid]) for p in files]
            return samples
        return self._flat_samples()

    def _flat_samples(self) -> list[tuple[str, int]]:
        solution_path = self.root / VAL_SOLUTION
        files = sorted(p for p in self.split_dir.iterdir() if is_image_file(p))
        if not files:
            return []
        if not solution_path.is_file():
            self.problems.append((str(solution_path), f"flat {self.split}/ folder needs {VAL_SOLUTION} "
                                  "(or put the images in <wnid>/ class folders)"))
            return []
        self.extra_files.append(solution_path)
        labels = self._try(read_val_solution, solution_path)
        if labels is None:
            return []
        samples = []
        for path in files:
            wnid = labels.get(path.stem)
            if wnid is None:
                self.problems.append((str(path), f"ImageId {path.stem} not in {VAL_SOLUTION}"))
            elif wnid not in self.class_to_idx:
                self.problems.append((str(path), f"label {wnid} is not one of the {len(self.classes)} train classes"))
            else:
                samples.append((str(path), self.class_to_idx[wnid]))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform else image), label

    def fingerprint(self) -> str:
        """Hash of relative paths and sizes of this split's images and annotation files."""
        return dataset_fingerprint(self.root, [p for p, _ in self.samples] + self.extra_files)


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file fully as RGB; raises DataError when it is missing or unreadable."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{path}: unreadable image ({err})") from None
