"""Synthetic landscapes (landscape/synthetic.py) against their known truth: the global minima
(Newton-refined from the published locations for Himmelblau and the six-hump camel, exact for
the others), closed-form Hessians against torch.func.hessian, the designed flat/sharp curvature
ratio of the Gaussian wells, the Wilson interval by hand, basin_of near each minimum, and SGD
through landscape.attach whose recorded lambda_max and sharpness match the analytic Hessian."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import landscape
from landscape.functional import FunctionalModel
from landscape.synthetic import (Ackley, GaussianWells, Himmelblau, Rastrigin, SixHumpCamel, StyblinskiTang,
                                 SyntheticLandscape, value_loss, wilson_interval)
from probes import HessianSpectrum, Sharpness

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def _newton(f, w0, steps: int = 8) -> torch.Tensor:
    w = torch.as_tensor(w0, dtype=F64)
    for _ in range(steps):
        w = w - torch.linalg.solve(torch.func.hessian(f)(w), torch.func.grad(f)(w))
    assert float(torch.func.grad(f)(w).norm()) < 1e-12
    return w


ALL = [Himmelblau(), SixHumpCamel(), Rastrigin(3), Ackley(3), StyblinskiTang(4), GaussianWells(3)]


# -- minima ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, published, f_star", [
    (Himmelblau, [(3.0, 2.0), (-2.805118, 3.131312), (-3.779310, -3.283186), (3.584428, -1.848126)], 0.0),
    (SixHumpCamel, [(0.0898, -0.7126), (-0.0898, 0.7126)], -1.0316),
])
def test_published_minima_newton_refined(cls, published, f_star):
    f = cls()
    assert f.minima.shape == (len(published), 2)
    assert f.f_star == pytest.approx(f_star, abs=1e-4)
    for start, stored in zip(published, f.minima):
        w = _newton(f.function, start)
        torch.testing.assert_close(stored, w, rtol=0, atol=1e-13)
        assert float(f.value(stored)) == pytest.approx(f.f_star, abs=1e-12)
        assert float(f.gradient_at(stored).norm()) < 1e-12
        assert bool((torch.linalg.eigvalsh(f.hessian_at(stored)) > 0).all())  # a true minimum


@pytest.mark.parametrize("f", [Rastrigin(5), Ackley(5), StyblinskiTang(5), GaussianWells(5)], ids=lambda f: f.name)
def test_exact_minima_and_values(f):
    for m in f.minima:
        assert float(f.value(m)) == pytest.approx(f.f_star, abs=1e-12)
        assert float(f.gradient_at(m).norm()) < 1e-12
    # no sampled point beats f*: a global minimum
    near = f.minima[:, None] + 1e-3 * torch.randn(50, f.dim, dtype=F64, generator=torch.Generator().manual_seed(2))
    pts = torch.cat([f.sample(2000, seed=1), near.reshape(-1, f.dim)])
    assert float(f.value(pts).min()) > f.f_star


def test_published_values_of_the_d_dimensional_functions():
    assert StyblinskiTang(3).f_star == pytest.approx(-39.16616570377142 * 3, rel=1e-14)
    x = float(StyblinskiTang(1).minima[0, 0])
    assert 4 * x**3 - 32 * x + 5 == pytest.approx(0.0, abs=1e-12) and x == pytest.approx(-2.903534, abs=1e-6)
    assert float(Rastrigin(2).value([1.0, 0.0])) == pytest.approx(1.0, abs=1e-12)  # 1 - 10 cos(2 pi) + 10
    a = Ackley(2)
    # f(1, 0) = -20 exp(-0.2 / sqrt 2) - exp((cos 2pi + cos 0) / 2) + 20 + e
    assert float(a.value([1.0, 0.0])) == pytest.approx(-20 * math.exp(-0.2 / math.sqrt(2)) + 20, abs=1e-12)


# -- Hessians -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("f", ALL, ids=lambda f: f"{f.name}{f.dim}")
def test_closed_form_hessian_against_autograd(f):
    pts = list(f.sample(5, seed=7)) + [m + 0.01 for m in f.minima]
    for p in pts:
        torch.testing.assert_close(f.hessian_at(p), torch.func.hessian(f.function)(p), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f.hessian_at(), f.hessian_at(f.w.detach()))  # default: the current point


def test_ackley_has_no_hessian_at_its_cone():
    with pytest.raises(ValueError, match="cone"):
        Ackley(2).hessian_at([0.0, 0.0])


def test_gaussian_wells_curvatures_in_closed_form_and_by_the_designed_ratio():
    for ratio, sep, depth, width, dim in ((16.0, 2.5, 1.0, 1.0, 2), (4.0, 3.0, 2.0, 0.5, 4), (100.0, 1.2, 1.0, 1.0, 3)):
        f = GaussianWells(dim, ratio=ratio, separation=sep, depth=depth, width=width)
        sf, ss = f.flat_width, f.sharp_width
        # s_sharp = s_flat / sqrt(ratio) but for the flat tail at the sharp centre (large when close)
        assert ss == pytest.approx(width * math.sqrt((1 - math.exp(-sep**2 / (2 * width**2))) / ratio), rel=1e-12)
        lam = []
        for c, s, other in ((f.flat_centre, sf, ss), (f.sharp_centre, ss, sf)):
            H = f.hessian_at(c)
            exact = depth * (1 - math.exp(-sep**2 / (2 * other**2))) / s**2
            torch.testing.assert_close(H, exact * torch.eye(dim, dtype=F64), rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(H, torch.func.hessian(f.function)(c), rtol=1e-10, atol=1e-12)
            lam.append(torch.linalg.eigvalsh(H))
        assert float(lam[0].max()) == pytest.approx(f.flat_curvature, rel=1e-13)
        assert float(lam[1].min()) == pytest.approx(f.sharp_curvature, rel=1e-13)
        np.testing.assert_allclose((lam[1] / lam[0]).numpy(), ratio, rtol=1e-12)
        assert f.value(f.minima).tolist() == [-depth, -depth]  # exactly equal depths


# -- the module protocol -------------------------------------------------------------------------------
def test_module_protocol_and_starts():
    f = GaussianWells(2, seed=3)
    assert [n for n, _ in f.named_parameters()] == ["w"] and f.w.dtype == F64
    lo, hi = f.domain[:, 0], f.domain[:, 1]
    assert bool(((f.w >= lo) & (f.w <= hi)).all())
    torch.testing.assert_close(GaussianWells(2, seed=3).w, f.w)  # seeded
    assert not torch.equal(GaussianWells(2, seed=4).w, f.w)
    torch.testing.assert_close(f.w.detach(), f.sample(1, seed=3)[0])
    x = torch.zeros(5, 3)
    out = f(x)
    assert out.shape == (5,) and bool((out == f.function(f.w)).all())
    fm = FunctionalModel(f, value_loss)
    w = fm.flat_params()
    assert float(fm.loss(w, f.dummy_batches(2))) == pytest.approx(float(f.value(w)), abs=1e-15)
    torch.testing.assert_close(fm.grad(w, f.dummy_batches()), f.gradient_at(w))
    g = Himmelblau(start=[3.0, 2.0], dtype=torch.float32)
    assert g.w.dtype == torch.float32 and g.seed is None and g.nearest_minimum() == (0, 0.0)
    assert len(g.dummy_batches(3)) == 3 and g.dummy_batches()[0][0].dtype == torch.float32


def test_argument_errors():
    with pytest.raises(ValueError, match="not both"):
        Rastrigin(2, start=[0.0, 0.0], seed=1)
    with pytest.raises(ValueError, match="2 numbers"):
        Himmelblau(start=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-finite"):
        Himmelblau(start=[1.0, float("nan")])
    with pytest.raises(ValueError, match="dim"):
        Ackley(0)
    with pytest.raises(TypeError, match="dtype"):
        Rastrigin(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="ratio"):
        GaussianWells(ratio=1.0)
    with pytest.raises(ValueError, match="separation"):
        GaussianWells(separation=1.1, width=1.0, ratio=4.0)  # 1.1 < 1 + 0.5
    with pytest.raises(ValueError, match="overlap"):
        GaussianWells().basin_of([0.0, 0.0], within=3.0)
    with pytest.raises(TypeError, match="batch"):
        GaussianWells()(torch.tensor(1.0))
    with pytest.raises(ValueError, match="empty"):
        GaussianWells().fraction_in_flat([])
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 4, confidence=95)


# -- basins and the flat fraction ------------------------------------------------------------------------
def test_basin_of_near_each_minimum():
    f = GaussianWells(3, ratio=9.0)
    u = torch.tensor([0.6, 0.0, 0.8], dtype=F64)
    assert f.basin_of(f.flat_centre) == "flat" and f.basin_of(f.sharp_centre) == "sharp"
    assert f.basin_of(f.flat_centre + 0.99 * f.flat_width * u) == "flat"
    assert f.basin_of(f.flat_centre + 1.01 * f.flat_width * u) is None
    assert f.basin_of(f.sharp_centre - 0.99 * f.sharp_width * u) == "sharp"
    assert f.basin_of(f.sharp_centre - 1.01 * f.sharp_width * u) is None
    assert f.basin_of(f.sharp_centre - 1.01 * f.sharp_width * u, within=1.1) == "sharp"
    assert f.basin_of(torch.zeros(3, dtype=F64)) is None  # between the wells
    f.w.data.copy_(f.sharp_centre)
    assert f.basin_of() == "sharp"


def test_wilson_interval_by_hand():
    # k = 7 of n = 10, z = 1.959964 (z^2 = 3.841459): centre (0.7 + z^2/20) / (1 + z^2/10) = 0.644492,
    # half-width z sqrt(0.021 + z^2/400) / (1 + z^2/10) = 0.247715 -> [0.396778, 0.892209]
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.396778, abs=1e-6) and hi == pytest.approx(0.892209, abs=1e-6)
    z = 1.959963984540054
    den = 1 + z * z / 10
    assert lo == pytest.approx((0.7 + z * z / 20 - z * math.sqrt(0.021 + z * z / 400)) / den, rel=1e-14)
    assert hi == pytest.approx((0.7 + z * z / 20 + z * math.sqrt(0.021 + z * z / 400)) / den, rel=1e-14)
    lo0, hi0 = wilson_interval(0, 20)
    assert lo0 == 0.0 and hi0 == pytest.approx(z * z / (20 + z * z), rel=1e-12)  # k = 0: [0, z^2 / (n + z^2)]
    assert wilson_interval(20, 20) == pytest.approx((20 / (20 + z * z), 1.0), rel=1e-12)
    lo90, hi90 = wilson_interval(7, 10, confidence=0.9)
    assert lo < lo90 < hi90 < hi
    # and scipy's
    from scipy.stats import binomtest
    for k, n, c in ((7, 10, 0.95), (7, 10, 0.9), (4, 7, 0.95), (1, 30, 0.99)):
        ci = binomtest(k, n).proportion_ci(confidence_level=c, method="wilson")
        assert wilson_interval(k, n, c) == pytest.approx((ci.low, ci.high), rel=1e-12)


def test_fraction_in_flat_counts_and_interval():
    f = GaussianWells(2)
    a, b = f.flat_centre, f.sharp_centre
    pts = torch.stack([a, a + 0.1, a - 0.2, b, b + 0.01, torch.zeros(2, dtype=F64), a])
    res = f.fraction_in_flat(pts)
    assert (res.flat, res.sharp, res.neither, res.n) == (4, 2, 1, 7)
    assert res.fraction == pytest.approx(4 / 7)
    assert (res.low, res.high) == wilson_interval(4, 7)
    # points as a list of modules (one per seed) give the same
    mods = [GaussianWells(2, start=p) for p in pts]
    assert f.fraction_in_flat(mods) == res


# -- end to end: SGD from seeded starts, recorded through the probes -----------------------------------
def test_sgd_on_gaussian_wells_through_attach_matches_the_analytic_curvature(tmp_path):
    """lr 0.4 on wells of curvature 1 and 4: both are stable (lr lambda < 2), each seed settles in
    one within 40 steps; the recorded lambda_max equals the closed-form Hessian's top eigenvalue
    at the recorded point, and that of the minimum reached; worst-case sharpness at radius rho
    is rho^2 lambda / 2 and the average one rho^2 tr(H) / 2 (within its Monte-Carlo error)."""
    rho, steps, finals = 0.01, 41, []
    reached = {}
    for seed in (0, 1, 4, 8):
        f = GaussianWells(2, ratio=4.0, seed=seed)
        opt = torch.optim.SGD(f.parameters(), lr=0.4)
        probes = [HessianSpectrum(every=10, k=2, tol=1e-8),
                  Sharpness(every=10, radius=rho, kinds=("worst_l2", "average"), noise_samples=8)]
        batches = f.dummy_batches()
        rec = landscape.attach(f, opt, loss_fn=value_loss, probe_data=batches, probes=probes, store=tmp_path / f"{seed}.zarr",
                               run={"optimizer": "sgd", "seed": seed})
        for t in range(steps):
            if t == steps - 1:
                w_last = f.w.detach().clone()  # the point of the last measurement (step 40)
            x, y = batches[0]
            opt.zero_grad()
            value_loss(f(x), y).backward()
            opt.step()
        rec.close()
        ds = landscape.open_run(rec.path)
        assert ds.attrs["probe_errors"] == {}
        lam = float(ds["lambda_max"].sel(step=40).squeeze())
        H = f.hessian_at(w_last)
        assert lam == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-7)
        well = f.basin_of()
        assert well is not None
        reached[seed] = well
        exact = f.flat_curvature if well == "flat" else f.sharp_curvature
        assert lam == pytest.approx(exact, rel=1e-3)
        top = float(torch.linalg.eigvalsh(f.hessian_at(f.minima[f.wells.index(well)]))[-1])
        assert exact == pytest.approx(top, rel=1e-12)
        sharp = ds["sharpness"].sel(step=40).squeeze()
        assert float(sharp.sel(kind="worst_l2")) == pytest.approx(0.5 * rho**2 * exact, rel=1e-2)
        avg, err = float(sharp.sel(kind="average")), float(ds["sharpness_stderr"].sel(step=40, kind="average").squeeze())
        assert abs(avg - 0.5 * rho**2 * 2 * exact) < 4 * err + 1e-3 * avg
        finals.append(f)
    assert set(reached.values()) == {"flat", "sharp"}  # the seeds were chosen to reach both
    res = GaussianWells(2, ratio=4.0).fraction_in_flat(finals)
    flat = sum(v == "flat" for v in reached.values())
    assert (res.flat, res.n) == (flat, 4) and (res.low, res.high) == wilson_interval(flat, 4)


def test_every_landscape_is_a_synthetic_landscape():
    for f in ALL:
        assert isinstance(f, SyntheticLandscape)
        assert f.domain.shape == (f.dim, 2) and f.minima.shape[1] == f.dim
        assert f.config()["name"] == f.name
