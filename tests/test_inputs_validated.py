"""Issue 23: every value a user can type or ship is checked where it enters - one line, exit 2 -
and unreadable images are skipped and named (or stop the run under --strict)."""

from __future__ import annotations

import json
import shutil

import pytest

from totobench.cli import main
from totobench.results.schema import load_result


def _one_line(capsys, code, *words):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("totobench: error: "), err
    for word in words:
        assert word in err[0], err[0]


def _run(*args):
    return main(["run", "--quick", *args])


def test_an_empty_layer_range_is_one_line(micro_checkpoint, tmp_path, capsys):
    code = _run("--model", str(micro_checkpoint), "--tasks", "imagenet", "--layers", "3:1", "--out", str(tmp_path))
    _one_line(capsys, code, "--layers '3:1': the range selects no layer of a model with 4 layers")


@pytest.mark.parametrize("field, value, words", [
    ("n_layers", "8", "n_layers must be an integer >= 1, got '8'"),
    ("n_heads", 0, "n_heads must be an integer >= 1, got 0"),
    ("rope_base", "ten thousand", "rope_base must be a number > 0, got 'ten thousand'"),
    ("vocab_size", 10, "vocab_size=10 must be >= codebook_size + 3"),
])
def test_a_bad_checkpoint_config_is_one_line_naming_the_file_and_field(micro_checkpoint, tmp_path, capsys,
                                                                          field, value, words):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, field: value}))
    code = _run("--model", str(ckpt), "--tasks", "imagenet", "--out", str(tmp_path / "out"))
    _one_line(capsys, code, str(ckpt / "config.json"), words)
    assert main(["info", str(ckpt)]) == 2
    _one_line(capsys, 2, str(ckpt / "config.json"), words)


def test_a_bad_tokenizer_config_is_one_line(micro_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(micro_checkpoint, ckpt)
    path = ckpt / "tokenizer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "downsample": 6}))
    code = _run("--model", str(ckpt), "--tasks", "imagenet", "--out", str(tmp_path / "out"))
    _one_line(capsys, code, str(path), "downsample must be a power of two, got 6")


@pytest.mark.parametrize("setting, words", [
    ("imagenet-linear.probe.epochs=ten", "probe.epochs: expected an integer, got 'ten'"),
    ("imagenet-linear.probe.lrs=0.1", "probe.lrs: expected a list of finite numbers, got 0.1"),
    ("imagenet-linear.input.resolution=-64", "input.resolution: expected >= 1, got -64"),
    ("imagenet-linear.quick.max_val_per_class=[1]", "quick.max_val_per_class: expected an integer"),
])
def test_bad_set_values_are_one_line_before_any_work(micro_checkpoint, tmp_path, capsys, setting, words):
    code = _run("--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--set", setting,
                "--out", str(tmp_path))
    _one_line(capsys, code, f"--set {setting}", words)


def _broken_imagenet(tiny_world, tmp_path):
    """A copy of the tiny world's ImageNet with a truncated JPEG in train and a text file named
    .JPEG in val."""
    root = tmp_path / "imagenet"
    shutil.copytree(tiny_world / "imagenet", root)
    truncated = sorted((root / "train").rglob("*.JPEG"))[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    text = sorted((root / "val").rglob("*.JPEG"))[0]
    text.write_text("this is not an image\n")
    return root, truncated, text


def test_unreadable_images_are_skipped_and_named_or_stop_the_run_with_strict(tiny_world, micro_checkpoint,
                                                                            tmp_path, capsys):
    root, truncated, text = _broken_imagenet(tiny_world, tmp_path)
    common = ["--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--layers", "-1",
              "--set", f"imagenet.root={root}", "--set", "probe.epochs=2"]
    assert _run(*common, "--strict", "--out", str(tmp_path / "strict")) == 2
    _one_line(capsys, 2, str(truncated), "unreadable image", "--strict")
    assert not (tmp_path / "strict" / "micro" / "imagenet-linear.json").exists()

    assert _run(*common, "--out", str(tmp_path / "out")) == 0
    result = load_result(tmp_path / "out" / "micro" / "imagenet-linear.json")
    listed = {split: [p for paths in reasons.values() for p in paths] for split, reasons in result["extra"]["skipped"].items()}
    assert listed == {"train": [str(truncated)], "val": [str(text)]}
    assert result["extra"]["num_skipped"] == {"train": 1, "val": 1}
    quick_train = result["protocol"]["data"]["num_train"]
    assert quick_train > 1   # the run went on with the readable images

    # the features are now cached with the skip recorded: --strict still stops, naming the file
    assert _run(*common, "--strict", "--overwrite", "--out", str(tmp_path / "out")) == 2
    _one_line(capsys, 2, str(truncated))


@pytest.mark.parametrize("flags, words", [
    (["--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "--device cuda:x: expected cpu, cuda or cuda:N"),
    (["--layers", "0:4:0"], "the step must not be 0"),
    (["--layers", "9"], "layer 9 is out of range for a model with 4 layers"),
    (["--set", "probe.ep\nochs=3"], "--set 'probe.ep\\nochs=3'"),
])
def test_other_flags_are_one_line(micro_checkpoint, tmp_path, capsys, flags, words):
    code = _run("--model", str(micro_checkpoint), "--tasks", "imagenet", "--out", str(tmp_path), *flags)
    _one_line(capsys, code, words)


def test_an_empty_model_spec_is_one_line(tmp_path, capsys):
    for spec, words in (("", "--model: expected a model spec (`totobench ls models`)"),
                        ("random-init:", "--model 'random-init:': expected a model spec"),
                        ("timm:", "--model 'timm:': expected timm:ARCH"),
                        ("random-init:random-init:toto-tiny", "random-init: is given twice")):
        _one_line(capsys, _run("--model", spec, "--tasks", "imagenet", "--out", str(tmp_path)), words)


def test_a_davis_sequence_with_an_unreadable_frame_is_skipped_and_named(tiny_world, micro_checkpoint, tmp_path, capsys):
    root = tmp_path / "davis"
    shutil.copytree(tiny_world / "davis", root)
    first_seq = sorted((root / "ImageSets" / "2017" / "val.txt").read_text().split())[0]
    frame = sorted((root / "JPEGImages").glob(f"*/{first_seq}/*.jpg"))[3]
    frame.write_bytes(frame.read_bytes()[:100])
    common = ["--model", str(micro_checkpoint), "--tasks", "davis", "--layers", "-1", "--set", f"davis.root={root}"]
    assert _run(*common, "--strict", "--out", str(tmp_path / "strict")) == 2
    _one_line(capsys, 2, str(frame), "unreadable frame", "--strict")
    assert _run(*common, "--out", str(tmp_path / "out")) == 0
    result = load_result(tmp_path / "out" / "micro" / "davis.json")
    assert list(result["extra"]["skipped"]["val"]) == [first_seq] and str(frame) in result["extra"]["skipped"]["val"][first_seq]
    assert result["protocol"]["data"]["num_sequences"] == 1   # --quick reads 2 sequences; the other one is scored


def test_other_subcommands_answer_bad_paths_with_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for argv, words in ((["data", "synth", "--out", str(a_file)], "is a file; expected a folder"),
                        (["info", ""], "--model: expected a model spec"),
                        (["export", str(tmp_path / "nowhere"), "--format", "md"], "no such result file or folder")):
        _one_line(capsys, main(argv), words)


def test_a_missing_dataset_root_of_a_later_task_fails_before_the_model_loads(tmp_path, monkeypatch, capsys):
    import totobench.model
    monkeypatch.setattr(totobench.model, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
    code = _run("--model", "toto-tiny", "--tasks", "imagenet,davis", "--set", f"davis.root={tmp_path / 'nope'}",
                "--out", str(tmp_path / "out"))
    _one_line(capsys, code, f"dataset root {tmp_path / 'nope'} does not exist (format davis)")
