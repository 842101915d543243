"""Label propagation: cases worked by hand, and the vectorised version against the plain loop."""

import math

import numpy as np
import pytest
import torch

import totobench.probes.label_propagation as lp
from totobench.probes.label_propagation import (
    label_propagation,
    label_propagation_loop,
    mask_to_soft_labels,
    radius_mask,
    soft_labels_to_mask,
)


def random_video(seed, frames, h, w, dim, labels, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    feats = torch.randn(frames, h, w, dim, generator=generator, dtype=dtype)
    first = torch.rand(labels, h, w, generator=generator, dtype=dtype)
    return feats, first / first.sum(0, keepdim=True)


@pytest.mark.parametrize("frames,h,w,context,radius,topk", [
    (9, 6, 7, 3, 2.5, 5),     # ring buffer wraps around several times
    (6, 5, 5, 20, 12, 10),    # context longer than the video, radius covers the grid
    (5, 4, 4, 2, 1, 30),      # radius 1 keeps only the same cell; top-k larger than the valid positions
    (4, 3, 3, 0, 2, 4),       # first frame only
])
def test_vectorised_equals_loop(frames, h, w, context, radius, topk):
    feats, first = random_video(0, frames, h, w, dim=16, labels=3)
    args = dict(context=context, radius=radius, topk=topk, temperature=0.07)
    fast, slow = label_propagation(feats, first, **args), label_propagation_loop(feats, first, **args)
    assert fast.shape == (frames, 3, h, w)
    assert torch.equal(fast[0], first)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    # soft labels stay distributions
    torch.testing.assert_close(fast.sum(1), torch.ones(frames, h, w, dtype=fast.dtype))


def test_chunked_queries_give_the_same_result(monkeypatch):
    feats, first = random_video(1, 6, 6, 6, dim=8, labels=4)
    whole = label_propagation(feats, first, context=3, radius=3, topk=4)
    monkeypatch.setattr(lp, "MAX_AFFINITY_ELEMENTS", 50)  # a handful of query rows per chunk
    torch.testing.assert_close(label_propagation(feats, first, context=3, radius=3, topk=4), whole)


def test_float32_matches_loop():
    feats, first = random_video(2, 6, 8, 8, dim=32, labels=3, dtype=torch.float32)
    fast = label_propagation(feats, first, context=4, radius=4, topk=5, temperature=0.05)
    slow = label_propagation_loop(feats, first, context=4, radius=4, topk=5, temperature=0.05)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)


def test_softmax_weights_by_hand():
    # one query cell; first frame has 2 cells at cosine 1 and 0 from it (features not unit length:
    # they are normalised inside); temperature 1, top-2 -> weights e/(e+1), 1/(e+1)
    feats = torch.tensor([[[[3.0, 0.0], [0.0, 2.0]]], [[[5.0, 0.0], [5.0, 0.0]]]])  # [T=2, h=1, w=2, D=2]
    first = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # cell 0 background, cell 1 object
    out = label_propagation(feats, first, context=0, topk=2, temperature=1.0)
    near = math.e / (math.e + 1)
    expected = torch.tensor([[[near, near]], [[1 - near, 1 - near]]])
    torch.testing.assert_close(out[1], expected)
    # top-1 copies the label of the most similar cell: both target cells look like cell 0
    out = label_propagation(feats, first, context=0, topk=1, temperature=1.0)
    torch.testing.assert_close(out[1], torch.tensor([[[1.0, 1.0]], [[0.0, 0.0]]]))


def test_labels_follow_a_moving_pattern_with_top1():
    # one-hot features on a 1x4 grid, moving one cell right per frame (wrapping); top-1 with the
    # previous frame in context follows the motion, the radius stops it from jumping 3 cells
    eye = torch.eye(4)
    feats = torch.stack([eye[[(c - t) % 4 for c in range(4)]] for t in range(4)])[:, None]  # [4,1,4,4]
    first = torch.zeros(2, 1, 4)
    first[0], first[1, 0, 0] = 1, 1  # the object is on cell 0
    first[0, 0, 0] = 0
    out = label_propagation(feats, first, context=1, radius=1.5, topk=1, temperature=0.1)
    objects = out[:, 1, 0].argmax(dim=1).tolist()
    assert objects == [0, 1, 2, 3]


def test_radius_mask_is_strictly_below_the_radius():
    mask = radius_mask(3, 3, 1)  # distance < 1: only the cell itself
    assert torch.equal(mask, torch.eye(9, dtype=torch.bool))
    mask = radius_mask(3, 3, 1.5)  # the 8-neighbourhood (diagonal 1.41) and the cell
    assert mask[4].all() and mask[0].tolist() == [True, True, False, True, True, False, False, False, False]


def test_mask_to_soft_labels_averages_each_cell():
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[:2, :3] = 1         # fills cell (0, 0)
    mask[2, 3:] = 2          # half of cell (1, 1)
    mask[3, 0] = 255         # void counts as background
    soft = mask_to_soft_labels(mask, num_labels=3, size=(2, 2))
    assert soft.shape == (3, 2, 2)
    torch.testing.assert_close(soft[1], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(soft[2], torch.tensor([[0.0, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(soft.sum(0), torch.ones(2, 2))


def test_soft_labels_to_mask_upsamples_bilinearly_then_argmax():
    # label 1 probabilities [0, 1] on a 1x2 grid upsampled to 1x4 (half-pixel centres):
    # [0, 0.25, 0.75, 1] -> argmax [0, 0, 1, 1]; label 2 never wins
    soft = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[0.1, 0.1]]])
    mask = soft_labels_to_mask(soft, size=(1, 4))
    assert mask.dtype == np.uint8
    assert mask.tolist() == [[0, 0, 1, 1]]
    assert soft_labels_to_mask(soft, size=(3, 4)).tolist() == [[0, 0, 1, 1]] * 3
