"""Ego4D short-term object-interaction anticipation (STA): the official Top-5 mAP.

Rules (Ego4D forecasting evaluation, quirks included; see PROTOCOLS.md):
- a prediction matches a ground-truth object when box IoU > 0.5 (box areas count the end pixel:
  (x2-x1+1)*(y2-y1+1), negative sides clamp to 0), the labels the variant needs are equal, and
  |ttc error| <= 0.25 s;
- in each frame, predictions are matched from the highest score down, each one to the unmatched
  valid ground truth of highest IoU (first one on a tie), each ground truth at most once, for every
  variant independently;
- top-k rule (k = 5): in each frame, the first (k-1) * (number of ground-truth objects) false
  positives by score are discarded;
- AP per noun class (the predicted noun for predictions, the true noun for ground truth) is VOC
  all-point interpolated; the mAP averages over the noun classes present in the counted ground
  truth, in percent;
- a frame with no predictions contributes nothing, not even its ground truth.

One deliberate difference: equal scores are ordered by a stable sort, descending (the later of two
equal scores first). The official code uses numpy's default argsort, whose order on ties depends on
the CPU's SIMD sort; with distinct scores both agree exactly.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from totobench.errors import DataError

CHALLENGE = "ego4d_short_term_object_interaction_anticipation"
VERSION = "1.0"
VARIANTS = ("Noun", "Noun+Verb", "Noun+TTC", "Overall")
IOU_THRESHOLD = 0.5
TTC_THRESHOLD = 0.25
TOP_K = 5


@dataclass
class _FrameObjects:
    """Boxes [n,4] in pixels (x1,y1,x2,y2), noun / verb ids [n], times to contact [n] in seconds."""
    boxes: np.ndarray
    nouns: np.ndarray
    verbs: np.ndarray
    ttcs: np.ndarray
    scores: np.ndarray | None = None  # predictions only


# ----------------------------------------------------------------------------- validation

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _annotation_entries(annotations, source: str) -> list[Mapping]:
    """The annotated frames of a `load_sta` result, a parsed fho_sta_*.json (v1 or v2) or a list."""
    if hasattr(annotations, "annotations") and not isinstance(annotations, Mapping):
        annotations = annotations.annotations  # totobench.data.ego4d.StaAnnotations
    elif isinstance(annotations, Mapping):
        if "annotations" not in annotations:
            raise DataError(f"{source}: missing top-level field 'annotations' (an fho_sta_*.json file)")
        annotations = annotations["annotations"]
    if not isinstance(annotations, list):
        raise DataError(f"{source}: 'annotations' must be a list of annotated frames")
    for n, entry in enumerate(annotations):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("uid"), str):
            raise DataError(f"{source}: annotations[{n}] has no string field 'uid'")
    return annotations


def _ground_truth(entry: Mapping, source: str) -> _FrameObjects:
    """The objects of one annotated frame; raises DataError on a malformed one."""
    uid = entry["uid"]
    objects = entry.get("objects")
    if objects is None:
        raise DataError(f"{source}: uid {uid!r} has no field 'objects' (a test split has no ground truth)")
    if not isinstance(objects, list) or not objects:
        # the official evaluator cannot score a frame without objects either (it crashes)
        raise DataError(f"{source}: uid {uid!r} field 'objects' must be a non-empty list")
    for n, obj in enumerate(objects):
        where = f"{source}: uid {uid!r} objects[{n}]"
        box = obj.get("box") if isinstance(obj, Mapping) else None
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise DataError(f"{where}.box must be 4 numbers [x1, y1, x2, y2], got {box!r}")
        for field in ("noun_category_id", "verb_category_id"):
            if not _is_int(obj.get(field)):
                raise DataError(f"{where}.{field} must be an integer, got {obj.get(field)!r}")
        if not _is_number(obj.get("time_to_contact")):
            raise DataError(f"{where}.time_to_contact must be a number of seconds, "
                            f"got {obj.get('time_to_contact')!r}")
    return _FrameObjects(
        boxes=np.array([o["box"] for o in objects], dtype=np.float64).reshape(-1, 4),
        nouns=np.array([o["noun_category_id"] for o in objects], dtype=np.int64),
        verbs=np.array([o["verb_category_id"] for o in objects], dtype=np.int64),
        ttcs=np.array([o["time_to_contact"] for o in objects], dtype=np.float64))


def validate_sta_predictions(pred_json, annotations, source: str = "predictions") -> None:
    """Check a prediction file (parsed JSON) in the challenge format against the annotations.

    Required: keys "version" ("1.0"), "challenge" (CHALLENGE) and "results": {uid: [detection]},
    each detection {box: 4 numbers, noun_category_id: int, verb_category_id: int,
    time_to_contact: float, score: float}, and every annotated uid present (extra uids are ignored).
    `source` names the file in messages. Raises DataError with one line naming the uid and field.
    """
    if not isinstance(pred_json, Mapping):
        raise DataError(f"{source}: expected a JSON object with 'version', 'challenge' and 'results'")
    for key in ("results", "version", "challenge"):
        if key not in pred_json:
            raise DataError(f"{source}: missing top-level field {key!r}")
    if pred_json["challenge"] != CHALLENGE:
        raise DataError(f"{source}: field 'challenge' must be {CHALLENGE!r}, got {pred_json['challenge']!r}")
    if pred_json["version"] != VERSION:
        raise DataError(f"{source}: field 'version' must be {VERSION!r}, got {pred_json['version']!r}")
    results = pred_json["results"]
    if not isinstance(results, Mapping):
        raise DataError(f"{source}: field 'results' must be an object {{uid: [detections]}}")
    for uid, detections in results.items():
        if not isinstance(detections, list):
            raise DataError(f"{source}: uid {uid!r}: results must be a list of detections")
        for n, det in enumerate(detections):
            where = f"{source}: uid {uid!r} detection {n}"
            if not isinstance(det, Mapping):
                raise DataError(f"{where}: expected an object, got {det!r}")
            for field in ("box", "noun_category_id", "verb_category_id", "time_to_contact", "score"):
                if field not in det:
                    raise DataError(f"{where}: missing field {field!r}")
            box = det["box"]
            if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
                raise DataError(f"{where}: field 'box' must be a list of 4 numbers [x1, y1, x2, y2], got {box!r}")
            for field in ("noun_category_id", "verb_category_id"):
                if not _is_int(det[field]):
                    raise DataError(f"{where}: field {field!r} must be an integer, "
                                    f"got {det[field]!r} ({type(det[field]).__name__})")
            for field in ("time_to_contact", "score"):
                if not isinstance(det[field], float) or not math.isfinite(det[field]):
                    raise DataError(f"{where}: field {field!r} must be a finite float, "
                                    f"got {det[field]!r} ({type(det[field]).__name__})")
    expected = [entry["uid"] for entry in _annotation_entries(annotations, "annotations")]
    missing = [uid for uid in dict.fromkeys(expected) if uid not in results]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"{source}: uid {missing[0]!r} missing from field 'results'{more}; "
                        f"every annotated uid needs an entry, [] for none")


# ----------------------------------------------------------------------------- matching

def box_iou(pred_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """IoU [P, G] of boxes [P,4] and [G,4] (x1,y1,x2,y2 pixels), the end pixel counted in areas."""
    def area(x1, y1, x2, y2):
        return np.clip(x2 - x1 + 1, 0, None) * np.clip(y2 - y1 + 1, 0, None)

    p, g = pred_boxes[:, None, :], gt_boxes[None, :, :]
    inter = area(np.maximum(p[..., 0], g[..., 0]), np.maximum(p[..., 1], g[..., 1]),
                 np.minimum(p[..., 2], g[..., 2]), np.minimum(p[..., 3], g[..., 3]))
    union = area(*np.moveaxis(p, -1, 0)) + area(*np.moveaxis(g, -1, 0)) - inter
    return inter / (union + 1e-11)  # the official epsilon, which matters only at the threshold


def _descending(scores: np.ndarray) -> np.ndarray:
    """Indices by score, highest first; equal scores: the later index first."""
    return np.argsort(scores, kind="stable")[::-1]


def _match_frame(pred: _FrameObjects, gt: _FrameObjects, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """True positives [P, 4 variants] of one frame's predictions in descending score order (NaN =
    a false positive discarded by the top-k rule), and that order."""
    iou = box_iou(pred.boxes, gt.boxes)
    box_ok = iou > IOU_THRESHOLD
    noun_ok = pred.nouns[:, None] == gt.nouns[None, :]
    verb_ok = pred.verbs[:, None] == gt.verbs[None, :]
    ttc_ok = np.abs(pred.ttcs[:, None] - gt.ttcs[None, :]) <= TTC_THRESHOLD
    allowed = np.stack([box_ok & noun_ok, box_ok & noun_ok & verb_ok, box_ok & noun_ok & ttc_ok,
                        box_ok & noun_ok & verb_ok & ttc_ok], axis=-1)  # [P, G, variants]
    order = _descending(pred.scores)
    tp = np.zeros((len(order), len(VARIANTS)))
    taken = np.zeros((len(gt.nouns), len(VARIANTS)), dtype=bool)  # per variant: GT already matched
    variants = np.arange(len(VARIANTS))
    overlapping = box_ok.any(axis=1)
    for rank in np.flatnonzero(overlapping[order]).tolist():  # the others match nothing anywhere
        i = order[rank]
        candidates = allowed[i] & ~taken
        best = np.argmax(np.where(candidates, iou[i][:, None], -1.0), axis=0)  # highest IoU, first on ties
        hit = candidates[best, variants]
        tp[rank, hit] = 1.0
        taken[best[hit], variants[hit]] = True
    # top-k rule: the first (k-1) * n_gt false positives of the frame are forgiven (dropped)
    budget = (top_k - 1) * len(gt.nouns)
    false_pos = tp == 0
    tp[false_pos & (np.cumsum(false_pos, axis=0) <= budget)] = np.nan
    return tp, order


def _voc_ap(tp: np.ndarray, scores: np.ndarray, num_gt: int) -> float:
    """VOC all-point interpolated average precision of one class, in [0, 1]."""
    tp = tp[_descending(scores)]
    tp_cum = np.cumsum(tp)
    fp_cum = np.cumsum(1 - tp)
    precision = tp_cum / (tp_cum + fp_cum)
    recall = tp_cum / num_gt
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    precision[1:-1] = np.maximum.accumulate(precision[1:-1][::-1])[::-1]  # monotone envelope
    steps = np.where(recall[1:] != recall[:-1])[0] + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * precision[steps]))


def sta_top5_map(annotations, predictions, top_k: int = TOP_K) -> dict[str, float]:
    """Official STA Top-5 mAP, in percent: {"Noun", "Noun+Verb", "Noun+TTC", "Overall"}.

    annotations: `totobench.data.ego4d.load_sta(path)`, a parsed fho_sta_{train,val}.json (v1 or
    v2) or its list of annotated frames.
    predictions: a parsed challenge-format prediction file, or its "results" mapping
    {uid: [detection]}; run `validate_sta_predictions` first for a clear error on a bad file.
    A value is NaN when no annotated frame has a prediction (nothing to average).
    """
    results = predictions.get("results", predictions) if isinstance(predictions, Mapping) else None
    if not isinstance(results, Mapping):
        raise DataError("predictions: expected {uid: [detections]} or a challenge-format object")
    all_tp, all_scores, all_pred_nouns, all_gt_nouns = [], [], [], []
    for entry in _annotation_entries(annotations, "annotations"):
        detections = results.get(entry["uid"], [])
        gt = _ground_truth(entry, "annotations")
        if not detections:
            continue  # the official quirk: the frame's ground truth is not counted either
        pred = _FrameObjects(
            boxes=np.array([d["box"] for d in detections], dtype=np.float64).reshape(-1, 4),
            nouns=np.array([d["noun_category_id"] for d in detections], dtype=np.int64),
            verbs=np.array([d["verb_category_id"] for d in detections], dtype=np.int64),
            ttcs=np.array([d["time_to_contact"] for d in detections], dtype=np.float64),
            scores=np.array([d["score"] for d in detections], dtype=np.float64))
        tp, order = _match_frame(pred, gt, top_k)
        all_tp.append(tp)
        all_scores.append(pred.scores[order])
        all_pred_nouns.append(pred.nouns[order])
        all_gt_nouns.append(gt.nouns)
    if not all_tp:
        return {name: float("nan") for name in VARIANTS}
    tp = np.concatenate(all_tp)
    scores = np.concatenate(all_scores)
    pred_nouns = np.concatenate(all_pred_nouns)
    gt_nouns = np.concatenate(all_gt_nouns)
    metrics = {}
    for v, name in enumerate(VARIANTS):
        per_class = []
        for noun in np.unique(gt_nouns):
            keep = (pred_nouns == noun) & ~np.isnan(tp[:, v])
            if keep.any():
                ap = _voc_ap(tp[keep, v], scores[keep], int(np.sum(gt_nouns == noun)))
                per_class.append(ap * 100)
            else:
                per_class.append(0.0)
        metrics[name] = float(np.mean(per_class))
    return metrics


# ----------------------------------------------------------------------------- files

def check_ground_truth(annotations, source: str) -> None:
    """Raise DataError naming `source` unless every annotated frame of `annotations` (as for
    `sta_top5_map`) has well-formed objects; a test split, which has none, fails here."""
    for entry in _annotation_entries(annotations, source):
        _ground_truth(entry, source)


def load_sta_predictions(path: str, annotations) -> dict:
    """A challenge-format prediction file, parsed and checked against `annotations` with
    `validate_sta_predictions`. Raises DataError (one line naming the file) when it is missing,
    not JSON or malformed."""
    try:
        with open(path) as f:
            predictions = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: prediction file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: prediction file is not valid JSON ({err})") from None
    validate_sta_predictions(predictions, annotations, source=path)
    return predictions
