"""Every root of the generated data world (tiny) passes `data check` and opens with the readers."""

from __future__ import annotations

import pytest

from totobench.data.check import check_root
from totobench.data.davis import DavisDataset
from totobench.data.ego4d import find_sta_annotations, load_sta, sta_clip, sta_video_path
from totobench.data.imagenet import ImageNetFolder
from totobench.data.kinetics import KineticsClips, KineticsIndex
from totobench.data.synth import synth


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synth(out, seed=0, size="tiny", roots=["imagenet", "kinetics400", "ego4d", "davis"])
    return out


@pytest.mark.parametrize("fmt, root", [("imagenet", "imagenet"), ("k400", "kinetics400"),
                                       ("ego4d-sta", "ego4d"), ("davis", "davis")])
def test_generated_root_passes_check(world, fmt, root):
    report = check_root(fmt, world / root)
    assert report.problems == [] and report.usable
    assert {"train", "val"} <= set(report.summary["splits"])


def test_generated_roots_open_with_the_readers(world):
    train = ImageNetFolder(world / "imagenet", "train")
    val = ImageNetFolder(world / "imagenet", "val")
    assert len(train.classes) >= 10 and val.classes == train.classes and len(val) > 0
    assert train[0][0].mode == "RGB"

    index = KineticsIndex(world / "kinetics400", "val")
    assert len(index.classes) >= 8 and index.skipped == {}
    clip = KineticsClips(index, num_frames=8, stride=2, clips_per_video=2)[1]
    assert clip["frames"].shape[:1] == (8,) and clip["frames"].shape[-1] == 3

    sta = load_sta(find_sta_annotations(world / "ego4d", "val"))
    first = sta.annotations[0]
    frames = sta_clip(sta_video_path(world / "ego4d", first["video_uid"]), first["frame"], 4, 2)
    assert frames.shape[0] == 4 and first["objects"]

    davis = DavisDataset(world / "davis", "val")
    seq = davis.sequences[0]
    assert davis.load_mask(seq, 0).shape == davis.load_frame(seq, 0).shape[:2]
    assert davis.num_objects(seq) >= 2
