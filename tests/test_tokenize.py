"""`totobench tokenize` -> token shards, and pre-training on them: same inputs give the same bytes,
a killed run resumed equals an uninterrupted one, unreadable files are skipped and listed, the
stored tokens are the tokenizer's codes of each file, the held-out split is corpus.py's, torchrun
ranks write their own shards, and `pretrain` with `data.shards` trains to a finite loss."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pretrain_fixtures import MICRO_CONFIG, REPO, make_corpus, make_tokenizer
from totobench.cli import main
from totobench.errors import ConfigError
from totobench.model import load_backbone
from totobench.model.tokenizer import VisualTokenizer
from totobench.pretrain import load_pretrain_config
from totobench.pretrain.config import model_cfg
from totobench.pretrain.corpus import heldout_bucket, list_sources, load_image
from totobench.pretrain.shards import ShardCorpus, read_index
from totobench.pretrain.tokenizer_stage import tokenize_to_shards

# 3 files a batch, a shard closed at >= 100 tokens: batch 0 (broken.mp4 skipped, 2 videos of 6
# stored frames x 4 tokens) leaves shard 0 open at 48 tokens, batch 1 closes it at 120.
SETTINGS = dict(resolution=16, frames=4, stride=2, shard_tokens=100, batch_files=3)
ARGS = ["--resolution", "16", "--frames", "4", "--stride", "2", "--shard-tokens", "100", "--batch", "3"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A micro corpus (5 videos of 12 frames, 8 images), one broken video, one 3-frame video
    (too short for a 4-frame clip at stride 2), and a random-init VQ-VAE (16 codes, 8x)."""
    tmp = tmp_path_factory.mktemp("tokenize")
    root = make_corpus(tmp / "data")
    (root / "videos" / "broken.mp4").write_bytes(b"not a video")
    make_corpus(tmp / "short", images=0, videos=1, frames=3)
    shutil.copy(tmp / "short" / "videos" / "vid_000.mp4", root / "videos" / "zz_short.mp4")
    spec = make_tokenizer(sorted((root / "videos").glob("vid_*.mp4")), tmp / "tok")
    return {"tmp": tmp, "root": root, "spec": spec,
            "sources": [str(root / "videos"), str(root / "images")]}


@pytest.fixture(scope="module")
def shards(corpus):
    """The uninterrupted run: (folder, index)."""
    out = corpus["tmp"] / "shards"
    index = tokenize_to_shards(corpus["spec"], corpus["sources"], out, **SETTINGS)
    return out, index


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_tokenize_twice_gives_identical_bytes(corpus, shards):
    again = tokenize_to_shards(corpus["spec"], corpus["sources"], corpus["tmp"] / "again", **SETTINGS)
    first = _files(shards[0])
    assert again == shards[1]
    assert _files(corpus["tmp"] / "again") == first
    assert sorted(first) == ["index.json", "progress.json", "shard_00000.seqs.npy", "shard_00000.tokens",
                             "shard_00001.seqs.npy", "shard_00001.tokens"]


def test_unreadable_and_short_files_are_skipped_and_listed(shards):
    index = shards[1]
    assert [s["path"] for s in index["skipped"]] == ["videos/broken.mp4", "videos/zz_short.mp4"]
    assert "cannot open video" in index["skipped"][0]["error"]
    assert "2 frames at stride 2" in index["skipped"][1]["error"]
    assert index["totals"] == {"sequences": 13, "tokens": 5 * 6 * 4 + 8 * 4, "images": 8, "videos": 5, "skipped": 2}
    assert [(s["tokens"], s["sequences"]) for s in index["shards"]] == [(120, 5), (32, 8)]
    assert index["sources"][0]["files"] == 7 and index["dtype"] == "<u2"


def test_stored_tokens_are_the_codes_of_each_file(corpus, shards):
    out, index = shards
    tok = VisualTokenizer.load(corpus["tmp"] / "tok")
    rows = np.load(out / "shard_00001.seqs.npy")
    tokens = np.fromfile(out / "shard_00001.tokens", dtype="<u2")
    first_image = corpus["root"] / "images" / "img_000.JPEG"
    expected = tok.encode(load_image(first_image, 16).float() / 255).flatten()
    offset, length, kind, source, bucket = rows[0]
    assert (kind, source, length) == (0, 1, 4)
    assert tokens[offset:offset + length].tolist() == expected.tolist()
    assert bucket == heldout_bucket("images/img_000.JPEG")


def test_heldout_split_is_the_corpus_split(corpus, shards):
    cfg = load_pretrain_config(MICRO_CONFIG)
    cfg["data"]["root"] = str(corpus["root"])
    expected = {s["kind"]: (len(s["train"]), len(s["heldout"])) for s in list_sources(cfg, corpus["root"])}
    mc = model_cfg(cfg)
    sc = ShardCorpus(shards[0], mc, cfg["data"]["heldout_fraction"])
    got = {f["kind"]: (f["train_files"], f["heldout_files"]) for f in sc.facts()["sources"]}
    # list_sources counts broken.mp4 and zz_short.mp4 as training videos; the shards skipped them
    assert got == {"image": expected["image"], "video": (expected["video"][0] - 2, expected["video"][1])}
    seq = sc.sample([0, 2, 0, 0])
    assert seq[0] in (mc.image_start_id, mc.video_start_id) and seq[-1] == mc.end_id
    assert len(seq) == 2 + (mc.num_frames if seq[0] == mc.video_start_id else mc.images_per_sequence) * 4


def test_a_video_clip_takes_every_step_th_stored_frame(corpus, shards):
    cfg = load_pretrain_config(_shard_config(corpus["tmp"], shards[0], frame_stride=4, num_frames=3))
    mc = model_cfg(cfg)  # frames stored every 2 frames, clips every 4: every 2nd stored frame, 5 of 6 spanned
    sc = ShardCorpus(shards[0], mc)
    tokens = np.fromfile(shards[0] / "shard_00000.tokens", dtype="<u2")
    videos = [tokens[o:o + n].reshape(-1, 4) for o, n, *_ in np.load(shards[0] / "shard_00000.seqs.npy")]
    clips = {tuple(v[start:start + 5:2].reshape(-1)) for v in videos for start in range(2)}
    drawn = [sc.sample([0, 2, 0, g]) for g in range(20)]
    drawn = [seq[1:-1].tolist() for seq in drawn if seq[0] == mc.video_start_id]
    assert drawn and all(tuple(d) in clips for d in drawn)
    assert len(videos) == 5 and all(len(v) == 6 for v in videos)  # 12 frames at stride 2
    assert len({tuple(v.reshape(-1)) for v in videos}) == 5 and len(np.unique(videos[0], axis=0)) > 1


def test_kill_and_resume_gives_the_uninterrupted_shards(corpus, shards):
    out = corpus["tmp"] / "killed"
    env = {**os.environ, "TOTOBENCH_TOKENIZE_KILL_AFTER_FILES": "5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "totobench", "tokenize", "--tokenizer", corpus["spec"],
                           "--source", *corpus["sources"], "--out", str(out), *ARGS],
                          cwd=REPO, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    state = json.loads((out / "progress.json").read_text())
    # killed in batch 1: batch 0 recorded, shard 0 open at 48 tokens with 72 more bytes' worth written after
    assert state["next_batch"] == 1 and state["shards"] == [
        {"name": "shard_00000", "tokens": 48, "sequences": 2, "closed": False}]
    assert (out / "shard_00000.tokens").stat().st_size == 2 * (48 + 2 * 24)
    assert not (out / "index.json").exists()
    assert main(["tokenize", "--tokenizer", corpus["spec"], "--source", *corpus["sources"], "--out", str(out),
                 *ARGS]) == 0
    assert _files(out) == _files(shards[0])


def test_other_settings_in_the_same_folder_are_refused(corpus, shards, tmp_path):
    with pytest.raises(ConfigError, match="other settings"):
        tokenize_to_shards(corpus["spec"], corpus["sources"], shards[0], **{**SETTINGS, "stride": 1})
    (tmp_path / "progress_r1.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"another number of processes \(progress_r1.json\)"):
        tokenize_to_shards(corpus["spec"], corpus["sources"], tmp_path, **SETTINGS)


def test_a_list_of_files_is_a_source(corpus, tmp_path):
    listing = corpus["root"] / "list.txt"
    listing.write_text("# a Kinetics-style list: path and label\nvideos/vid_001.mp4 3\n\nimages/img_002.JPEG\n"
                       "images/missing.JPEG\n")
    index = tokenize_to_shards(corpus["spec"], [str(listing)], tmp_path / "listed", **SETTINGS)
    assert index["totals"] == {"sequences": 2, "tokens": 6 * 4 + 4, "images": 1, "videos": 1, "skipped": 1}
    assert index["skipped"][0]["path"] == "images/missing.JPEG"
    assert "unreadable image" in index["skipped"][0]["error"]
    rows = np.load(tmp_path / "listed" / "shard_00000.seqs.npy")
    assert rows[:, 4].tolist() == [heldout_bucket("videos/vid_001.mp4"), heldout_bucket("images/img_002.JPEG")]


def test_two_torchrun_ranks_write_their_own_shards(corpus, shards):
    torchrun = shutil.which("torchrun", path=str(REPO / ".venv" / "bin")) or shutil.which("torchrun")
    out = corpus["tmp"] / "two"
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "totobench", "tokenize",
                           "--tokenizer", corpus["spec"], "--source", *corpus["sources"], "--out", str(out), *ARGS],
                          cwd=REPO, capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    index = read_index(out)
    assert [s["name"] for s in index["shards"]][:1] == ["shard_r0_00000"]
    assert {s["name"][:8] for s in index["shards"]} == {"shard_r0", "shard_r1"}
    assert index["totals"] == shards[1]["totals"] and index["skipped"] == shards[1]["skipped"]

    def sequences(folder, idx):  # every file's tokens, as a multiset
        out = []
        for s in idx["shards"]:
            tokens = np.fromfile(folder / f"{s['name']}.tokens", dtype="<u2")
            out += [tuple(r[2:]) + tuple(tokens[r[0]:r[0] + r[1]]) for r in np.load(folder / f"{s['name']}.seqs.npy")]
        return sorted(out)
    assert sequences(out, index) == sequences(shards[0], shards[1])


def _shard_config(tmp: Path, shards_dir: Path, **model) -> Path:
    cfg = yaml.safe_load(MICRO_CONFIG.read_text())
    cfg["data"] = {"shards": str(shards_dir), "heldout_fraction": 0.2}
    cfg["model"].update(model)
    path = tmp / f"shards_{len(model)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_on_shards(corpus, shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--config", str(_shard_config(tmp_path, shards[0])), "--out", str(out)]) == 0
    facts = json.loads((out / "training.json").read_text())
    assert np.isfinite(facts["final_train_loss"]) and np.isfinite(facts["heldout_loss"])
    assert facts["heldout_loss"] < facts["heldout_loss_random_init"]
    assert facts["steps"] == 12 and facts["data"]["shards"] == str(shards[0])
    assert facts["tokenizer"]["sha256"] == shards[1]["tokenizer"]["sha256"]
    assert (out / "tokenizer" / "model.safetensors").is_file()
    assert "Token shards:" in (out / "README.md").read_text()
    # the per-frame loss of the shards' clips, read from the shards (no tokenizer runs)
    assert main(["nll", str(out), "--data", str(shards[0]), "--out", str(tmp_path / "nll")]) == 0
    frames = list(csv.DictReader((tmp_path / "nll" / "nll.csv").open()))
    assert [float(r["nll"]) for r in frames] == pytest.approx(_hand_nll(out, shards), abs=1e-5)
    # --heldout: only the files pre-training held out at that fraction
    assert main(["nll", str(out), "--data", str(shards[0]), "--heldout", "0.2", "--out", str(tmp_path / "held")]) == 0
    corpus_split = ShardCorpus(shards[0], load_backbone(str(out)).config, 0.2)
    held = sum(len(corpus_split.items[(s, "heldout")]) for s, (_, kind) in enumerate(corpus_split.streams)
               if kind == "video")
    assert 0 < held < 5 and f": {held} clips of {shards[0]} (held-out 0.2)" in capsys.readouterr().out


def _hand_nll(checkpoint: Path, shards) -> list[float]:
    """Mean nll per frame of the centred clips of every long enough video, the clips cut from the
    raw token files by hand."""
    from totobench.commands.nll import position_nll
    backbone = load_backbone(str(checkpoint))
    c = backbone.config
    folder, index = shards
    tpf, step = c.tokens_per_frame, c.frame_stride // index["stride"]
    span = (c.num_frames - 1) * step + 1
    clips = []
    for shard in index["shards"]:
        tokens = np.fromfile(folder / f"{shard['name']}.tokens", dtype=index["dtype"]).astype(np.int64)
        for offset, length, kind, _source, bucket in np.load(folder / f"{shard['name']}.seqs.npy"):
            if kind == 1 and length // tpf >= span:
                start = (length // tpf - span) // 2
                clips.append(np.stack([tokens[offset + (start + i * step) * tpf:][:tpf] for i in range(c.num_frames)]))
    ids = torch.from_numpy(np.stack(clips))
    nll = position_nll(backbone.model, ids.reshape(len(clips), -1), c.video_start_id).reshape(ids.shape)
    return [float(nll[:, t].mean()) for t in range(c.num_frames)]


def test_shard_config_errors(corpus, shards, tmp_path):
    with pytest.raises(ConfigError, match="codebook of 16 codes"):
        ShardCorpus(shards[0], model_cfg(load_pretrain_config(_shard_config(tmp_path, shards[0], codebook_size=32))))
    with pytest.raises(ConfigError, match="frame_stride 3 must be a multiple"):
        ShardCorpus(shards[0], model_cfg(load_pretrain_config(_shard_config(tmp_path, shards[0], frame_stride=3))))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"shards": str(shards[0]),
                                            "sources": [{"kind": "video", "path": "v"}]}}))
    with pytest.raises(ConfigError, match="data.sources empty"):
        load_pretrain_config(bad)
