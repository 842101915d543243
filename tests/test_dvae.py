"""The DALL-E dVAE encoder (totobench.model.dvae): the same codes as the `dall_e` package from
every file form, the same sha256, the pickle notice, `totobench convert dvae`, one-line errors."""

from __future__ import annotations

import os
import sys
from argparse import Namespace

import pytest
import torch
from safetensors.torch import save_file

from totobench.cli import main
from totobench.commands.convert import cli_convert
from totobench.errors import CheckpointError, DataError
from totobench.model.backbone import load_tokenizer
from totobench.model.checkpoint import file_sha256
from totobench.model.dvae import convert_dvae, load_dvae_tokenizer

dall_e_encoder = pytest.importorskip("dall_e.encoder")
dall_e_utils = pytest.importorskip("dall_e.utils")

NOTICE = "is a pickle: loading it runs code"


def dall_e_codes(encoder, images: torch.Tensor) -> torch.Tensor:
    """The reference: codes as the dall_e package computes them."""
    with torch.no_grad():
        return torch.argmax(encoder(dall_e_utils.map_pixels(images)), 1)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random dall_e Encoder saved as the official file is (torch.save of the module),
    in the legacy torch format, as a state dict and as safetensors in dall_e names; 32 random
    64x96 images and the package's codes for them."""
    folder = tmp_path_factory.mktemp("dvae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = dall_e_encoder.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512,
                                         requires_grad=False, use_mixed_precision=False)
        images = torch.rand(32, 3, 64, 96)
    files = {"pickle": folder / "encoder.pkl", "legacy pickle": folder / "legacy.pkl",
             "state dict": folder / "state.pt", "safetensors": folder / "dalle_names.safetensors"}
    torch.save(encoder, files["pickle"])
    torch.save(encoder, files["legacy pickle"], _use_new_zipfile_serialization=False)
    torch.save(encoder.state_dict(), files["state dict"])
    save_file(encoder.state_dict(), files["safetensors"])
    return Namespace(encoder=encoder, images=images, codes=dall_e_codes(encoder, images), files=files,
                     folder=folder)


@pytest.mark.parametrize("form", ["pickle", "legacy pickle", "state dict", "safetensors"])
def test_codes_equal_dall_e_from_every_file_form(small, form):
    path = small.files[form]
    rng = torch.random.get_rng_state()
    tokenizer = load_dvae_tokenizer(str(path))
    assert torch.equal(torch.random.get_rng_state(), rng)   # loading draws no random numbers
    codes = tokenizer.encode(small.images)
    assert codes.dtype == torch.long and codes.shape == (32, 8, 12)
    assert small.codes.unique().numel() > 1
    assert torch.equal(codes, small.codes)
    assert (tokenizer.codebook_size, tokenizer.downsample, tokenizer.name) == (512, 8, f"dvae:{path}")
    assert tokenizer.sha256 == load_dvae_tokenizer(str(small.files["state dict"])).sha256


def test_load_tokenizer_dispatches_dvae(small):
    tokenizer = load_tokenizer(f"dvae:{small.files['pickle']}")
    assert tokenizer.name == f"dvae:{small.files['pickle']}"
    assert torch.equal(tokenizer.encode(small.images), small.codes)


def test_converted_safetensors_same_codes_and_sha256_no_notice(small, tmp_path, capfd):
    out = convert_dvae(small.files["pickle"], tmp_path / "encoder.safetensors")
    from_pickle = load_dvae_tokenizer(str(small.files["pickle"]))
    capfd.readouterr()
    converted = load_dvae_tokenizer(str(out))
    assert capfd.readouterr().err == ""
    assert torch.equal(converted.encode(small.images), small.codes)
    assert converted.sha256 == from_pickle.sha256 == file_sha256(out)
    assert set(converted.state_dict()) == set(from_pickle.state_dict())


def test_default_architecture_codes_equal_dall_e(tmp_path):
    """The official shape (n_hid 256, 2 blocks per group, 8192 codes) on a few images: a forward
    of 32 64x64 images takes ~8 s per model on one CPU thread."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        encoder = dall_e_encoder.Encoder(requires_grad=False, use_mixed_precision=False)
        images = torch.rand(4, 3, 32, 48)
    torch.save(encoder, tmp_path / "encoder.pkl")
    tokenizer = load_dvae_tokenizer(str(tmp_path / "encoder.pkl"))
    assert tokenizer.codebook_size == 8192
    assert torch.equal(tokenizer.encode(images), dall_e_codes(encoder, images))


def test_pickle_loads_without_dall_e(small, monkeypatch):
    for name in ("dall_e", "dall_e.encoder", "dall_e.utils", "dall_e.decoder"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError):
        import dall_e.encoder  # noqa: F401
    tokenizer = load_dvae_tokenizer(str(small.files["pickle"]))
    assert torch.equal(tokenizer.encode(small.images), small.codes)


def test_pickle_notice_once_and_only_for_pickles(small, capfd):
    load_dvae_tokenizer(str(small.files["pickle"]))
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and NOTICE in err
    assert f"totobench convert dvae {small.files['pickle']} --out {small.folder / 'encoder.safetensors'}" in err
    load_dvae_tokenizer(str(small.files["state dict"]))
    load_dvae_tokenizer(str(small.files["safetensors"]))
    assert capfd.readouterr().err == ""


def test_convert_command_direct(small, tmp_path, capsys):
    out = tmp_path / "direct.safetensors"
    assert cli_convert(Namespace(what="dvae", file=str(small.files["pickle"]), out=str(out))) == 0
    sha = load_dvae_tokenizer(str(out)).sha256
    assert capsys.readouterr().out == f"{out}: DALL-E dVAE encoder, 512 codes, sha256 {sha}\n"


def test_convert_command_via_main(small, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["convert", "dvae", str(small.files["pickle"]), "--out", str(out)]) == 0
    assert f"{out}: DALL-E dVAE encoder, 512 codes, sha256 {file_sha256(out)}" in capsys.readouterr().out
    assert main(["convert", "dvae", str(small.files["state dict"])]) == 0    # default: FILE.safetensors
    assert (small.folder / "state.safetensors").is_file()
    assert main(["convert", "dvae", str(tmp_path / "missing.pkl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.pkl: file not found" in err


def one_line_error(path) -> str:
    """The CheckpointError message of loading `path`, checked to be one line naming the file."""
    with pytest.raises(CheckpointError) as info:
        load_dvae_tokenizer(str(path))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_error_missing_file(tmp_path):
    assert "file not found" in one_line_error(tmp_path / "encoder.pkl")


def test_error_not_a_dvae(tmp_path):
    torch.save({"conv.weight": torch.zeros(2, 3, 1, 1)}, tmp_path / "other.pt")
    assert "not a DALL-E dVAE encoder (missing blocks.input.w)" in one_line_error(tmp_path / "other.pt")


def test_error_unreadable_file(tmp_path):
    (tmp_path / "junk.pkl").write_bytes(b"not a torch file")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert "not a readable torch file" in one_line_error(tmp_path / "junk.pkl")
    assert "not a readable safetensors file" in one_line_error(tmp_path / "junk.safetensors")


def test_error_wrong_shape_names_key_and_both_shapes(small, tmp_path):
    state = dict(small.encoder.state_dict())
    state["blocks.group_2.block_1.res_path.conv_2.w"] = torch.zeros(32, 32, 1, 1)
    torch.save(state, tmp_path / "bad.pt")
    assert ("blocks.group_2.block_1.res_path.conv_2.w has shape [32, 32, 1, 1], expected [32, 32, 3, 3]"
            in one_line_error(tmp_path / "bad.pt"))


def test_error_missing_and_unexpected_tensors(small, tmp_path):
    state = dict(small.encoder.state_dict())
    del state["blocks.group_3.block_1.id_path.b"]
    torch.save(state, tmp_path / "missing.pt")
    assert "(missing blocks.group_3.block_1.id_path.b)" in one_line_error(tmp_path / "missing.pt")
    state = {**small.encoder.state_dict(), "blocks.extra.w": torch.zeros(1)}
    torch.save(state, tmp_path / "extra.pt")
    assert "(unexpected tensor blocks.extra.w)" in one_line_error(tmp_path / "extra.pt")


def test_error_pickle_with_forbidden_global(tmp_path, capfd):
    torch.save({"blocks.input.w": os.system}, tmp_path / "evil.pkl")
    message = one_line_error(tmp_path / "evil.pkl")
    assert f"refusing to unpickle the global {os.system.__module__}.system" in message
    assert NOTICE in capfd.readouterr().err


@pytest.mark.parametrize("frames", [torch.rand(2, 3, 60, 64), torch.rand(3, 64, 64), torch.rand(2, 1, 64, 64),
                                    torch.zeros(2, 3, 64, 64, dtype=torch.uint8)])
def test_encode_bad_frames(small, frames):
    tokenizer = load_dvae_tokenizer(str(small.files["safetensors"]))
    with pytest.raises(DataError) as info:
        tokenizer.encode(frames)
    assert "\n" not in str(info.value) and "multiples of 8" in str(info.value)
