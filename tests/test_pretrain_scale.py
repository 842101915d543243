"""Pre-training that scales (issue 21): gradient accumulation equals the big batch, activation
checkpointing changes nothing, bf16/fp16 autocast stay near fp32, `train.init_from` copies a
checkpoint (and names a mismatched parameter), kill-and-resume with accumulation and bf16 repeats
the uninterrupted run, FSDP under torchrun (2 gloo ranks) follows the one-process loss curve, and
the paper-size configs load."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pretrain_fixtures import REPO, make_corpus, micro_config
from totobench.cli import main
from totobench.errors import ConfigError
from totobench.model.checkpoint import save_checkpoint
from totobench.model.toto import Toto, TotoConfig
from totobench.pretrain import collate, initial_model, load_pretrain_config, next_token_loss
from totobench.pretrain.config import RunPaths, global_batch_size, model_cfg, sequence_tokens
from totobench.pretrain.train import (TrainState, load_init_weights, load_state, make_optimizer, save_state,
                                     train_step)


# Measured on the micro config, first 6 steps (see the README's pre-training section): the largest
# relative loss difference from the one-process fp32 curve, with a margin.
BF16_REL_TOL = 1e-3   # measured 4.0e-5
FSDP_REL_TOL = 1e-5   # measured 3.4e-7 (float summation order)


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _micro_mc(**over) -> TotoConfig:
    base = {**TotoConfig.preset("toto-tiny").to_dict(), "dim": 32, "n_layers": 2, "n_heads": 2, "mlp_hidden": 64,
            "codebook_size": 16, "vocab_size": 19, "max_seq_len": 64, "resolution": 16, "num_frames": 4}
    return TotoConfig.from_dict({**base, **over})


def _padded_batch(mc: TotoConfig, lengths=(18, 11, 18, 7, 14)) -> torch.Tensor:
    """Sequences of unequal length (so micro-batches hold unequal numbers of target tokens)."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.cat([torch.tensor([mc.video_start_id]), torch.randint(0, mc.codebook_size, (n - 2,), generator=g),
                       torch.tensor([mc.end_id])]) for n in lengths]
    return collate(seqs, mc.end_id)


def _grads_after_step(model, seqs, micro, precision="fp32"):
    """(loss, {name: grad}) of one train_step at lr 0 (weights unchanged, gradients kept)."""
    opt = make_optimizer(model, {"lr": 0.0, "weight_decay": 0.0})
    loss, _ = train_step(model, opt, seqs, model.config.end_id, 0.0, micro, grad_clip=1e9, precision=precision)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_accumulated_micro_batches_give_the_big_batch_gradient():
    mc = _micro_mc()
    model, seqs = initial_model(mc, 0), _padded_batch(mc)
    reference = next_token_loss(model, seqs, mc.end_id)  # the mean over every valid target of the batch
    reference.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    for micro in (1, 2, 3, 5):
        loss, grads = _grads_after_step(model, seqs, micro)
        assert loss == pytest.approx(reference.item(), rel=1e-6), micro
        for n, g in grads.items():
            torch.testing.assert_close(g, want[n], rtol=1e-5, atol=1e-7, msg=f"micro={micro} {n}")


def test_activation_checkpointing_keeps_loss_and_gradients():
    mc = _micro_mc()
    seqs = _padded_batch(mc)
    plain, ckpt = initial_model(mc, 0), initial_model(mc, 0)
    ckpt.activation_checkpointing = True
    (la, ga), (lb, gb) = _grads_after_step(plain, seqs, 2), _grads_after_step(ckpt, seqs, 2)
    assert la == lb
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-6, atol=0.0, msg=n)


@pytest.mark.parametrize("precision, tol", [("bf16", 0.02), ("fp16", 0.005)])
def test_autocast_loss_and_gradient_stay_near_fp32(precision, tol):
    mc = _micro_mc()
    seqs = _padded_batch(mc)
    loss32, g32 = _grads_after_step(initial_model(mc, 0), seqs, 2)
    loss, g = _grads_after_step(initial_model(mc, 0), seqs, 2, precision)
    assert loss == pytest.approx(loss32, rel=tol)
    flat32, flat = torch.cat([v.flatten() for v in g32.values()]), torch.cat([v.flatten() for v in g.values()])
    assert torch.nn.functional.cosine_similarity(flat, flat32, dim=0) > 0.99


def test_tokens_per_step_sets_the_global_batch(tmp_path, corpus_root):
    cfg = load_pretrain_config(micro_config(tmp_path, corpus_root, tokens_per_step=100))
    mc = model_cfg(cfg)
    assert sequence_tokens(mc) == 4 * 4 + 1  # 4 frames of 2x2 tokens + the end token
    assert global_batch_size(cfg, mc, 1) == 6   # 100 / 17 = 5.9
    assert global_batch_size(cfg, mc, 4) == 4   # multiples of 4 ranks: 68 tokens is nearer 100 than 136
    cfg = load_pretrain_config(micro_config(tmp_path, corpus_root, batch_size=6))
    assert global_batch_size(cfg, mc, 2) == 6
    with pytest.raises(ConfigError, match="train.batch_size=6 must be a multiple of the 4 processes"):
        global_batch_size(cfg, mc, 4)


def test_train_config_errors(tmp_path, corpus_root):
    for train, message in [({"precision": "int8"}, "train.precision must be one of fp32, bf16, fp16, got 'int8'"),
                           ({"sharding": "zero3"}, "train.sharding must be one of ddp, fsdp"),
                           ({"activation_checkpointing": "yes"},
                            "train.activation_checkpointing must be true or false"),
                           ({"tokens_per_step": 0}, "train.tokens_per_step must be an integer >= 1")]:
        with pytest.raises(ConfigError, match=message):
            load_pretrain_config(micro_config(tmp_path, corpus_root, **train))


def test_init_from_copies_weights_across_rope_base_and_resolution(tmp_path):
    trained = initial_model(_micro_mc(), 7)
    save_checkpoint(tmp_path / "ckpt", trained)
    finer = initial_model(_micro_mc(rope_base=50000.0, resolution=32, max_seq_len=128), 0)
    load_init_weights(finer, tmp_path / "ckpt", "ft.yaml")
    for name, value in trained.state_dict().items():
        assert torch.equal(finer.state_dict()[name], value), name
    with pytest.raises(ConfigError, match=r"ft.yaml: train.init_from .*: parameter tok_embeddings.weight has "
                                          r"shape \[19, 32\] there, \[35, 32\] in this config"):
        load_init_weights(initial_model(_micro_mc(codebook_size=32, vocab_size=35), 0), tmp_path / "ckpt", "ft.yaml")


def test_resume_state_reads_both_last_pt_layouts(tmp_path):
    """last.pt holds full state dicts keyed by parameter name; one written before FSDP (optimizer
    state keyed by index) still resumes. Either way the next steps are the uninterrupted ones."""
    mc = _micro_mc()
    seqs = _padded_batch(mc)
    model = initial_model(mc, 0)
    opt = make_optimizer(model, {"lr": 1e-3, "weight_decay": 0.1})
    train_step(model, opt, seqs, mc.end_id, 1e-3, 5, 1.0)
    paths = RunPaths.of({}, tmp_path / "run")
    paths.state.mkdir(parents=True)
    save_state(paths, model, opt, None, TrainState(step=1, tokens=10), {})
    ref_model, ref_opt = copy.deepcopy((model, opt))
    want = [train_step(ref_model, ref_opt, seqs, mc.end_id, 1e-3, 5, 1.0) for _ in range(2)]  # 2nd: after an update
    old = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 1, "tokens": 10, "elapsed_s": 0.0}
    for layout in ("by name", "by index"):
        if layout == "by index":
            torch.save(old, paths.last_checkpoint)
        fresh = initial_model(mc, 1)
        fresh_opt = make_optimizer(fresh, {"lr": 1e-3, "weight_decay": 0.1})
        assert load_state(paths, fresh, fresh_opt, None) == TrainState(step=1, tokens=10)
        assert [train_step(fresh, fresh_opt, seqs, mc.end_id, 1e-3, 5, 1.0) for _ in range(2)] == want, layout


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _curve(path):
    with open(path, newline="") as f:
        return [(int(r["step"]), int(r["tokens"]), r["loss"]) for r in csv.DictReader(f)]


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, corpus_root):
    """A plain one-process fp32 run of the micro config (6 steps): the curve the others follow."""
    tmp = tmp_path_factory.mktemp("fp32")
    assert main(["pretrain", "--config", str(micro_config(tmp, corpus_root, steps=6, checkpoint_every=3)),
                 "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def test_kill_and_resume_with_accumulation_and_bf16(tmp_path, corpus_root, fp32_run):
    cfg = micro_config(tmp_path, corpus_root, steps=6, checkpoint_every=3, micro_batch_size=1, precision="bf16",
                       activation_checkpointing=True)
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(["pretrain", "--config", str(cfg), "--out", str(full)]) == 0
    env = {**os.environ, "TOTOBENCH_PRETRAIN_KILL_AT_STEP": "5"}  # after the step-3 checkpoint
    proc = subprocess.run([sys.executable, "-m", "totobench", "pretrain", "--config", str(cfg), "--out", str(killed)],
                          env=env, cwd=REPO, capture_output=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert main(["pretrain", "--config", str(cfg), "--out", str(killed), "--resume"]) == 0
    assert _curve(killed / "loss_curve.csv") == _curve(full / "loss_curve.csv")
    a, b = _weights(full), _weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # bf16 autocast follows the fp32 curve of the same batches
    bf16, fp32 = ([float(r[2]) for r in _curve(d / "loss_curve.csv")] for d in (full, fp32_run))
    assert bf16 == pytest.approx(fp32, rel=BF16_REL_TOL)


def test_init_from_starts_at_the_checkpoint_loss(tmp_path, corpus_root, fp32_run):
    warm = micro_config(tmp_path, corpus_root, steps=1, init_from=str(fp32_run))
    assert main(["pretrain", "--config", str(warm), "--out", str(tmp_path / "warm"), "--precision", "bf16"]) == 0
    facts = json.loads((tmp_path / "warm" / "training.json").read_text())
    assert facts["config"]["train"]["precision"] == "bf16" and facts["command"].endswith("--precision bf16")
    curve = _curve(fp32_run / "loss_curve.csv")
    first, last = float(curve[0][2]), float(curve[-1][2])
    warm_first = float(_curve(tmp_path / "warm" / "loss_curve.csv")[0][2])
    assert warm_first < first - 0.1 and warm_first == pytest.approx(last, abs=0.2)


def test_fsdp_two_ranks_follow_the_one_process_curve(tmp_path, corpus_root, fp32_run):
    torchrun = shutil.which("torchrun", path=str(REPO / ".venv" / "bin")) or shutil.which("torchrun")
    assert torchrun, "torchrun not installed next to python"
    fsdp = tmp_path / "fsdp"
    # FSDP, a batch of 4 sequences given in tokens (4 x 17), accumulated over micro-batches of 1
    # sequence, activation checkpointing
    cfg = micro_config(tmp_path, corpus_root, steps=6, checkpoint_every=3, sharding="fsdp", micro_batch_size=1,
                       tokens_per_step=68, batch_size=1, activation_checkpointing=True)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "totobench", "pretrain",
                           "--config", str(cfg), "--out", str(fsdp)], cwd=REPO, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    a, b = _curve(fp32_run / "loss_curve.csv"), _curve(fsdp / "loss_curve.csv")
    assert [r[:2] for r in a] == [r[:2] for r in b] and len(a) == 6
    assert [float(r[2]) for r in b] == pytest.approx([float(r[2]) for r in a], rel=FSDP_REL_TOL)
    wa, wb = _weights(fp32_run), _weights(fsdp)  # the sharded model is gathered into a full checkpoint
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-5, msg=k)
    assert json.loads((fsdp / "training.json").read_text())["processes"] == 2
    # the resume state is a full state dict: the FSDP run continues on one process
    resumed = micro_config(tmp_path, corpus_root, steps=8, checkpoint_every=3)
    assert main(["pretrain", "--config", str(resumed), "--out", str(fsdp), "--resume"]) == 0
    assert [r[0] for r in _curve(fsdp / "loss_curve.csv")] == list(range(1, 9))


@pytest.mark.parametrize("name, preset, sharding", [("toto-base", "toto-base", "ddp"),
                                                    ("toto-large", "toto-large", "ddp"),
                                                    ("toto-1b", "toto-1b", "fsdp")])
def test_paper_configs_load(name, preset, sharding):
    cfg = load_pretrain_config(REPO / "configs" / "pretrain" / f"{name}.yaml")
    mc, paper = model_cfg(cfg), TotoConfig.preset(preset)
    assert (mc.dim, mc.n_layers, mc.n_heads, mc.mlp_hidden, mc.codebook_size) == \
        (paper.dim, paper.n_layers, paper.n_heads, paper.mlp_hidden, paper.codebook_size)
    assert cfg["train"]["precision"] == "bf16" and cfg["train"]["sharding"] == sharding
    assert global_batch_size(cfg, mc, 8) % 8 == 0
    with torch.device("meta"):  # the architecture builds (no memory spent on weights)
        assert Toto(mc).num_params(non_embedding=False) > 1e8
