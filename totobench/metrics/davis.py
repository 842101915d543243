"""DAVIS-2017 semi-supervised J&F, reproducing the official davis2017-evaluation rules.

The rules (PROTOCOLS.md, "DAVIS 2017 semi-supervised"):
- objects of a sequence are the ids 1..K, K = the largest id in the first frame's annotation;
- scored frames are all annotated frames but the first and the last;
- ground-truth pixels of value 255 count as background (the official loader zeroes them, so its
  void mask is always empty);
- J is the IoU of one object's masks in one frame, 1 when both masks are empty;
- F is the boundary F-measure: 1-pixel boundary maps, each dilated by a disk of radius
  ceil(0.008 * image diagonal), precision/recall of matched boundary pixels, F = 2PR/(P+R);
- per object: Mean over frames, Recall = fraction of frames above 0.5, Decay = mean of the first
  of 4 (overlapping) frame bins minus mean of the last;
- reported values are means over all objects of all sequences; J&F-Mean = (J-Mean + F-Mean) / 2.

Where the official code stops instead of scoring, we do better-defined things and say so:
a results folder whose largest id is below K is scored (the absent objects get empty masks),
and the Decay bins use plain integers (the official ones wrap around past 256 frames).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from totobench.data.davis import voc_palette
from totobench.errors import DataError
from totobench.io import atomic_path
from totobench.progress import progress_bar

VOID_LABEL = 255
METRIC_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


# ----------------------------------------------------------------------------- per-frame measures

def jaccard(mask: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J (IoU) of two binary masks [H, W]; void pixels are left out of both
    intersection and union. Returns 1.0 when the union is empty."""
    mask, gt = _binary(mask), _binary(gt)
    if mask.shape != gt.shape:
        raise ValueError(f"mask {mask.shape} and ground truth {gt.shape} differ in size")
    keep = np.ones_like(gt) if void is None else ~_binary(void)
    union = np.count_nonzero((mask | gt) & keep)
    if union == 0:
        return 1.0
    return np.count_nonzero(mask & gt & keep) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """1-pixel boundary of a binary mask [H, W] (the seg2bmap rule): a pixel is on the boundary
    when it differs from its east, south or south-east neighbour; neighbours outside the image
    are ignored, so the boundary sits half a pixel towards the origin from the true edge."""
    seg = _binary(mask)
    bmap = np.zeros_like(seg)
    bmap[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    bmap[:-1, :] |= seg[:-1, :] != seg[1:, :]
    bmap[:-1, :-1] |= seg[:-1, :-1] != seg[1:, 1:]
    return bmap


def disk(radius: int) -> np.ndarray:
    """Binary disk structuring element [2r+1, 2r+1]: offsets (dy, dx) with dy^2 + dx^2 <= r^2."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius ** 2


def dilate_disk(bmap: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation of `bmap` [H, W] by `disk(radius)` (pixels outside the image count as 0).

    The disk is split into its rows: row dy is a horizontal segment of half-width
    isqrt(r^2 - dy^2), so the dilation is an OR of shifted 1-d maximum filters (same result as
    ndimage.binary_dilation with the disk, several times faster)."""
    bmap = _binary(bmap)
    height = bmap.shape[0]
    out = np.zeros_like(bmap)
    widened = {}  # half-width -> horizontally dilated map
    for dy in range(-min(radius, height - 1), min(radius, height - 1) + 1):
        half = math.isqrt(radius * radius - dy * dy)
        if half not in widened:
            row = ndimage.maximum_filter1d(bmap.view(np.uint8), 2 * half + 1, axis=1, mode="constant")
            widened[half] = row.view(bool)
        row = widened[half]
        if dy >= 0:
            out[dy:] |= row[:height - dy]
        else:
            out[:dy] |= row[-dy:]
    return out


def boundary_radius(shape: tuple[int, int], bound_th: float = 0.008) -> int:
    """Dilation radius in pixels: `bound_th` itself when >= 1, else ceil(bound_th * diagonal)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(*shape)))


def boundary_f(mask: np.ndarray, gt: np.ndarray, void: np.ndarray | None = None,
               bound_th: float = 0.008) -> float:
    """Boundary F-measure of a predicted binary mask against the ground truth, both [H, W].

    Void pixels are cleared from both masks before taking boundaries. Precision = fraction of
    predicted boundary pixels within the dilation radius of a ground-truth boundary pixel, recall
    the converse. Empty boundaries: both -> P = R = 1; the prediction's only -> P = 1, R = 0;
    the ground truth's only -> P = 0, R = 1. F = 2PR / (P + R), 0 when P + R = 0.
    """
    mask, gt = _binary(mask), _binary(gt)
    if mask.shape != gt.shape:
        raise ValueError(f"mask {mask.shape} and ground truth {gt.shape} differ in size")
    if void is not None:
        keep = ~_binary(void)
        mask, gt = mask & keep, gt & keep
    fg_boundary, gt_boundary = boundary_map(mask), boundary_map(gt)
    n_fg, n_gt = np.count_nonzero(fg_boundary), np.count_nonzero(gt_boundary)
    if n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    elif n_fg == 0:
        precision, recall = 1.0, 0.0
    elif n_gt == 0:
        precision, recall = 0.0, 1.0
    else:
        radius = boundary_radius(mask.shape, bound_th)
        # every boundary pixel lies in the box around both boundaries: dilating that crop is enough
        rows = np.flatnonzero((fg_boundary | gt_boundary).any(axis=1))
        cols = np.flatnonzero((fg_boundary | gt_boundary).any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        fg_crop, gt_crop = fg_boundary[box], gt_boundary[box]
        precision = np.count_nonzero(fg_crop & dilate_disk(gt_crop, radius)) / n_fg
        recall = np.count_nonzero(gt_crop & dilate_disk(fg_crop, radius)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _binary(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).astype(bool)


# ----------------------------------------------------------------------------- per-object statistics

def decay_bins(num_frames: int) -> list[slice]:
    """The official 4 Decay bins over `num_frames` scored frames. Bin edges are
    round-half-up(linspace(0, n - 1, 5)); bin i runs from edge i to edge i+1 inclusive, so
    neighbouring bins share a frame."""
    edges = [(i * (num_frames - 1) + 2) // 4 for i in range(5)]
    return [slice(edges[i], edges[i + 1] + 1) for i in range(4)]


def mean_recall_decay(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of one object's per-frame J or F values [N], N >= 1.
    Recall = fraction of frames with a value > 0.5; Decay = mean(first bin) - mean(last bin)."""
    values = np.asarray(per_frame, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"expected a non-empty 1-d array of per-frame values, got shape {values.shape}")
    bins = decay_bins(values.size)
    decay = values[bins[0]].mean() - values[bins[3]].mean()
    return float(values.mean()), float((values > 0.5).mean()), float(decay)


def score_sequence(gt_masks: np.ndarray, result_masks: np.ndarray, num_objects: int,
                   bound_th: float = 0.008) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame J and F of one sequence.

    gt_masks, result_masks: integer index masks [N, H, W] of the scored frames (ground-truth 255
    already cleared). Returns (J, F), each float64 [num_objects, N]; row k is object id k + 1.
    """
    shape = (num_objects, len(gt_masks))
    j_values, f_values = np.zeros(shape), np.zeros(shape)
    for n, (gt, result) in enumerate(zip(gt_masks, result_masks)):
        for k in range(num_objects):
            gt_object, result_object = gt == k + 1, result == k + 1
            j_values[k, n] = jaccard(result_object, gt_object)
            f_values[k, n] = boundary_f(result_object, gt_object, bound_th=bound_th)
    return j_values, f_values


# ----------------------------------------------------------------------------- indexed PNGs

def read_indexed_png(path: str | Path) -> np.ndarray:
    """Index mask [H, W] uint8 of a single-channel PNG (mode P or L), as np.array(Image.open(path))
    reads it; raises DataError when the file is missing, unreadable or not single-channel."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with Image.open(path) as image:
            mode = image.mode
            mask = np.array(image)
    except OSError as error:
        raise DataError(f"{path}: not a readable PNG ({error})") from None
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise DataError(f"{path}: expected a single-channel indexed PNG (mode P or L), got mode {mode}")
    return mask


def write_indexed_png(path: str | Path, mask: np.ndarray) -> None:
    """Write an index mask [H, W] (values 0..255) as a PASCAL-palette indexed PNG, atomically."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.min(initial=0) < 0 or mask.max(initial=0) > 255:
        raise ValueError(f"expected a 2-d mask of ids in 0..255, got shape {mask.shape}")
    image = Image.fromarray(mask.astype(np.uint8))  # mode L; putpalette turns it into mode P
    image.putpalette(voc_palette())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# ----------------------------------------------------------------------------- folder evaluation

def davis_sequences(davis_root: str | Path, split: str = "val") -> list[str]:
    """Sequence names of `ImageSets/2017/<split>.txt`; raises DataError when it is missing."""
    listing = Path(davis_root) / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing}: split file not found (expected one sequence name per line)")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{listing}: no sequence names")
    return names


def read_ground_truth(davis_root: str | Path, sequence: str,
                      resolution: str = "480p") -> tuple[list[str], np.ndarray]:
    """Frame names and index masks [N, H, W] of `Annotations/<resolution>/<sequence>/*.png`, sorted
    by name, 255 cleared to 0. Raises DataError on a missing folder or frames of different sizes."""
    folder = Path(davis_root) / "Annotations" / resolution / sequence
    files = sorted(folder.glob("*.png"))
    if not files:
        raise DataError(f"{folder}: no annotation PNGs for sequence '{sequence}'")
    masks = [read_indexed_png(file) for file in files]
    for file, mask in zip(files, masks):
        if mask.shape != masks[0].shape:
            raise DataError(f"{file}: size {mask.shape[1]}x{mask.shape[0]}, the first annotation "
                            f"of '{sequence}' is {masks[0].shape[1]}x{masks[0].shape[0]}")
    masks = np.stack(masks)
    masks[masks == VOID_LABEL] = 0
    return [file.stem for file in files], masks


def read_results(results_dir: str | Path, sequence: str, frames: list[str],
                 shape: tuple[int, int], num_objects: int) -> np.ndarray:
    """Index masks [len(frames), H, W] of `<results_dir>/<sequence>/<frame>.png`; raises DataError
    on a missing sequence or frame, a wrong size, or an object id outside 1..num_objects."""
    folder = Path(results_dir) / sequence
    if not folder.is_dir():
        raise DataError(f"{folder}: results have no folder for sequence '{sequence}'")
    masks = []
    for frame in frames:
        path = folder / f"{frame}.png"
        if not path.is_file():
            raise DataError(f"{path}: missing result frame (one indexed PNG per annotated frame "
                            f"of '{sequence}' but the first and last is needed)")
        mask = read_indexed_png(path)
        if mask.shape != shape:
            raise DataError(f"{path}: size {mask.shape[1]}x{mask.shape[0]}, expected "
                            f"{shape[1]}x{shape[0]} like the ground truth")
        largest = int(mask.max())
        if largest > num_objects:
            raise DataError(f"{path}: object id {largest} is not in the ground truth of "
                            f"'{sequence}' (ids 1..{num_objects})")
        masks.append(mask)
    return np.stack(masks)


def evaluate_davis(davis_root: str | Path, results_dir: str | Path, split: str = "val", *,
                   sequences: list[str] | None = None, resolution: str = "480p",
                   bound_th: float = 0.008, show_progress: bool = False) -> dict:
    """Official semi-supervised DAVIS-2017 scores of a results folder.

    davis_root holds `ImageSets/2017/<split>.txt` and `Annotations/<resolution>/<seq>/<frame>.png`;
    results_dir holds `<seq>/<frame>.png` (indexed, same names and sizes). `sequences` restricts
    the split to these names. Returns {"J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean",
    "F-Recall", "F-Decay"} (fractions, means over all objects of all sequences) and "per_object":
    {"<seq>_<id>": the same seven keys for that object}. Raises DataError on a wrong folder.
    """
    names = davis_sequences(davis_root, split) if sequences is None else list(sequences)
    if not Path(results_dir).is_dir():
        raise DataError(f"{results_dir}: results folder not found")
    per_object = {}
    with progress_bar(fields="", transient=True, disable=not show_progress) as progress:
        task = progress.add_task("DAVIS J&F", total=len(names))
        for sequence in names:
            frames, gt_masks = read_ground_truth(davis_root, sequence, resolution)
            if len(frames) < 3:
                raise DataError(f"{Path(davis_root) / 'Annotations' / resolution / sequence}: "
                                f"{len(frames)} annotated frames; at least 3 needed (the first "
                                f"and last are not scored)")
            num_objects = int(gt_masks[0].max())
            scored = frames[1:-1]
            results = read_results(results_dir, sequence, scored, gt_masks.shape[1:], num_objects)
            j_values, f_values = score_sequence(gt_masks[1:-1], results, num_objects, bound_th)
            for k in range(num_objects):
                per_object[f"{sequence}_{k + 1}"] = _object_scores(j_values[k], f_values[k])
            progress.advance(task)
    if not per_object:
        raise DataError(f"{davis_root}: no objects in the first frames of split '{split}'")
    scores = {key: float(np.mean([o[key] for o in per_object.values()]))
              for key in METRIC_KEYS if key != "J&F-Mean"}
    scores = {"J&F-Mean": (scores["J-Mean"] + scores["F-Mean"]) / 2, **scores}
    return {**scores, "per_object": per_object}


def _object_scores(j_values: np.ndarray, f_values: np.ndarray) -> dict[str, float]:
    j_mean, j_recall, j_decay = mean_recall_decay(j_values)
    f_mean, f_recall, f_decay = mean_recall_decay(f_values)
    return {"J&F-Mean": (j_mean + f_mean) / 2, "J-Mean": j_mean, "J-Recall": j_recall,
            "J-Decay": j_decay, "F-Mean": f_mean, "F-Recall": f_recall, "F-Decay": f_decay}
