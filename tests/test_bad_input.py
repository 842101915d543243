"""Every bad input a user can give `totobench run` ends with ONE line on stderr, exit code 2 and
no result file (nor temporary file) left behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from totobench.cli import main


@pytest.fixture
def run(tiny_world, micro_checkpoint, tmp_path, capsys):
    """run(*extra args, model=..., tasks=...) -> (exit code, stderr lines); checks no result file."""
    out = tmp_path / "results"

    def _run(*extra, model=None, tasks="imagenet-linear", out_dir=None, data_root=True):
        args = ["run", "--model", str(model or micro_checkpoint), "--tasks", tasks, "--quick",
                "--layers", "-1", "--out", str(out_dir or out), *extra]
        if data_root:
            args += ["--data-root", str(tiny_world)]
        capsys.readouterr()
        code = main(args)
        err = capsys.readouterr().err
        if out.exists():
            assert not list(out.rglob("*.json")), "a result file was written"
            assert not list(out.rglob("*.tmp")), "a temporary file was left"
        return code, err.splitlines()
    return _run


def _one_line(code, lines, *words):
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("totobench: error: ")
    for word in words:
        assert word in lines[0], lines[0]


def test_dataset_root_that_does_not_exist(run, tmp_path):
    code, lines = run("--data-root", str(tmp_path / "nowhere"), data_root=False)
    _one_line(code, lines, f"{tmp_path / 'nowhere' / 'imagenet'} does not exist", "--data-root")


def test_dataset_root_set_per_format_that_does_not_exist(run, tmp_path):
    code, lines = run("--set", f"imagenet.root={tmp_path / 'in1k'}")
    _one_line(code, lines, f"dataset root {tmp_path / 'in1k'} does not exist", "imagenet-linear.yaml")


def test_dataset_root_of_the_wrong_format(run, tiny_world):
    # the ImageNet task pointed at the DAVIS folder
    code, lines = run("--set", f"imagenet.root={tiny_world / 'davis'}")
    _one_line(code, lines, str(tiny_world / "davis"), "train")


def test_unknown_task_name(run):
    code, lines = run(tasks="imagenet-linaer")
    _one_line(code, lines, "unknown task 'imagenet-linaer'", "did you mean 'imagenet-linear'")


def test_unknown_model_name(run):
    code, lines = run(model="toto-tiyn")
    _one_line(code, lines, "unknown model 'toto-tiyn'", "did you mean 'toto-tiny'")


@pytest.mark.parametrize("body,words", [
    ("datset: {format: imagenet}\n", ["unknown key 'datset'", "did you mean 'dataset'"]),
    ("batch_size: sixty\n", ["'batch_size' must be an integer", "'sixty'"]),
    ("quick: {max_train_per_class: [2]}\n", ["quick.max_train_per_class: expected an integer, got [2]"]),
    ("probe: {name: linear\n", ["is not valid YAML"]),
])
def test_malformed_task_yaml(run, tmp_path, monkeypatch, body, words):
    folder = tmp_path / "my-tasks"
    folder.mkdir()
    bundled = Path(__file__).resolve().parent.parent / "tasks" / "_imagenet.yaml"
    (folder / "mine.yaml").write_text(f"include: {bundled}\n{body}")
    monkeypatch.setenv("TOTOBENCH_TASKS", str(folder))
    code, lines = run(tasks="mine")
    _one_line(code, lines, str(folder / "mine.yaml"), *words)


def test_override_of_the_wrong_type(run):
    code, lines = run("--set", "batch_size=many")
    _one_line(code, lines, "'batch_size' must be an integer", "'many'")


def _broken_checkpoint(micro_checkpoint, tmp_path, edit):
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "broken"
    shutil.copytree(micro_checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_checkpoint_with_a_missing_tensor(run, micro_checkpoint, tmp_path):
    folder = _broken_checkpoint(micro_checkpoint, tmp_path, lambda t: t.pop("layers.1.attention.wq.weight"))
    code, lines = run(model=folder)
    _one_line(code, lines, str(folder / "model.safetensors"), "missing: layers.1.attention.wq.weight")


def test_checkpoint_with_a_mismatched_tensor(run, micro_checkpoint, tmp_path):
    def widen(t):
        t["layers.0.mlp.w1.weight"] = torch.zeros(256, 64)
    folder = _broken_checkpoint(micro_checkpoint, tmp_path, widen)
    code, lines = run(model=folder)
    _one_line(code, lines, "layers.0.mlp.w1.weight has shape [256, 64]", "config.json implies")


def test_layer_index_out_of_range(run):
    code, lines = run("--layers", "4")
    _one_line(code, lines, "layer 4 is out of range for a model with 4 layers")


def test_output_folder_that_is_not_writable(run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, lines = run(out_dir=blocker / "results")
    _one_line(code, lines, f"--out {blocker / 'results'}: folder is not writable")


def test_output_folder_on_a_read_only_file_system(run, tmp_path):
    mount = tmp_path / "ro"
    if not _mount_tmpfs(mount, "ro,size=64k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, lines = run(out_dir=mount / "results")
        _one_line(code, lines, f"--out {mount / 'results'}: folder is not writable (Read-only file system)")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_feature_cache_folder_that_is_not_writable(run, tmp_path, monkeypatch):
    blocker = tmp_path / "home-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TOTOBENCH_HOME", str(blocker))
    code, lines = run()
    _one_line(code, lines, f"cannot write features to {blocker / 'features'}", "Not a directory")


def _no_temp_files(folder: Path):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")] if folder.exists() else []


@pytest.mark.parametrize("where", ["allocate", "commit"])
def test_disk_full_while_writing_features(run, tmp_path, monkeypatch, where):
    import totobench.features.cache as cache
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TOTOBENCH_CHUNK_BATCHES", "1")
    calls = []
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if where == "allocate":   # the 3rd shard cannot get its blocks
        real = cache._preallocate

        def preallocate(fd, size):
            calls.append(size)
            if len(calls) >= 3:
                raise full
            real(fd, size)
        monkeypatch.setattr(cache, "_preallocate", preallocate)
    else:                     # a raw OSError out of the shard writer itself
        def commit(self):
            raise full
        monkeypatch.setattr(cache.ShardWriter, "commit", commit)
    code, lines = run("--set", "batch_size=16")
    _one_line(code, lines, f"disk full while writing features to {tmp_path / 'home' / 'features'}")
    assert _no_temp_files(tmp_path / "home") == []


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_really_full_disk_through_the_command(tiny_world, micro_checkpoint, tmp_path):
    """A 64 KiB tmpfs as the cache: the real ENOSPC path, the real stderr of the command."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "size=64k"):
        pytest.skip("cannot mount a tmpfs here")
    try:
        env = {**os.environ, "TOTOBENCH_HOME": str(small), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "totobench", "run", "--model", str(micro_checkpoint),
                               "--tasks", "imagenet-linear", "--quick", "--layers", "all", "--data-root",
                               str(tiny_world), "--out", str(tmp_path / "results")],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.splitlines() == [f"totobench: error: disk full while writing features to "
                                            f"{small / 'features'} (free some space or set $TOTOBENCH_HOME "
                                            f"to a larger disk)"]
        assert _no_temp_files(small) == []
        assert not (tmp_path / "results" / "micro" / "imagenet-linear.json").exists()
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)
