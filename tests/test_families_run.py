"""`totobench run --quick` of imagenet, k400 and davis for one model of each family (tiny random
models built here), each with as many per-layer rows as the model has layers; then `compare`
across families of different depths."""

import json

import pytest
import torch

from totobench.cli import main
from totobench.results.schema import load_result

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
dall_e = pytest.importorskip("dall_e")

TASKS = ("imagenet", "k400", "davis")


def _timm_micro():
    """A 3-block, 32-wide ViT (patch 8, 32 px) registered with timm as `vit_micro_totobench`."""
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer
    if not timm.is_model("vit_micro_totobench"):
        @register_model
        def vit_micro_totobench(pretrained=False, **kwargs):
            return _create_vision_transformer("vit_micro_totobench", pretrained=pretrained,
                                              **{**dict(img_size=32, patch_size=8, embed_dim=32, depth=3,
                                                        num_heads=2), **kwargs})
    return "timm:vit_micro_totobench"


def _llama(root):
    """A 2-layer Llama over a 512-code dVAE, 32 px frames, 4-frame clips (totobench.json)."""
    folder = root / "llama-micro"
    torch.manual_seed(0)
    enc = dall_e.encoder.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512, requires_grad=False)
    config = transformers.LlamaConfig(vocab_size=515, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=256)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    torch.save(enc, folder / "encoder.pkl")
    (folder / "totobench.json").write_text(json.dumps({"tokenizer": "dvae:encoder.pkl", "resolution": 32,
                                                       "num_frames": 4, "frame_stride": 2}))
    return f"llama:{folder}"


def _dinov2(root):
    folder = root / "dinov2-micro"
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=8, image_size=32)
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(folder)
    return f"hf:{folder}"


def _videomae(root):
    folder = root / "videomae-micro"
    config = transformers.VideoMAEConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                         intermediate_size=64, patch_size=8, image_size=32, num_frames=4,
                                         tubelet_size=2)
    torch.manual_seed(0)
    transformers.VideoMAEModel(config).save_pretrained(folder)
    return f"hf:{folder}"


@pytest.fixture(scope="module")
def specs(tmp_path_factory, micro_checkpoint):
    root = tmp_path_factory.mktemp("families")
    with torch.random.fork_rng(devices=[]):
        return {"checkpoint": str(micro_checkpoint), "llama": _llama(root), "timm": _timm_micro(),
                "hf-image": _dinov2(root), "hf-video": _videomae(root), "pixels": "pixels"}


@pytest.mark.parametrize("family", ["checkpoint", "llama", "timm", "hf-image", "hf-video", "pixels"])
def test_quick_run_of_each_family_gives_a_row_per_layer(family, specs, tiny_world, tmp_path):
    from totobench.model import load_backbone
    spec = specs[family]
    n = load_backbone(spec).num_layers
    args = ["run", "--model", spec, "--tasks", ",".join(TASKS), "--quick", "--data-root", str(tiny_world),
            "--out", str(tmp_path)]
    if family != "hf-video":   # VideoMAE reads its own 4-frame clips; the others a short clip, to stay quick
        args += ["--set", "k400.input.frames=4"]
    assert main(args) == 0
    files = sorted(tmp_path.glob("*/*.json"))
    assert sorted(f.stem for f in files) == sorted(TASKS)
    for f in files:
        result = load_result(f)
        assert [row["layer"] for row in result["per_layer"]] == list(range(n)), f
        assert result["model"]["num_layers"] == n and result["model"]["family"] == family.split("-")[0]
    k400 = load_result(next(f for f in files if f.stem == "k400"))
    assert k400["protocol"]["input"]["frames"] == 4


def test_compare_lines_up_families_of_different_depths(specs, tiny_world, tmp_path, capsys):
    out = tmp_path / "results"
    for spec in (specs["llama"], specs["hf-video"], "pixels"):
        assert main(["run", "--model", spec, "--tasks", "imagenet-linear", "--quick", "--data-root", str(tiny_world),
                     "--out", str(out)]) == 0
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 3
    capsys.readouterr()
    assert main(["compare", *map(str, folders), "--plot", str(tmp_path / "sweep.png")]) == 0
    text = capsys.readouterr().out
    assert "pixels" in text and "llama" in text and (tmp_path / "sweep.png").stat().st_size > 0
