import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from torch.optim.adamw import adamw

from totobench.errors import ConfigError, DataError
from totobench.probes.grid import GridAdamW, holdout_split
from totobench.probes.linear import fit_linear_grid

WDS = (1e-4, 1e-2)


def gaussian_layers(n_train=2000, n_val=1000, dim=64, num_classes=10, noises=(1.0, 1.5, 2.2, 3.2), seed=0):
    """Overlapping Gaussian clusters seen through 4 "layers" of falling quality (more noise), each
    rotated, scaled per dimension and offset (so standardisation matters)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * 0.45
    y_train = torch.randint(0, num_classes, (n_train,), generator=g)
    y_val = torch.randint(0, num_classes, (n_val,), generator=g)
    train, val = {}, {}
    for layer, noise in enumerate(noises):
        rotation = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
        scale = torch.exp(torch.randn(dim, generator=g))
        offset = torch.randn(dim, generator=g) * 5

        def draw(y):
            return ((centers[y] + noise * torch.randn(len(y), dim, generator=g)) @ rotation) * scale + offset
        train[layer], val[layer] = draw(y_train), draw(y_val)
    return train, y_train, val, y_val


def sklearn_top1(x_train, y_train, x_val, y_val):
    """LogisticRegression with C chosen on the same held-out slice from the same regularisation grid
    (C = 1 / (wd * N)), refitted on all of train: the protocol of fit_linear_grid, done by sklearn."""
    fit, held = (i.numpy() for i in holdout_split(y_train, 0.1, 0))
    x, y = x_train.numpy(), y_train.numpy()
    mean, std = x[fit].mean(0), x[fit].std(0)

    def held_out_top1(c):
        model = LogisticRegression(C=c, max_iter=3000).fit((x[fit] - mean) / std, y[fit])
        return (model.predict((x[held] - mean) / std) == y[held]).mean()
    best_c = max((1 / (wd * len(fit)) for wd in WDS), key=held_out_top1)
    mean, std = x.mean(0), x.std(0)
    model = LogisticRegression(C=best_c, max_iter=3000).fit((x - mean) / std, y)
    return (model.predict((x_val.numpy() - mean) / std) == y_val.numpy()).mean()


def test_linear_grid_matches_sklearn_logistic_regression():
    train, y_train, val, y_val = gaussian_layers()
    out = fit_linear_grid(train, y_train, val, y_val, 10, wds=WDS, epochs=10, batch_size=64)
    ours = {layer: row["metrics"]["top1"] for layer, row in out.items()}
    with threadpool_limits(1):
        reference = {layer: sklearn_top1(train[layer], y_train, val[layer], y_val) for layer in train}
    best = max(ours, key=ours.get)
    assert best == max(reference, key=reference.get) == 0
    assert abs(ours[best] - reference[best]) <= 0.01, (ours, reference)
    for layer in train:  # every layer, not only the best, lands near the reference
        assert abs(ours[layer] - reference[layer]) <= 0.02, (layer, ours, reference)
    assert ours[0] > ours[1] > ours[2] > ours[3]  # layer quality is recovered in order
    for row in out.values():
        assert row["best_hparams"]["wd"] in WDS and 0.0 <= row["select_score"] <= 1.0
        assert row["metrics"]["top5"] >= row["metrics"]["top1"]


def test_linear_grid_is_deterministic_and_accepts_float16_arrays():
    train, y_train, val, y_val = gaussian_layers(n_train=300, n_val=100, dim=16, num_classes=4, noises=(1.0, 2.0))
    kwargs = dict(lrs=(0.01, 0.1), wds=(1e-3,), epochs=3, batch_size=32, seed=3)
    first = fit_linear_grid(train, y_train, val, y_val, 4, return_scores=True, **kwargs)
    second = fit_linear_grid(train, y_train, val, y_val, 4, return_scores=True, **kwargs)
    for layer in train:
        assert first[layer]["metrics"] == second[layer]["metrics"]
        assert torch.equal(first[layer]["val_scores"], second[layer]["val_scores"])
        assert first[layer]["val_scores"].shape == (100, 4)
    # memory-mapped caches hold float16 numpy arrays: same contract
    as_f16 = lambda feats: {layer: x.numpy().astype(np.float16) for layer, x in feats.items()}
    half = fit_linear_grid(as_f16(train), y_train.numpy(), as_f16(val), y_val.numpy(), 4, **kwargs)
    for layer in train:
        assert abs(half[layer]["metrics"]["top1"] - first[layer]["metrics"]["top1"]) <= 0.03


def test_without_refit_the_reported_head_is_the_selected_one():
    train, y_train, val, y_val = gaussian_layers(n_train=400, n_val=200, dim=16, num_classes=4, noises=(1.5,))
    # the held-out slice doubles as val: the reported top-1 must equal the selection score
    fit, held = holdout_split(y_train, 0.1, 0)
    out = fit_linear_grid(train, y_train, {0: train[0][held]}, y_train[held], 4, lrs=(0.003, 0.03),
                          wds=(1e-4, 1e-2), epochs=4, batch_size=32, refit=False)
    assert out[0]["metrics"]["top1"] == pytest.approx(out[0]["select_score"])


def test_holdout_split_is_stratified_disjoint_and_deterministic():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    fit, held = holdout_split(labels, 0.1, seed=0)
    assert torch.bincount(labels[held]).tolist() == [5, 3, 2]
    assert sorted(fit.tolist() + held.tolist()) == list(range(100))
    assert torch.equal(held, holdout_split(labels, 0.1, seed=0)[1])
    assert not torch.equal(held, holdout_split(labels, 0.1, seed=1)[1])
    with pytest.raises(ConfigError):
        holdout_split(labels, 1.5)
    with pytest.raises(DataError):
        holdout_split(torch.tensor([0, 1, 2]), 0.1)  # one item per class: nothing to hold out


def test_grid_adamw_steps_every_head_like_torch_adamw():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(2, 3, 4, generator=g)
    grads = [torch.randn(2, 3, 4, generator=g) for _ in range(5)]
    lrs, wds = torch.tensor([0.1, 0.01]), torch.tensor([0.5, 0.0])
    stacked = start.clone()
    ours = GridAdamW([(stacked, lrs.view(2, 1, 1), wds.view(2, 1, 1))])
    for i, grad in enumerate(grads):
        stacked.grad = grad
        ours.step(lr_scale=1.0 - 0.1 * i)
    for head in range(2):  # torch's own AdamW, functional form (the Optimizer class imports dynamo: slow)
        single, m, v, step = start[head].clone(), torch.zeros(3, 4), torch.zeros(3, 4), torch.tensor(0.0)
        for i, grad in enumerate(grads):
            adamw([single], [grad[head]], [m], [v], [], [step], foreach=False, capturable=False,
                  differentiable=False, fused=None, grad_scale=None, found_inf=None, amsgrad=False, beta1=0.9,
                  beta2=0.999, lr=lrs[head].item() * (1.0 - 0.1 * i), weight_decay=wds[head].item(), eps=1e-8,
                  maximize=False)
        torch.testing.assert_close(stacked[head], single, rtol=1e-5, atol=1e-6)


def test_bad_grid_settings_raise_config_error():
    train, y_train, val, y_val = gaussian_layers(n_train=100, n_val=20, dim=4, num_classes=2, noises=(1.0,))
    with pytest.raises(ConfigError):
        fit_linear_grid(train, y_train, val, y_val, 2, lrs=())
    with pytest.raises(ConfigError):
        fit_linear_grid(train, y_train, val, y_val, 2, epochs=0)
    for bad in (-0.1, "yes"):
        with pytest.raises(ConfigError, match="probe.whiten"):
            fit_linear_grid(train, y_train, val, y_val, 2, whiten=bad)


def test_whitening_decorrelates_and_keeps_the_l2_objective():
    from totobench.probes.linear import _batches, _whitening
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(6, 6, generator=g) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1, 3.0])
    feats = {0: torch.randn(500, 6, generator=g) @ mixing + 4.0, 1: torch.randn(500, 6, generator=g)}
    index = torch.arange(500)
    mean, transform, penalty = _whitening(feats, [0, 1], index, "cpu", shrink=0.0)
    assert torch.allclose(mean[0], feats[0].mean(0), atol=1e-4)
    u = torch.cat([b for b, _ in _batches(feats, [0, 1], index, mean, transform, 500, "cpu")], dim=1)
    for layer in range(2):
        assert torch.allclose(u[layer].T @ u[layer] / 500, torch.eye(6), atol=1e-3)
    # shrinkage s: the variances become L / (L + s), s = shrink * mean(L) of the standardised features
    z = (feats[0] - feats[0].mean(0)) / feats[0].std(0, correction=0)
    evals = torch.linalg.eigvalsh(torch.cov(z.T, correction=0).double())
    mean, transform, penalty = _whitening(feats, [0], index, "cpu", shrink=1.0)
    u = (feats[0] - mean[0]) @ transform[0]
    assert torch.allclose(torch.linalg.eigvalsh(torch.cov(u.T, correction=0).double()),
                          evals / (evals + evals.mean()), atol=1e-3)
    # a head V on u is a head W on the standardised z with the same logits, |W|^2 = sum penalty_i |V_i|^2
    v = torch.randn(6, 3, generator=g)
    w = torch.linalg.lstsq(z, u @ v).solution
    assert torch.allclose(z @ w, u @ v, atol=1e-3)
    assert torch.allclose((w ** 2).sum(), (penalty[0][:, None] * v ** 2).sum(), rtol=1e-3)


def test_whitened_grid_lands_near_sklearn():
    train, y_train, val, y_val = gaussian_layers()
    out = fit_linear_grid(train, y_train, val, y_val, 10, wds=WDS, epochs=15, batch_size=64, whiten=0.01)
    ours = {layer: row["metrics"]["top1"] for layer, row in out.items()}
    with threadpool_limits(1):
        reference = {layer: sklearn_top1(train[layer], y_train, val[layer], y_val) for layer in train}
    assert max(ours, key=ours.get) == max(reference, key=reference.get) == 0
    assert abs(ours[0] - reference[0]) <= 0.01, (ours, reference)


def test_rows_normalised_once_train_like_rows_normalised_every_epoch(monkeypatch):
    import totobench.probes.linear as linear
    train, y_train, val, y_val = gaussian_layers(n_train=300, n_val=100, dim=8, noises=(1.0, 2.0))
    kwargs = dict(lrs=(0.01, 0.1), wds=(1e-3,), epochs=3, batch_size=32, whiten=0.01, return_scores=True)
    resident = fit_linear_grid(train, y_train, val, y_val, 10, **kwargs)
    monkeypatch.setattr(linear, "RESIDENT_BYTES", 0)
    streamed = fit_linear_grid(train, y_train, val, y_val, 10, **kwargs)
    for layer in train:
        assert torch.allclose(resident[layer]["val_scores"], streamed[layer]["val_scores"], atol=1e-4)
