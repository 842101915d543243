"""Checkpoint folders: round trip, sha256, and one clear error per kind of damage."""

import hashlib
import json
import types

import pytest
import torch

from totobench.commands.info import cli_info
from totobench.errors import CheckpointError
from totobench.model import Toto, TotoConfig
from totobench.model.tokens import load_checkpoint
from totobench.model.checkpoint import save_checkpoint
from totobench.model.tokenizer import VisualTokenizer

CONFIG = TotoConfig(dim=32, n_layers=2, n_heads=2, mlp_hidden=48, codebook_size=16, vocab_size=19,
                    max_seq_len=32, resolution=16)


def small_tokenizer():
    torch.manual_seed(0)
    return VisualTokenizer(codebook_size=16, channels=8, code_dim=4)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Toto(CONFIG)
    sha = save_checkpoint(tmp_path / "ck", model, small_tokenizer(), {"steps": 7, "final_loss": 2.5})
    return model, tmp_path / "ck", sha


def test_round_trip_and_sha256_of_the_weight_bytes(saved):
    model, directory, sha = saved
    loaded, tokenizer, sha2, training = load_checkpoint(directory)
    assert sha == sha2 == hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads((directory / "config.json").read_text())["architecture"] == "toto"
    assert loaded.config == CONFIG and training == {"steps": 7, "final_loss": 2.5}
    assert tokenizer.codebook_size == 16
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not loaded.training   # eval mode
    assert Toto.from_pretrained(directory).config == CONFIG


def test_without_tokenizer_or_training(tmp_path):
    save_checkpoint(tmp_path, Toto(CONFIG))
    _, tokenizer, _, training = load_checkpoint(tmp_path)
    assert tokenizer is None and training == {}


def test_missing_weights_file(saved):
    _, directory, _ = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"ck/model.safetensors: missing \(expected the transformer weights"):
        load_checkpoint(directory)


def test_missing_config_and_folder(saved, tmp_path):
    _, directory, _ = saved
    with pytest.raises(CheckpointError, match="nope: checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")
    (directory / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"ck/config.json: missing"):
        load_checkpoint(directory)


def test_shape_mismatch_names_tensor_and_expected_shape(saved):
    _, directory, _ = saved
    cfg = json.loads((directory / "config.json").read_text())
    cfg["mlp_hidden"] = 40
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: layers.0.mlp.w1.weight has shape \[48, 32\], "
                                              r"config.json implies \[40, 32\]"):
        load_checkpoint(directory)


def test_layer_count_mismatch_names_missing_tensors(saved):
    _, directory, _ = saved
    cfg = json.loads((directory / "config.json").read_text())
    cfg["n_layers"] = 3
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"do not match config.json \(missing: layers.2.attention.wk.weight"):
        load_checkpoint(directory)


def test_corrupt_weights_file(saved):
    _, directory, _ = saved
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])   # truncated mid-download
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors file"):
        load_checkpoint(directory)


def test_corrupt_config_and_wrong_architecture(saved):
    _, directory, _ = saved
    (directory / "config.json").write_text('{"dim": 32,')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps({**CONFIG.to_dict(), "architecture": "gpt2"}))
    with pytest.raises(CheckpointError, match="architecture is 'gpt2', expected 'toto'"):
        load_checkpoint(directory)


def test_tokenizer_codebook_mismatch(tmp_path):
    save_checkpoint(tmp_path, Toto(CONFIG), VisualTokenizer(codebook_size=8, channels=8, code_dim=4))
    with pytest.raises(CheckpointError, match="tokenizer codebook_size is 8, config.json expects 16"):
        load_checkpoint(tmp_path)


def test_cli_info_prints_config_params_sha_and_training(saved, capsys):
    model, directory, sha = saved
    assert cli_info(types.SimpleNamespace(checkpoint=str(directory))) == 0
    out = capsys.readouterr().out
    assert sha in out
    assert f"{model.num_params(non_embedding=False) - model.output.weight.numel():,}" in out   # head excluded
    assert "mlp_hidden" in out and "final_loss" in out and "2.5" in out


def test_save_leaves_only_the_checkpoint_files(saved):
    _, directory, _ = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors", "tokenizer",
                                                           "training.json"]
    assert sorted(p.name for p in (directory / "tokenizer").iterdir()) == ["config.json", "model.safetensors"]
