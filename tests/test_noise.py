"""Gradient noise (probes/noise.py, FunctionalModel.per_sample_grads) against ground truth:
per-example gradients against a loop of torch.autograd.grad on single examples (MLP, CNN with
BatchNorm in eval mode, a small transformer); the probe's statistics against numpy on the explicit
per-example gradient matrix, per block; the noise scale of linear regression against its closed
form, and the unbiasedness of the estimators over replicates; the per-batch fallback; then a
recorded run whose trajectory is bitwise unchanged."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape
from landscape.functional import FunctionalModel, probe_guard
from landscape.models import DigitsCNN, DigitsMLP
from probes.base import Context
from probes.noise import GradientNoise
from tests._helpers import SMALL_MODELS, assert_same_weights, digits, record

STATS = ("grad_variance", "grad_sqnorm", "noise_scale", "grad_snr", "grad_snr_median")


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int, offset: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    (X, y), _ = digits()
    return X[offset:offset + n].to(dtype), y[offset:offset + n]


def _loop_grads(model: nn.Module, loss_fn, batches) -> torch.Tensor:
    """(n, d) per-example gradients by plain autograd, one example at a time on the live module."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for x, y in batches:
        for i in range(x.shape[0]):
            loss = loss_fn(model(x[i:i + 1]), y[i:i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _measure(probe: GradientNoise, model: nn.Module, batches, loss_fn=F.cross_entropy, fm=None, setup=True):
    fm = fm or FunctionalModel(model, loss_fn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = Context(step=0, functional=fm, model=model, optimizer=opt, probe_batches=list(batches), params=fm.flat_params())
    if setup:
        probe.setup(fm, opt)
    with probe_guard(model, probe.bn_mode):
        out = probe.measure(ctx)
    return {k: np.asarray(v.data) for k, v in out.values.items()}, {k: v.attrs for k, v in out.values.items()}


def _numpy_stats(m: np.ndarray, v: np.ndarray, n: int) -> dict[str, float]:
    """The estimators written out in numpy from a mean m and unbiased per-example variances v."""
    tr = v.sum()
    sq = (m**2).sum() - tr / n
    ratio = m[v > 0] ** 2 / v[v > 0]
    return {"grad_variance": tr, "grad_sqnorm": sq, "noise_scale": tr / sq if sq > 0 else math.inf,
            "grad_snr": ratio.mean(), "grad_snr_median": np.median(ratio)}


MODELS = SMALL_MODELS


@pytest.mark.parametrize("kind", list(MODELS))
def test_per_sample_grads_match_a_loop_of_single_example_gradients(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().double().eval()  # eval: BN running statistics, no dropout
    if kind == "cnn":  # non-trivial running statistics, so eval-mode BN does something
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    batch = _batch(11)
    fm = FunctionalModel(model, F.cross_entropy)
    w = fm.flat_params()
    truth = _loop_grads(model, F.cross_entropy, [batch])
    whole = list(fm.per_sample_grads(w, batch))
    assert len(whole) == 1 and whole[0].shape == (11, fm.dim) and whole[0].dtype == torch.float64
    torch.testing.assert_close(whole[0], truth, rtol=0, atol=1e-10)
    chunks = list(fm.per_sample_grads(w, batch, chunk=4))
    assert [c.shape[0] for c in chunks] == [4, 4, 3]
    torch.testing.assert_close(torch.cat(chunks), truth, rtol=0, atol=1e-10)
    # the rows average to the batch gradient (the loss is a mean)
    torch.testing.assert_close(whole[0].mean(0), fm.grad(w, batch), rtol=0, atol=1e-12)


def test_per_sample_grads_refuse_models_that_mix_or_randomise_examples():
    model = DigitsCNN(channels=3).double()
    fm = FunctionalModel(model, F.cross_entropy)
    w, batch = fm.flat_params(), _batch(4)
    with pytest.raises(RuntimeError, match="BatchNorm2d is in train mode"):
        next(fm.per_sample_grads(w, batch))
    with probe_guard(model, "train"), pytest.raises(RuntimeError, match="per_batch"):
        next(fm.per_sample_grads(w, batch))
    with probe_guard(model, "eval"):  # fine in eval mode
        assert next(fm.per_sample_grads(w, batch)).shape == (4, fm.dim)
    for m in model.modules():  # BN in eval, dropout still in train mode: random numbers under vmap
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with pytest.raises(RuntimeError, match="dropout in train mode"):
        next(fm.per_sample_grads(w, batch))
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        next(fm.per_sample_grads(w, batch, chunk=0))


@pytest.mark.parametrize("blocks", [None, "params", ["net.1", "net.5"]])
def test_probe_against_numpy_on_the_explicit_gradient_matrix(blocks):
    torch.manual_seed(2)
    model = DigitsMLP(hidden=8).double()
    batches = [_batch(24), _batch(16, offset=24), _batch(20, offset=40)]  # unequal sizes
    G = _loop_grads(model, F.cross_entropy, batches).numpy()
    n = G.shape[0]
    probe = GradientNoise(samples=3, blocks=blocks)
    out, attrs = _measure(probe, model, batches)
    labels = list(probe.block_index)
    assert probe.coords() == {"block": labels} and len(labels) == (1 if blocks is None else 6 if blocks == "params" else 2)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for p in model.parameters()]
    offsets = np.cumsum([0] + sizes)
    cols = {name: np.arange(offsets[i], offsets[i + 1]) for i, name in enumerate(names)}
    if blocks is None:
        members = {"model": names}
    elif blocks == "params":
        members = {k: [k] for k in names}
    else:
        members = {"net.1": ["net.1.weight", "net.1.bias"], "net.5": ["net.5.weight", "net.5.bias"]}
    assert list(members) == labels
    # per-batch gradients and their size-weighted spread, written out from the same matrix
    sizes_b = np.array([b[0].shape[0] for b in batches])
    ends = np.cumsum(sizes_b)
    Gb = np.stack([G[e - s:e].mean(0) for s, e in zip(sizes_b, ends)])
    mb = (sizes_b[:, None] * Gb).sum(0) / n
    vb = (sizes_b[:, None] * (Gb - mb) ** 2).sum(0) / (len(batches) - 1)
    pb, pb_attrs = _measure(GradientNoise(samples=3, blocks=blocks, method="per_batch"), model, batches)
    for b, label in enumerate(labels):
        idx = np.concatenate([cols[m] for m in members[label]])
        want = _numpy_stats(G[:, idx].mean(0), G[:, idx].var(0, ddof=1), n)
        want_pb = _numpy_stats(mb[idx], vb[idx], n)
        for name in STATS:
            np.testing.assert_allclose(out[name][b], want[name], rtol=1e-9, err_msg=f"{name} {label}")
            np.testing.assert_allclose(pb[name][b], want_pb[name], rtol=1e-9, err_msg=f"per_batch {name} {label}")
    a = attrs["noise_scale"]
    assert (a["method"], a["method_requested"], a["samples"], a["examples"], a["bn_mode"]) == ("per_sample", "auto", 3, 60, "eval")
    assert pb_attrs["grad_snr"]["method"] == "per_batch" and pb_attrs["grad_snr"]["batch_sizes"] == [24, 16, 20]


class TwoBlockLinear(nn.Module):
    """y_hat = x[:, :p1] a + x[:, p1:] b: linear regression whose weights are two parameter blocks."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.a, self.b = nn.Parameter(a.clone()), nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p1 = self.a.numel()
        return x[:, :p1] @ self.a + x[:, p1:] @ self.b


P1, P2, NOISE_SD = 2, 4, 0.7
W_STAR = torch.tensor([0.5, -1.0, 0.3, 0.8, -0.2, 0.1], dtype=torch.float64)
U = torch.tensor([0.6, -0.3, 0.2, 0.5, -0.4, 0.3], dtype=torch.float64)  # w - w*


def _regression(sizes, seed: int):
    """Batches of y = x^T w* + eps, x ~ N(0, I), eps ~ N(0, NOISE_SD^2); the model at w = w* + U."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in sizes:
        x = torch.randn(s, P1 + P2, generator=gen, dtype=torch.float64)
        out.append((x, x @ W_STAR + NOISE_SD * torch.randn(s, generator=gen, dtype=torch.float64)))
    w = W_STAR + U
    return TwoBlockLinear(w[:P1], w[P1:]), out


def _closed_form() -> dict[str, dict[str, float]]:
    """Squared loss, g = 2 x (x^T u - eps), x ~ N(0, I): E g = 2u and, by Isserlis,
    Cov g = 4 ((|u|^2 + s^2) I + u u^T). Per block B: tr Sigma_B = 4 sum_{j in B} (|u|^2 + s^2 + u_j^2),
    |G_B|^2 = 4 |u_B|^2, and parameter j's SNR is u_j^2 / (|u|^2 + s^2 + u_j^2)."""
    u = U.numpy()
    var = 4 * ((u**2).sum() + NOISE_SD**2 + u**2)
    out = {}
    for label, idx in {"model": slice(None), "a": slice(0, P1), "b": slice(P1, None)}.items():
        tr, sq = var[idx].sum(), 4 * (u[idx] ** 2).sum()
        snr = (2 * u[idx]) ** 2 / var[idx]
        out[label] = {"grad_variance": tr, "grad_sqnorm": sq, "noise_scale": tr / sq, "grad_snr": snr.mean()}
    return out


def test_noise_scale_of_linear_regression_matches_its_closed_form():
    truth = _closed_form()
    blocks = {"model": None, "a": "a", "b": "b"}
    K = 80
    sizes = [300, 700] * (K // 2)  # 40000 examples in unequal batches
    model, batches = _regression(sizes, seed=0)
    ps, _ = _measure(GradientNoise(samples=K, blocks=blocks), model, batches, loss_fn=F.mse_loss)
    pb, attrs = _measure(GradientNoise(samples=K, blocks=blocks, method="per_batch"), model, batches, loss_fn=F.mse_loss)
    assert attrs["noise_scale"]["method"] == "per_batch" and attrs["noise_scale"]["examples"] == 40000
    u = U.numpy()
    for b, label in enumerate(blocks):
        # 40000 examples: relative standard errors of these estimates are 0.7-2.2 % (measured over 40
        # seeds), so 10 % is more than 4.5 of them
        for name in ("noise_scale", "grad_variance", "grad_sqnorm", "grad_snr"):
            np.testing.assert_allclose(ps[name][b], truth[label][name], rtol=0.1, err_msg=f"{name} {label}")
        # per_batch: the same examples, so the same mean; its tr(Sigma) has K - 1 degrees of freedom,
        # relative standard error sqrt(2 tr(Sigma_B^2) / (K - 1)) / tr(Sigma_B) (batch means are Gaussian)
        idx = {"model": slice(None), "a": slice(0, P1), "b": slice(P1, None)}[label]
        Sigma = 4 * (((u**2).sum() + NOISE_SD**2) * np.eye(6) + np.outer(u, u))[idx, idx]
        rel = math.sqrt(2 * np.trace(Sigma @ Sigma) / (K - 1)) / np.trace(Sigma)
        assert abs(pb["grad_variance"][b] / ps["grad_variance"][b] - 1) < 4 * rel, label
        # |G|^2 moves only through tr(Sigma) / n; B_simple by tr(Sigma)'s relative error
        assert abs(pb["noise_scale"][b] / ps["noise_scale"][b] - 1) < 4 * rel + 0.01, label


def test_estimators_are_unbiased_over_replicates():
    """Mean over 300 independent draws: tr(Sigma) and |G|^2 within 4 standard errors of the truth
    (without the tr(Sigma)/n correction |G|^2 would be 50 % high at n = 20; per-batch
    variances of these unequal batch sizes weighted naively would be 5x off)."""
    truth = _closed_form()["model"]
    reps = 300
    for method, sizes in (("per_sample", [20]), ("per_batch", [2, 5, 20, 50, 100])):
        probe = GradientNoise(samples=len(sizes), method=method)
        tr, sq = [], []
        for r in range(reps):
            model, batches = _regression(sizes, seed=1000 + r)
            out, _ = _measure(probe, model, batches, loss_fn=F.mse_loss, setup=r == 0)
            tr.append(out["grad_variance"][0])
            sq.append(out["grad_sqnorm"][0])
        for name, vals in (("grad_variance", np.array(tr)), ("grad_sqnorm", np.array(sq))):
            err = vals.std(ddof=1) / math.sqrt(reps)
            assert abs(vals.mean() - truth[name]) < 4 * err, (method, name, vals.mean(), truth[name], err)
            assert 4 * err < 0.3 * truth[name]  # sharp enough to see a 30 % bias


class ItemModel(nn.Module):
    """Reads a value out of the tensor: a forward pass vmap cannot batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if x.sum().item() > 0 else 1.0
        return self.lin(x.flatten(1)) * scale


def test_per_batch_needs_two_batches_and_auto_falls_back():
    with pytest.raises(ValueError, match="samples >= 2"):
        GradientNoise(method="per_batch", samples=1)
    with pytest.raises(ValueError, match="samples >= 2"):
        GradientNoise(bn_mode="train")  # auto with train-mode BN goes per-batch
    with pytest.raises(ValueError, match="undefined"):
        GradientNoise(method="per_sample", bn_mode="train", samples=2)
    with pytest.raises(ValueError, match="method must be"):
        GradientNoise(method="exact")
    with pytest.raises(ValueError, match="samples"):
        GradientNoise(samples=0)
    torch.manual_seed(0)
    batches = [_batch(16), _batch(16, offset=16)]
    # train-mode BN: per batch, and the values are those of the train-mode batch gradients
    cnn = DigitsCNN(channels=3).double()
    out, attrs = _measure(GradientNoise(samples=2, bn_mode="train"), cnn, batches)
    assert (attrs["noise_scale"]["method"], attrs["noise_scale"]["bn_mode"]) == ("per_batch", "train")
    fm = FunctionalModel(cnn, F.cross_entropy)
    with probe_guard(cnn, "train"):
        g = torch.stack([fm.grad(fm.flat_params(), b) for b in batches]).numpy()
    var = 16 * g.var(0, ddof=1)
    np.testing.assert_allclose(out["grad_variance"][0], var.sum(), rtol=1e-9)
    np.testing.assert_allclose(out["grad_sqnorm"][0], (g.mean(0) ** 2).sum() - var.sum() / 32, rtol=1e-9)
    # a model vmap cannot run: auto tries once, falls back and says why
    probe = GradientNoise(samples=2)
    _, attrs = _measure(probe, ItemModel().double(), batches)
    assert attrs["grad_snr"]["method"] == "per_batch" and "vmap" in attrs["grad_snr"]["fallback_reason"]
    assert probe._per_sample is False  # remembered: later measurements go straight to per-batch
    with pytest.raises(RuntimeError, match="samples >= 2"):
        _measure(GradientNoise(samples=1), ItemModel().double(), batches)


def _record(tmp_path, probes, steps=12, name="run"):
    model, path = record(tmp_path / f"{name}.zarr", probes, model=lambda: DigitsMLP(hidden=8), steps=steps)
    return model, (landscape.open_run(path) if path is not None else None)


def test_recorded_run_has_the_variables_and_an_unchanged_trajectory(tmp_path):
    plain, _ = _record(tmp_path, None, name="plain")
    model, ds = _record(tmp_path, [GradientNoise(every=5, samples=2, blocks={"model": None, "head": "net.5"})])
    assert_same_weights(plain, model)
    assert ds.attrs["probe_errors"] == {}
    assert list(ds["block"].values) == ["model", "head"]
    for name in STATS:
        assert ds[name].dims == ("step", "block")
        measured = ds[name].sel(block="model").dropna("step")
        assert list(measured["step"].values) == [0, 5, 10]
        assert np.isnan(ds[name].sel(step=[1, 2, 3, 4, 6, 11])).all()
        assert np.isfinite(ds[name].sel(step=[0, 5, 10], block="head")).all()
    assert ds["noise_scale"].attrs["method"] == "per_sample" and ds["noise_scale"].attrs["examples"] == 128
    assert (ds["grad_variance"].sel(step=[0, 5, 10]) > 0).all()
    # the head's parameters are a subset: its variance trace is at most the model's
    assert (ds["grad_variance"].sel(block="head") <= ds["grad_variance"].sel(block="model")).sel(step=[0, 5, 10]).all()
