"""DAVIS J&F on small synthetic DAVIS roots: end to end, Recall/Decay, wrong results folders, CLI."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from totobench.cli import main
from totobench.errors import DataError
from totobench.metrics.davis import evaluate_davis, read_indexed_png, voc_palette, write_indexed_png

SEQUENCES = {"two-squares": 10, "one-blob": 5}  # name -> number of frames


def annotation(sequence: str, frame: int) -> np.ndarray:
    """A 40x60 index mask: moving squares (ids 1, 2) or a disc (id 1), with a void (255) rim."""
    mask = np.zeros((40, 60), dtype=np.uint8)
    if sequence == "two-squares":
        mask[5:15, 5 + 2 * frame:15 + 2 * frame] = 1
        mask[25:35, 40 - frame:50 - frame] = 2
        mask[4, 5 + 2 * frame:15 + 2 * frame] = 255
    else:
        ys, xs = np.mgrid[:40, :60]
        mask[(ys - 20) ** 2 + (xs - 20 - 3 * frame) ** 2 < 64] = 1
    return mask


@pytest.fixture()
def davis(tmp_path):
    """(davis_root, results_dir) where results are the ground truth (void cleared to 0)."""
    root, results = tmp_path / "davis", tmp_path / "results"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("\n".join(SEQUENCES) + "\n")
    for sequence, num_frames in SEQUENCES.items():
        for frame in range(num_frames):
            gt = annotation(sequence, frame)
            write_indexed_png(root / "Annotations" / "480p" / sequence / f"{frame:05d}.png", gt)
            write_indexed_png(results / sequence / f"{frame:05d}.png", np.where(gt == 255, 0, gt))
    return root, results


def test_indexed_png_round_trip(tmp_path):
    mask = annotation("two-squares", 3)
    write_indexed_png(tmp_path / "m.png", mask)
    with Image.open(tmp_path / "m.png") as image:
        assert image.mode == "P"
        assert image.getpalette()[3:9] == [128, 0, 0, 0, 128, 0]  # VOC colours of ids 1 and 2
    assert np.array_equal(read_indexed_png(tmp_path / "m.png"), mask)
    assert voc_palette()[255 * 3:] == [224, 224, 192]


def test_perfect_predictions_score_one_everywhere(davis):
    scores = evaluate_davis(*davis)
    assert set(scores["per_object"]) == {"two-squares_1", "two-squares_2", "one-blob_1"}
    for values in [scores, *scores["per_object"].values()]:
        for key in ("J&F-Mean", "J-Mean", "J-Recall", "F-Mean", "F-Recall"):
            assert values[key] == 1.0, key
        assert values["J-Decay"] == 0.0 and values["F-Decay"] == 0.0


def test_recall_and_decay_on_a_sequence_built_for_them(davis):
    root, results = davis
    # object 1 of two-squares is found in scored frames 1..4 and lost in 5..8 (frame 9 is not scored)
    for frame in range(5, 10):
        path = results / "two-squares" / f"{frame:05d}.png"
        mask = read_indexed_png(path)
        write_indexed_png(path, np.where(mask == 1, 0, mask))
    scores = evaluate_davis(root, results)
    lost = scores["per_object"]["two-squares_1"]
    # per-frame J = F = [1, 1, 1, 1, 0, 0, 0, 0]: bins 0..2 and 5..7 -> Decay 1 - 0
    for key, value in {"J-Mean": 0.5, "J-Recall": 0.5, "J-Decay": 1.0,
                       "F-Mean": 0.5, "F-Recall": 0.5, "F-Decay": 1.0, "J&F-Mean": 0.5}.items():
        assert lost[key] == value, key
    # means over the 3 objects, not over the 2 sequences
    assert scores["J-Mean"] == pytest.approx(2.5 / 3)
    assert scores["J-Recall"] == pytest.approx(2.5 / 3)
    assert scores["J-Decay"] == pytest.approx(1 / 3)
    assert scores["J&F-Mean"] == pytest.approx(2.5 / 3)


def test_an_object_absent_from_every_result_frame_scores_zero(davis):
    root, results = davis
    for path in (results / "two-squares").glob("*.png"):
        mask = read_indexed_png(path)
        write_indexed_png(path, np.where(mask == 2, 0, mask))
    scores = evaluate_davis(root, results)
    missing = scores["per_object"]["two-squares_2"]
    assert missing["J-Mean"] == 0.0 and missing["F-Mean"] == 0.0 and missing["J-Decay"] == 0.0
    assert scores["J-Mean"] == pytest.approx(2 / 3)


def test_first_and_last_frames_are_not_needed(davis):
    root, results = davis
    (results / "one-blob" / "00000.png").unlink()
    (results / "one-blob" / "00004.png").unlink()
    assert evaluate_davis(root, results)["J-Mean"] == 1.0


def test_wrong_results_folders_raise_one_clear_line(davis):
    root, results = davis
    shutil.rmtree(results / "one-blob")
    with pytest.raises(DataError, match=r"one-blob: results have no folder for sequence 'one-blob'"):
        evaluate_davis(root, results)
    shutil.copytree(root / "Annotations" / "480p" / "one-blob", results / "one-blob")

    (results / "two-squares" / "00003.png").unlink()
    with pytest.raises(DataError, match=r"two-squares/00003\.png: missing result frame"):
        evaluate_davis(root, results)

    write_indexed_png(results / "two-squares" / "00003.png", np.zeros((40, 61), dtype=np.uint8))
    with pytest.raises(DataError, match=r"00003\.png: size 61x40, expected 60x40"):
        evaluate_davis(root, results)

    bad = np.where(annotation("two-squares", 3) == 255, 0, annotation("two-squares", 3))
    bad[0, 0] = 3
    write_indexed_png(results / "two-squares" / "00003.png", bad)
    with pytest.raises(DataError, match=r"object id 3 is not in the ground truth of 'two-squares' \(ids 1\.\.2\)"):
        evaluate_davis(root, results)

    write_indexed_png(results / "two-squares" / "00003.png", annotation("two-squares", 3))
    with pytest.raises(DataError, match=r"object id 255 is not in the ground truth"):
        evaluate_davis(root, results)

    Image.new("RGB", (60, 40)).save(results / "two-squares" / "00003.png")
    with pytest.raises(DataError, match=r"single-channel indexed PNG .* got mode RGB"):
        evaluate_davis(root, results)

    with pytest.raises(DataError, match=r"ImageSets/2017/train\.txt: split file not found"):
        evaluate_davis(root, results, split="train")


def test_cli_prints_tables_and_writes_json(davis, tmp_path, capsys):
    root, results = davis
    out = tmp_path / "scores.json"
    code = main(["davis-eval", "--davis-root", str(root), "--results", str(results), "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "J&F-Mean" in printed and "two-squares" in printed
    written = json.loads(out.read_text())
    assert written["J&F-Mean"] == 1.0 and written["per_object"]["one-blob_1"]["F-Mean"] == 1.0

    (results / "one-blob" / "00002.png").unlink()
    code = main(["davis-eval", "--davis-root", str(root), "--results", str(results)])
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1 and "00002.png: missing result frame" in error
