"""Backbones (model/backbone.py): names, model families, random-init baseline, tokenize and forward_frames."""

import pytest
import torch

import totobench.model.backbone as backbone_module
from totobench.errors import CheckpointError, ConfigError, DataError
from totobench.model import Toto, TotoConfig, load_backbone
from totobench.model.tokens import load_checkpoint
from totobench.model.checkpoint import save_checkpoint
from totobench.model.tokenizer import VisualTokenizer

# 16 px frames, 8x downsampling: 2x2 = 4 tokens per frame
CONFIG = TotoConfig(dim=32, n_layers=3, n_heads=2, mlp_hidden=48, codebook_size=16, vocab_size=19,
                    max_seq_len=64, resolution=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    directory = tmp_path_factory.mktemp("ck") / "my-toto"
    save_checkpoint(directory, Toto(CONFIG), VisualTokenizer(codebook_size=16, channels=8, code_dim=4))
    return directory


@pytest.fixture(scope="module")
def backbone(checkpoint):
    return load_backbone(str(checkpoint))


@pytest.fixture(scope="module")
def frames():
    return torch.rand(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_backbone_from_a_folder(backbone, checkpoint):
    assert backbone.name == "my-toto" and backbone.path == checkpoint
    assert (backbone.num_layers, backbone.dim, backbone.config) == (3, 32, CONFIG)
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_tokenize_shape_and_equals_the_tokenizer_per_frame(backbone, frames):
    ids = backbone.tokenize(frames)
    assert ids.shape == (2, 3, 2, 2) and ids.dtype == torch.long
    assert torch.equal(ids[1, 2], backbone.tokenizer.encode(frames[1, 2:3])[0])


def test_forward_frames_video_is_one_sequence_after_a_video_start(backbone, frames):
    feats = backbone.forward_frames(frames, [0, -1], kind="video")
    assert [f.shape for f in feats] == [(2, 3, 2, 2, 32)] * 2     # [B, T, h, w, D]
    ids = backbone.tokenize(frames)
    seq = torch.cat([torch.full((2, 1), CONFIG.video_start_id), ids.reshape(2, 12)], dim=1)
    with torch.no_grad():
        ref = backbone.model.forward_intermediates(seq, [2])[0]
    assert torch.equal(feats[1], ref[:, 1:].reshape(2, 3, 2, 2, 32))   # raster order within a frame


def test_forward_frames_images_are_independent_sequences(backbone, frames):
    feats = backbone.forward_frames(frames, [1], kind="image")[0]
    ids = backbone.tokenize(frames)
    seq = torch.cat([torch.tensor([[CONFIG.image_start_id]]), ids[0, 2].reshape(1, 4)], dim=1)   # 3rd image alone
    with torch.no_grad():
        ref = backbone.model.forward_intermediates(seq, [1])[0]
    torch.testing.assert_close(feats[0, 2], ref[0, 1:].reshape(2, 2, 32), rtol=0, atol=1e-5)
    # and video features of a later frame do depend on earlier frames
    video = backbone.forward_frames(frames, [1], kind="video")[0]
    assert (video[:, 1:] - feats[:, 1:]).abs().max() > 1e-3


def test_bad_inputs(backbone, frames):
    with pytest.raises(DataError, match=r"H and W multiples of the patch size 8 .*got \[2, 3, 3, 12, 16\]"):
        backbone.tokenize(frames[..., :12, :])
    with pytest.raises(DataError, match=r"frames must be \[B, T, 3, H, W\]"):
        backbone.tokenize(frames[:, :, :2])
    with pytest.raises(ConfigError, match="kind must be 'image' or 'video'"):
        backbone.forward_frames(frames, [0], kind="audio")
    with pytest.raises(ConfigError, match="valid indices are 0..2"):
        backbone.forward_frames(frames, [3], kind="video")


def test_random_init_same_config_and_tokenizer_seeded_weights(backbone, checkpoint):
    state = torch.get_rng_state()
    a = load_backbone(f"random-init:{checkpoint}")
    assert torch.equal(torch.get_rng_state(), state)   # the caller's RNG is untouched
    b = load_backbone(f"random-init:{checkpoint}")
    torch.manual_seed(0)
    expected = Toto(CONFIG).state_dict()
    assert a.name == "random-init:my-toto" and a.path is None and a.config == CONFIG
    assert a.sha256 == b.sha256 != backbone.sha256
    for k, v in expected.items():
        assert torch.equal(a.model.state_dict()[k], v), k
    for k, v in backbone.tokenizer.state_dict().items():
        assert torch.equal(a.tokenizer.state_dict()[k], v), k


def test_registered_names_resolve_under_checkpoints_dir(checkpoint, monkeypatch):
    monkeypatch.setattr(backbone_module, "checkpoints_dir", lambda: checkpoint.parent)
    assert backbone_module.list_models() == ["my-toto", "toto-tiny", "random-init:my-toto", "random-init:toto-tiny"]
    assert load_backbone("my-toto").name == "my-toto"
    assert load_backbone("random-init:my-toto").name == "random-init:my-toto"
    with pytest.raises(CheckpointError, match="toto-tiny checkpoint is missing"):
        load_backbone("toto-tiny")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ConfigError, match="unknown model 'toto-tni'; did you mean 'toto-tiny'"):
        load_backbone("toto-tni")


def test_checkpoint_without_tokenizer_is_not_a_backbone(tmp_path):
    save_checkpoint(tmp_path, Toto(CONFIG))
    with pytest.raises(CheckpointError, match="tokenizer: missing"):
        load_backbone(str(tmp_path))


def test_frames_larger_than_the_model_resolution(backbone):
    """Any multiple of the patch size is read: 24 x 32 px -> a 3 x 4 token grid, raster order."""
    big = torch.rand(1, 2, 3, 24, 32, generator=torch.Generator().manual_seed(2))
    ids = backbone.tokenize(big)
    assert ids.shape == (1, 2, 3, 4)
    assert torch.equal(ids[0, 1], backbone.tokenizer.encode(big[0, 1:])[0])
    feats = backbone.forward_frames(big, [0, -1], kind="image")
    assert [tuple(f.shape) for f in feats] == [(1, 2, 3, 4, CONFIG.dim)] * 2


def test_a_retrained_tokenizer_changes_the_feature_identity(checkpoint, tmp_path):
    """Same transformer weights, other tokenizer: the cache key part (features_id) differs, so cached
    features of the old tokenizer are never reused; random-init baselines included."""
    model, _, _, _ = load_checkpoint(checkpoint, "cpu")
    torch.manual_seed(7)
    other = tmp_path / "my-toto"
    save_checkpoint(other, model, VisualTokenizer(codebook_size=16, channels=8, code_dim=4))
    a, b = load_backbone(str(checkpoint)), load_backbone(str(other))
    assert a.sha256 == b.sha256
    assert a.tokenizer_sha256 != b.tokenizer_sha256 and a.features_id != b.features_id
    ra, rb = load_backbone("random-init:" + str(checkpoint)), load_backbone("random-init:" + str(other))
    assert ra.sha256 == rb.sha256 and ra.features_id != rb.features_id


def test_family_prefix_picks_the_registered_loader(backbone, checkpoint):
    from totobench.registry import MODELS
    from totobench.model import tokens
    assert MODELS.get("checkpoint") is tokens.load_checkpoint_backbone
    assert MODELS.get("random-init") is tokens.load_random_init_backbone
    explicit = load_backbone(f"checkpoint:{checkpoint}")
    assert (explicit.name, explicit.sha256, explicit.path) == (backbone.name, backbone.sha256, checkpoint)


def test_unknown_family_suggests_the_closest_registered_one():
    with pytest.raises(ConfigError, match=r"^unknown model family 'radnom-init' in 'radnom-init:toto-tiny'; "
                                          r"did you mean 'random-init'\?$"):
        load_backbone("radnom-init:toto-tiny")
