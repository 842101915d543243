"""The VQGAN encoder (totobench.model.vqgan): the same codes as taming-transformers' Encoder +
quant_conv + VectorQuantizer from a released-style folder, a lone .ckpt and the converted
safetensors, the same sha256, the pickle notice for Lightning checkpoints, one-line errors."""

from __future__ import annotations

import os
import sys
import types
from argparse import Namespace

import pytest
import torch
import yaml
from safetensors import safe_open

from totobench.errors import CheckpointError, DataError
from totobench.model.backbone import load_tokenizer
from totobench.model.checkpoint import file_sha256
from totobench.model.vqgan import convert_vqgan, load_vqgan_tokenizer

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

NOTICE = "is a pickle: loading it runs code"
ATTENTION_ONLY = pytest.mark.parametrize("vqgan", ["attention"], indirect=True)   # one config is enough
# two small VQGANs: attention at level 1 (32 // 2 in attn_resolutions), and the f16 layout of the
# released models (5 levels, attention at 256 // 16)
CONFIGS = {
    "attention": {"ddconfig": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
                               "resolution": 32, "z_channels": 64},
                  "n_embed": 128, "embed_dim": 48, "downsample": 4},
    "f16": {"ddconfig": {"ch": 32, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
                         "resolution": 256, "z_channels": 32},
            "n_embed": 256, "embed_dim": 32, "downsample": 16},
}
FIXED = {"in_channels": 3, "out_ch": 3, "double_z": False, "dropout": 0.0}


class TamingVQ(torch.nn.Module):
    """The reference: taming's VQModel.encode (encoder, quant_conv, quantize) without Lightning."""

    def __init__(self, ddconfig: dict, n_embed: int, embed_dim: int):
        super().__init__()
        self.encoder = taming_model.Encoder(**ddconfig)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.quantize = taming_quantize.VectorQuantizer(n_embed, embed_dim, beta=0.25)

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images * 2 - 1))

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] in [0, 1] -> the quantizer's indices as [N, h, w]."""
        h = self.latents(images)
        _, _, (_, _, indices) = self.quantize(h)
        return indices.view(h.shape[0], h.shape[2], h.shape[3])


def random_reference(ddconfig: dict, n_embed: int, embed_dim: int, images: torch.Tensor) -> TamingVQ:
    """A TamingVQ with random weights, norms included, and a codebook of latents of `images` plus
    noise, so that codes spread over the codebook."""
    reference = TamingVQ(ddconfig, n_embed, embed_dim).eval()
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
        flat = reference.latents(images).permute(0, 2, 3, 1).reshape(-1, embed_dim)
        picked = flat[torch.randint(len(flat), (n_embed,))]
        reference.quantize.embedding.weight.copy_(picked + 0.3 * flat.std() * torch.randn_like(picked))
    return reference


def vqmodel_state(reference: TamingVQ, ddconfig: dict, embed_dim: int) -> dict[str, torch.Tensor]:
    """A whole VQModel's state dict as a released last.ckpt holds it: the reference's keys plus a
    decoder, post_quant_conv and loss weights."""
    decoder = taming_model.Decoder(**ddconfig)
    return {**reference.state_dict(), **{f"decoder.{k}": v for k, v in decoder.state_dict().items()},
            "post_quant_conv.weight": torch.randn(ddconfig["z_channels"], embed_dim, 1, 1),
            "post_quant_conv.bias": torch.zeros(ddconfig["z_channels"]),
            "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4)}


def model_yaml(ddconfig: dict, n_embed: int, embed_dim: int) -> dict:
    """configs/model.yaml as the released models have it."""
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
                      "params": {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig,
                                 "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                                "params": {"disc_start": 250001, "codebook_weight": 1.0}}}}}


@pytest.fixture(scope="module", params=list(CONFIGS))
def vqgan(request, tmp_path_factory):
    """One config of CONFIGS: a random reference, 16 random 32x48 images and the reference's codes
    for them, saved as a released-style folder (checkpoints/last.ckpt + configs/model.yaml, and a
    trainer config to pass over), and converted to safetensors."""
    spec = CONFIGS[request.param]
    ddconfig = {**spec["ddconfig"], **FIXED}
    folder = tmp_path_factory.mktemp(f"vqgan_{request.param}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        images = torch.rand(16, 3, 32, 48)
        reference = random_reference(ddconfig, spec["n_embed"], spec["embed_dim"], images)
        state = vqmodel_state(reference, ddconfig, spec["embed_dim"])
    (folder / "checkpoints").mkdir()
    (folder / "configs").mkdir()
    torch.save({"state_dict": state, "epoch": 3, "global_step": 1200,
                "hyper_parameters": {"n_embed": spec["n_embed"], "embed_dim": spec["embed_dim"]}},
               folder / "checkpoints" / "last.ckpt")
    config = model_yaml(ddconfig, spec["n_embed"], spec["embed_dim"])
    (folder / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    (folder / "configs" / "lightning.yaml").write_text(yaml.safe_dump({"lightning": {"trainer": {"benchmark": True}}}))
    converted = convert_vqgan(folder, folder.parent / f"{folder.name}.safetensors")
    return Namespace(spec=spec, ddconfig=ddconfig, reference=reference, state=state, images=images,
                     codes=reference.codes(images), folder=folder, ckpt=folder / "checkpoints" / "last.ckpt",
                     converted=converted)


@pytest.mark.parametrize("form", ["folder", "ckpt", "converted"])
def test_codes_equal_taming_from_every_file_form(vqgan, form):
    path = {"folder": vqgan.folder, "ckpt": vqgan.ckpt, "converted": vqgan.converted}[form]
    rng = torch.random.get_rng_state()
    tokenizer = load_tokenizer(f"vqgan:{path}")
    assert torch.equal(torch.random.get_rng_state(), rng)   # loading draws no random numbers
    d = vqgan.spec["downsample"]
    codes = tokenizer.encode(vqgan.images)
    assert codes.dtype == torch.long and codes.shape == (16, 32 // d, 48 // d)
    assert vqgan.codes.unique().numel() > 10
    assert torch.equal(codes, vqgan.codes)
    assert (tokenizer.codebook_size, tokenizer.downsample) == (vqgan.spec["n_embed"], d)
    assert tokenizer.name == f"vqgan:{path}"
    assert tokenizer.sha256 == load_vqgan_tokenizer(str(vqgan.folder)).sha256


def test_hyper_parameters_from_config_weights_and_metadata_agree(vqgan):
    from_config = load_vqgan_tokenizer(str(vqgan.folder)).config
    assert from_config == load_vqgan_tokenizer(str(vqgan.ckpt)).config   # from the weights' shapes
    assert from_config == load_vqgan_tokenizer(str(vqgan.converted)).config   # from the metadata
    assert from_config.attn_levels == ((1,) if len(from_config.ch_mult) == 3 else (4,))


def test_converted_file_loads_alone_without_notice(vqgan, capfd):
    with safe_open(vqgan.converted, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert "vqgan" in metadata
    assert keys == {k for k in vqgan.reference.state_dict()}   # the encoder only: no decoder, no loss
    tokenizer = load_vqgan_tokenizer(str(vqgan.converted))
    assert capfd.readouterr().err == ""
    assert torch.equal(tokenizer.encode(vqgan.images), vqgan.codes)
    assert file_sha256(vqgan.converted) != tokenizer.sha256   # the metadata is not part of the weights' sha256


@pytest.fixture
def lightning_ckpt(vqgan, tmp_path, monkeypatch):
    """A last.ckpt as Lightning 1.x writes it: the callbacks' states keyed by the callback class.
    The class is faked (pytorch_lightning is not installed) and gone once the file is written."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    with monkeypatch.context() as patch:
        for name in names:
            patch.setitem(sys.modules, name, types.ModuleType(name))
        sys.modules[names[-1]].ModelCheckpoint = model_checkpoint
        callbacks = {model_checkpoint: {"monitor": "val/rec_loss", "best_model_score": torch.tensor(0.1)}}
        torch.save({"state_dict": vqgan.state, "epoch": 3, "pytorch-lightning_version": "1.0.8",
                    "callbacks": callbacks}, tmp_path / "last.ckpt")
    assert "pytorch_lightning" not in sys.modules
    return tmp_path / "last.ckpt"


def test_lightning_checkpoint_notice_once_and_same_codes(vqgan, lightning_ckpt, capfd):
    tokenizer = load_vqgan_tokenizer(str(lightning_ckpt))
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and NOTICE in err
    assert f"totobench convert vqgan {lightning_ckpt} --out {lightning_ckpt.with_suffix('.safetensors')}" in err
    assert "pytorch_lightning" not in sys.modules
    assert torch.equal(tokenizer.encode(vqgan.images), vqgan.codes)
    assert tokenizer.sha256 == load_vqgan_tokenizer(str(vqgan.converted)).sha256
    load_vqgan_tokenizer(str(vqgan.folder))   # its last.ckpt holds tensors and plain data only
    assert capfd.readouterr().err == ""


def one_line_error(spec, named) -> str:
    """The CheckpointError message of loading `spec`, checked to be one line starting with `named`."""
    with pytest.raises(CheckpointError) as info:
        load_vqgan_tokenizer(str(spec))
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{named}: "), message
    return message


@ATTENTION_ONLY
def test_error_pickle_with_forbidden_global(vqgan, tmp_path, capfd):
    torch.save({"state_dict": vqgan.state, "callbacks": {"x": os.system}}, tmp_path / "evil.ckpt")
    message = one_line_error(tmp_path / "evil.ckpt", tmp_path / "evil.ckpt")
    assert f"refusing to unpickle the global {os.system.__module__}.system" in message
    assert NOTICE in capfd.readouterr().err


def test_error_missing_paths(tmp_path):
    assert "not found" in one_line_error(tmp_path / "vqgan_imagenet_f16_1024", tmp_path / "vqgan_imagenet_f16_1024")
    assert "not found" in one_line_error(tmp_path / "last.ckpt", tmp_path / "last.ckpt")
    (tmp_path / "configs").mkdir()
    assert "no .ckpt in the folder" in one_line_error(tmp_path, tmp_path)


def test_error_not_a_vqgan_and_unreadable(tmp_path):
    torch.save({"state_dict": {"decoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}}, tmp_path / "other.ckpt")
    assert "not a taming VQGAN (missing encoder.conv_in.weight)" in one_line_error(tmp_path / "other.ckpt",
                                                                                   tmp_path / "other.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a torch file")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert "not a readable torch file" in one_line_error(tmp_path / "junk.ckpt", tmp_path / "junk.ckpt")
    assert "not a readable safetensors file" in one_line_error(tmp_path / "junk.safetensors",
                                                               tmp_path / "junk.safetensors")


@ATTENTION_ONLY
def test_error_wrong_shape_names_key_and_both_shapes(vqgan, tmp_path):
    key = "encoder.down.1.block.0.conv2.weight"
    width = vqgan.state[key].shape[0]
    torch.save({"state_dict": {**vqgan.state, key: torch.zeros(width, width, 1, 1)}}, tmp_path / "bad.ckpt")
    assert (f"{key} has shape [{width}, {width}, 1, 1], expected [{width}, {width}, 3, 3]"
            in one_line_error(tmp_path / "bad.ckpt", tmp_path / "bad.ckpt"))


@ATTENTION_ONLY
def test_error_unexpected_quantizer_tensor(vqgan, tmp_path):
    """A quantizer with remapped indices (taming's VectorQuantizer2 `used`) would give other codes."""
    torch.save({"state_dict": {**vqgan.state, "quantize.used": torch.arange(4)}}, tmp_path / "remap.ckpt")
    assert "unexpected tensor quantize.used" in one_line_error(tmp_path / "remap.ckpt", tmp_path / "remap.ckpt")


def released_folder_with(vqgan, tmp_path, **changes) -> tuple:
    """A copy of the released-style folder whose model.yaml has ddconfig (or n_embed) `changes`:
    (folder, its ckpt, its yaml)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "configs").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(vqgan.ckpt.read_bytes())
    n_embed = changes.pop("n_embed", vqgan.spec["n_embed"])
    config = model_yaml({**vqgan.ddconfig, **changes}, n_embed, vqgan.spec["embed_dim"])
    (tmp_path / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    return tmp_path, tmp_path / "checkpoints" / "last.ckpt", tmp_path / "configs" / "model.yaml"


@ATTENTION_ONLY
@pytest.mark.parametrize("changes, expected", [
    ({"ch_mult": [1, 2, 4]},
     "encoder.down.2.block.0.conv1.weight has shape [64, 64, 3, 3], {yaml} implies [128, 64, 3, 3]"),
    ({"attn_resolutions": []}, "unexpected tensor encoder.down.1.attn.0.norm.weight ({yaml} implies none)"),
    ({"attn_resolutions": [16, 8]}, "missing encoder.down.2.attn.0.norm.weight, which {yaml} implies"),
    ({"n_embed": 64}, "quantize.embedding.weight has shape [128, 48], {yaml} implies [64, 48]"),
])
def test_error_config_does_not_match_weights(vqgan, tmp_path, changes, expected):
    folder, ckpt, config = released_folder_with(vqgan, tmp_path, **changes)
    assert expected.format(yaml=config) in one_line_error(folder, ckpt)


@pytest.mark.parametrize("changes, expected", [
    ({"double_z": True}, "model.params.ddconfig.double_z is True, expected false"),
    ({"ch": "32"}, "model.params.ddconfig.ch is '32', expected a positive integer"),
    ({"ch": 48}, "unbuildable encoder (ch is 48, expected a multiple of 32"),
])
@ATTENTION_ONLY
def test_error_config_field(vqgan, tmp_path, changes, expected):
    folder, _, config = released_folder_with(vqgan, tmp_path, **changes)
    assert expected in one_line_error(folder, config)


@ATTENTION_ONLY
@pytest.mark.parametrize("frames", [torch.rand(2, 3, 30, 48), torch.rand(3, 32, 48), torch.rand(2, 1, 32, 48),
                                    torch.zeros(2, 3, 32, 48, dtype=torch.uint8)])
def test_encode_bad_frames(vqgan, frames):
    tokenizer = load_vqgan_tokenizer(str(vqgan.converted))
    with pytest.raises(DataError) as info:
        tokenizer.encode(frames)
    assert "\n" not in str(info.value) and f"multiples of {vqgan.spec['downsample']}" in str(info.value)


def test_cli_convert_vqgan(vqgan, tmp_path, capsys):
    from totobench.cli import main
    out = tmp_path / "enc.safetensors"
    assert main(["convert", "vqgan", str(vqgan.folder), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    tokenizer = load_tokenizer(f"vqgan:{out}")
    assert line == f"{out}: taming VQGAN encoder, {tokenizer.codebook_size} codes, sha256 {tokenizer.sha256}"
    assert torch.equal(tokenizer.encode(vqgan.images), vqgan.codes)
