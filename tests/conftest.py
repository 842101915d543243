"""Shared fixtures: an isolated TOTOBENCH_HOME, the tiny data world, a micro checkpoint."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_home(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/totobench."""
    home = tmp_path_factory.mktemp("totobench-home")
    old = os.environ.get("TOTOBENCH_HOME")
    os.environ["TOTOBENCH_HOME"] = str(home)
    os.environ.setdefault("MUJOCO_GL", "osmesa")
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    yield home
    if old is None:
        os.environ.pop("TOTOBENCH_HOME", None)
    else:
        os.environ["TOTOBENCH_HOME"] = old


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread for every test: the tensors are tiny, and on 2 cores shared with
    other work two threads spin and run ~10x slower."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _keep_threads():
    """A test that sets torch's thread count (pre-training, tokenizing do) leaves it as it found it."""
    import torch
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The data world at size tiny (seconds to generate), shared by the whole session."""
    from totobench.data.synth import synth
    out = tmp_path_factory.mktemp("world") / "tiny"
    synth(out, seed=0, size="tiny")
    return out


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory):
    """A 4-layer, dim-64 Toto with an untrained tokenizer, saved as a checkpoint folder."""
    import torch

    from totobench.model import Toto, TotoConfig
    from totobench.model.checkpoint import save_checkpoint
    from totobench.model.tokenizer import VisualTokenizer
    path = tmp_path_factory.mktemp("ckpt") / "micro"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = TotoConfig.preset("toto-tiny")
        cfg.n_layers, cfg.dim, cfg.n_heads, cfg.mlp_hidden = 4, 64, 4, 128
        save_checkpoint(path, Toto(cfg), VisualTokenizer(codebook_size=cfg.codebook_size),
                        {"note": "micro test checkpoint"})
    return path
