"""The curvature probes (probes/curvature.py) against ground truth: dense float64 Hessians of an
MLP, a CNN with BatchNorm and a small transformer (torch.func.hessian), closed-form Hessians
(linear regression 2/N X^T X), dense P^-1/2 H P^-1/2 from a real Adam state, the edge-of-stability
constants against simulated momentum iterations, per-block spectra against dense diagonal
blocks; then the recorder: stored variables and the ``block`` coordinate, warm-started tracking,
and a training trajectory that is bitwise unchanged with every probe attached."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape
from landscape.functional import FunctionalModel, probe_guard, resolve_blocks, second_order_kernels
from landscape.models import DigitsCNN, DigitsMLP
from probes import HessianSpectrum, HessianTrace, PreconditionedSharpness, RestrictedSecant, SpectralDensity
from probes.base import Context
from probes.curvature import density_on_grid, preconditioner_diagonal, stability_constant
from tests._helpers import SMALL_MODELS, assert_same_weights, digits, record


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 48, offset: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    (X, y), _ = digits()
    return X[offset:offset + n].to(dtype), y[offset:offset + n]


def _dense(fm: FunctionalModel, w: torch.Tensor, batches, *, independent: bool = False) -> torch.Tensor:
    """The dense float64 Hessian, column by column from the HVP operator (fast); or
    (``independent``) from torch.func.hessian, which shares no code with the operator. The HVP
    itself is checked against torch.func.hessian, closed forms and finite differences in
    test_functional.py and test_hessian.py; here the numerics above it are under test."""
    w = w.detach()
    if independent:
        with second_order_kernels():
            H = torch.func.hessian(lambda x: fm.loss(x, batches))(w)
    else:
        H = fm.hessian_operator(w, batches).matmat(torch.eye(w.numel(), dtype=w.dtype))
    return (H + H.T) / 2


def _ctx(model: nn.Module, opt: torch.optim.Optimizer, batches, step: int = 0, fm: FunctionalModel | None = None,
         weight_decay: torch.Tensor | None = None) -> Context:
    fm = fm or FunctionalModel(model, F.cross_entropy)
    return Context(step=step, functional=fm, model=model, optimizer=opt, probe_batches=list(batches),
                   params=fm.flat_params(), lr=float(opt.param_groups[0]["lr"]), weight_decay=weight_decay)


def _measure(probe, model, opt, batches, **kw):
    ctx = _ctx(model, opt, batches, **kw)
    probe.setup(ctx.functional, opt)
    with probe_guard(model, probe.bn_mode):
        out = probe.measure(ctx)
    return {k: np.asarray(v.data) for k, v in out.values.items()}, ctx


MODELS = SMALL_MODELS


@pytest.mark.parametrize("kind", list(MODELS))
def test_top5_spectrum_and_trace_against_dense_float64_hessian(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [_batch(40), _batch(24, offset=40)]  # two batches: the example-weighted mean loss
    out, ctx = _measure(HessianSpectrum(k=5, tol=1e-10, samples=2), model, opt, batches)
    with probe_guard(model, "eval"):
        H = _dense(ctx.functional, ctx.params, batches, independent=kind == "mlp")
    true = torch.linalg.eigvalsh(H).flip(0).numpy()
    np.testing.assert_allclose(out["eigenvalues"][0], true[:5], rtol=1e-6)
    assert out["lambda_max"][0] == out["eigenvalues"][0, 0]
    assert out["eigenvalues_converged"].all()
    assert (out["eigenvalue_residuals"] < 1e-6 * abs(true[0])).all()
    # the same Hessian on the concatenated batch: several batches are one big batch
    cat = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    V = torch.randn(ctx.functional.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with probe_guard(model, "eval"):
        torch.testing.assert_close(ctx.functional.hessian_operator(ctx.params, [cat]).matmat(V), H @ V, rtol=1e-9, atol=1e-12)
    # trace: Hutch++ within its standard error (4 sigma), and far better than its error suggests is luck
    tr, _ = _measure(HessianTrace(matvecs=60, samples=2), model, opt, batches)
    err = abs(tr["trace"][0] - float(torch.trace(H)))
    assert tr["trace_stderr"][0] > 0
    assert err < 4 * tr["trace_stderr"][0] + 1e-9, (err, tr["trace_stderr"][0])


def test_bottom_eigenvalues_and_bn_train_mode():
    torch.manual_seed(1)
    model = DigitsCNN(channels=3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [_batch(32)]
    out, ctx = _measure(HessianSpectrum(k=3, bottom=2, tol=1e-10, bn_mode="train"), model, opt, batches)
    with probe_guard(model, "train"):
        H = _dense(ctx.functional, ctx.params, batches)
    true = torch.linalg.eigvalsh(H).numpy()
    np.testing.assert_allclose(out["eigenvalues"][0], true[::-1][:3], rtol=1e-6)
    np.testing.assert_allclose(out["eigenvalues_bottom"][0], true[:2], rtol=1e-6, atol=1e-9 * abs(true).max())
    assert out["lambda_min"][0] == out["eigenvalues_bottom"][0, 0]
    # eval mode gives another Hessian (BN statistics no longer depend on w)
    ev, _ = _measure(HessianSpectrum(k=3, tol=1e-10), model, opt, batches)
    assert abs(ev["eigenvalues"][0, 0] - out["eigenvalues"][0, 0]) > 1e-6 * abs(ev["eigenvalues"][0, 0])


def test_linear_regression_closed_form():
    """MSE of a bias-free linear model: H = 2/N X^T X, its trace 2/N |X|_F^2."""
    gen = torch.Generator().manual_seed(3)
    N, p = 80, 12
    X = torch.randn(N, p, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 3.0, p, dtype=torch.float64)
    y = torch.randn(N, 1, generator=gen, dtype=torch.float64)
    model = nn.Linear(p, 1, bias=False).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fm = FunctionalModel(model, F.mse_loss)
    H = 2 / N * X.T @ X
    true = torch.linalg.eigvalsh(H).flip(0).numpy()
    out, _ = _measure(HessianSpectrum(k=4, tol=1e-12), model, opt, [(X, y)], fm=fm)
    np.testing.assert_allclose(out["eigenvalues"][0], true[:4], rtol=1e-9)
    tr, _ = _measure(HessianTrace(matvecs=36), model, opt, [(X, y)], fm=FunctionalModel(model, F.mse_loss))
    # rank p = 12 <= matvecs / 3: Hutch++'s sketch captures the whole range, the trace is exact
    assert tr["trace"][0] == pytest.approx(float(2 / N * (X**2).sum()), rel=1e-9)
    assert tr["trace_stderr"][0] < 1e-9 * tr["trace"][0]


def test_blocks_against_dense_diagonal_blocks():
    torch.manual_seed(2)
    model = DigitsMLP(hidden=6).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [_batch(40)]
    probe = HessianSpectrum(k=2, tol=1e-10, blocks={"first": "net.1", "last": model.net[5], "weights": "*.weight"})
    out, ctx = _measure(probe, model, opt, batches)
    assert probe.coords() == {"block": ["first", "last", "weights"]}
    with probe_guard(model, "eval"):
        H = _dense(ctx.functional, ctx.params, batches)
    sl = ctx.functional.layout.slices()
    groups = {"first": ["net.1.weight", "net.1.bias"], "last": ["net.5.weight", "net.5.bias"],
              "weights": ["net.1.weight", "net.3.weight", "net.5.weight"]}
    for b, label in enumerate(["first", "last", "weights"]):
        idx = torch.cat([torch.arange(sl[n].start, sl[n].stop) for n in groups[label]])
        true = torch.linalg.eigvalsh(H[idx][:, idx]).flip(0).numpy()
        np.testing.assert_allclose(out["eigenvalues"][b], true[:2], rtol=1e-7)
        # the Ritz pairs left for other probes at this step are eigenpairs of the block
        pairs = ctx.shared["hessian_eigenvectors"][label]
        Hb, V = H[idx][:, idx], pairs["eigenvectors"]
        resid = torch.linalg.vector_norm(Hb @ V - V * pairs["eigenvalues"], dim=0).numpy()
        assert (resid <= 1.1 * out["eigenvalue_residuals"][b] + 1e-12).all(), (resid, out["eigenvalue_residuals"][b])
        assert (resid < 1e-5 * abs(true[0])).all()
        assert pairs["bn_mode"] == "eval" and pairs["samples"] == 1
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        HessianSpectrum(blocks=["conv*"]).setup(ctx.functional, opt)
    with pytest.raises(ValueError, match="block 'net.5.bias', which has only 10 parameters"):
        HessianSpectrum(k=20, blocks=["net.5.bias", "net.3.bias"]).setup(ctx.functional, opt)


def test_spectral_density_quadrature():
    torch.manual_seed(4)
    model = DigitsMLP(hidden=8).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [_batch(48)]
    out, ctx = _measure(SpectralDensity(vectors=4, steps=40), model, opt, batches)
    nodes, weights = out["slq_nodes"][0], out["slq_weights"][0]
    assert nodes.shape == (160,)
    assert weights.sum() == pytest.approx(1.0, abs=1e-10)
    with probe_guard(model, "eval"):
        H = _dense(ctx.functional, ctx.params, batches)
    ev = torch.linalg.eigvalsh(H).numpy()
    # nodes lie inside the spectrum, and the extreme ones converge to the extreme eigenvalues
    assert nodes.min() >= ev.min() - 1e-8 and nodes.max() <= ev.max() + 1e-8
    assert nodes.max() == pytest.approx(ev.max(), rel=1e-6)
    # SLQ's trace estimate is a Hutchinson estimate with 4 vectors: within a loose band
    assert ctx.functional.dim * float(np.sum(nodes * weights)) == pytest.approx(float(ev.sum()), rel=0.5)


def test_preconditioned_sharpness_against_dense_adam_state():
    torch.manual_seed(5)
    model = DigitsMLP(hidden=6).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-6)
    for i in range(5):  # Adam state from real steps
        xb, yb = _batch(32, offset=100 + 32 * i)
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    batches = [_batch(40)]
    out, ctx = _measure(PreconditionedSharpness(k=2, tol=1e-10), model, opt, batches)
    with probe_guard(model, "eval"):
        H = _dense(ctx.functional, ctx.params, batches)
    # P by hand from the state
    P = []
    for p in model.parameters():
        st = opt.state[p]
        P.append((st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"]))).sqrt().reshape(-1) + 1e-6)
    P = torch.cat(P)
    torch.testing.assert_close(preconditioner_diagonal(opt, list(model.parameters())), P)
    Pm = torch.diag(P.rsqrt())
    true = torch.linalg.eigvalsh(Pm @ H @ Pm).flip(0).numpy()
    np.testing.assert_allclose(out["preconditioned_eigenvalues"][0], true[:2], rtol=1e-7)
    c = (2 + 2 * 0.8) / (1 - 0.8)
    assert out["stability_ratio"][0] == pytest.approx(3e-3 * true[0] / c, rel=1e-7)
    assert out["eos_threshold"] == pytest.approx(c / 3e-3)


def test_preconditioned_sgd_is_lambda_max_of_h_plus_weight_decay():
    torch.manual_seed(6)
    model = DigitsMLP(hidden=6).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    batches = [_batch(40)]
    wd = torch.full((FunctionalModel(model, F.cross_entropy).dim,), 0.01, dtype=torch.float64)
    out, ctx = _measure(PreconditionedSharpness(tol=1e-10), model, opt, batches, weight_decay=wd)
    with probe_guard(model, "eval"):
        H = _dense(ctx.functional, ctx.params, batches)
    lam = float(torch.linalg.eigvalsh(H)[-1]) + 0.01
    assert out["preconditioned_lambda_max"][0] == pytest.approx(lam, rel=1e-8)
    assert out["stability_ratio"][0] == pytest.approx(0.05 * lam / 3.8, rel=1e-8)


@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9), dict(momentum=0.5, dampening=0.3),
                                dict(momentum=0.9, nesterov=True)])
def test_edge_of_stability_constant_matches_simulated_iterations(kw):
    """On f(w) = lambda w^2 / 2, torch's SGD is stable iff eta * lambda < c: just below the
    constant the iterate shrinks, just above it grows."""
    w0 = nn.Parameter(torch.ones(1, dtype=torch.float64))
    c, _ = stability_constant(torch.optim.SGD([w0], lr=1.0, **kw))
    lam = 3.0
    final = {}
    for ratio in (0.9, 1.1):
        w = nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=ratio * c / lam, **kw)
        for _ in range(600):
            opt.zero_grad()
            (lam * w.pow(2).sum() / 2).backward()
            opt.step()
        final[ratio] = abs(float(w.detach()))
    assert final[0.9] < 1e-2 and final[1.1] > 1e2, (c, final)


def test_stability_constants_and_bad_optimizers():
    p = [nn.Parameter(torch.ones(2))]
    assert stability_constant(torch.optim.Adam(p, betas=(0.9, 0.999)))[0] == pytest.approx(38.0)
    assert stability_constant(torch.optim.RMSprop(p, momentum=0.5))[0] == pytest.approx(3.0)
    with pytest.raises(TypeError, match="supported are SGD, Adam"):
        stability_constant(torch.optim.Adamax(p))
    with pytest.raises(ValueError, match="param groups differ in 'momentum'"):
        stability_constant(torch.optim.SGD([{"params": p, "momentum": 0.9}, {"params": [nn.Parameter(torch.ones(1))]}],
                                           lr=0.1, momentum=0.0))
    with pytest.raises(ValueError, match="tol must be"):
        HessianSpectrum(tol=0)
    with pytest.raises(ValueError, match="method must be"):
        HessianTrace(method="exact")
    with pytest.raises(ValueError, match="samples"):
        HessianSpectrum(samples=0)


def _record(tmp_path, probes, steps=40, name="run", seed=0, opt_cls=torch.optim.SGD, **opt_kw):
    model, path = record(tmp_path / f"{name}.zarr", probes, model=lambda: DigitsCNN(channels=4), steps=steps, seed=seed,
                         opt_cls=opt_cls, **(opt_kw or {"lr": 0.05, "momentum": 0.9}))
    return model, (landscape.open_run(path) if path is not None else None)


@pytest.mark.slow
def test_recorded_run_has_every_variable_and_unchanged_trajectory(tmp_path):
    probes = [RestrictedSecant(every=8, samples=2), HessianSpectrum(every=8, k=3),
              HessianTrace(every=8, matvecs=12, blocks={"model": None, "head": "head"}),
              SpectralDensity(every=16, steps=20), PreconditionedSharpness(every=8, bn_mode="eval")]
    plain, _ = _record(tmp_path, None, name="plain")
    model, ds = _record(tmp_path, probes)
    assert_same_weights(plain, model)
    assert list(ds["block"].values) == ["model", "head"]
    assert ds["eigenvalues"].dims == ("step", "block", "eig")
    measured = ds["lambda_max"].sel(block="model").dropna("step")
    assert list(measured["step"].values) == list(range(0, 40, 8))
    assert np.isnan(ds["lambda_max"].sel(block="head")).all()  # HessianSpectrum did not measure "head"
    assert np.isfinite(ds["trace"].sel(block="head").dropna("step")).all()
    assert ds["trace"].sel(block="head").dropna("step").size == 5
    assert ds["eigenvalues"].attrs["bn_mode"] == "eval" and ds["trace"].attrs["method"] == "hutch++"
    at = {"block": "model", "step": measured["step"]}  # flags read False where nothing was measured
    assert bool(ds["eigenvalues_converged"].sel(at).all())
    # SGD: preconditioned = lambda_max of the same Hessian (no weight decay here)
    both = ds[["lambda_max", "preconditioned_lambda_max"]].sel(block="model").dropna("step")
    np.testing.assert_allclose(both["preconditioned_lambda_max"], both["lambda_max"], rtol=1e-3)
    np.testing.assert_allclose(ds["eos_threshold"].dropna("step"), 3.8 / 0.05)
    dens = density_on_grid(ds)
    assert dens.dims == ("step", "eigenvalue") and dens.sizes["step"] == 3
    integral = np.trapezoid(dens.values, dens["eigenvalue"].values, axis=1)
    np.testing.assert_allclose(integral, 1.0, atol=1e-3)
    assert ds.attrs["probe_errors"] == {}
    assert (ds["spectrum_matvecs"].sel(at) >= 5).all()


def test_density_helper_says_what_is_missing(tmp_path):
    _, ds = _record(tmp_path, [HessianTrace(every=4, matvecs=6)], steps=5)
    with pytest.raises(KeyError, match="attach SpectralDensity"):
        density_on_grid(ds)


def test_conflicting_block_labels_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="block 'head' means different parameters"):
        _record(tmp_path, [HessianTrace(blocks={"head": "head"}), HessianSpectrum(blocks={"head": "features"})], steps=1)


@pytest.mark.parametrize("warm", [True, "block"])
def test_warm_started_tracking_is_as_accurate_and_cheaper_when_the_hessian_moves_little(warm):
    torch.manual_seed(7)
    model = DigitsMLP(hidden=16).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [_batch(64)]
    fm = FunctionalModel(model, F.cross_entropy)
    w = fm.flat_params()
    moved = w + 1e-4 * w.norm() * torch.randn(w.shape, generator=torch.Generator().manual_seed(1), dtype=w.dtype) / math.sqrt(w.numel())

    def measure(probe, params, step):
        ctx = Context(step=step, functional=fm, model=model, optimizer=opt, probe_batches=batches, params=params)
        with probe_guard(model, "eval"):
            return probe.measure(ctx).values

    tracked = HessianSpectrum(k=5, tol=1e-8, warm_start=warm)
    tracked.setup(fm, opt)
    measure(tracked, w, 0)
    warm_out = measure(tracked, moved, 1)
    cold = HessianSpectrum(k=5, tol=1e-8, warm_start=False)
    cold.setup(fm, opt)
    cold_out = measure(cold, moved, 1)
    np.testing.assert_allclose(warm_out["eigenvalues"].data, cold_out["eigenvalues"].data, rtol=1e-7)
    assert warm_out["spectrum_matvecs"].data[0] < cold_out["spectrum_matvecs"].data[0]
    with pytest.raises(ValueError, match="warm_start must be"):
        HessianSpectrum(warm_start="yes")


def test_block_specs_params_modules_patterns_and_errors():
    model = DigitsMLP(hidden=4)
    fm = FunctionalModel(model, F.cross_entropy)
    sl = fm.layout.slices()
    per_param = resolve_blocks(fm.layout, model, "params")
    assert list(per_param) == list(fm.layout.names)
    for name, index in per_param.items():
        assert torch.equal(index, torch.arange(sl[name].start, sl[name].stop))
    per_module = resolve_blocks(fm.layout, model, "modules")
    assert list(per_module) == ["net.1", "net.3", "net.5"]
    assert per_module["net.3"].numel() == 4 * 4 + 4
    assert resolve_blocks(fm.layout, model, None) == {"model": None}
    assert resolve_blocks(fm.layout, model, {"all": "*"}) == {"all": None}  # everything: no restriction
    both = resolve_blocks(fm.layout, model, [["net.1", model.net[5]]])
    assert list(both) == ["net.1+net.5"] and both["net.1+net.5"].numel() == 64 * 4 + 4 + 4 * 10 + 10
    with pytest.raises(ValueError, match="two blocks are labelled 'net.1'"):
        resolve_blocks(fm.layout, model, ["net.1", "net.1"])
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_blocks(fm.layout, model, [nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="blocks must be None"):
        resolve_blocks(fm.layout, model, 3)


def test_preconditioned_custom_preconditioner_threshold_and_per_group_lrs():
    torch.manual_seed(8)
    model = DigitsMLP(hidden=5).double()
    first = list(model.net[1].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    opt = torch.optim.SGD([{"params": first, "lr": 0.2}, {"params": rest, "lr": 0.05}], lr=0.05)
    batches = [_batch(40)]
    fm = FunctionalModel(model, F.cross_entropy)
    P = torch.linspace(0.5, 2.0, fm.dim, dtype=torch.float64)
    probe = PreconditionedSharpness(tol=1e-10, preconditioner=lambda o: P, threshold=3.0, bn_mode="eval")
    out, ctx = _measure(probe, model, opt, batches, fm=fm)
    with probe_guard(model, "eval"):
        H = _dense(fm, ctx.params, batches)
    n1 = sum(p.numel() for p in first)  # net.1 comes first in the flat vector
    rel = torch.cat([torch.full((n1,), 0.2 / 0.2), torch.full((fm.dim - n1,), 0.05 / 0.2)]).double()
    D = torch.diag((rel / P).sqrt())
    lam = float(torch.linalg.eigvalsh(D @ H @ D)[-1])
    assert out["preconditioned_lambda_max"][0] == pytest.approx(lam, rel=1e-8)
    assert out["stability_ratio"][0] == pytest.approx(0.2 * lam / 3.0, rel=1e-8)
    assert out["eos_threshold"] == pytest.approx(3.0 / 0.2)
    with pytest.raises(ValueError, match="threshold must be a positive number"):
        PreconditionedSharpness(threshold=-1)
    bad = PreconditionedSharpness(preconditioner=lambda o: -P)
    bad.setup(fm, opt)
    with pytest.raises(FloatingPointError, match="non-positive"):
        bad.measure(_ctx(model, opt, batches, fm=fm))
