"""The valley probes (probes/valley.py) against closed forms: quadratics (valley width
2 sqrt(2 tau / d^T A d), u^T A u along the step, gradient overlap from the known eigenbasis, zero
barrier on convex functions), the known minima of Himmelblau's function and the six-hump camel
(Newton-refined, analytic Hessians), dense float64 Hessians of a small MLP, ReLU rescaling (the
filter-normalised width is unchanged, the raw one is not), the EMA of the river/hill split, and
end to end through the recorder with the training trajectory unchanged."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape
from landscape.functional import FunctionalModel
from landscape.models import DigitsMLP
from probes import (GradientOverlap, HessianSpectrum, Interpolation, RiverHill, StepCurvature, ValleyWidth)
from probes.base import Context
from landscape.slices import interpolate
from tests._helpers import assert_same_weights, digits, record


pytestmark = pytest.mark.usefixtures("one_thread")


class Surface(nn.Module):
    """A loss surface f(w) as a model: the output ignores the data (loss_fn = mean of it)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], w0) -> None:
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.as_tensor(w0, dtype=torch.float64).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(self.w).expand(x.shape[0])


def _surface_loss(out, y):
    return out.mean()


_DUMMY = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))]


def _quadratic(d: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    lam = torch.linspace(0.2, 5.0, d, dtype=torch.float64).flip(0)
    A = Q @ torch.diag(lam) @ Q.T
    c = torch.randn(d, generator=g, dtype=torch.float64)
    return A, c, lam, Q


def _ctx(model: nn.Module, *, step: int = 0, update=None, grad=None, loss_fn=_surface_loss, batches=_DUMMY,
         fm: FunctionalModel | None = None) -> Context:
    fm = fm or FunctionalModel(model, loss_fn)
    w = fm.flat_params()
    return Context(step=step, functional=fm, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                   probe_batches=list(batches), params=w, grad=grad, update=update)


def _values(probe, ctx, fm=None):
    probe.setup(ctx.functional, ctx.optimizer)
    return {k: np.asarray(v.data) for k, v in probe.measure(ctx).values.items()}


def _newton(f, w0, steps: int = 30) -> torch.Tensor:
    w = torch.as_tensor(w0, dtype=torch.float64)
    for _ in range(steps):
        g = torch.func.grad(f)(w)
        w = w - torch.linalg.solve(torch.func.hessian(f)(w), g)
    assert float(torch.func.grad(f)(w).norm()) < 1e-12
    return w


def himmelblau(w):
    x, y = w[0], w[1]
    return (x * x + y - 11) ** 2 + (x + y * y - 7) ** 2


def himmelblau_hessian(x, y):
    return torch.tensor([[12 * x * x + 4 * y - 42, 4 * (x + y)], [4 * (x + y), 12 * y * y + 4 * x - 26]], dtype=torch.float64)


def camel(w):
    x, y = w[0], w[1]
    return (4 - 2.1 * x**2 + x**4 / 3) * x**2 + x * y + (-4 + 4 * y**2) * y**2


def camel_hessian(x, y):
    return torch.tensor([[8 - 25.2 * x * x + 10 * x**4, 1.0], [1.0, -8 + 48 * y * y]], dtype=torch.float64)


# -- StepCurvature -----------------------------------------------------------------------------
def test_step_curvature_on_a_quadratic_is_u_A_u_both_ways():
    A, c, lam, _ = _quadratic()
    model = Surface(lambda w: 0.5 * (w - c) @ A @ (w - c), torch.zeros(6))
    dw = torch.tensor([0.3, -0.1, 0.2, 0.0, 0.5, -0.4], dtype=torch.float64)
    v = _values(StepCurvature(tol=1e-8), _ctx(model, update=dw))
    u = dw / dw.norm()
    exact = float(u @ A @ u)
    assert v["floor_curvature"] == pytest.approx(exact, rel=1e-12)
    assert v["floor_curvature_secant"] == pytest.approx(exact, rel=1e-10)  # exact for a quadratic
    assert v["valley_anisotropy"] == pytest.approx(float(lam[0]) / exact, rel=1e-6)
    # no step taken: NaN, not a crash
    v = _values(StepCurvature(), _ctx(model, update=torch.zeros(6, dtype=torch.float64)))
    assert np.isnan(v["floor_curvature"]) and np.isnan(v["valley_anisotropy"])


def test_step_curvature_on_an_mlp_against_the_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Tanh(), nn.Linear(6, 10)).double()
    (X, y), _ = digits()
    batches = [(X[:40].double(), y[:40]), (X[40:64].double(), y[40:64])]
    fm = FunctionalModel(model, F.cross_entropy)
    w = fm.flat_params()
    H = torch.func.hessian(lambda x: fm.loss(x, batches))(w)
    dw = 1e-4 * torch.randn(w.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ctx = _ctx(model, update=dw, loss_fn=F.cross_entropy, batches=batches, fm=fm)
    probe = StepCurvature(samples=2, tol=1e-8)
    v = _values(probe, ctx)
    u = dw / dw.norm()
    assert v["floor_curvature"] == pytest.approx(float(u @ H @ u), rel=1e-9)
    # the secant form averages the curvature over the step: u^T H u up to O(|dw|)
    assert v["floor_curvature_secant"] == pytest.approx(float(u @ H @ u), rel=1e-3)
    assert v["valley_anisotropy"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]) / float(u @ H @ u), rel=1e-6)


# -- ValleyWidth -------------------------------------------------------------------------------
def test_valley_width_on_a_quadratic_closed_form():
    """At the minimum of 0.5 (w - c)^T A (w - c), t+- = sqrt(2 tau / d^T A d) for a unit d."""
    A, c, lam, Q = _quadratic()
    model = Surface(lambda w: 0.5 * (w - c) @ A @ (w - c), c)
    dw = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5, 0.3], dtype=torch.float64)
    tau = 0.05
    probe = ValleyWidth(tau=tau, random=2, rtol=1e-6)
    ctx = _ctx(model, update=dw)
    v = _values(probe, ctx)
    labels = probe.coords()["direction"]
    assert labels == ["trajectory", "eigenvector", "random_0", "random_1"]
    u = dw / dw.norm()
    expected = {"trajectory": 2 * math.sqrt(2 * tau / float(u @ A @ u)), "eigenvector": 2 * math.sqrt(2 * tau / float(lam[0]))}
    gen = probe.generator(0)
    for i in range(2):
        r = torch.randn(6, generator=gen, dtype=torch.float64)
        r = r / r.norm()
        expected[f"random_{i}"] = 2 * math.sqrt(2 * tau / float(r @ A @ r))
    for i, label in enumerate(labels):
        assert v["valley_width"][i] == pytest.approx(expected[label], rel=2e-6), label
        assert v["valley_width_plus"][i] == pytest.approx(v["valley_width_minus"][i], rel=2e-6)  # symmetric
    assert v["valley_width_anisotropy"] == pytest.approx(expected["trajectory"] / expected["eigenvector"], rel=5e-6)
    # reproducible with the seed, different with another
    again = _values(ValleyWidth(tau=tau, random=2, rtol=1e-6), _ctx(model, update=dw))
    np.testing.assert_array_equal(again["valley_width"], v["valley_width"])
    other = _values(ValleyWidth(tau=tau, random=2, rtol=1e-6, seed=1), _ctx(model, update=dw))
    assert not np.allclose(other["valley_width"][2:], v["valley_width"][2:])


@pytest.mark.parametrize("surface", ["himmelblau", "camel"])
def test_valley_widths_at_known_minima_follow_the_analytic_hessian(surface):
    """Himmelblau's four minima and the six-hump camel's two global minima (Newton-refined from
    their published locations): the width along the top eigenvector is 2 sqrt(2 tau / lambda_max)
    of the analytic Hessian, and the minima rank by flatness as their lambda_max says."""
    if surface == "himmelblau":
        f, hess = himmelblau, himmelblau_hessian
        starts = [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)]
        value = 0.0
    else:
        f, hess = camel, camel_hessian
        starts = [(0.0898, -0.7126), (-0.0898, 0.7126)]
        value = -1.031628453
    tau = 1e-6
    widths, lams = [], []
    for start in starts:
        w = _newton(f, start)
        assert float(f(w)) == pytest.approx(value, abs=1e-8)
        lam = float(torch.linalg.eigvalsh(hess(float(w[0]), float(w[1])))[-1])
        v = _values(ValleyWidth(tau=tau, directions=("eigenvector",), rtol=1e-7, tol=1e-10),
                    _ctx(Surface(f, w), update=torch.tensor([1.0, 0.0], dtype=torch.float64)))
        assert v["valley_width"][0] == pytest.approx(2 * math.sqrt(2 * tau / lam), rel=2e-3)
        c = _values(StepCurvature(tol=1e-10), _ctx(Surface(f, w), update=torch.tensor([0.6, 0.8], dtype=torch.float64)))
        u = torch.tensor([0.6, 0.8], dtype=torch.float64)
        assert c["floor_curvature"] == pytest.approx(float(u @ hess(float(w[0]), float(w[1])) @ u), rel=1e-10)
        widths.append(v["valley_width"][0])
        lams.append(lam)
    if surface == "himmelblau":  # four distinct curvatures: the flattest minimum is the widest
        assert np.argsort(widths).tolist() == np.argsort(lams)[::-1].tolist()
    else:  # f(-w) = f(w): the two global minima are equally wide
        assert widths[0] == pytest.approx(widths[1], rel=1e-6)


def test_filter_normalised_width_is_invariant_under_relu_rescaling_and_the_raw_one_is_not():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    twin = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).double()
    twin.load_state_dict(net.state_dict())
    a = 4.0
    with torch.no_grad():
        twin[1].weight.mul_(a); twin[1].bias.mul_(a); twin[3].weight.div_(a)
    (X, y), _ = digits()
    batches = [(X[:64].double(), y[:64])]
    out = {}
    for norm in ("filter", "unit"):
        for name, model in (("net", net), ("twin", twin)):
            probe = ValleyWidth(tau=0.05, directions=("random",), random=2, normalization=norm, rtol=1e-8)
            out[norm, name] = _values(probe, _ctx(model, loss_fn=F.cross_entropy, batches=batches))["valley_width"]
    np.testing.assert_allclose(out["filter", "net"], out["filter", "twin"], rtol=1e-6)
    assert np.all(np.abs(out["unit", "net"] / out["unit", "twin"] - 1) > 0.1)


# -- GradientOverlap ---------------------------------------------------------------------------
def test_gradient_overlap_closed_form():
    A, c, lam, Q = _quadratic(d=8, seed=2)
    w0 = torch.zeros(8, dtype=torch.float64)
    model = Surface(lambda w: 0.5 * (w - c) @ A @ (w - c), w0)
    g = A @ (w0 - c)
    g_train = torch.randn(8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for k in (1, 3):
        v = _values(GradientOverlap(k=k, tol=1e-10), _ctx(model, grad=g_train))
        V = Q[:, :k]  # eigenvalues were built descending
        assert v["gradient_overlap_probe"] == pytest.approx(float((V.T @ g).norm() ** 2 / g.norm() ** 2), rel=1e-8)
        assert v["gradient_overlap"] == pytest.approx(float((V.T @ g_train).norm() ** 2 / g_train.norm() ** 2), rel=1e-8)
    v = _values(GradientOverlap(k=8), _ctx(model, grad=g_train))
    assert v["gradient_overlap"] == pytest.approx(1.0, rel=1e-10)
    with pytest.raises(ValueError, match="exceeds"):
        GradientOverlap(k=9).setup(FunctionalModel(model, _surface_loss), None)  # type: ignore[arg-type]


def test_probes_reuse_hessian_spectrum_eigenvectors_at_the_same_step():
    A, c, lam, Q = _quadratic(d=8, seed=2)
    model = Surface(lambda w: 0.5 * (w - c) @ A @ (w - c), torch.zeros(8))
    ctx = _ctx(model, grad=torch.ones(8, dtype=torch.float64), update=torch.ones(8, dtype=torch.float64))
    spec = HessianSpectrum(k=3, tol=1e-10)
    _values(spec, ctx)
    before = ctx.hessian(1).matvecs
    _values(GradientOverlap(k=3), ctx)
    _values(StepCurvature(), ctx)
    assert ctx.hessian(1).matvecs == before + 1  # only StepCurvature's own u^T H u


# -- RiverHill ---------------------------------------------------------------------------------
def test_river_hill_ema_and_heights():
    A, c, lam, Q = _quadratic()
    f = lambda w: 0.5 * (w - c) @ A @ (w - c)  # noqa: E731
    model = Surface(f, torch.zeros(6))
    fm = FunctionalModel(model, _surface_loss)
    rng = torch.Generator().manual_seed(0)
    path = [c + torch.randn(6, generator=rng, dtype=torch.float64) for _ in range(12)]
    beta = 0.8
    for every in (1, 3):
        probe = RiverHill(beta=beta, lag=2 * every)
        probe.setup(fm, None)  # type: ignore[arg-type]
        ema, history = None, {}
        for step in range(0, 12, every):
            w = path[step]
            ctx = Context(step=step, functional=fm, model=model, optimizer=None, probe_batches=_DUMMY, params=w)  # type: ignore[arg-type]
            v = {k: np.asarray(x.data) for k, x in probe.measure(ctx).values.items()}
            ema = w.clone() if ema is None else beta**every * ema + (1 - beta**every) * w
            history[step] = ema.clone()
            assert v["ema_loss"] == pytest.approx(float(f(ema)), rel=1e-12)
            assert v["hill_height"] == pytest.approx(float(f(w) - f(ema)), rel=1e-10, abs=1e-12)
            assert v["ema_distance"] == pytest.approx(float((w - ema).norm()), rel=1e-12)
            if step - 2 * every in history:
                assert v["floor_progress"] == pytest.approx(float((ema - history[step - 2 * every]).norm()), rel=1e-12)
            else:
                assert np.isnan(v["floor_progress"])


# -- Interpolation -----------------------------------------------------------------------------
def test_interpolation_probe_on_a_convex_function_has_zero_barrier_and_counts_rises():
    A, c, lam, Q = _quadratic()
    f = lambda w: 0.5 * (w - c) @ A @ (w - c)  # noqa: E731
    model = Surface(f, torch.zeros(6))
    fm = FunctionalModel(model, _surface_loss)
    probe = Interpolation(alphas=np.linspace(0, 1, 11))
    probe.setup(fm, None)  # type: ignore[arg-type]
    points = [c - 3 * Q[:, 0], c + 2 * Q[:, 0], c + 2.5 * Q[:, 0]]
    results = []
    for step, w in enumerate(points):
        ctx = Context(step=step * 5, functional=fm, model=model, optimizer=None, probe_batches=_DUMMY, params=w)  # type: ignore[arg-type]
        results.append({k: np.asarray(x.data) for k, x in probe.measure(ctx).values.items()})
    assert np.all(np.isnan(results[0]["interpolation_loss"])) and results[0]["interpolation_violations"] == -1
    a = np.linspace(0, 1, 11)
    # segment 1 crosses the minimum: loss falls, then rises after t = 0.6
    t = -3 + 5 * a
    np.testing.assert_allclose(results[1]["interpolation_loss"], 0.5 * float(lam[0]) * t**2, rtol=1e-10, atol=1e-12)
    assert results[1]["interpolation_barrier"] <= 1e-12  # convex: never above the chord
    assert results[1]["interpolation_violations"] == int(np.sum(np.diff(t**2) > 0))
    assert results[1]["interpolation_max_rise"] == pytest.approx(0.5 * float(lam[0]) * (4 - 0), rel=1e-9)
    assert results[2]["interpolation_violations"] == 10  # monotone increasing segment
    final = probe.finalize(Context(step=15, functional=fm, model=model, optimizer=None, probe_batches=_DUMMY,  # type: ignore[arg-type]
                                   final_params=c))
    assert final is not None
    np.testing.assert_allclose(final["mli_loss"].values, 0.5 * float(lam[0]) * (3 * (1 - a)) ** 2, rtol=1e-10, atol=1e-12)
    assert int(final["mli_violations"]) == 0 and float(final["mli_barrier"]) <= 1e-12


def test_interpolate_between_two_models_and_a_barrier_on_a_double_well():
    # a double well along the first axis: two minima at +-1, barrier 1 in between
    well = lambda w: (w[0] ** 2 - 1) ** 2 + w[1] ** 2  # noqa: E731
    model = Surface(well, torch.zeros(2))
    left, right = torch.tensor([-1.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64)
    ds = interpolate(model, _surface_loss, _DUMMY, left, right, alphas=np.linspace(0, 1, 21))
    assert float(ds["endpoint_barrier"]) == pytest.approx(1.0, abs=1e-12)
    assert int(ds["endpoint_violations"]) == 10
    assert ds["endpoint_loss"].attrs["long_name"] and ds["endpoint_loss"].dims == ("alpha",)
    # modules and state_dicts as end points; rejection of a wrong shape
    m1, m2 = Surface(well, left), Surface(well, right)
    ds2 = interpolate(model, _surface_loss, _DUMMY, m1, m2.state_dict(), alphas=np.linspace(0, 1, 21))
    np.testing.assert_allclose(ds2["endpoint_loss"].values, ds["endpoint_loss"].values)
    with pytest.raises(ValueError, match="entries"):
        interpolate(model, _surface_loss, _DUMMY, torch.zeros(3), right)
    with pytest.raises(ValueError, match="include"):
        interpolate(model, _surface_loss, _DUMMY, left, right, alphas=[0.2, 0.5, 1.0])


def test_argument_errors():
    with pytest.raises(ValueError, match="tau"):
        ValleyWidth(tau=0)
    with pytest.raises(ValueError, match="directions"):
        ValleyWidth(directions=("river",))
    with pytest.raises(ValueError, match="normalization"):
        ValleyWidth(normalization="none")
    with pytest.raises(ValueError, match="beta"):
        RiverHill(beta=1.0)
    with pytest.raises(ValueError, match="lag"):
        RiverHill(lag=0)
    with pytest.raises(ValueError, match="k "):
        GradientOverlap(k=0)
    with pytest.raises(ValueError, match="samples"):
        StepCurvature(samples=0)
    with pytest.raises(TypeError, match="alphas"):
        Interpolation(alphas="abc")


# -- end to end --------------------------------------------------------------------------------
def test_valley_probes_through_the_recorder_leave_training_unchanged(tmp_path):
    probes = [HessianSpectrum(every=10, k=3), StepCurvature(every=10), RiverHill(every=5),
              ValleyWidth(every=10, rtol=0.05), GradientOverlap(every=10, k=3), Interpolation(every=10)]
    plain, _ = record(None, None, model=lambda: DigitsMLP(hidden=12), steps=30)
    model, path = record(tmp_path / "run.zarr", probes, model=lambda: DigitsMLP(hidden=12), steps=30)
    assert_same_weights(plain, model)
    ds = landscape.open_run(path)
    assert ds.attrs["probe_errors"] == {}
    for name in ("floor_curvature", "floor_curvature_secant", "valley_anisotropy", "hill_height", "floor_progress",
                 "valley_width", "valley_width_anisotropy", "gradient_overlap", "gradient_overlap_probe",
                 "interpolation_barrier", "mli_loss", "mli_barrier"):
        assert name in ds, name
        assert ds[name].attrs["long_name"] and ds[name].attrs["probe"]
    assert list(ds["direction"].values) == ["trajectory", "eigenvector", "random_0"]
    assert np.all(np.isfinite(ds["valley_width"].sel(step=[0, 10, 20]).values))
    assert np.all(np.isnan(ds["valley_width"].sel(step=5).values))
    ov = ds["gradient_overlap_probe"].sel(step=[0, 10, 20]).values
    assert np.all((ov > 0) & (ov <= 1 + 1e-6))
    assert ds["mli_loss"].sizes["alpha"] == 11 and ds["interpolation_loss"].dims == ("step", "alpha")
    assert ds["mli_barrier"].dims == () and float(ds["mli_barrier"]) >= 0  # 0 at the end points
