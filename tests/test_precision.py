"""--precision: the backbone forward under autocast (the tokenizer's code lookup in fp32), features
within a stated tolerance of fp32, cached apart from them, recorded in the result and respected by
the skip rule; the kNN index falls back to the CPU when faiss has no GPU."""

from __future__ import annotations

import pytest
import torch

from totobench.cli import main
from totobench.model import load_backbone
from totobench.results.schema import load_result
from totobench.model.backbone import resolve_precision

# Relative L2 error of bf16 features against fp32, per layer: measured 0.2-0.35% (micro and toto-tiny)
BF16_TOLERANCE = 0.01


def _frames(tiny_world, n: int = 8) -> torch.Tensor:
    from totobench.data.imagenet import ImageNetFolder, load_rgb
    from totobench.data.preprocess import image_transform
    folder, transform = ImageNetFolder(tiny_world / "imagenet", "val"), image_transform(64)
    return torch.stack([transform(load_rgb(path)) for path, _ in folder.samples[:n]]).unsqueeze(1)


@pytest.mark.parametrize("spec", ["micro", "toto-tiny"])
def test_bf16_features_are_within_tolerance_of_fp32(spec, tiny_world, micro_checkpoint):
    """toto-tiny's trained tokenizer would flip ~3% of its codes under bf16 (features off by ~10%):
    its code lookup stays fp32, so only the transformer's rounding remains."""
    backbone = load_backbone(str(micro_checkpoint) if spec == "micro" else spec)
    frames = _frames(tiny_world)
    layers = list(range(backbone.num_layers))
    reference = backbone.forward_frames(frames, layers, kind="image")
    backbone.precision = "bf16"
    features = backbone.forward_frames(frames, layers, kind="image")
    assert all(f.dtype == torch.float32 for f in features)
    errors = [float((f - r).norm() / r.norm()) for f, r in zip(features, reference)]
    assert max(errors) < BF16_TOLERANCE, errors
    assert min(errors) > 0          # the forward did run in bf16


def test_bf16_runs_end_to_end_on_cpu_apart_from_the_fp32_cache(tiny_world, micro_checkpoint, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("TOTOBENCH_HOME", str(tmp_path / "home"))
    base = ["run", "--model", str(micro_checkpoint), "--tasks", "imagenet-linear", "--quick", "--data-root",
            str(tiny_world), "--out", str(tmp_path / "out")]
    assert main(base) == 0
    fp32 = load_result(tmp_path / "out" / "micro" / "imagenet-linear.json")
    capsys.readouterr()
    assert main(base + ["--precision", "bf16"]) == 0
    text = capsys.readouterr().out
    assert "skipped" not in text and "forward in bf16 on cpu" in text   # an fp32 result does not answer bf16
    bf16 = load_result(tmp_path / "out" / "micro" / "imagenet-linear.json")
    assert (fp32["protocol"]["precision"], bf16["protocol"]["precision"]) == ("fp32", "bf16")
    assert bf16["extra"]["feature_cache"] == "miss"                    # fp32 features are not reused
    stored = [r["protocol"]["estimate"]["stored_bytes"] for r in (fp32, bf16)]
    assert stored[0] == stored[1]                                       # the cache keeps float16 either way
    gap = abs(fp32["best_layer"]["metrics"]["top1"] - bf16["best_layer"]["metrics"]["top1"])
    assert gap <= 0.05, gap


def test_precision_defaults_to_bf16_on_cuda_and_fp32_on_cpu():
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision(None, torch.device("cuda")) == "bf16"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"


def test_features_id_names_a_reduced_precision(micro_checkpoint):
    backbone = load_backbone(str(micro_checkpoint))
    fp32_id = backbone.features_id
    backbone.precision = "bf16"
    assert backbone.features_id == f"{fp32_id}+bf16"


def test_knn_index_stays_on_the_cpu_without_gpu_faiss():
    import faiss

    from totobench.probes.knn import flat_ip_index, knn_classify
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss with a GPU: the index moves to it")
    assert isinstance(flat_ip_index(4, "cuda"), faiss.IndexFlatIP)
    train = torch.eye(4)
    scores = knn_classify(train, torch.arange(4), train, 4, ks=(1,), device="cuda")[1]
    assert scores.argmax(1).tolist() == [0, 1, 2, 3]
