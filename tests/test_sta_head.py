"""The STA head: targets, decoding by hand, and training on a trivially separable synthetic set."""

import math

import pytest
import torch

from totobench.errors import DataError
from totobench.metrics.ego4d_sta import CHALLENGE, sta_top5_map, validate_sta_predictions
from totobench.probes.sta_head import (IGNORE, STAHead, STAHeadConfig, decode_sta, sta_loss,
                                       sta_targets, train_sta_head)


def test_targets_put_each_object_on_its_centre_cell():
    objects = [[{"box": [0, 0, 40, 20], "noun_category_id": 3, "verb_category_id": 1, "time_to_contact": 0.5},
                {"box": [250, 180, 310, 230], "noun_category_id": 0, "verb_category_id": 2, "time_to_contact": 1.5}]]
    t = sta_targets(objects, [(320, 240)], grid=(4, 4), num_nouns=4, num_verbs=3)
    # centres (20, 10) -> cell (row 0, col 0); (280, 205) -> (row 3, col 3) on an 80 x 60 px cell grid
    assert t["objectness"][0].nonzero().tolist() == [[0, 0], [3, 3]]
    assert t["box"][0, 0, 0].tolist() == pytest.approx([20 / 320, 10 / 240, 40 / 320, 20 / 240])
    assert t["noun"][0, 3, 3].item() == 0 and t["verb"][0, 0, 0].item() == 1
    assert t["ttc"][0, 3, 3].item() == 1.5
    assert (t["noun"][0] != IGNORE).sum().item() == 2
    with pytest.raises(DataError, match="noun 4"):
        sta_targets([[dict(objects[0][0], noun_category_id=4)]], [(320, 240)], (4, 4), 4, 3)


def test_decode_ranks_objectness_times_noun_probability():
    h = w = 2
    big = 20.0  # logits that make probabilities ~0 or ~1
    objectness = torch.full((1, h, w), -big)
    objectness[0, 1, 0] = 0.0  # p = 0.5
    objectness[0, 0, 1] = big  # p = 1
    noun = torch.full((1, h, w, 3), -big)
    noun[0, 1, 0, 2] = 0.0
    noun[0, 0, 1, 0] = math.log(3.0)  # nouns 0 and 1 at this cell: p = 3/4 and 1/4
    noun[0, 0, 1, 1] = 0.0
    verb = torch.zeros(1, h, w, 2)
    verb[0, 0, 1, 1] = 1.0
    box = torch.tensor([0.5, 0.5, 0.2, 0.4]).expand(1, h, w, 4).clone()
    box[0, 0, 1] = torch.tensor([0.9, 0.1, 0.4, 0.4])  # partly outside the frame: clipped
    outputs = {"objectness": objectness, "box": box, "noun": noun, "verb": verb,
               "ttc": torch.full((1, h, w), 0.75)}
    [dets] = decode_sta(outputs, [(200, 100)], topk=3)
    assert [d["noun_category_id"] for d in dets] == [0, 2, 1]  # scores 0.75, 0.5, 0.25
    assert [d["score"] for d in dets] == pytest.approx([0.75, 0.5, 0.25])
    assert dets[0]["box"] == pytest.approx([140.0, 0.0, 200.0, 30.0])
    assert dets[1]["box"] == pytest.approx([80.0, 30.0, 120.0, 70.0])
    assert dets[0]["verb_category_id"] == 1 and dets[0]["time_to_contact"] == 0.75
    assert all(isinstance(d["score"], float) and isinstance(d["noun_category_id"], int) for d in dets)


def synthetic_frames(n, grid=8, nouns=5, verbs=3, dim=32, seed=0):
    """Frames whose tokens say where the object is, its class, verb, size and ttc (plus noise).
    Every token also carries a shared background direction, as transformer tokens do."""
    g = torch.Generator().manual_seed(seed)
    tokens = 0.3 * torch.randn(n, grid, grid, dim, generator=g)
    tokens[..., -1] += 3.0
    frames, sizes = [], []
    width, height = 320, 240
    for i in range(n):
        row, col = torch.randint(0, grid, (2,), generator=g).tolist()
        noun = int(torch.randint(0, nouns, (1,), generator=g))
        verb = int(torch.randint(0, verbs, (1,), generator=g))
        ttc = float(torch.rand(1, generator=g)) * 2
        bw, bh = 0.1 + 0.05 * noun, 0.15 + 0.05 * verb  # normalised box size
        cx, cy = (col + 0.5) / grid, (row + 0.5) / grid
        frames.append([{"box": [(cx - bw / 2) * width, (cy - bh / 2) * height,
                                (cx + bw / 2) * width, (cy + bh / 2) * height],
                        "noun_category_id": noun, "verb_category_id": verb, "time_to_contact": ttc}])
        sizes.append((width, height))
        code = torch.zeros(dim)
        code[0] = 3.0  # "an object is here"
        code[1 + noun] = 3.0
        code[1 + nouns + verb] = 3.0
        code[1 + nouns + verbs] = 2.0 * ttc
        tokens[i, row, col] += code
    return tokens, frames, sizes


def test_training_on_separable_features_reaches_high_noun_map():
    torch.manual_seed(0)
    train_tokens, train_frames, train_sizes = synthetic_frames(256, seed=0)
    val_tokens, val_frames, val_sizes = synthetic_frames(64, seed=1)
    targets = sta_targets(train_frames, train_sizes, (8, 8), num_nouns=5, num_verbs=3)
    head = train_sta_head(train_tokens, targets, num_nouns=5, num_verbs=3, epochs=25, lr=1e-2,
                          seed=0, batch_size=32, hidden=64)
    with torch.no_grad():
        detections = decode_sta(head(val_tokens), val_sizes, topk=5)
    annotations = {"annotations": [{"uid": f"u{i}", "objects": objs} for i, objs in enumerate(val_frames)]}
    predictions = {"version": "1.0", "challenge": CHALLENGE,
                   "results": {f"u{i}": dets for i, dets in enumerate(detections)}}
    validate_sta_predictions(predictions, annotations)
    metrics = sta_top5_map(annotations, predictions)
    assert metrics["Noun"] > 90.0, metrics
    assert metrics["Noun+Verb"] > 80.0, metrics


def test_untrained_head_scores_low_and_loss_decreases():
    tokens, frames, sizes = synthetic_frames(64, seed=2)
    targets = sta_targets(frames, sizes, (8, 8), num_nouns=5, num_verbs=3)
    torch.manual_seed(0)
    untrained = STAHead(STAHeadConfig(32, 5, 3, hidden=64))
    trained = train_sta_head(tokens, targets, 5, 3, epochs=15, lr=3e-3, seed=0, batch_size=32, hidden=64)
    with torch.no_grad():
        assert sta_loss(trained(tokens), targets) < 0.5 * sta_loss(untrained(tokens), targets)
        detections = decode_sta(untrained(tokens), sizes, topk=5)
    annotations = {"annotations": [{"uid": f"u{i}", "objects": objs} for i, objs in enumerate(frames)]}
    assert sta_top5_map(annotations, {f"u{i}": d for i, d in enumerate(detections)})["Noun"] < 30.0
