"""`totobench data check`: clean fixtures pass; each kind of damage is reported with its path."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from test_data_readers import make_davis, make_ego4d, make_imagenet
from test_data_readers_kinetics import make_kinetics, video_name

from totobench.cli import main
from totobench.data.check import check_root


def run_check(capsys, fmt, root) -> tuple[int, list[str]]:
    code = main(["data", "check", "--format", fmt, str(root)])
    return code, capsys.readouterr().out.splitlines()


def problem_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith(("ERROR ", "WARNING "))]


@pytest.mark.parametrize("fmt, make", [("imagenet", make_imagenet), ("k400", make_kinetics),
                                       ("ego4d-sta", make_ego4d), ("davis", make_davis)])
def test_clean_roots_pass_with_a_summary(tmp_path, capsys, fmt, make):
    root = make(tmp_path / fmt)
    code, lines = run_check(capsys, fmt, root)
    assert code == 0 and problem_lines(lines) == [] and lines[-1] == "usable: 0 errors, 0 warnings"
    splits = check_root(fmt, root).summary["splits"]
    assert set(splits) >= {"val"}


def test_summary_counts(tmp_path):
    imagenet = check_root("imagenet", make_imagenet(tmp_path / "in")).summary
    assert imagenet["splits"]["train"] == {"images": 6, "classes": 3, "images per class": "2",
                                           "resolution": "20x16..24x16"}
    assert imagenet["splits"]["val"]["images"] == 4 and imagenet["classes"] == 3
    k400 = check_root("k400", make_kinetics(tmp_path / "k400")).summary["splits"]["train"]
    assert (k400["videos listed"], k400["usable"], k400["classes"], k400["frames"], k400["fps"],
            k400["resolution"]) == (4, 4, 3, "24..40", "25", "24x16")
    sta = check_root("ego4d-sta", make_ego4d(tmp_path / "ego4d")).summary["splits"]
    assert sta["train"]["objects"] == 2 and sta["test"]["annotations"] == 1 and sta["val"]["nouns"] == 3
    davis = check_root("davis", make_davis(tmp_path / "davis")).summary["splits"]["val"]
    assert (davis["sequences"], davis["frames"], davis["objects"], davis["resolution"]) == (2, 6, 3, "24x16")


def test_k400_deleted_and_truncated_videos_are_reported(tmp_path, capsys):
    root = make_kinetics(tmp_path / "k400")
    deleted = root / "train" / video_name("_x_Y9", 0, 10)
    deleted.unlink()
    truncated = root / "val" / video_name("v-al_1", 2, 12)
    truncated.write_bytes(truncated.read_bytes()[:1500])
    code, lines = run_check(capsys, "k400", root)
    problems = problem_lines(lines)
    assert f"WARNING {deleted}: missing video (the reader skips it)" in problems
    assert any(p.startswith(f"WARNING {truncated}: unreadable or truncated video") for p in problems)
    assert len(problems) == 2 and code == 0  # the runs skip these two; the rest is usable


def test_k400_unknown_label_and_missing_split(tmp_path, capsys):
    root = make_kinetics(tmp_path / "k400")
    with open(root / "annotations" / "validate.csv", "a") as f:
        f.write('"juggling fire",abc,0,10,validate\n')
    code, lines = run_check(capsys, "k400", root)
    assert code == 1
    assert problem_lines(lines) == [f"ERROR {root / 'annotations' / 'validate.csv'}: abc_000000_000010.mp4 label "
                                    "'juggling fire': unknown label, not one of the 3 train classes"]
    shutil.rmtree(root / "val")
    (root / "annotations" / "validate.csv").unlink()
    code, lines = run_check(capsys, "k400", root)
    assert code == 1 and any("no val.csv" in p for p in problem_lines(lines))


def test_ego4d_missing_box_wrong_type_and_missing_video(tmp_path, capsys):
    root = make_ego4d(tmp_path / "ego4d")
    path = root / "annotations" / "fho_sta_val.json"
    data = json.loads(path.read_text())
    del data["annotations"][0]["objects"][0]["box"]
    data["annotations"][1]["objects"][0]["time_to_contact"] = "soon"
    path.write_text(json.dumps(data))
    (root / "v2" / "full_scale" / "vid-b.mp4").unlink()
    code, lines = run_check(capsys, "ego4d-sta", root)
    problems = problem_lines(lines)
    assert code == 1
    assert f"ERROR {path}: vid-a_0000030: objects[0]: box: missing (expected [x1, y1, x2, y2] in pixels)" in problems
    assert (f"ERROR {path}: vid-b_0000002: objects[0]: time_to_contact: expected a non-negative number "
            "of seconds, got 'soon'") in problems
    assert any(p.startswith(f"ERROR {root / 'v2' / 'full_scale' / 'vid-b.mp4'}: video vid-b.mp4 not found")
               for p in problems)


def test_ego4d_annotated_frame_past_the_video_end(tmp_path, capsys):
    root = make_ego4d(tmp_path / "ego4d")
    path = root / "annotations" / "fho_sta_train.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["frame"] = 31  # vid-b has 30 frames
    path.write_text(json.dumps(data))
    code, lines = run_check(capsys, "ego4d-sta", root)
    assert code == 1 and problem_lines(lines) == [
        f"ERROR {root / 'v2' / 'full_scale' / 'vid-b.mp4'}: annotated frame 31 is past the video's 30 frames"]


def test_imagenet_unreadable_image_and_missing_folder(tmp_path, capsys):
    root = make_imagenet(tmp_path / "in")
    broken = root / "train" / "n01443537" / "n01443537_1.JPEG"
    broken.write_bytes(broken.read_bytes()[:200])
    code, lines = run_check(capsys, "imagenet", root)
    assert code == 1 and len(problem_lines(lines)) == 1
    assert problem_lines(lines)[0].startswith(f"ERROR {broken}: unreadable image")
    shutil.rmtree(root / "val")
    code, lines = run_check(capsys, "imagenet", root)
    assert f"ERROR {root / 'val'}: missing val/ folder" in problem_lines(lines)


def test_davis_mask_not_in_p_mode_missing_mask_and_missing_list(tmp_path, capsys):
    root = make_davis(tmp_path / "davis")
    rgb = root / "Annotations" / "480p" / "bear" / "00001.png"
    Image.new("RGB", (24, 16)).save(rgb)
    hole = root / "Annotations" / "480p" / "car" / "00002.png"
    hole.unlink()
    code, lines = run_check(capsys, "davis", root)
    assert code == 1 and problem_lines(lines) == [
        f"ERROR {rgb}: mask is mode RGB, expected an indexed PNG (mode P)",
        f"ERROR {hole}: missing annotation"]
    (root / "ImageSets" / "2017" / "val.txt").unlink()
    code, lines = run_check(capsys, "davis", root)
    assert f"ERROR {root / 'ImageSets' / '2017' / 'val.txt'}: missing sequence list" in problem_lines(lines)


def test_missing_root(tmp_path, capsys):
    code, lines = run_check(capsys, "davis", tmp_path / "nowhere")
    assert code == 1 and problem_lines(lines) == [f"ERROR {tmp_path / 'nowhere'}: dataset root not found (not a folder)"]
