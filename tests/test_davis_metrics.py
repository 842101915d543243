"""DAVIS J&F: per-frame measures and statistics on cases worked out by hand."""

import math

import numpy as np
import pytest
from scipy import ndimage

from totobench.metrics.davis import (
    boundary_f,
    boundary_map,
    boundary_radius,
    decay_bins,
    dilate_disk,
    disk,
    jaccard,
    mean_recall_decay,
)


def square(shape=(10, 10), top=2, left=2, size=4):
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_empty_and_empty_frame_scores_one():
    empty = np.zeros((10, 10), dtype=bool)
    assert jaccard(empty, empty) == 1.0
    assert boundary_f(empty, empty) == 1.0


def test_missing_object_scores_zero_both_ways():
    empty, gt = np.zeros((10, 10), dtype=bool), square()
    # predicted nothing: J = 0; boundary P = 1, R = 0 -> F = 0
    assert jaccard(empty, gt) == 0.0
    assert boundary_f(empty, gt) == 0.0
    # predicted an object that is not there: J = 0; P = 0, R = 1 -> F = 0
    assert jaccard(gt, empty) == 0.0
    assert boundary_f(gt, empty) == 0.0


def test_boundary_map_of_a_square_is_the_ring_half_a_pixel_towards_the_origin():
    # 4x4 square at rows/cols 2..5: its boundary is the ring of the 5x5 box at rows/cols 1..5
    ring = np.zeros((10, 10), dtype=bool)
    ring[1:6, 1:6] = True
    ring[2:5, 2:5] = False
    assert np.array_equal(boundary_map(square()), ring)
    assert boundary_map(square()).sum() == 16
    # a mask covering the whole image has no boundary (neighbours outside are ignored)
    assert not boundary_map(np.ones((5, 7), dtype=bool)).any()


def test_one_pixel_shift():
    gt, shifted = square(), square(left=3)
    # overlap 4x3 = 12, union 16 + 16 - 12 = 20
    assert jaccard(shifted, gt) == pytest.approx(12 / 20)
    # 10x10 image: radius ceil(0.008 * 14.14) = 1; every boundary pixel of one ring is within
    # one pixel of the other ring -> P = R = 1
    assert boundary_radius((10, 10)) == 1
    assert boundary_f(shifted, gt) == 1.0
    # radius 0 (bound_th = 0): only the 8 pixels of the shared top and bottom rows match -> 8/16
    assert boundary_f(shifted, gt, bound_th=0) == pytest.approx(0.5)


def test_two_pixel_shift():
    gt, shifted = square(), square(left=4)
    assert jaccard(shifted, gt) == pytest.approx(8 / 24)
    # radius 1: of the 16 pixels of the shifted ring, 4 of the top row, 4 of the bottom row and
    # the 2 ends of its left column (next to the other ring's top/bottom rows) match -> P = R = 10/16
    assert boundary_f(shifted, gt) == pytest.approx(10 / 16)


def test_void_pixels_are_left_out():
    gt, pred = square(), square(left=3)
    void = np.zeros((10, 10), dtype=bool)
    void[:, 6:] = True  # hides the column the prediction adds
    # overlap 12, union without void = 16 -> 0.75
    assert jaccard(pred, gt, void) == pytest.approx(12 / 16)
    assert jaccard(pred, gt, np.ones_like(void)) == 1.0


def test_boundary_radius_follows_the_image_diagonal():
    assert boundary_radius((480, 854)) == math.ceil(0.008 * math.hypot(480, 854)) == 8
    assert boundary_radius((480, 854), bound_th=3) == 3


def test_dilate_disk_equals_binary_dilation_with_the_disk():
    rng = np.random.default_rng(0)
    assert disk(1).astype(int).tolist() == [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    assert disk(8).sum() == sum(1 for y in range(-8, 9) for x in range(-8, 9) if x * x + y * y <= 64)
    for radius, shape in [(0, (9, 9)), (1, (40, 50)), (3, (40, 50)), (8, (40, 50)), (8, (5, 30))]:
        bmap = rng.random(shape) < 0.02
        bmap[0, 0] = bmap[-1, -1] = True  # corners: nothing may leak in from outside the image
        expected = ndimage.binary_dilation(bmap, structure=disk(radius))
        assert np.array_equal(dilate_disk(bmap, radius), expected), (radius, shape)


def test_mean_recall_decay_by_hand():
    # 5 frames: bins {0,1} {1,2} {2,3} {3,4}; decay = (0.9+0.5)/2 - (0.2+0.1)/2
    mean, recall, decay = mean_recall_decay(np.array([0.9, 0.5, 0.7, 0.2, 0.1]))
    assert mean == pytest.approx(0.48)
    assert recall == pytest.approx(0.4)  # 0.5 itself does not count
    assert decay == pytest.approx(0.55)
    # 8 frames: bins 0..2, 2..4, 4..5, 5..7
    mean, recall, decay = mean_recall_decay(np.array([1, 1, 1, 1, 0, 0, 0, 0.0]))
    assert (mean, recall, decay) == (0.5, 0.5, 1.0)
    assert mean_recall_decay(np.array([0.3])) == (0.3, 0.0, 0.0)


def test_decay_bins_match_rounded_linspace():
    assert [(b.start, b.stop) for b in decay_bins(8)] == [(0, 3), (2, 5), (4, 6), (5, 8)]
    for num_frames in range(1, 250):
        # official bin edges: round half up of linspace(1, n, 5), minus 1; bins include both edges
        edges = np.floor(np.linspace(1, num_frames, 5) + 0.5).astype(int) - 1
        bins = [(b.start, b.stop - 1) for b in decay_bins(num_frames)]
        assert bins == list(zip(edges[:-1], edges[1:])), num_frames


def _brute_force_boundary(mask):
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y in range(h):
        for x in range(w):
            neighbours = [(y, x + 1), (y + 1, x), (y + 1, x + 1)]
            out[y, x] = any(mask[ny, nx] != mask[y, x] for ny, nx in neighbours if ny < h and nx < w)
    return out


def _brute_force_f(pred, gt, radius):
    fg, gb = _brute_force_boundary(pred), _brute_force_boundary(gt)
    fg_pts, gt_pts = np.argwhere(fg), np.argwhere(gb)

    def matched(points, others):  # points with some other point at squared distance <= r^2
        squared = ((points[:, None, :] - others[None, :, :]) ** 2).sum(-1)
        return int((squared <= radius ** 2).any(axis=1).sum())

    precision, recall = matched(fg_pts, gt_pts) / len(fg_pts), matched(gt_pts, fg_pts) / len(gt_pts)
    return 2 * precision * recall / (precision + recall)


def test_j_and_f_match_a_brute_force_computation_on_blobs():
    rng = np.random.default_rng(1)
    shape = (48, 64)  # diagonal 80 -> radius ceil(0.64) = 1
    gt = ndimage.gaussian_filter(rng.random(shape), 3) > 0.5
    pred = ndimage.binary_dilation(gt, iterations=2) ^ (rng.random(shape) < 0.05)
    inter, union = (gt & pred).sum(), (gt | pred).sum()
    assert jaccard(pred, gt) == pytest.approx(inter / union)
    assert 0 < inter / union < 1
    assert np.array_equal(boundary_map(pred), _brute_force_boundary(pred))
    for bound_th in (0.008, 3):
        expected = _brute_force_f(pred, gt, boundary_radius(shape, bound_th))
        assert boundary_f(pred, gt, bound_th=bound_th) == pytest.approx(expected)
        assert 0 < expected < 1


def test_f_matches_brute_force_on_small_objects_far_from_the_edges():
    # boundaries in a small part of the frame, some pixels more than the radius apart
    shape = (60, 80)
    gt, pred = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    gt[20:30, 30:45] = True
    gt[33:36, 50:52] = True
    pred[22:31, 33:44] = True
    pred[40:42, 10:12] = True
    for bound_th in (0.008, 2, 4):
        expected = _brute_force_f(pred, gt, boundary_radius(shape, bound_th))
        assert boundary_f(pred, gt, bound_th=bound_th) == pytest.approx(expected)
        assert 0 < expected < 1
