"""Model families of the backbone contract: llama:DIR over dVAE tokens, preset:NAME, pixels, the
FLOP counter, and `totobench info` / `ls models` (timm and hf: test_vision_backbones.py)."""

import json

import pytest
import torch

from totobench.cli import main
from totobench.errors import CheckpointError, ConfigError
from totobench.model import Toto, TotoConfig, load_backbone, load_tokenizer
from totobench.model.flops import count_flops

transformers = pytest.importorskip("transformers")
dall_e = pytest.importorskip("dall_e")


@pytest.fixture(scope="module")
def dvae_file(tmp_path_factory):
    """A random-weight dVAE encoder of the dall_e package (512 codes), pickled as the official file is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        enc = dall_e.encoder.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    path = tmp_path_factory.mktemp("dvae") / "encoder.pkl"
    torch.save(enc, path)
    return path, enc


def save_llama(directory, vocab_size=515, kv_heads=2, causal=True, layout=None):
    """A tiny random Llama (3 layers, dim 32, 4 heads) saved with save_pretrained."""
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=kv_heads,
                                      max_position_embeddings=512)
    torch.manual_seed(3)
    model = (transformers.LlamaForCausalLM if causal else transformers.LlamaModel)(config).eval()
    model.save_pretrained(directory)
    if layout is not None:
        (directory / "totobench.json").write_text(json.dumps(layout))
    return model.model if causal else model


def test_llama_over_dvae_tokens_equals_transformers_per_block(tmp_path, dvae_file):
    """Features of layer i = output of decoder layer i of transformers' own model, pre-norm, 1e-5:
    compared with `hidden_states[i + 1]` of the same weights with the final norm removed."""
    pkl, enc = dvae_file
    llama = save_llama(tmp_path, layout={"resolution": 32, "num_frames": 2, "frame_stride": 1})
    backbone = load_backbone(f"llama:{tmp_path}", tokenizer=f"dvae:{pkl}")
    assert (backbone.family, backbone.num_layers, backbone.dim, backbone.num_heads) == ("llama", 3, 32, 4)
    assert backbone.inputs.resolution == 32 and backbone.inputs.patch_size == 8
    frames = torch.rand(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = backbone.forward_frames(frames, [0, 1, -1], kind="video")
    assert [tuple(f.shape) for f in feats] == [(2, 2, 4, 4, 32)] * 3
    with torch.no_grad():
        codes = enc(dall_e.utils.map_pixels(frames.flatten(0, 1))).argmax(1).reshape(2, 2 * 16)
        tokens = torch.cat([torch.full((2, 1), 513), codes], dim=1)           # video start = 512 + 1
        llama.norm = torch.nn.Identity()
        hidden = llama(input_ids=tokens, output_hidden_states=True).hidden_states
    for f, i in zip(feats, (0, 1, 2)):
        torch.testing.assert_close(f, hidden[i + 1][:, 1:].reshape(2, 2, 4, 4, 32), rtol=0, atol=1e-5)


def test_llama_model_folder_and_images(tmp_path, dvae_file):
    """A LlamaModel folder (no LM head) loads too; kind="image" reads each frame after the image start."""
    pkl, enc = dvae_file
    llama = save_llama(tmp_path, causal=False, kv_heads=4)
    backbone = load_backbone(f"llama:{tmp_path}", tokenizer=f"dvae:{pkl}")
    assert backbone.inputs.resolution == 128 and backbone.inputs.num_frames == 16   # the paper's layout
    assert "defaults (no totobench.json)" in backbone.notes[0]
    frames = torch.rand(1, 2, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    feat = backbone.forward_frames(frames, [-1], kind="image")[0]
    with torch.no_grad():
        codes = enc(dall_e.utils.map_pixels(frames[0, 1:])).argmax(1).reshape(1, 6)
        llama.norm = torch.nn.Identity()
        ref = llama(input_ids=torch.cat([torch.tensor([[512]]), codes], 1), output_hidden_states=True).hidden_states[3]
    torch.testing.assert_close(feat[0, 1], ref[0, 1:].reshape(2, 3, 32), rtol=0, atol=1e-5)


def test_llama_errors_are_one_line(tmp_path, dvae_file):
    pkl, _ = dvae_file
    save_llama(tmp_path)
    with pytest.raises(ConfigError, match="needs its tokenizer: give --tokenizer dvae:FILE"):
        load_backbone(f"llama:{tmp_path}")
    small = tmp_path / "small"
    save_llama(small, vocab_size=300)
    with pytest.raises(ConfigError, match="has 512 codes .* embedding has 300 rows"):
        load_backbone(f"llama:{small}", tokenizer=f"dvae:{pkl}")
    (tmp_path / "totobench.json").write_text(json.dumps({"resolutoin": 64}))
    with pytest.raises(CheckpointError, match="unknown key 'resolutoin'"):
        load_backbone(f"llama:{tmp_path}", tokenizer=f"dvae:{pkl}")
    with pytest.raises(ConfigError, match="is not a folder"):
        load_backbone(f"llama:{tmp_path / 'nope'}", tokenizer=f"dvae:{pkl}")
    with pytest.raises(ConfigError, match="--tokenizer 'dave:x': expected FAMILY:PATH .*did you mean 'dvae'"):
        load_tokenizer("dave:x")


def test_llama_tokenizer_named_in_totobench_json_and_random_init(tmp_path, dvae_file):
    pkl, _ = dvae_file
    (tmp_path / "encoder.pkl").write_bytes(pkl.read_bytes())
    save_llama(tmp_path, layout={"tokenizer": "dvae:encoder.pkl", "resolution": 16})
    a = load_backbone(f"llama:{tmp_path}")
    r1, r2 = load_backbone(f"random-init:llama:{tmp_path}"), load_backbone(f"random-init:llama:{tmp_path}")
    assert r1.sha256 == r2.sha256 != a.sha256 and r1.name == f"random-init:llama:{tmp_path.name}"
    assert a.tokenizer_sha256 == r1.tokenizer_sha256 and r1.path is None


def test_preset_on_the_meta_device_counts_the_papers_shapes():
    b = load_backbone("preset:toto-1b", device="meta")
    assert (b.num_layers, b.dim, b.num_heads) == (22, 2048, 16)
    c = TotoConfig.preset("toto-1b")
    # embeddings in, LM head out: 22 blocks x (4 d^2 attention + 3 d x 5632 MLP + 2 d norms) + table + final norm
    assert b.params == 22 * (4 * 2048 ** 2 + 3 * 2048 * 5632 + 2 * 2048) + c.vocab_size * 2048 + 2048
    # FLOPs per token >= 2 x (non-embedding parameters): the matmuls, plus attention over 1 + 16 x 256 tokens
    dense = 2 * 22 * (4 * 2048 ** 2 + 3 * 2048 * 5632)
    assert dense < b.flops_per_token() < dense * 1.5
    with pytest.raises(ConfigError, match="unknown preset 'toto-bse'; did you mean 'toto-base'"):
        load_backbone("preset:toto-bse", device="meta")


def test_preset_tiny_runs_on_cpu():
    b = load_backbone("preset:toto-tiny")
    feats = b.forward_frames(torch.rand(1, 2, 3, 64, 64), [0, 7], kind="video")
    assert [tuple(f.shape) for f in feats] == [(1, 2, 8, 8, 256)] * 2


def test_count_flops_is_two_per_multiply_accumulate():
    layer = torch.nn.Linear(10, 6, bias=False)
    assert count_flops(lambda: layer(torch.zeros(7, 10))) == 2 * 7 * 10 * 6
    model = Toto(TotoConfig(dim=16, n_layers=1, n_heads=2, mlp_hidden=24, codebook_size=8, vocab_size=11,
                            max_seq_len=8))
    # per token: q, k, v, o (4 x 16 x 16) + MLP (3 x 16 x 24) MACs, + QK^T and AV over 5 keys (2 x 5 x 16)
    assert count_flops(lambda: model.forward_intermediates(torch.zeros(1, 5, dtype=torch.long), [0])) == \
        5 * 2 * (4 * 16 * 16 + 3 * 16 * 24 + 2 * 5 * 16)


def test_pixels_are_the_patch_pixels():
    b = load_backbone("pixels:patch=4,resolution=8,frames=2")
    frames = torch.rand(1, 2, 3, 8, 12)
    f = b.forward_frames(frames, [0], kind="video")[0]
    assert f.shape == (1, 2, 2, 3, 48) and b.num_layers == 1 and b.dim == 48
    assert torch.equal(f[0, 1, 1, 2], frames[0, 1, :, 4:8, 8:12].reshape(-1))   # channel-major patch
    assert load_backbone("pixels").inputs.as_dict()["resolution"] == 64
    with pytest.raises(ConfigError, match="KEY=INT pairs with KEY one of patch, resolution, frames, stride"):
        load_backbone("pixels:size=3")
    with pytest.raises(ConfigError, match="resolution 10 is not a multiple of patch 4"):
        load_backbone("pixels:patch=4,resolution=10")


def test_info_and_ls_name_every_family(tmp_path, dvae_file, capsys):
    pkl, _ = dvae_file
    save_llama(tmp_path)
    assert main(["info", f"llama:{tmp_path}", "--tokenizer", f"dvae:{pkl}"]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "forward FLOPs per token" in out and f"dvae:{pkl}" in out
    assert main(["info", "preset:toto-large"]) == 0
    assert "1024" in capsys.readouterr().out
    assert main(["ls", "models"]) == 0
    out = capsys.readouterr().out
    for family in ("llama", "timm", "hf", "pixels", "preset", "random-init", "dvae", "vqvae"):
        assert family in out
