"""RestrictedSecant (probes/secant.py) against ground truth: closed forms on quadratics (eigenbasis
formulas, Rayleigh bounds, SGD iterates), a logistic regression differentiated by hand in float64
(checked by finite differences), online vs final-iterate agreement, the sketch error documented in
``GaussianSketch``, a Monte Carlo check of the gamma null band, ``summarize`` on planted data,
property-based invariants of ``secant_quantities``, and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

import landscape
from landscape.linalg import GaussianSketch
from probes import RestrictedSecant
from probes.secant import QUANTILES, gamma_null_band, secant_quantities, summarize

NAMES = ("rsi", "eb", "gamma", "eta_star")
# Everything a probe reads is float32 (the model) and trajectory vectors are stored in float32;
# the numbers below are recomputed in float64 from the same float32 iterates, so what separates
# them is float32 rounding of one gradient / one subtraction: ~1e-7 relative. 1e-5 is 100x that
# and still catches any wrong formula, wrong reference or misaligned step.
RTOL32 = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def secant64(D: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    """rsi, eb, gamma, eta* of directions D (..., d) against Y = w - w* (..., d), written out in
    float64 independently of secant_quantities."""
    D, Y = np.asarray(D, np.float64), np.asarray(Y, np.float64)
    dot = np.sum(D * Y, axis=-1)
    gn, yn = np.linalg.norm(D, axis=-1), np.linalg.norm(Y, axis=-1)
    return {"rsi": dot / yn**2, "eb": gn / yn, "gamma": dot / (gn * yn), "eta_star": dot / gn**2}


def from_vectors(g: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """secant_quantities fed from the vectors (the code under test)."""
    return secant_quantities(np.sum(g * y, -1), np.linalg.norm(g, axis=-1), np.linalg.norm(y, axis=-1))


# ---------------------------------------------------------------------------------------------
# 1. Quadratics: closed forms in the eigenbasis
# ---------------------------------------------------------------------------------------------

D_Q = 6
_rng = np.random.default_rng(1234)
_BASIS, _ = np.linalg.qr(_rng.standard_normal((D_Q, D_Q)))
EIG_SPD = np.array([0.5, 1.0, 2.0, 3.0, 5.0, 8.0])
EIG_INDEF = np.array([-2.0, -0.5, 0.25, 1.0, 3.0, 6.0])
A_SPD = _BASIS @ np.diag(EIG_SPD) @ _BASIS.T
A_INDEF = _BASIS @ np.diag(EIG_INDEF) @ _BASIS.T
WSTAR = _rng.standard_normal(D_Q)
QUADS = pytest.mark.parametrize("A, eig", [(A_SPD, EIG_SPD), (A_INDEF, EIG_INDEF)], ids=["spd", "indefinite"])


@QUADS
@settings(max_examples=50, deadline=None)
@given(w=arrays(np.float64, D_Q, elements=st.floats(-10, 10)))
def test_quadratic_closed_forms(A, eig, w):
    """g = A(w - w*): in the eigenbasis c = V^T (w - w*), rsi = sum l c^2 / |c|^2 (a Rayleigh
    quotient), eb = sqrt(sum l^2 c^2) / |c|, eta* = sum l c^2 / sum l^2 c^2."""
    y = w - WSTAR
    assume(np.linalg.norm(y) > 1e-3)
    g = A @ y
    got = from_vectors(g, y)
    c = _BASIS.T @ y
    c2 = c**2
    rsi = np.sum(eig * c2) / np.sum(c2)
    eb = math.sqrt(np.sum(eig**2 * c2)) / math.sqrt(np.sum(c2))
    np.testing.assert_allclose(got["rsi"], rsi, rtol=1e-10, atol=1e-12 * np.max(np.abs(eig)))
    np.testing.assert_allclose(got["eb"], eb, rtol=1e-10)
    np.testing.assert_allclose(got["gamma"], rsi / eb, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["eta_star"], np.sum(eig * c2) / np.sum(eig**2 * c2), rtol=1e-10, atol=1e-12)
    # definitions of REFERENCE.md §1, on the raw vectors
    np.testing.assert_allclose(got["gamma"], g @ y / (np.linalg.norm(g) * np.linalg.norm(y)), rtol=1e-10, atol=1e-12)
    assert eig.min() - 1e-9 <= got["rsi"] <= eig.max() + 1e-9
    assert np.abs(eig).min() - 1e-9 <= got["eb"] <= np.abs(eig).max() + 1e-9


@QUADS
def test_quadratic_eigenvectors_and_uniform_bounds(A, eig):
    """Along an eigenvector v_i (either sign, any length): rsi = l_i, eb = |l_i|, gamma = sign l_i,
    eta* = 1 / l_i. summarize over eigenvectors plus random points: mu_hat = l_min and
    L_hat = max |l| exactly (extreme), the quantile bounds inside [l_min, max|l|]."""
    rng = np.random.default_rng(7)
    scales = np.array([1.0, -0.3, 25.0])
    Y = np.concatenate([s * _BASIS.T for s in scales])  # rows: s * v_i
    lam = np.tile(eig, len(scales))
    q = from_vectors(Y @ A, Y)  # A symmetric: row i of Y A is A y_i
    np.testing.assert_allclose(q["rsi"], lam, rtol=1e-10)
    np.testing.assert_allclose(q["eb"], np.abs(lam), rtol=1e-10)
    np.testing.assert_allclose(q["gamma"], np.sign(lam), rtol=1e-10)
    np.testing.assert_allclose(q["eta_star"], 1 / lam, rtol=1e-10)

    R = rng.standard_normal((40, D_Q))
    qr = from_vectors(R @ A, R)
    rsi = np.concatenate([q["rsi"], qr["rsi"]])
    eb = np.concatenate([q["eb"], qr["eb"]])
    ds = xr.Dataset({"rsi_train": ("step", rsi), "eb_train": ("step", eb)}, coords={"step": np.arange(rsi.size)})
    s = summarize(ds, dim=D_Q, source="_train", tail=0.0)
    mu, L = s.mu_hat.values, s.L_hat.values
    np.testing.assert_allclose(mu[0], eig.min(), rtol=1e-10)
    np.testing.assert_allclose(L[0], np.abs(eig).max(), rtol=1e-10)
    assert eig.min() <= mu[1] <= eig.max() and np.abs(eig).min() <= L[1] <= np.abs(eig).max()
    assert s.has_guarantee.values[0] == (eig.min() > 0)
    if eig.min() > 0:
        np.testing.assert_allclose(s.implied_step.values[0], eig.min() / eig.max() ** 2, rtol=1e-10)
        np.testing.assert_allclose(s.contraction.values[0], 1 - (eig.min() / eig.max()) ** 2, rtol=1e-10)
    else:
        assert np.isnan(s.implied_step.values[0]) and np.isnan(s.contraction.values[0])


# ---------------------------------------------------------------------------------------------
# 2. End to end on a quadratic loss, plain SGD
# ---------------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """The output is the parameter itself; the loss turns it into 1/2 (w - w*)^T A (w - w*)."""

    def __init__(self, w0: np.ndarray) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w0, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def quadratic_loss(A: np.ndarray, wstar: np.ndarray):  # type: ignore[no-untyped-def]
    At, ws = torch.as_tensor(A, dtype=torch.float32), torch.as_tensor(wstar, dtype=torch.float32)

    def loss_fn(out: torch.Tensor, target: object) -> torch.Tensor:
        y = out - ws
        return 0.5 * (y @ (At @ y))

    return loss_fn


def train_quadratic(path, A, w0, probe, *, lr, steps, weight_decay=0.0):  # type: ignore[no-untyped-def]
    """Plain SGD on the quadratic; returns the run and the iterates w_0..w_T as seen by the loop."""
    model = Quadratic(w0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = quadratic_loss(A, WSTAR)
    rec = landscape.attach(model, opt, loss_fn=loss_fn, probes=[probe], store=path)
    W = [model.w.detach().double().numpy().copy()]
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(torch.zeros(1)), None).backward()
        opt.step()
        W.append(model.w.detach().double().numpy().copy())
    rec.close()
    ds = landscape.open_run(path)
    assert ds.attrs["probe_errors"] == {}
    return ds, np.stack(W)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05], ids=["no-wd", "wd"])
def test_quadratic_run_against_final_iterate(tmp_path, weight_decay):
    """Final-iterate mode: every variant recomputed in float64 from the iterates, with
    g_t = A (w_t - w*) (closed form), y_t = w_t - w_T; -update = lr (g + lam w) for SGD, so the
    update variant is the weight-decay one (or the training one) scaled by lr, gamma unchanged."""
    lr, T = 0.05, 8
    w0 = WSTAR + np.random.default_rng(3).standard_normal(D_Q)
    ds, W = train_quadratic(tmp_path / "r.zarr", A_SPD, w0, RestrictedSecant(every=1, samples=0), lr=lr, steps=T,
                            weight_decay=weight_decay)
    G = (W[:T] - WSTAR) @ A_SPD
    Y = W[:T] - W[T]
    want = secant64(G, Y)
    for n in NAMES:
        np.testing.assert_allclose(ds[n + "_train"].values, want[n], rtol=RTOL32, err_msg=n)
    np.testing.assert_allclose(ds.dist_to_ref.values, np.linalg.norm(Y, axis=1), rtol=RTOL32)
    np.testing.assert_allclose(ds.grad_norm_train.values, np.linalg.norm(G, axis=1), rtol=RTOL32)
    # the realised update, from the iterates
    want_u = secant64(W[:T] - W[1:], Y)
    for n in NAMES:
        np.testing.assert_allclose(ds[n + "_update"].values, want_u[n], rtol=1e-4, err_msg=n)
    if weight_decay:
        want_wd = secant64(G + weight_decay * W[:T], Y)
        for n in NAMES:
            np.testing.assert_allclose(ds[n + "_wd"].values, want_wd[n], rtol=RTOL32, err_msg=n)
        assert ds.rsi_wd.attrs["weight_decay"] == pytest.approx(weight_decay)
        base = "_wd"
    else:
        assert "rsi_wd" not in ds  # no decay anywhere: no variant
        base = "_train"
    # SGD: -update = lr * (g [+ lam w])
    np.testing.assert_allclose(ds.gamma_update.values, ds["gamma" + base].values, rtol=1e-4)
    np.testing.assert_allclose(ds.rsi_update.values, lr * ds["rsi" + base].values, rtol=1e-4)
    np.testing.assert_allclose(ds.eb_update.values, lr * ds["eb" + base].values, rtol=1e-4)
    np.testing.assert_allclose(ds.eta_star_update.values, ds["eta_star" + base].values / lr, rtol=1e-4)
    if weight_decay:  # and the decay matters: the training-gradient variant is not the update's
        assert not np.allclose(ds.gamma_update.values, ds.gamma_train.values, rtol=1e-3)


@pytest.mark.parametrize("online", [False, True], ids=["final", "online"])
def test_weight_decay_override(tmp_path, online):
    """weight_decay=lam on the probe with an optimizer without decay: the _wd variant is g + lam w_t
    while the update stays -lr g (its gamma is the training gradient's)."""
    lam, lr, T = 0.3, 0.05, 6
    ref = {"w": torch.as_tensor(WSTAR, dtype=torch.float32)} if online else None
    w0 = WSTAR + np.random.default_rng(8).standard_normal(D_Q)
    ds, W = train_quadratic(tmp_path / "r.zarr", A_SPD, w0, RestrictedSecant(every=1, samples=0, weight_decay=lam, reference=ref),
                            lr=lr, steps=T)
    Y = W[:T] - (ref["w"].double().numpy() if online else W[T])
    want = secant64((W[:T] - WSTAR) @ A_SPD + lam * W[:T], Y)
    for n in NAMES:
        np.testing.assert_allclose(ds[n + "_wd"].values, want[n], rtol=RTOL32, err_msg=n)
    assert ds.rsi_wd.attrs["weight_decay"] == pytest.approx(lam)
    np.testing.assert_allclose(ds.gamma_update.values, ds.gamma_train.values, rtol=1e-4)
    assert not np.allclose(ds.gamma_wd.values, ds.gamma_train.values, rtol=1e-3)


def test_quadratic_eigenvector_run_closed_form(tmp_path):
    """Start on an eigenvector: w_t - w* = c r^t v with r = 1 - lr l, so against w_T
    rsi_t = l r^t / (r^t - r^T), eb_t = |rsi_t|, gamma_t = 1: no iterate needed at all."""
    i, lr, T, c = 3, 0.1, 6, 2.0
    lam, v = EIG_SPD[i], _BASIS[:, i]
    r = 1 - lr * lam
    ds, _ = train_quadratic(tmp_path / "r.zarr", A_SPD, WSTAR + c * v, RestrictedSecant(every=1, samples=0), lr=lr, steps=T)
    t = np.arange(T)
    rsi = lam * r**t / (r**t - r**T)
    np.testing.assert_allclose(ds.rsi_train.values, rsi, rtol=1e-4)
    np.testing.assert_allclose(ds.eb_train.values, rsi, rtol=1e-4)
    np.testing.assert_allclose(ds.gamma_train.values, 1.0, atol=1e-6)
    np.testing.assert_allclose(ds.dist_to_ref.values, c * (r**t - r**T), rtol=1e-4)


def test_quadratic_run_online_reference(tmp_path):
    """reference = w* (a state_dict): rsi_train is the Rayleigh quotient of A at w_t - w*, computed
    from the iterates; from an eigenvector start it is l_i at every step, and the run's summary
    gives mu_hat = L_hat = l_i (tail excluded or not)."""
    lr, T = 0.05, 8
    ref = {"w": torch.as_tensor(WSTAR, dtype=torch.float32)}
    w0 = WSTAR + np.random.default_rng(5).standard_normal(D_Q)
    ds, W = train_quadratic(tmp_path / "a.zarr", A_SPD, w0, RestrictedSecant(every=1, samples=0, reference=ref), lr=lr, steps=T)
    ws32 = ref["w"].double().numpy()
    Y = W[:T] - ws32
    G = (W[:T] - WSTAR) @ A_SPD
    want = secant64(G, Y)
    for n in NAMES:
        np.testing.assert_allclose(ds[n + "_train"].values, want[n], rtol=RTOL32, err_msg=n)
    np.testing.assert_allclose(ds.dist_to_ref.values, np.linalg.norm(Y, axis=1), rtol=RTOL32)
    assert np.all(ds.rsi_train.values >= EIG_SPD.min() - 1e-5) and np.all(ds.rsi_train.values <= EIG_SPD.max() + 1e-5)
    assert ds.rsi_train.attrs["reference"] == "given"

    i = 1
    ds, _ = train_quadratic(tmp_path / "b.zarr", A_SPD, WSTAR + 3.0 * _BASIS[:, i],
                            RestrictedSecant(every=1, samples=0, reference=ref), lr=lr, steps=T)
    np.testing.assert_allclose(ds.rsi_train.values, EIG_SPD[i], rtol=1e-4)
    np.testing.assert_allclose(ds.eb_train.values, EIG_SPD[i], rtol=1e-4)
    np.testing.assert_allclose(ds.eta_star_train.values, 1 / EIG_SPD[i], rtol=1e-4)
    np.testing.assert_allclose(ds.mu_hat.values, EIG_SPD[i], rtol=1e-4)
    np.testing.assert_allclose(ds.L_hat.values, EIG_SPD[i], rtol=1e-4)
    np.testing.assert_allclose(ds.implied_step.values, 1 / EIG_SPD[i], rtol=1e-3)
    np.testing.assert_allclose(ds.contraction.values, 0.0, atol=1e-3)
    assert ds.has_guarantee.values.all()


# ---------------------------------------------------------------------------------------------
# 3. Logistic regression by hand
# ---------------------------------------------------------------------------------------------

N_IN, N_OUT = 3, 2


def logistic_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(48, N_IN, generator=gen)
    y = ((X @ torch.tensor([1.0, -2.0, 0.5]) + 0.7 * torch.randn(48, generator=gen)) > 0).long()
    return X, y


def ce64(flat: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy of nn.Linear(N_IN, N_OUT) and its gradient, by hand in float64
    (flat = [weight row-major, bias], the order of named_parameters)."""
    W, b = flat[: N_IN * N_OUT].reshape(N_OUT, N_IN), flat[N_IN * N_OUT:]
    Z = X @ W.T + b
    Z = Z - Z.max(axis=1, keepdims=True)
    logp = Z - np.log(np.exp(Z).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -logp[np.arange(n), y].mean()
    Gz = (np.exp(logp) - np.eye(N_OUT)[y]) / n
    return float(loss), np.concatenate([(Gz.T @ X).ravel(), Gz.sum(axis=0)])


def test_hand_gradient_matches_finite_differences():
    """The float64 ground truth used below, checked by central differences."""
    X, y = (a.numpy() for a in logistic_data())
    X = X.astype(np.float64)
    w = np.random.default_rng(0).standard_normal(N_IN * N_OUT + N_OUT)
    _, g = ce64(w, X, y)
    h = 1e-6
    fd = np.array([(ce64(w + h * e, X, y)[0] - ce64(w - h * e, X, y)[0]) / (2 * h) for e in np.eye(w.size)])
    np.testing.assert_allclose(g, fd, rtol=1e-7, atol=1e-9)


def train_logistic(path, probe, *, steps, lr=0.5, momentum=0.0, weight_decay=0.0):  # type: ignore[no-untyped-def]
    """nn.Linear + cross-entropy, fixed minibatches of 8 in order; two probe batches of 6 and 10."""
    X, y = logistic_data()
    torch.manual_seed(0)
    model = nn.Linear(N_IN, N_OUT)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    probe_batches = [(X[:6], y[:6]), (X[6:16], y[6:16])]
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=probe_batches, probes=[probe], store=path)
    W, train_batches = [], []
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy().copy()  # noqa: E731
    for t in range(steps):
        lo = 8 * (t % 6)
        xb, yb = X[lo:lo + 8], y[lo:lo + 8]
        W.append(flat())
        train_batches.append((xb.double().numpy(), yb.numpy()))
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    W.append(flat())
    rec.close()
    ds = landscape.open_run(path)
    assert ds.attrs["probe_errors"] == {}
    return ds, np.stack(W), train_batches, [(a.double().numpy(), b.numpy()) for a, b in probe_batches], model


def test_logistic_regression_by_hand(tmp_path):
    """Per (step, probe batch): the probe-batch gradients at each w_t by hand, rsi/eb/gamma/eta*
    against w_T, grad_norm, sample_loss, dist_to_ref; the training-gradient variant; the stored
    per-step quantiles, bounds (last 10% of steps excluded) and null-band fraction."""
    T, K = 10, 2
    ds, W, train_batches, probe_batches, _ = train_logistic(tmp_path / "r.zarr", RestrictedSecant(every=1, samples=K), steps=T)
    d = W.shape[1]
    Y = W[:T] - W[T]
    losses = np.array([[ce64(W[t], Xb, yb)[0] for Xb, yb in probe_batches] for t in range(T)])
    G = np.array([[ce64(W[t], Xb, yb)[1] for Xb, yb in probe_batches] for t in range(T)])  # (T, K, d)
    want = secant64(G, Y[:, None, :])
    assert ds.rsi.dims == ("step", "sample") and ds.rsi.shape == (T, K)
    for n in NAMES:
        np.testing.assert_allclose(ds[n].values, want[n], rtol=RTOL32, err_msg=n)
    np.testing.assert_allclose(ds.grad_norm.values, np.linalg.norm(G, axis=2), rtol=RTOL32)
    np.testing.assert_allclose(ds.sample_loss.values, losses, rtol=RTOL32)
    np.testing.assert_allclose(ds.dist_to_ref.values, np.linalg.norm(Y, axis=1), rtol=RTOL32)
    Gt = np.array([ce64(W[t], *train_batches[t])[1] for t in range(T)])
    want_t = secant64(Gt, Y)
    for n in NAMES:
        np.testing.assert_allclose(ds[n + "_train"].values, want_t[n], rtol=RTOL32, err_msg=n)
    np.testing.assert_allclose(ds.grad_norm_train.values, np.linalg.norm(Gt, axis=1), rtol=RTOL32)
    # the stored summary
    for n in ("rsi", "eb", "gamma"):
        np.testing.assert_allclose(ds[n + "_quantiles"].values, np.quantile(want[n], QUANTILES, axis=1).T, rtol=RTOL32,
                                   atol=1e-12)
    kept = np.arange(T) <= 0.9 * (T - 1)  # tail=0.1 of the step range: steps 0..8
    assert kept.sum() == 9
    r, e = want["rsi"][kept].ravel(), want["eb"][kept].ravel()
    np.testing.assert_allclose(ds.mu_hat.values, [r.min(), np.quantile(r, 0.05)], rtol=RTOL32)
    np.testing.assert_allclose(ds.L_hat.values, [e.max(), np.quantile(e, 0.95)], rtol=RTOL32)
    assert ds.mu_hat.attrs["points"] == kept.sum() * K
    lo, hi = gamma_null_band(d, 0.95)
    np.testing.assert_allclose(ds.gamma_null.values, [lo, hi])
    np.testing.assert_allclose(ds.gamma_above_null.values, (want["gamma"] > hi).mean(axis=1))


# ---------------------------------------------------------------------------------------------
# 4. Online (reference = checkpoint of w_T) vs final iterate
# ---------------------------------------------------------------------------------------------


def test_online_reference_checkpoint_agrees_with_final_iterate(tmp_path):
    """Two identical runs (momentum, weight decay, every=2): the second measures online against a
    torch.save'd state_dict of the first run's w_T (loaded with weights_only). Every variant, the
    distances and the bounds agree to float32 precision, NaN at the same (unmeasured) steps."""
    T = 11
    probe_kw = dict(every=2, samples=2)
    ds_f, W_f, *_, model = train_logistic(tmp_path / "final.zarr", RestrictedSecant(**probe_kw), steps=T, momentum=0.9,
                                          weight_decay=1e-2)
    torch.save(model.state_dict(), tmp_path / "wT.pt")
    ds_o, W_o, *_ = train_logistic(tmp_path / "online.zarr", RestrictedSecant(**probe_kw, reference=tmp_path / "wT.pt"),
                                   steps=T, momentum=0.9, weight_decay=1e-2)
    np.testing.assert_array_equal(W_f, W_o)  # the same trajectory
    np.testing.assert_array_equal(ds_f.loss.values, ds_o.loss.values)
    names = [n + s for s in ("", "_train", "_wd", "_update") for n in NAMES] + ["dist_to_ref"]
    for n in names:
        a, b = ds_f[n].values, ds_o[n].values
        assert a.shape == b.shape, n
        measured = np.arange(T) % 2 == 0
        assert np.isfinite(a[measured]).all() and np.isnan(a[~measured]).all(), n
        np.testing.assert_allclose(b, a, rtol=RTOL32, err_msg=n)  # NaN positions must match too
    for n in ("mu_hat", "L_hat", "implied_step", "contraction", "gamma_null", "rsi_quantiles", "gamma_above_null"):
        np.testing.assert_allclose(ds_o[n].values, ds_f[n].values, rtol=RTOL32, err_msg=n)
    np.testing.assert_array_equal(ds_o.has_guarantee.values, ds_f.has_guarantee.values)
    assert ds_f.rsi.attrs["reference"] == "final iterate" and ds_o.rsi.attrs["reference"] == "given"
    # and both against the hand value of w_T
    np.testing.assert_allclose(ds_o.dist_to_ref.values[::2], np.linalg.norm(W_f[:T:2] - W_f[T], axis=1), rtol=RTOL32)


# ---------------------------------------------------------------------------------------------
# 5. Sketch mode vs full vectors
# ---------------------------------------------------------------------------------------------

S_IN, S_OUT = 40, 5  # d = 205


def train_wide(path, probe, steps=12):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(96, S_IN, generator=gen)
    y = torch.randint(0, S_OUT, (96,), generator=gen)
    torch.manual_seed(0)
    model = nn.Linear(S_IN, S_OUT)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    probe_batches = [(X[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]) for i in range(4)]
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=probe_batches, probes=[probe], store=path)
    for t in range(steps):
        lo = 16 * (t % 6)
        opt.zero_grad()
        F.cross_entropy(model(X[lo:lo + 16]), y[lo:lo + 16]).backward()
        opt.step()
    rec.close()
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double().numpy()
    return path, final


@pytest.fixture(scope="module")
def wide_full(tmp_path_factory):
    path, final = train_wide(tmp_path_factory.mktemp("wide") / "full.zarr", RestrictedSecant(every=1, samples=4))
    return landscape.open_run(path), landscape.open_trajectory(path), final


def sketch_sd(gamma: np.ndarray, eb: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Standard deviations of the sketch error, as documented in GaussianSketch."""
    return {"gamma": (1 - gamma**2) / math.sqrt(k), "eb": eb * np.sqrt((1 - gamma**2) / k), "rsi": eb * 2 / math.sqrt(k)}


def test_sketch_error_within_documented_bound(tmp_path, wide_full):
    """sketch=k on the same run: every (step, sample) and training-gradient point within 5
    documented standard deviations of the full-vector value, most within 2; the sketched values
    are those of GaussianSketch(k, d, seed) applied to the stored full vectors; the null band is
    that of k dimensions."""
    ds_full, traj, final = wide_full
    d = final.size
    k, seed = 32, 3
    path, _ = train_wide(tmp_path / "sk.zarr", RestrictedSecant(every=1, samples=4, sketch=k, seed=seed))
    ds_sk = landscape.open_run(path)
    assert ds_sk.attrs["probe_errors"] == {}
    tr_sk = landscape.open_trajectory(path)
    assert tr_sk.params.shape == (12, k) and tr_sk.sample_grad.shape == (12, 4, k)
    z = []
    for suffix in ("", "_train"):
        g, eb = ds_full["gamma" + suffix].values, ds_full["eb" + suffix].values
        sd = sketch_sd(g, eb, k)
        for n in ("gamma", "eb", "rsi"):
            err = np.abs(ds_sk[n + suffix].values - ds_full[n + suffix].values)
            # + a float32 floor: at the last step y = lr g exactly, gamma = 1 and the sd is 0
            assert np.all(err <= 5 * sd[n] + 1e-6 * (1 + np.abs(ds_full[n + suffix].values))), (n + suffix, float(np.max(err / sd[n])))
            if n != "rsi":  # the documented RSI sd is an upper bound (see test below), not a scale
                z.append((err / sd[n])[sd[n] > 1e-6].ravel())
        assert not np.allclose(ds_sk["gamma" + suffix].values, ds_full["gamma" + suffix].values, atol=1e-4)
    assert np.mean(np.concatenate(z) <= 2) >= 0.8
    # the probe's sketch is GaussianSketch(k, d, seed): recompute from the full stored vectors
    S = GaussianSketch(k, d, seed=seed)
    sk = lambda a: S(torch.as_tensor(np.asarray(a), dtype=torch.float32)).double().numpy()  # noqa: E731
    Y = sk(traj.params.values) - sk(final)
    want = secant64(sk(traj.sample_grad.values), Y[:, None, :])
    for n in NAMES:
        np.testing.assert_allclose(ds_sk[n].values, want[n], rtol=1e-4, atol=1e-6, err_msg=n)
    np.testing.assert_allclose(ds_sk.gamma_null.values, gamma_null_band(k, 0.95))


def test_sketch_error_scales_like_one_over_sqrt_k(wide_full):
    """Over 200 sketch seeds, on the run's full vectors: the mean |gamma error| at k=16 is twice
    that at k=64, and the errors match the documented sd (gamma, EB) in RMS; the RSI error obeys
    its documented sd as an upper bound (its exact sd is EB sqrt(1 - gamma^2) / sqrt(k))."""
    ds_full, traj, final = wide_full
    d = final.size
    Y = traj.params.values.astype(np.float64) - final
    G = traj.sample_grad.values.astype(np.float64)  # (T, K, d)
    ref = secant64(G, Y[:, None, :])
    mean_err, seeds = {}, 200
    for k in (16, 64):
        errs = {n: [] for n in ("gamma", "eb", "rsi")}
        for seed in range(seeds):
            S = GaussianSketch(k, d, seed=seed)
            SY = S(torch.as_tensor(Y, dtype=torch.float32)).double().numpy()
            SG = S(torch.as_tensor(G, dtype=torch.float32)).double().numpy()
            q = secant64(SG, SY[:, None, :])
            for n in errs:
                errs[n].append(q[n] - ref[n])
        sd = sketch_sd(ref["gamma"], ref["eb"], k)
        mean_err[k] = np.mean(np.abs(errs["gamma"]))
        for n in ("gamma", "eb"):
            rms = np.sqrt(np.mean((np.asarray(errs[n]) / sd[n]) ** 2))
            assert 0.8 <= rms <= 1.25, (k, n, rms)
        exact_rsi_sd = ref["eb"] * np.sqrt((1 - ref["gamma"] ** 2) / k)
        rms_rsi = np.sqrt(np.mean((np.asarray(errs["rsi"]) / exact_rsi_sd) ** 2))
        assert 0.8 <= rms_rsi <= 1.25, (k, rms_rsi)
        assert np.sqrt(np.mean((np.asarray(errs["rsi"]) / sd["rsi"]) ** 2)) <= 0.7
    assert mean_err[16] / mean_err[64] == pytest.approx(2.0, rel=0.12)


# ---------------------------------------------------------------------------------------------
# 6. The gamma null band
# ---------------------------------------------------------------------------------------------


def random_cosines(d: int, n: int, rng: np.random.Generator) -> np.ndarray:
    out = []
    for lo in range(0, n, 2000):
        m = min(2000, n - lo)
        U, V = rng.standard_normal((m, d)), rng.standard_normal((m, d))
        out.append(np.sum(U * V, 1) / (np.linalg.norm(U, axis=1) * np.linalg.norm(V, axis=1)))
    return np.concatenate(out)


@pytest.mark.parametrize("d", [10, 1000])
def test_gamma_null_band_monte_carlo(d):
    """Cosines of 20000 seeded pairs of uniform random directions: the fraction outside the band is
    1 - level within 4.5 binomial standard deviations, half on each side."""
    n = 20000
    c = random_cosines(d, n, np.random.default_rng(d))
    assert np.std(c) == pytest.approx(1 / math.sqrt(d), rel=0.05)
    for level in (0.8, 0.95):
        lo, hi = gamma_null_band(d, level)
        assert lo == pytest.approx(-hi)
        p = 1 - level
        tol = 4.5 * math.sqrt(p * (1 - p) / n)
        assert abs(np.mean((c < lo) | (c > hi)) - p) <= tol
        assert abs(np.mean(c > hi) - p / 2) <= 4.5 * math.sqrt(p / 2 * (1 - p / 2) / n)


def test_gamma_null_band_closed_forms():
    """d = 3: cos is uniform on [-1, 1] (Archimedes), band = +-level; d = 2: cos of a uniform angle,
    upper edge cos(pi (1 - level) / 2); large d: about +-z / sqrt(d)."""
    for level in (0.5, 0.9, 0.95):
        np.testing.assert_allclose(gamma_null_band(3, level), (-level, level), atol=1e-12)
        hi = math.cos(math.pi * (1 - level) / 2)
        np.testing.assert_allclose(gamma_null_band(2, level), (-hi, hi), atol=1e-12)
    assert gamma_null_band(10**6, 0.95)[1] == pytest.approx(1.959964 / 1000, rel=1e-3)
    with pytest.raises(ValueError, match="d >= 2"):
        gamma_null_band(1)


# ---------------------------------------------------------------------------------------------
# 7. summarize on planted data
# ---------------------------------------------------------------------------------------------


def planted(steps: int = 20, samples: int = 5, seed: int = 0) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    rsi = rng.uniform(0.5, 2.0, (steps, samples))
    eb = rng.uniform(1.0, 4.0, (steps, samples))
    gamma = rng.uniform(-0.3, 0.9, (steps, samples))
    return xr.Dataset({"rsi": (("step", "sample"), rsi), "eb": (("step", "sample"), eb), "gamma": (("step", "sample"), gamma)},
                      coords={"step": np.arange(steps)})


def test_summarize_quantiles_bounds_and_tail():
    """Per-step quantiles equal np.quantile per row (NaN-aware, NaN for unmeasured rows); the tail
    rule drops the last 10% of the measured step range (planted outliers there are ignored);
    mu_hat/L_hat = min/max and the 5%/95% quantiles of the rest; implied = mu/L^2,
    contraction = 1 - mu^2/L^2; gamma_above_null = fraction of samples above the band."""
    ds = planted()
    rsi, eb, gamma = (ds[n].values for n in ("rsi", "eb", "gamma"))
    rsi[18:] = -100.0  # the end of training (steps 18, 19 of 0..19): must be left out
    eb[18:] = 1e3
    rsi[3, 1] = np.nan  # one missing sample
    rsi[7] = eb[7] = gamma[7] = np.nan  # an unmeasured step
    ds = ds.assign(rsi=(("step", "sample"), rsi), eb=(("step", "sample"), eb), gamma=(("step", "sample"), gamma))
    s = summarize(ds, dim=50, source="", settings={"samples": 5})
    for n, a in (("rsi", rsi), ("eb", eb), ("gamma", gamma)):
        q = s[n + "_quantiles"].values
        assert q.shape == (20, len(QUANTILES))
        for t in range(20):
            if t == 7:
                assert np.isnan(q[t]).all()
            else:
                np.testing.assert_allclose(q[t], np.quantile(a[t][np.isfinite(a[t])], QUANTILES), rtol=1e-12)
    keep = np.r_[0:7, 8:18]
    r = rsi[keep].ravel()
    r = r[np.isfinite(r)]
    e = eb[keep].ravel()
    assert r.size == 17 * 5 - 1
    mu = np.array([r.min(), np.quantile(r, 0.05)])
    L = np.array([e.max(), np.quantile(e, 0.95)])
    np.testing.assert_allclose(s.mu_hat.values, mu, rtol=1e-12)
    np.testing.assert_allclose(s.L_hat.values, L, rtol=1e-12)
    np.testing.assert_allclose(s.implied_step.values, mu / L**2, rtol=1e-12)
    np.testing.assert_allclose(s.contraction.values, 1 - mu**2 / L**2, rtol=1e-12)
    assert s.has_guarantee.values.tolist() == [True, True]
    assert s.mu_hat.attrs["points"] == r.size and s.mu_hat.attrs["tail_excluded"] == 0.1
    assert s.mu_hat.attrs["samples"] == 5
    lo, hi = gamma_null_band(50, 0.95)
    np.testing.assert_allclose(s.gamma_null.values, [lo, hi])
    frac = s.gamma_above_null.values
    assert np.isnan(frac[7])
    np.testing.assert_allclose(np.delete(frac, 7), np.delete((gamma > hi).mean(axis=1), 7))
    # without the tail rule the planted outliers are the bounds, and the guarantee is gone
    s0 = summarize(ds, dim=50, source="", tail=0.0)
    assert s0.mu_hat.values[0] == -100.0 and s0.L_hat.values[0] == 1e3
    assert not s0.has_guarantee.values[0]
    # other quantile levels and bound quantile
    s2 = summarize(ds, dim=50, source="", quantiles=(0.1, 0.9), bound_quantile=0.25)
    np.testing.assert_allclose(s2.rsi_quantiles.values[0], np.quantile(rsi[0], [0.1, 0.9]), rtol=1e-12)
    np.testing.assert_allclose(s2.mu_hat.values[1], np.quantile(r, 0.25), rtol=1e-12)


def test_summarize_tail_counts_measured_steps_only():
    """Trailing unmeasured steps (NaN rows) do not shift the tail: measured 0..18 of 0..24, the
    cutoff is 0.9 * 18 = 16.2, so steps 17 and 18 are left out."""
    ds = planted(steps=25)
    rsi = ds.rsi.values.copy()
    rsi[19:] = np.nan
    rsi[17:19] = -5.0
    s = summarize(ds.assign(rsi=(("step", "sample"), rsi)), dim=10, source="")
    np.testing.assert_allclose(s.mu_hat.values[0], rsi[:17].min(), rtol=1e-12)


def test_summarize_training_variant_and_no_guarantee():
    """source="_train" (one value per step); mu_hat <= 0 (including exactly 0) clears
    has_guarantee and makes implied_step and contraction NaN, per bound."""
    steps = np.arange(30)
    rng = np.random.default_rng(4)
    rsi = rng.uniform(0.1, 1.0, 30)
    eb = rng.uniform(1.0, 2.0, 30)
    rsi[5] = -0.2  # the minimum, but the 5% quantile stays positive
    ds = xr.Dataset({"rsi_train": ("step", rsi), "eb_train": ("step", eb)}, coords={"step": steps})
    s = summarize(ds, dim=10, source="_train", tail=0.0)
    assert "rsi_quantiles" not in s and "gamma_above_null" not in s
    assert s.has_guarantee.values.tolist() == [False, True]
    assert np.isnan(s.implied_step.values[0]) and np.isnan(s.contraction.values[0])
    q = np.quantile(rsi, 0.05)
    assert q > 0
    np.testing.assert_allclose(s.implied_step.values[1], q / np.quantile(eb, 0.95) ** 2, rtol=1e-12)
    rsi0 = np.abs(rsi)
    rsi0[:] = np.maximum(rsi0, 0.5)
    rsi0[3] = 0.0
    s = summarize(ds.assign(rsi_train=("step", rsi0)), dim=10, source="_train", tail=0.0)
    assert s.mu_hat.values[0] == 0.0 and not s.has_guarantee.values[0] and np.isnan(s.contraction.values[0])
    s = summarize(ds.assign(rsi_train=("step", -rsi0)), dim=10, source="_train", tail=0.0)
    assert not s.has_guarantee.values.any()
    assert np.isnan(s.implied_step.values).all() and np.isnan(s.contraction.values).all()
    # nothing measured at all: NaN bounds, no guarantee
    s = summarize(ds.assign(rsi_train=("step", np.full(30, np.nan))), dim=10, source="_train")
    assert np.isnan(s.mu_hat.values).all() and not s.has_guarantee.values.any()


# ---------------------------------------------------------------------------------------------
# 8. Invariants of secant_quantities
# ---------------------------------------------------------------------------------------------

vec = arrays(np.float64, st.integers(1, 8).map(lambda n: (2, n)), elements=st.floats(-1e3, 1e3))


@settings(max_examples=50, deadline=None)
@given(gy=vec, c=st.floats(1e-3, 1e3))
def test_secant_quantities_invariants(gy, c):
    g, y = gy
    assume(np.linalg.norm(g) > 1e-6 and np.linalg.norm(y) > 1e-6)
    q = from_vectors(g, y)
    assert abs(q["gamma"]) <= 1 + 1e-12
    np.testing.assert_allclose(q["rsi"], q["gamma"] * q["eb"], rtol=1e-9, atol=1e-12 * q["eb"])
    np.testing.assert_allclose(q["eta_star"], g @ y / (g @ g), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(q["eta_star"] * q["eb"] ** 2, q["rsi"], rtol=1e-9, atol=1e-12 * q["eb"])
    # g -> c g: rsi and eb scale by c, gamma stays, eta* scales by 1/c
    qc = from_vectors(c * g, y)
    np.testing.assert_allclose(qc["rsi"], c * q["rsi"], rtol=1e-9, atol=1e-12 * c * q["eb"])
    np.testing.assert_allclose(qc["eb"], c * q["eb"], rtol=1e-9)
    np.testing.assert_allclose(qc["gamma"], q["gamma"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(qc["eta_star"], q["eta_star"] / c, rtol=1e-9, atol=1e-12 * abs(q["eta_star"]) + 1e-300)
    # y -> c y: rsi and eb scale by 1/c, gamma stays, eta* by c
    qy = from_vectors(g, c * y)
    np.testing.assert_allclose(qy["eb"], q["eb"] / c, rtol=1e-9)
    np.testing.assert_allclose(qy["gamma"], q["gamma"], rtol=1e-9, atol=1e-12)
    # -g flips the sign of rsi, gamma, eta*, keeps eb
    qn = from_vectors(-g, y)
    np.testing.assert_allclose([qn["rsi"], qn["gamma"], qn["eb"]], [-q["rsi"], -q["gamma"], q["eb"]], rtol=1e-12)


def test_secant_quantities_degenerate_and_vectorised():
    """|y| = 0: rsi, eb, gamma NaN (eta* defined); |g| = 0: gamma, eta* NaN, rsi = eb = 0;
    arrays are handled elementwise."""
    q = secant_quantities(np.array([0.0, 0.0, 3.0]), np.array([2.0, 0.0, 5.0]), np.array([0.0, 4.0, 2.0]))
    assert np.isnan(q["rsi"][0]) and np.isnan(q["eb"][0]) and np.isnan(q["gamma"][0]) and q["eta_star"][0] == 0.0
    assert q["rsi"][1] == 0.0 and q["eb"][1] == 0.0 and np.isnan(q["gamma"][1]) and np.isnan(q["eta_star"][1])
    np.testing.assert_allclose([q[n][2] for n in NAMES], [3 / 4, 5 / 2, 3 / 10, 3 / 25])


# ---------------------------------------------------------------------------------------------
# 9. Bad arguments
# ---------------------------------------------------------------------------------------------


def test_bad_constructor_arguments():
    for kw, match in [({"samples": -1}, "samples must be"), ({"samples": 1.5}, "samples must be"),
                      ({"samples": True}, "samples must be"), ({"sketch": 0}, "sketch must be"), ({"sketch": True}, "sketch must be"),
                      ({"sketch": 2.5}, "sketch must be"), ({"tail": 1.5}, "tail must be"), ({"tail": -0.1}, "tail must be"),
                      ({"tail": 1.0}, "tail must be"), ({"bound_quantile": 0.5}, "bound_quantile"),
                      ({"null_level": 1.0}, "null_level"), ({"quantiles": (0.5, 1.2)}, "quantiles"),
                      ({"bn_mode": "test"}, "bn_mode")]:
        with pytest.raises(ValueError, match=match):
            RestrictedSecant(**kw)
    with pytest.raises(TypeError, match="sampels"):
        RestrictedSecant(sampels=3)  # type: ignore[call-arg]
    RestrictedSecant(samples=0, sketch=None, tail=0.0)  # the edges that are allowed


def test_bad_reference_raises_at_attach_before_training(tmp_path):
    """A reference missing a parameter, with a wrong shape, a flat tensor of the wrong length, a
    missing file, or a sketch as large as the model: a clear error from attach, no store, no hooks."""
    model = nn.Linear(N_IN, N_OUT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.zarr"
    good = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (RestrictedSecant(samples=0, reference={"weight": good["weight"]}), KeyError, "lacks parameters.*bias"),
        (RestrictedSecant(samples=0, reference={**good, "bias": torch.zeros(3)}), ValueError, r"bias has shape \(3,\).*\(2,\)"),
        (RestrictedSecant(samples=0, reference=torch.zeros(7)), ValueError, "7 entries.*8"),
        (RestrictedSecant(samples=0, reference=tmp_path / "nope.pt"), FileNotFoundError, "does not exist"),
        (RestrictedSecant(samples=0, reference=[1.0, 2.0]), TypeError, "state_dict"),
        (RestrictedSecant(samples=0, sketch=8), ValueError, "smaller than the parameter count"),
    ]
    for probe, exc, match in cases:
        with pytest.raises(exc, match=match):
            landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[probe], store=path)
        assert not path.exists()
        assert not opt._optimizer_step_pre_hooks and not model._forward_hooks
    # the good reference (with its extra keys ignored) is accepted
    landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(samples=0, reference={**good, "extra": 1})],
                     store=path).close()


# ---------------------------------------------------------------------------------------------
# Found while writing these tests
# ---------------------------------------------------------------------------------------------


def test_sketch_weight_decay_override_attrs(tmp_path):
    probe = RestrictedSecant(every=1, samples=0, sketch=50, weight_decay=0.01)
    path, _ = train_wide(tmp_path / "r.zarr", probe, steps=3)
    ds = landscape.open_run(path)
    assert np.isfinite(ds.rsi_wd.values).all()
    assert ds.rsi_wd.attrs["weight_decay"] == pytest.approx(0.01)


def test_probes_importable_first():
    import subprocess
    import sys

    code = "from probes.secant import secant_quantities, RestrictedSecant; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
