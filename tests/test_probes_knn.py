import numpy as np
import pytest
import torch

from totobench.errors import ConfigError
from totobench.probes.grid import holdout_split
from totobench.probes.knn import fit_knn_layers, knn_classify


def brute_force_knn(train, train_labels, test, num_classes, k, temperature):
    """Reference: full cosine-similarity matrix, argsort, exp(sim / T) votes, in float64 numpy."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test @ train.T
    scores = np.zeros((len(test), num_classes))
    for i, row in enumerate(sims):
        for j in np.argsort(-row)[:k]:
            scores[i, train_labels[j]] += np.exp(row[j] / temperature)
    return scores


def test_scores_equal_a_brute_force_implementation_for_every_k():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 24)).astype(np.float64)
    labels = rng.integers(0, 7, 300)
    test = rng.normal(size=(40, 24))
    scores = knn_classify(torch.from_numpy(train).float(), torch.from_numpy(labels),
                          torch.from_numpy(test).float(), 7, ks=(20, 1, 5), temperature=0.07, batch_size=16)
    assert sorted(scores) == [1, 5, 20]
    for k, got in scores.items():
        expected = brute_force_knn(train, labels, test, 7, k, 0.07)
        assert got.shape == (40, 7) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)
        assert (got > 0).sum(1).max() <= k  # at most k classes receive votes


def test_k_above_the_memory_size_uses_every_train_item():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = knn_classify(train, labels, torch.tensor([[1.0, 0.0]]), 2, ks=(10,), temperature=1.0)[10]
    # similarities 1, 0, 1/sqrt(2): class 0 gets e^1, class 1 gets e^0 + e^(1/sqrt 2)
    expected = torch.tensor([[np.e, 1.0 + np.exp(2 ** -0.5)]], dtype=torch.float32)
    torch.testing.assert_close(scores, expected)


def test_fit_knn_layers_selects_k_on_the_held_out_slice():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(5, 16)) * 1.2
    y_train, y_val = rng.integers(0, 5, 400), rng.integers(0, 5, 100)
    train = {0: torch.from_numpy(centers[y_train] + rng.normal(size=(400, 16))).float(),
             3: torch.from_numpy(rng.normal(size=(400, 16))).float()}  # layer 3 holds no signal
    val = {0: torch.from_numpy(centers[y_val] + rng.normal(size=(100, 16))).float(),
           3: torch.from_numpy(rng.normal(size=(100, 16))).float()}
    out = fit_knn_layers(train, torch.from_numpy(y_train), val, torch.from_numpy(y_val), 5, ks=(1, 10, 20),
                         return_scores=True)
    assert out[0]["metrics"]["top1"] > 0.7 > 0.4 > out[3]["metrics"]["top1"]
    # the selection score is the held-out top-1 of the chosen k, recomputed by brute force
    fit, held = (i.numpy() for i in holdout_split(torch.from_numpy(y_train), 0.1, 0))
    k = out[0]["best_hparams"]["k"]
    ref = brute_force_knn(train[0].double().numpy()[fit], y_train[fit], train[0].double().numpy()[held], 5, k, 0.07)
    assert out[0]["select_score"] == pytest.approx((ref.argmax(1) == y_train[held]).mean())
    val_ref = brute_force_knn(train[0].double().numpy(), y_train, val[0].double().numpy(), 5, k, 0.07)
    np.testing.assert_allclose(out[0]["val_scores"].numpy(), val_ref, rtol=1e-4)
    assert out[0]["metrics"]["top1"] == pytest.approx((val_ref.argmax(1) == y_val).mean())


def test_bad_settings_raise_config_error():
    x = torch.randn(10, 4)
    with pytest.raises(ConfigError):
        knn_classify(x, torch.zeros(10, dtype=torch.long), x, 2, ks=(0,))
    with pytest.raises(ConfigError):
        knn_classify(x, torch.zeros(10, dtype=torch.long), x, 2, temperature=0.0)
