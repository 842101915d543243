"""timm and transformers vision models as backbones (totobench.model.vision), on tiny random models:
each layer equals the library's own per-block output; bad specs and files are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from totobench.errors import CheckpointError, ConfigError, DataError  # noqa: E402
from totobench.model.backbone import load_backbone  # noqa: E402
from totobench.model.vision import HF_LAYOUTS, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

ARCH = "vit_tiny_patch16_224"   # 5M parameters: cheap to build at random
TINY_VIT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                patch_size=8, image_size=32)


def _frames(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _normalised(frames: torch.Tensor, mean, std) -> torch.Tensor:
    return (frames - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# ---------------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """(reference model without head, its weights saved with a classifier head as .safetensors)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = timm.create_model(ARCH, pretrained=False, dynamic_img_size=True).eval()
    path = tmp_path_factory.mktemp("timm") / "vit_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    model.reset_classifier(0)
    return model, path


def test_timm_layers_equal_forward_intermediates(timm_vit):
    model, path = timm_vit
    backbone = load_backbone(f"timm:{ARCH}@{path}")
    assert (backbone.name, backbone.family, backbone.path) == (f"timm:{ARCH}@{path.name}", "timm", path)
    assert (backbone.num_layers, backbone.dim, backbone.num_heads) == (12, 192, 3)
    assert backbone.inputs.resolution == 224 and backbone.inputs.patch_size == 16 and not backbone.inputs.fixed_size
    frames = _frames(2, 3, 3, 64, 48)     # another size than 224: dynamic_img_size
    feats = backbone.forward_frames(frames, [0, 5, -1], kind="video")
    cfg = model.pretrained_cfg
    pixels = _normalised(frames.flatten(0, 1), cfg["mean"], cfg["std"])
    with torch.no_grad():
        ref = model.forward_intermediates(pixels, indices=[0, 5, 11], norm=False, intermediates_only=True)
    for got, want in zip(feats, ref):
        assert got.shape == (2, 3, 4, 3, 192)
        torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(2, 3, 4, 3, 192), atol=1e-5, rtol=0)


def test_timm_reads_a_torch_checkpoint_dict_as_the_same_weights(timm_vit, tmp_path):
    model, path = timm_vit
    pth = tmp_path / "vit.pth"
    torch.save({"model": model.state_dict(), "epoch": 3}, pth)
    assert load_backbone(f"timm:{ARCH}@{pth}").sha256 == load_backbone(f"timm:{ARCH}@{path}").sha256


@pytest.mark.parametrize("edit, key", [
    (lambda sd: sd.update({"blocks.2.attn.qkv.weight": torch.zeros(6, 192)}), "blocks.2.attn.qkv.weight"),
    (lambda sd: sd.pop("pos_embed"), "pos_embed"),
    (lambda sd: sd.update({"adapter.weight": torch.zeros(1)}), "adapter.weight"),
])
def test_timm_weights_that_do_not_fit_name_the_first_bad_key(timm_vit, tmp_path, edit, key):
    state = dict(timm_vit[0].state_dict())
    edit(state)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")) as err:
        load_backbone(f"timm:{ARCH}@{path}")
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_timm_random_init_ignores_the_file_and_is_seeded(timm_vit):
    _, path = timm_vit
    a, b = (load_backbone(f"random-init:timm:{ARCH}@{path}") for _ in range(2))
    assert a.sha256 == b.sha256 != load_backbone(f"timm:{ARCH}@{path}").sha256
    assert a.name == f"random-init:timm:{ARCH}" and a.path is None


def test_timm_unknown_and_unsupported_architectures():
    with pytest.raises(ConfigError, match="did you mean 'vit_tiny_patch16_224'"):
        load_backbone("timm:vit_tiny_patch16_22")
    with pytest.raises(ConfigError, match="resnet18: its stages change width or grid") as err:
        load_backbone("timm:resnet18")
    assert "\n" not in str(err.value)


def test_timm_missing_file():
    with pytest.raises(CheckpointError, match="nowhere.safetensors: weights file not found"):
        load_backbone(f"timm:{ARCH}@/nowhere.safetensors")


# ---------------------------------------------------------------------- transformers
def _save_hf(directory, config, seed: int = 0):
    """A random model of `config` saved with save_pretrained into `directory`; returns the folder."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.AutoModel.from_config(config).save_pretrained(directory)
    return directory


def _hidden_states(directory, **inputs):
    """The reference: the saved model's own hidden_states."""
    model = transformers.AutoModel.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


def test_hf_dinov2_layers_equal_hidden_states(tmp_path):
    directory = _save_hf(tmp_path / "dinov2", transformers.Dinov2Config(**TINY_VIT))
    backbone = load_backbone(f"hf:{directory}")
    assert (backbone.name, backbone.num_layers, backbone.dim, backbone.num_heads) == ("hf:dinov2", 3, 32, 2)
    assert backbone.inputs.patch_size == 8 and not backbone.inputs.fixed_size
    assert any("ImageNet" in n for n in backbone.notes)
    frames = _frames(2, 2, 3, 32, 48)
    feats = backbone.forward_frames(frames, [0, 1, -1], kind="video")
    hidden = _hidden_states(directory, pixel_values=_normalised(frames.flatten(0, 1), IMAGENET_MEAN, IMAGENET_STD))
    for got, i in zip(feats, [0, 1, 2]):
        assert got.shape == (2, 2, 4, 6, 32)
        torch.testing.assert_close(got, hidden[i + 1][:, 1:].reshape(2, 2, 4, 6, 32), atol=1e-5, rtol=0)
    assert backbone.flops_per_token() > 0


def test_hf_vit_reads_the_preprocessor_mean_and_std(tmp_path):
    directory = _save_hf(tmp_path / "vit", transformers.ViTConfig(**TINY_VIT))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    (directory / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": std}))
    backbone = load_backbone(f"hf:{directory}")
    assert any("preprocessor_config.json" in n for n in backbone.notes)
    frames = _frames(1, 2, 3, 32, 32)
    got = backbone.forward_frames(frames, -1, kind="image")[0]
    hidden = _hidden_states(directory, pixel_values=_normalised(frames[0], mean, std))
    torch.testing.assert_close(got, hidden[3][:, 1:].reshape(1, 2, 4, 4, 32), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def videomae(tmp_path_factory):
    config = transformers.VideoMAEConfig(**TINY_VIT, num_frames=4, tubelet_size=2)
    return _save_hf(tmp_path_factory.mktemp("hf") / "videomae", config)


def test_hf_videomae_reads_a_clip_in_tubelets(videomae):
    backbone = load_backbone(f"hf:{videomae}")
    i = backbone.inputs
    assert (i.num_frames, i.tubelet, i.fixed_size, i.fixed_frames) == (4, 2, True, True)
    frames = _frames(2, 4, 3, 32, 32)
    feats = backbone.forward_frames(frames, [0, -1], kind="video")
    hidden = _hidden_states(videomae, pixel_values=_normalised(frames, IMAGENET_MEAN, IMAGENET_STD))
    for got, layer in zip(feats, [0, 2]):
        assert got.shape == (2, 2, 4, 4, 32)
        torch.testing.assert_close(got, hidden[layer + 1].reshape(2, 2, 4, 4, 32), atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="exactly 4 frames"):
        backbone.forward_frames(_frames(1, 2, 3, 32, 32), 0, kind="video")


def test_hf_videomae_reads_an_image_as_a_static_clip(videomae):
    backbone = load_backbone(f"hf:{videomae}")
    assert any("static clip" in n for n in backbone.notes)
    frames = _frames(1, 3, 3, 32, 32)
    got = backbone.forward_frames(frames, [1], kind="image")[0]
    clips = _normalised(frames[0], IMAGENET_MEAN, IMAGENET_STD).unsqueeze(1).repeat(1, 4, 1, 1, 1)
    want = _hidden_states(videomae, pixel_values=clips)[2].reshape(3, 2, 4, 4, 32).mean(1)
    assert got.shape == (1, 3, 4, 4, 32)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=0)


def _tiny_config(model_type: str):
    """A 2-block, width-32 config of each supported model type (patch 8, frames of 32 pixels)."""
    if model_type == "vjepa2":
        return transformers.VJEPA2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                         patch_size=8, crop_size=32, frames_per_clip=4, tubelet_size=2,
                                         pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2)
    extra = {"num_frames": 4, "tubelet_size": 2} if model_type == "videomae" else {}
    return transformers.AutoConfig.for_model(model_type, **{**TINY_VIT, "num_hidden_layers": 2}, **extra)


@pytest.mark.parametrize("model_type", sorted(HF_LAYOUTS))
def test_hf_last_layer_is_the_last_block_before_the_final_norm(tmp_path, model_type):
    directory = _save_hf(tmp_path / model_type, _tiny_config(model_type))
    backbone = load_backbone(f"hf:{directory}")
    model = backbone.model
    blocks = next(m for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == 2 and "predictor" not in name)
    seen = []
    hook = blocks[-1].register_forward_hook(lambda module, args, out: seen.append(out[0] if isinstance(out, tuple)
                                                                                    else out))
    video = HF_LAYOUTS[model_type].kind == "video"
    got = backbone.forward_frames(_frames(1, 4 if video else 1, 3, 32, 32), -1, kind="video")[0]
    hook.remove()
    grid = (2 if video else 1) * 16
    torch.testing.assert_close(got.reshape(1, grid, 32), seen[0][:, -grid:], atol=0, rtol=0)


def test_hf_random_init_needs_no_weights_and_is_seeded(tmp_path):
    directory = tmp_path / "dinov2"
    directory.mkdir()
    (directory / "config.json").write_text(transformers.Dinov2Config(**TINY_VIT).to_json_string())
    a, b = (load_backbone(f"random-init:hf:{directory}") for _ in range(2))
    assert a.sha256 == b.sha256 and a.name == "random-init:hf:dinov2"
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_backbone(f"hf:{directory}")
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="dinov2: cannot load the weights"):
        load_backbone(f"hf:{directory}")


def test_hf_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_backbone(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="model_type 'bert' is not a supported vision model") as err:
        load_backbone(f"hf:{tmp_path}")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, key", [({"mlp_ratio": 3}, "mlp.fc1.weight has shape [128, 32]"),
                                         ({"num_hidden_layers": 4}, "encoder.layer.3.")])
def test_hf_weights_that_do_not_fit_name_the_first_bad_key(tmp_path, change, key):
    directory = _save_hf(tmp_path / "dinov2", transformers.Dinov2Config(**TINY_VIT))
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.").replace("[", r"\[")) as err:
        load_backbone(f"hf:{directory}")
    assert "\n" not in str(err.value)
