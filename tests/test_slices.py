"""Slices and trajectory PCA (landscape/slices.py, probes/slices.py) against ground truth: the
PCA of a planar path (zero residual), numpy's SVD, streaming in chunks equal to one chunk;
profiles and surfaces of a quadratic in closed form and of an MLP against a loop of fm.loss;
filter-normalised profiles invariant under ReLU rescaling (unit ones not); the eigenvector
profile's curvature equal to lambda_max; then a recorded run end to end and slice_run on its
store."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape
from landscape.directions import random_direction
from landscape.functional import FunctionalModel, draw_batches, probe_guard
from landscape.models import DigitsMLP
from landscape.slices import (grid_through_zero, loss_profile, loss_surface, pca_grid, slice_run, symmetric_grid,
                              trajectory_pca)
from probes import RestrictedSecant
from probes.base import Context
from probes.slices import LossProfile, TrajectoryPCA
from tests._helpers import assert_same_weights, digits, record


pytestmark = pytest.mark.usefixtures("one_thread")


def _factory(rows: np.ndarray, steps: np.ndarray, sizes: list[int] | None = None):
    sizes = sizes or [len(rows)]
    bounds = np.cumsum([0, *sizes])

    def make():
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            yield steps[lo:hi], rows[lo:hi]
    return make


# ---------------------------------------------------------------------------------------------
# trajectory PCA
# ---------------------------------------------------------------------------------------------


def test_pca_of_a_planar_path_has_zero_residual_and_recovers_the_plane():
    rng = np.random.default_rng(0)
    d, n = 500, 30
    final = rng.standard_normal(d)
    u, v = rng.standard_normal(d), rng.standard_normal(d)  # not orthogonal: the PCA finds the plane anyway
    t = np.linspace(0, 1, n)
    a, b = 3 * (1 - t) ** 2, np.sin(4 * t) * (1 - t)
    rows = (final + a[:, None] * u + b[:, None] * v).astype(np.float32)  # stored as float32, like the store
    final32 = final.astype(np.float32)
    res = trajectory_pca(_factory(rows, np.arange(n) * 3), torch.as_tensor(final32), components=2)
    X = rows.astype(np.float64) - final32
    norms = np.linalg.norm(X, axis=1)
    moving = norms > 0
    assert np.all(res.residual[moving] < 1e-5 * norms[moving])
    assert res.explained_variance_ratio.sum() == pytest.approx(1.0, abs=1e-9)
    assert res.valid.all() and np.array_equal(res.steps, np.arange(n) * 3)
    P = res.directions
    np.testing.assert_allclose(P.T @ P, np.eye(2), atol=1e-10)
    for w in (u, v):  # u and v lie in the principal plane
        assert np.linalg.norm(w - P @ (P.T @ w)) < 1e-5 * np.linalg.norm(w)
    np.testing.assert_allclose(res.coordinates @ P.T, X, atol=1e-5 * norms.max())


def _svd_truth(X: np.ndarray, k: int):
    U, S, Vt = np.linalg.svd(X, full_matrices=False)
    coords = U[:, :k] * S[:k]
    resid = np.linalg.norm(X - coords @ Vt[:k], axis=1)
    return Vt[:k].T, S[:k] ** 2 / np.sum(S**2), coords, resid


def test_pca_agrees_with_numpy_svd_and_streaming_equals_one_chunk():
    rng = np.random.default_rng(1)
    n, d, k = 13, 40, 3
    rows = rng.standard_normal((n, d)).astype(np.float32) * np.linspace(3, 0.5, d).astype(np.float32)
    final = rng.standard_normal(d).astype(np.float32)
    steps = np.arange(n) * 2
    one = trajectory_pca(_factory(rows, steps), final, components=k)
    dirs, ratio, coords, resid = _svd_truth(rows.astype(np.float64) - final, k)
    sign = np.sign(np.sum(one.directions * dirs, axis=0))
    np.testing.assert_allclose(one.directions, dirs * sign, atol=1e-9)
    np.testing.assert_allclose(one.explained_variance_ratio, ratio, rtol=1e-9)
    np.testing.assert_allclose(one.coordinates, coords * sign, atol=1e-9)
    np.testing.assert_allclose(one.residual, resid, rtol=1e-6, atol=1e-9)
    # orientation: the snapshot farthest along each direction has a positive coordinate
    assert np.all(one.coordinates[np.argmax(np.abs(one.coordinates), axis=0), range(k)] > 0)
    # chunks of 5, 1, 4, 3 with absent (all-NaN) snapshots in between, one chunk held per pass
    gappy = np.insert(rows, [2, 9], np.nan, axis=0)
    gsteps = np.insert(steps, [2, 9], [99, 98])
    for memory in (1, 10 * d * 8, 2**30):
        many = trajectory_pca(_factory(gappy, gsteps, [5, 1, 5, 4]), final, components=k, memory=memory)
        np.testing.assert_array_equal(many.steps, steps)
        for name in ("directions", "explained_variance_ratio", "coordinates", "residual"):
            np.testing.assert_allclose(getattr(many, name), getattr(one, name), rtol=1e-10, atol=1e-12)


def test_pca_degenerate_paths():
    rng = np.random.default_rng(2)
    d = 20
    final = rng.standard_normal(d)
    u = rng.standard_normal(d)
    line = final + np.array([2.0, 1.0, -0.5, 0.0])[:, None] * u  # the path moves along one line
    res = trajectory_pca(_factory(line, np.arange(4)), final, components=2)
    assert res.valid.tolist() == [True, False] and res.components == 1
    assert np.isnan(res.directions[:, 1]).all() and np.isnan(res.coordinates[:, 1]).all()
    assert res.explained_variance_ratio[0] == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(res.directions[:, 0]), np.abs(u) / np.linalg.norm(u), atol=1e-12)
    # on the line: zero up to the documented accuracy of the Gram form, sqrt(float64 eps) |x_t|
    assert np.all(res.residual <= 1e-7 * np.linalg.norm(line - final, axis=1))
    few = trajectory_pca(_factory(line[:1], np.arange(1)), final, components=3)  # k > n
    assert few.valid.tolist() == [True, False, False] and few.explained_variance_ratio[2] == 0.0
    with pytest.raises(ValueError, match="does not move"):
        trajectory_pca(_factory(np.tile(final, (3, 1)), np.arange(3)), final)
    with pytest.raises(ValueError, match="no parameter snapshot"):
        trajectory_pca(_factory(np.full((2, d), np.nan), np.arange(2)), final)
    with pytest.raises(ValueError, match=r"\(m, d=20\)"):
        trajectory_pca(_factory(np.zeros((2, 5)), np.arange(2)), final)
    with pytest.raises(ValueError, match="diverged"):
        trajectory_pca(_factory(np.where(np.eye(2, d) > 0, np.inf, 1.0), np.arange(2)), final)
    with pytest.raises(ValueError, match="components"):
        trajectory_pca(_factory(line, np.arange(4)), final, components=0)


def test_grids_contain_zero_and_cover_the_range():
    g = grid_through_zero(-0.3, 2.0, 7)
    assert g.size == 7 and 0.0 in g and g[0] <= -0.3 and g[-1] >= 2.0
    np.testing.assert_allclose(np.diff(g), np.diff(g)[0])
    g = pca_grid(np.array([0.5, 1.0, 4.0]), 9, 0.25)  # the origin (the centre) is always covered
    assert 0.0 in g and g[0] <= -1.0 and g[-1] >= 5.0
    s = symmetric_grid(1.0, 21)
    assert s[10] == 0.0 and np.array_equal(s, -s[::-1])
    with pytest.raises(ValueError, match="at least 3"):
        grid_through_zero(-1, 1, 2)


# ---------------------------------------------------------------------------------------------
# profiles and surfaces
# ---------------------------------------------------------------------------------------------


class Quadratic(nn.Module):
    """Outputs 0.5 (w - c)^T A (w - c) itself; the loss is the output."""

    def __init__(self, A: torch.Tensor, c: torch.Tensor, w0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("c", c)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w - self.c
        return 0.5 * (y @ (self.A @ y))


def _identity_loss(out, target):  # noqa: ANN001, ANN201
    return out


QBATCH = [(torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1))]


def _quadratic(d: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eigs = np.linspace(0.3, 5.0, d)
    A = Q @ np.diag(eigs) @ Q.T
    c, w0 = rng.standard_normal(d), rng.standard_normal(d)
    model = Quadratic(*(torch.as_tensor(v) for v in (A, c, w0)))
    return model, FunctionalModel(model, _identity_loss), A, c, w0, Q[:, -1]


@pytest.mark.parametrize("batched", [True, False, "auto"])
def test_quadratic_profile_and_surface_closed_form(batched):
    model, fm, A, c, w0, _ = _quadratic()
    rng = np.random.default_rng(5)
    d1, d2 = rng.standard_normal(10), rng.standard_normal(10)
    f = lambda w: 0.5 * (w - c) @ A @ (w - c)  # noqa: E731
    alphas = np.linspace(-2, 2, 37)
    prof = loss_profile(fm, torch.as_tensor(w0), torch.as_tensor(d1), alphas, QBATCH, batched=batched)
    assert prof.dtype == np.float64
    np.testing.assert_allclose(prof, [f(w0 + a * d1) for a in alphas], rtol=1e-12)
    xs, ys = np.linspace(-1, 1, 5), np.array([-0.5, 0.0, 0.25, 3.0])
    surf = loss_surface(fm, torch.as_tensor(w0), torch.as_tensor(d1), torch.as_tensor(d2), xs, ys, QBATCH, batched=batched)
    assert surf.shape == (5, 4)
    np.testing.assert_allclose(surf, [[f(w0 + x * d1 + y * d2) for y in ys] for x in xs], rtol=1e-12)


def test_mlp_profile_and_surface_equal_a_loop_of_fm_loss():
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    fm = FunctionalModel(model, F.cross_entropy)
    (X, y), _ = digits()
    batches = [(X[:40], y[:40]), (X[40:64], y[40:64])]
    w = fm.flat_params()
    gen = torch.Generator().manual_seed(0)
    d1, d2 = (random_direction(w, fm.layout, gen) for _ in range(2))
    alphas = np.linspace(-1, 1, 41)  # more points than one vmap block (32)
    with torch.no_grad():
        loop = np.array([float(fm.loss(w + float(a) * d1, batches)) for a in alphas])
        xs, ys = np.linspace(-1, 1, 6), np.linspace(-0.5, 0.5, 7)
        loop2 = np.array([[float(fm.loss(w + float(a) * d1 + float(b) * d2, batches)) for b in ys] for a in xs])
    for batched in (True, False):
        np.testing.assert_allclose(loss_profile(fm, w, d1, alphas, batches, batched=batched), loop, rtol=2e-6)
        np.testing.assert_allclose(loss_surface(fm, w, d1, d2, xs, ys, batches, batched=batched), loop2, rtol=2e-6)
    with pytest.raises(ValueError, match="flat vector"):
        loss_profile(fm, w, d1[:-1], alphas, batches)
    with pytest.raises(ValueError, match="alphas"):
        loss_profile(fm, w, d1, [np.nan], batches)


# ---------------------------------------------------------------------------------------------
# LossProfile
# ---------------------------------------------------------------------------------------------


def _ctx(model: nn.Module, fm: FunctionalModel, batches, step: int = 0, update: torch.Tensor | None = None) -> Context:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return Context(step=step, functional=fm, model=model, optimizer=opt, probe_batches=list(batches),
                   params=fm.flat_params(), update=update)


def _profile(probe: LossProfile, model: nn.Module, fm: FunctionalModel, batches, **kw) -> np.ndarray:
    ctx = _ctx(model, fm, batches, **kw)
    with probe_guard(model, probe.bn_mode):
        out = probe.measure(ctx)
    v = out.values["profile_loss"]
    assert v.dims == ("direction", "alpha")
    return np.asarray(v.data)


def _relu_net(a: float = 1.0) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        net[0].weight *= a
        net[0].bias *= a
        net[2].weight /= a
    return net


def test_filter_normalised_profile_is_invariant_under_relu_rescaling_unit_is_not():
    gen = torch.Generator().manual_seed(4)
    batches = [(torch.randn(30, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (30,), generator=gen))]
    base, twin = _relu_net(), _relu_net(7.5)
    for net in (base, twin):
        net.fm = FunctionalModel(net, F.cross_entropy)  # type: ignore[assignment]
    with torch.no_grad():  # the twin computes the same function
        np.testing.assert_allclose(twin(batches[0][0]).numpy(), base(batches[0][0]).numpy(), rtol=1e-12, atol=1e-12)
    profiles = {}
    for norm in ("filter", "unit"):
        for bias in ("zero", "filter"):
            for name, net in (("base", base), ("twin", twin)):
                probe = LossProfile(directions=("random",), random=2, alphas=np.linspace(-1, 1, 9), normalization=norm,
                                    bias=bias, seed=11)
                profiles[norm, bias, name] = _profile(probe, net, net.fm, batches, step=5)
    for bias in ("zero", "filter"):
        np.testing.assert_allclose(profiles["filter", bias, "twin"], profiles["filter", bias, "base"], rtol=1e-10)
        diff = np.abs(profiles["unit", bias, "twin"] - profiles["unit", bias, "base"]).max()
        assert diff > 1e-3, diff
    p = profiles["filter", "zero", "base"]
    assert not np.allclose(p[0], p[1])  # two different random directions
    assert np.all(p[:, 4] == p[0, 4])  # alpha = 0: L(w), shared


def test_eigenvector_profile_curvature_is_lambda_max_and_trajectory_follows_the_update():
    model, fm, A, c, w0, v_top = _quadratic(seed=1)
    lam_max = float(np.linalg.eigvalsh(A)[-1])
    h = 0.5
    alphas = np.array([-2 * h, -h, 0.0, h, 2 * h])
    update = torch.as_tensor(np.random.default_rng(9).standard_normal(10))
    profiles = []
    for seed in (0, 1):  # another Lanczos start: the sign fix makes the profile the same
        probe = LossProfile(directions=("eigenvector", "trajectory"), alphas=alphas, normalization="unit", tol=1e-10,
                             seed=seed)
        profiles.append(_profile(probe, model, fm, QBATCH, step=0, update=update))
    np.testing.assert_allclose(profiles[0], profiles[1], rtol=1e-9)
    eig, traj = profiles[0]
    for k in (1, 2):  # second differences of a quadratic profile: exactly v^T A v
        curvature = (eig[2 + k] - 2 * eig[2] + eig[2 - k]) / (k * h) ** 2
        assert curvature == pytest.approx(lam_max, rel=1e-8)
    v = v_top if v_top[np.argmax(np.abs(v_top))] > 0 else -v_top
    f = lambda w: 0.5 * (w - c) @ A @ (w - c)  # noqa: E731
    np.testing.assert_allclose(eig, [f(w0 + a * v) for a in alphas], rtol=1e-8)
    u = update.numpy() / np.linalg.norm(update.numpy())  # first measurement: the step's own update
    np.testing.assert_allclose(traj, [f(w0 + a * u) for a in alphas], rtol=1e-10)
    # without an update there is no trajectory direction yet: NaN, the other rows measured
    fresh = LossProfile(directions=("trajectory", "random"), alphas=alphas)
    out = _profile(fresh, model, fm, QBATCH)
    assert fresh.labels == ["trajectory", "random_0"] and np.isnan(out[0]).all()


def test_probe_arguments_are_validated():
    with pytest.raises(ValueError, match="directions must be"):
        LossProfile(directions=("random", "hessian"))
    with pytest.raises(ValueError, match="without repeats"):
        LossProfile(directions=("random", "random"))
    with pytest.raises(ValueError, match="include 0"):
        LossProfile(alphas=[-1.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="repeated"):
        LossProfile(alphas=[0.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="normalization"):
        LossProfile(normalization="l2")
    with pytest.raises(ValueError, match="bias"):
        LossProfile(bias="keep")
    with pytest.raises(ValueError, match="beta"):
        LossProfile(beta=1.0)
    with pytest.raises(ValueError, match="random"):
        LossProfile(random=0)
    with pytest.raises(ValueError, match="samples"):
        LossProfile(samples=0)
    with pytest.raises(ValueError, match="tol"):
        LossProfile(tol=0)
    with pytest.raises(ValueError, match="grid"):
        TrajectoryPCA(grid=2)
    with pytest.raises(ValueError, match="margin"):
        TrajectoryPCA(margin=-0.1)
    with pytest.raises(ValueError, match="components"):
        TrajectoryPCA(components=1)
    assert LossProfile(alphas=np.arange(-0.3, 0.31, 0.1)).alphas[3] == 0.0  # arange gives 5.6e-17: a rounded zero
    p = LossProfile(alphas=[1.0, -1.0, 0.0], random=2)  # alphas are sorted
    assert p.coords() == {"direction": ["trajectory", "eigenvector", "random_0", "random_1"], "alpha": [-1.0, 0.0, 1.0]}
    assert TrajectoryPCA().trajectory_vectors() == {"params": "param"}


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------

STEPS = 20


def _run(path, probes, steps=STEPS):
    return record(path, probes, model=lambda: DigitsMLP(hidden=8), steps=steps)[0]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("slices") / "run.zarr"
    plain = _run(None, None)
    model = _run(path, [LossProfile(every=5), TrajectoryPCA(every=5, grid=7)])
    (X, y), _ = digits()
    batches = draw_batches((X, y), 1, batch_size=64, seed=0)  # the recorder's probe batch
    return path, plain, model, batches


def test_recorded_run_has_profiles_the_pca_plane_and_an_unchanged_trajectory(recorded):
    path, plain, model, batches = recorded
    assert_same_weights(plain, model)
    ds = landscape.open_run(path)
    assert ds.attrs["probe_errors"] == {}
    measured = [0, 5, 10, 15]
    prof = ds["profile_loss"]
    assert prof.dims == ("step", "direction", "alpha")
    assert list(ds["direction"].values) == ["trajectory", "eigenvector", "random_0"]
    np.testing.assert_allclose(ds["alpha"].values, np.linspace(-1, 1, 21))
    assert prof.attrs["normalization"] == "filter" and prof.attrs["probe"] == "LossProfile"
    assert list(prof.dropna("step", how="all")["step"].values) == measured
    assert np.isfinite(prof.sel(step=measured)).all()
    # alpha = 0 of every direction is L(w_t) on the same batch as path_loss
    at0 = prof.sel(alpha=0.0, step=measured)
    np.testing.assert_allclose(at0, np.broadcast_to(ds["path_loss"].sel(step=measured).values[:, None], at0.shape), rtol=1e-6)
    # path_loss is L at the stored snapshots
    tr = landscape.open_trajectory(path)
    assert list(tr["step"].values) == measured
    fm = FunctionalModel(model, F.cross_entropy)
    with torch.no_grad():
        direct = [float(fm.loss(torch.as_tensor(row), batches)) for row in tr["params"].values]
    np.testing.assert_allclose(ds["path_loss"].sel(step=measured), direct, rtol=1e-6)
    assert ds["path_loss"].attrs["probe"] == "TrajectoryPCA"
    # the PCA plane, centred on the final iterate w_T
    ev = ds["pca_explained_variance"]
    assert ev.dims == ("component",) and ev.sizes["component"] == 2 and 0 < float(ev.sum()) <= 1 + 1e-12
    assert ds["path_coordinates"].dims == ("step", "component")
    assert list(ds["path_coordinates"].dropna("step", how="all")["step"].values) == measured
    wT = fm.flat_params()
    truth = trajectory_pca(lambda: iter([(tr["step"].values, tr["params"].values)]), wT)
    np.testing.assert_allclose(ds["path_residual"].sel(step=measured), truth.residual, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ds["path_coordinates"].sel(step=measured), truth.coordinates, rtol=1e-6, atol=1e-7)
    surf = ds["surface_loss"]
    assert surf.dims == ("x", "y") and surf.shape == (7, 7) and surf.attrs["grid"] == 7
    with torch.no_grad():
        assert float(surf.sel(x=0.0, y=0.0)) == pytest.approx(float(fm.loss(wT, batches)), rel=1e-6)
        P = torch.as_tensor(truth.directions, dtype=torch.float32)
        plane = [float(fm.loss(wT + P @ torch.as_tensor(c, dtype=torch.float32), batches)) for c in truth.coordinates]
    np.testing.assert_allclose(ds["plane_loss"].sel(step=measured), plane, rtol=1e-5)
    cx, cy = ds["path_coordinates"].sel(step=measured).values.T  # the grid covers the projected path
    assert surf["x"].min() <= cx.min() and surf["x"].max() >= cx.max()
    assert surf["y"].min() <= cy.min() and surf["y"].max() >= cy.max()


def test_slice_run_on_the_store(recorded):
    path, _, model, batches = recorded
    tr = landscape.open_trajectory(path)
    fm = FunctionalModel(model, F.cross_entropy)
    w15 = torch.as_tensor(tr["params"].values[-1])
    with torch.no_grad():
        L15 = float(fm.loss(w15, batches))
    arch = DigitsMLP(hidden=8)  # another instance: its own weights are not used
    ds = slice_run(path, arch, F.cross_entropy, batches, grid=5)
    # (0, 0) is the last stored snapshot w_15 (before update 15), not the final iterate
    assert ds.attrs["center_step"] == 15 and float(ds["surface_loss"].sel(x=0.0, y=0.0)) == pytest.approx(L15, rel=1e-6)
    assert list(ds["step"].values) == [0, 5, 10, 15]
    np.testing.assert_allclose(ds["path_loss"], landscape.open_run(path)["path_loss"].sel(step=[0, 5, 10, 15]), rtol=1e-6)
    assert ds["path_residual"].sel(step=15) == 0 and np.all(ds["path_coordinates"].sel(step=15) == 0)
    assert float(ds["plane_loss"].sel(step=15)) == pytest.approx(L15, rel=1e-6)
    assert ds["surface_loss"].attrs["computed_by"] == "slice_run"
    # around an earlier step: only the path up to it
    early = slice_run(path, arch, F.cross_entropy, batches, step=10, grid=5)
    assert list(early["step"].values) == [0, 5, 10] and early.attrs["center_step"] == 10
    # random directions, reproducible from the seed
    rnd = slice_run(path, arch, F.cross_entropy, batches, directions="random", grid=5, extent=0.5, seed=3)
    gen = torch.Generator().manual_seed(3)
    d1, d2 = (random_direction(w15, fm.layout, gen) for _ in range(2))
    with torch.no_grad():
        expect = float(fm.loss(w15 + 0.5 * d1 - 0.25 * d2, batches))
    assert float(rnd["surface_loss"].sel(x=0.5, y=-0.25)) == pytest.approx(expect, rel=1e-6)
    assert float(rnd["surface_loss"].sel(x=0.0, y=0.0)) == pytest.approx(L15, rel=1e-6)
    given = slice_run(path, arch, F.cross_entropy, batches, directions=(d1, d2), grid=5, extent=0.5)
    np.testing.assert_allclose(given["surface_loss"], rnd["surface_loss"], rtol=1e-6)
    # data as an (X, Y) pair: one (shuffled) batch of the same examples, the same mean loss
    pair = slice_run(path, arch, F.cross_entropy, batches[0], directions="random", grid=5, extent=0.5, seed=3)
    np.testing.assert_allclose(pair["surface_loss"], rnd["surface_loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="no parameters were stored at step 7"):
        slice_run(path, arch, F.cross_entropy, batches, step=7)
    with pytest.raises(ValueError, match="directions must be"):
        slice_run(path, arch, F.cross_entropy, batches, directions="eigen")
    with pytest.raises(ValueError, match="parameters have"):
        slice_run(path, DigitsMLP(hidden=4), F.cross_entropy, batches)


def test_stores_without_full_parameters_and_short_runs(tmp_path):
    # no trajectory at all: a clear error naming the probes that write one
    _run(tmp_path / "profile.zarr", [LossProfile(every=5, directions=("random",), alphas=[-1, 0, 1])], steps=6)
    (X, y), _ = digits()
    with pytest.raises(ValueError, match="TrajectoryPCA, or RestrictedSecant"):
        slice_run(tmp_path / "profile.zarr", DigitsMLP(hidden=8), F.cross_entropy, (X[:64], y[:64]))
    # sketched parameters only
    _run(tmp_path / "sketch.zarr", [RestrictedSecant(every=5, samples=0, sketch=8)], steps=6)
    with pytest.raises(ValueError, match="sketches"):
        slice_run(tmp_path / "sketch.zarr", DigitsMLP(hidden=8), F.cross_entropy, (X[:64], y[:64]))
    # TrajectoryPCA with two snapshots: path_loss recorded, no PCA
    _run(tmp_path / "short.zarr", [TrajectoryPCA(every=5)], steps=6)
    ds = landscape.open_run(tmp_path / "short.zarr")
    assert ds.attrs["probe_errors"] == {} and "pca_explained_variance" not in ds
    assert int(ds["path_loss"].notnull().sum()) == 2
    # full and sketched 'params' in one run cannot be stored together
    with pytest.raises(ValueError, match="sketch=None"):
        _run(tmp_path / "both.zarr", [TrajectoryPCA(every=5), RestrictedSecant(every=5, sketch=16)], steps=1)
