"""landscape.linalg against ground truth: symmetric matrices with KNOWN spectra (Q diag(lam) Q^T,
Q from the QR of a seeded Gaussian), so every eigenvalue, eigenvector, trace and spectral mass
below is compared with the exact answer, not with another solver. Statistical tests (Hutchinson,
Hutch++, SLQ) are seeded and use margins several times the expected Monte Carlo spread."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse.linalg
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape.linalg import (
    LanczosResult,
    NonFiniteError,
    SymmetricOperator,
    as_operator,
    from_scipy,
    hutchinson,
    hutchpp,
    lanczos,
    restricted,
    slq,
    slq_trace,
    spectral_density,
    to_scipy,
    transformed,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def known(lam, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A = Q diag(lam) Q^T with a seeded Haar-like Q; returns (A, Q, lam) with lam as given (unsorted)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    d = lam.numel()
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    A = (Q * lam) @ Q.T
    A = (A + A.T) / 2
    return A.to(dtype), Q, lam


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen(seed), dtype=torch.float64)


def check_ritz(res: LanczosResult, A: torch.Tensor, Q: torch.Tensor, lam: torch.Tensor, truth: torch.Tensor,
               rtol: float) -> None:
    """Eigenvalues vs truth, orthonormal Ritz vectors, recurrence residuals == true residuals,
    |theta - lambda| <= residual (rigorous) and sin(angle to the true eigenvector) <= residual / gap
    (Davis-Kahan, rigorous, with the true gap) for simple eigenvalues."""
    th = res.eigenvalues
    assert th.dtype == torch.float64
    np.testing.assert_allclose(th.numpy(), truth.numpy(), rtol=rtol, atol=0)
    Y = res.eigenvectors.to(torch.float64)
    n = Y.shape[1]
    np.testing.assert_allclose((Y.T @ Y).numpy(), np.eye(n), atol=1e-10 if res.eigenvectors.dtype == torch.float64 else 1e-5)
    Af = A.to(torch.float64)
    true_res = torch.linalg.vector_norm(Af @ Y - Y * th, dim=0)
    scale = float(lam.abs().max())
    np.testing.assert_allclose(res.residuals.numpy(), true_res.numpy(), rtol=1e-3, atol=1e-12 * scale)
    assert bool((res.residuals >= 0).all()) and bool((res.error_bounds <= res.residuals + 1e-300).all())
    for i in range(n):
        dist = (lam - th[i]).abs()
        assert float(dist.min()) <= float(res.residuals[i]) + 1e-12 * scale
        j = int(torch.argmin(dist))
        others = torch.cat([lam[:j], lam[j + 1:]])
        gap = float((others - lam[j]).abs().min())
        if gap > 1e-6 * scale:
            cos = float((Q[:, j] @ Y[:, i]).abs())
            sin = math.sqrt(max(0.0, 1 - min(1.0, cos) ** 2))
            assert sin <= float(res.residuals[i]) / gap * 1.01 + 1e-7


# ---------------------------------------------------------------------------------------------
# Lanczos
# ---------------------------------------------------------------------------------------------

def spectrum_pm(d: int) -> torch.Tensor:
    """Outliers on both sides of a bulk in [-1, 2]: 50, 40, 30, 20, 10 and -30, -20, -12, -8, -6."""
    out = torch.tensor([50., 40, 30, 20, 10, -30, -20, -12, -8, -6], dtype=torch.float64)
    return torch.cat([out, uniform(d - out.numel(), -1.0, 2.0, seed=d)])


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
@pytest.mark.parametrize("block_size", [1, 3])
def test_lanczos_extremes_float64(which, block_size):
    A, Q, lam = known(spectrum_pm(300), seed=1)
    res = lanczos(A, 5, which=which, tol=1e-10, block_size=block_size)
    desc = torch.sort(lam, descending=True).values
    truth = {"top": desc[:5], "bottom": desc.flip(0)[:5], "both": torch.cat([desc[:5], desc.flip(0)[:5]])}[which]
    check_ritz(res, A, Q, lam, truth, rtol=1e-8)
    assert bool(res.converged.all())
    assert res.kind == (("top",) * 5 + ("bottom",) * 5 if which == "both" else (which,) * 5)
    assert res.eigenvectors.shape == (300, truth.numel()) and res.eigenvectors.dtype == torch.float64
    assert res.matvecs <= 300 and res.iterations >= 1
    assert res.matvecs == block_size * res.iterations


def test_lanczos_negative_spectrum_and_default_tol():
    lam = torch.cat([f64([-100., -80, -65]), uniform(397, -40.0, -1.0, seed=2)])
    A, Q, lam = known(lam, seed=2)
    top = lanczos(A, 2)
    bottom = lanczos(A, 3, which="bottom")
    desc = torch.sort(lam, descending=True).values
    # default tol 1e-6 bounds the eigenvalue error (r^2/gap) relative to |theta|
    np.testing.assert_allclose(bottom.eigenvalues.numpy(), [-100, -80, -65], rtol=1e-6)
    np.testing.assert_allclose(top.eigenvalues.numpy(), desc[:2].numpy(), rtol=1e-5)
    assert bool(bottom.converged.all()) and bool(top.converged.all())


def test_lanczos_exact_multiplicity_needs_a_block():
    # 10 twice, 10 - 1e-3, 5, bulk in [0, 1]
    lam = torch.cat([f64([10., 10, 10 - 1e-3, 5]), uniform(296, 0.0, 1.0, seed=3)])
    A, Q, lam = known(lam, seed=3)
    res = lanczos(A, 4, tol=1e-10, block_size=2)
    check_ritz(res, A, Q, lam, torch.tensor([10., 10, 10 - 1e-3, 5], dtype=torch.float64), rtol=1e-8)
    # the two Ritz vectors for 10 span the true eigenspace
    P = Q[:, :2] @ Q[:, :2].T
    Y = res.eigenvectors[:, :2]
    np.testing.assert_allclose((Y.T @ P @ Y).numpy(), np.eye(2), atol=1e-8)
    # a warm start with two vectors is a block too
    warm = lanczos(A, 4, tol=1e-10, warm_start=torch.randn(300, 2, generator=gen(9), dtype=torch.float64))
    np.testing.assert_allclose(warm.eigenvalues.numpy(), [10, 10, 10 - 1e-3, 5], rtol=1e-8)


def test_lanczos_near_cluster_single_vector():
    lam = torch.cat([f64([10., 10 - 1e-5, 10 - 1e-3, 5]), uniform(296, 0.0, 1.0, seed=4)])
    A, Q, lam = known(lam, seed=4)
    res = lanczos(A, 4, tol=1e-11)
    np.testing.assert_allclose(res.eigenvalues.numpy(), [10., 10 - 1e-5, 10 - 1e-3, 5], rtol=1e-9)
    assert bool(res.converged.all())
    Y = res.eigenvectors
    true_res = torch.linalg.vector_norm(A @ Y - Y * res.eigenvalues, dim=0)
    np.testing.assert_allclose(res.residuals.numpy(), true_res.numpy(), rtol=1e-3, atol=1e-12)


def test_lanczos_breakdown_restarts_and_finds_multiplicity():
    # three distinct eigenvalues: a single Krylov space has dimension 3, so the wanted 4 need restarts
    lam = torch.tensor([3.0] * 2 + [1.0] * 40 + [-2.0] * 8, dtype=torch.float64)
    A, Q, lam = known(lam, seed=5)
    res = lanczos(A, 4, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues.numpy(), [3, 3, 1, 1], rtol=1e-12)
    for block_size in (1, 2):
        triple = lanczos(known(f64([3.0] * 3 + [1.0] * 40 + [-2.0] * 7), seed=6)[0], 4, tol=1e-10, block_size=block_size)
        np.testing.assert_allclose(triple.eigenvalues.numpy(), [3, 3, 3, 1], rtol=1e-12)
    # rank 2 plus zeros: the first Krylov space is invariant at once
    low = lanczos(known(f64([5.0, 4.0] + [0.0] * 98), seed=7)[0], 3, tol=1e-10)
    np.testing.assert_allclose(low.eigenvalues.numpy(), [5, 4, 0], atol=1e-12)
    both = lanczos(A, 3, which="both", tol=1e-10)
    np.testing.assert_allclose(both.eigenvalues.numpy(), [3, 3, 1, -2, -2, -2], rtol=1e-12)
    assert bool(both.converged.all())
    Y = both.eigenvectors
    np.testing.assert_allclose(torch.linalg.vector_norm(A @ Y - Y * both.eigenvalues, dim=0).numpy(), 0, atol=1e-12)


@pytest.mark.parametrize("d,k,which,block_size", [
    (d, k, which, b) for d, k, which in [(6, 3, "top"), (6, 6, "top"), (6, 6, "bottom"), (10, 4, "both"),
                                         (7, 4, "both"), (10, 10, "both"), (1, 1, "top")]
    for b in (1, 2, 3) if b <= d])
def test_lanczos_tiny_exact(d, k, which, block_size):
    lam = torch.linspace(-3, 5, d, dtype=torch.float64) ** 3
    A, Q, lam = known(lam, seed=d)
    res = lanczos(A, k, which=which, tol=1e-12, block_size=block_size)
    desc = torch.sort(lam, descending=True).values
    truth = {"top": desc[:k], "bottom": desc.flip(0)[:k], "both": torch.cat([desc[:k], desc.flip(0)[:k]])}[which]
    np.testing.assert_allclose(res.eigenvalues.numpy(), truth.numpy(), rtol=1e-12, atol=1e-12)
    assert bool(res.converged.all())
    assert res.matvecs <= d
    Y = res.eigenvectors
    np.testing.assert_allclose(torch.linalg.vector_norm(A @ Y - Y * res.eigenvalues, dim=0).numpy(), 0, atol=1e-11)


def test_lanczos_float32_operator():
    lam = torch.cat([f64([50., 40, 30, 20, 10]), uniform(395, -1.0, 2.0, seed=6)])
    A, Q, lam = known(lam, seed=6, dtype=torch.float32)
    res = lanczos(A, 5, tol=1e-6)
    assert res.eigenvectors.dtype == torch.float32 and res.eigenvalues.dtype == torch.float64
    np.testing.assert_allclose(res.eigenvalues.numpy(), [50, 40, 30, 20, 10], rtol=1e-5)
    assert bool(res.converged.all())
    Y = res.eigenvectors.double()
    np.testing.assert_allclose((Y.T @ Y).numpy(), np.eye(5), atol=1e-5)
    true_res = torch.linalg.vector_norm(A.double() @ Y - Y * res.eigenvalues, dim=0)
    np.testing.assert_allclose(res.residuals.numpy(), true_res.numpy(), rtol=0.1, atol=1e-4)
    # the same float32 matrix seen in float64 (as_operator(dtype=...)) is solved to float64 accuracy
    exact = torch.linalg.eigvalsh(A.double()).flip(0)[:5]
    res64 = lanczos(as_operator(A, dtype=torch.float64), 5, tol=1e-10)
    np.testing.assert_allclose(res64.eigenvalues.numpy(), exact.numpy(), rtol=1e-10)


def _tracking_case(rel: float):
    """d=1000: five outliers just above a dense bulk (cold Lanczos needs many steps), then A rotated
    slightly and its eigenvalues moved: known spectrum before and after, ||A2 - A|| ~ rel ||A||."""
    d = 1000
    lam = torch.cat([f64([10., 9.8, 9.6, 9.4, 9.2]), uniform(d - 5, 0.0, 9.0, seed=7)])
    A, Q, lam = known(lam, seed=7)
    g = gen(8)
    eps = rel / 31.6  # QR of Q + eps G moves A by ~ 2 eps sqrt(d) ||A||
    Q2, R = torch.linalg.qr(Q + eps * torch.randn(d, d, generator=g, dtype=torch.float64))
    Q2 = Q2 * torch.sign(torch.diagonal(R))
    lam2 = lam * (1 + 10 * eps * torch.randn(d, generator=g, dtype=torch.float64))
    A2 = (Q2 * lam2) @ Q2.T
    return A, (A2 + A2.T) / 2, torch.sort(lam2, descending=True).values[:5]


def test_lanczos_warm_start_saves_matvecs():
    A, A2, truth = _tracking_case(rel=3e-4)
    before = lanczos(A, 5)
    op = as_operator(A2)
    cold = lanczos(op, 5, generator=gen(1))
    n_cold = op.matvecs
    warm = lanczos(op, 5, warm_start=before.eigenvectors)
    assert op.matvecs - n_cold == warm.matvecs and cold.matvecs == n_cold
    assert bool(cold.converged.all()) and bool(warm.converged.all())
    # same accuracy against the known spectrum of the perturbed matrix
    err_cold = float(((cold.eigenvalues - truth).abs() / truth).max())
    err_warm = float(((warm.eigenvalues - truth).abs() / truth).max())
    assert err_cold < 1e-6 and err_warm < 1e-6
    # one or two batched block steps of k + extra_random = 6 products, against ~50 cold
    assert warm.iterations <= 3
    assert warm.matvecs <= cold.matvecs / 3, (warm.matvecs, cold.matvecs)


def test_lanczos_warm_start_exact_vectors_one_step():
    lam = torch.cat([f64([9., 7, 5]), uniform(197, -1.0, 1.0, seed=10)])
    A, Q, lam = known(lam, seed=10)
    # exact eigenvectors, slightly non-orthonormal and scaled: the first Rayleigh-Ritz is exact
    X = Q[:, :3] * torch.tensor([2.0, 0.5, 3.0], dtype=torch.float64) + 1e-3 * Q[:, :1]
    res = lanczos(A, 3, tol=1e-10, warm_start=X)
    assert res.iterations == 1 and res.matvecs == 4
    np.testing.assert_allclose(res.eigenvalues.numpy(), [9, 7, 5], rtol=1e-12)


@pytest.mark.parametrize("tol", [1e-6, 1e-10])
def test_lanczos_warm_start_on_a_wrong_invariant_subspace(tol):
    # warm vectors exactly spanning eigenvectors of 7, 5, 4.9 with no extra random vector: the
    # first block is invariant, and the restart that follows must still find the hidden 9
    lam = torch.cat([f64([9., 7, 5, 4.9]), torch.linspace(-1, 1, 196, dtype=torch.float64)])
    A, Q, lam = known(lam, seed=24)
    res = lanczos(A, 3, tol=tol, warm_start=Q[:, 1:4], extra_random=0)
    np.testing.assert_allclose(res.eigenvalues.numpy(), [9, 7, 5], rtol=10 * tol)
    # the right subspace: exact after the first Rayleigh-Ritz, then a short check of the complement
    right = lanczos(A, 3, tol=tol, warm_start=Q[:, :3], extra_random=0)
    np.testing.assert_allclose(right.eigenvalues.numpy(), [9, 7, 5], rtol=1e-12)
    assert right.matvecs <= 30


def test_lanczos_budget_and_determinism():
    lam = torch.cat([f64([10., 9.99, 9.98]), uniform(297, 0.0, 9.9, seed=11)])
    A, Q, lam = known(lam, seed=11)
    state = torch.get_rng_state()
    r1 = lanczos(A, 3, tol=1e-12, max_matvecs=12)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was touched"
    assert r1.matvecs == 12 and not bool(r1.converged.all())
    r2 = lanczos(A, 3, tol=1e-12, max_matvecs=12)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues)
    r3 = lanczos(A, 3, tol=1e-12, max_matvecs=12, generator=gen(3))
    assert not torch.equal(r1.eigenvalues, r3.eigenvalues)
    blk = lanczos(A, 3, tol=1e-12, max_matvecs=14, block_size=4)
    assert blk.matvecs == 12  # a fourth block would pass the budget


def test_lanczos_invalid_input():
    A, _, _ = known(torch.arange(8.0), seed=12)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        lanczos(A, 0)
    with pytest.raises(ValueError, match="exceeds the operator dimension"):
        lanczos(A, 9)
    with pytest.raises(ValueError, match="which must be"):
        lanczos(A, 1, which="largest")
    with pytest.raises(ValueError, match=r"warm_start must have shape \(8, p\)"):
        lanczos(A, 1, warm_start=torch.ones(7, 2))
    with pytest.raises(ValueError, match="warm_start contains NaN"):
        lanczos(A, 1, warm_start=torch.full((8, 1), float("nan")))
    with pytest.raises(ValueError, match="block_size"):
        lanczos(A, 1, block_size=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        lanczos(A, 1, tol=0)
    with pytest.raises(ValueError, match="max_matvecs=2 is smaller"):
        lanczos(A, 3, max_matvecs=2)
    bad = A.clone()
    bad[0, 1] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        lanczos(bad, 1)
    with pytest.raises(ValueError, match="square"):
        lanczos(torch.ones(3, 4), 1)
    with pytest.raises(TypeError, match="cannot use"):
        lanczos([[1.0]], 1)


class NaNAfter:
    """A duck-typed operator that breaks after a few products."""

    def __init__(self, A: torch.Tensor, after: int, value: float = float("nan")) -> None:
        self.A, self.after, self.value, self.shape, self.dtype = A, after, value, tuple(A.shape), A.dtype
        self.calls = 0

    def matvec(self, v):
        self.calls += 1
        out = self.A @ v
        if self.calls > self.after:
            out[3] = self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_products_raise(value):
    A, _, _ = known(torch.linspace(0, 1, 20), seed=13)
    with pytest.raises(FloatingPointError, match="returned NaN/Inf"):
        lanczos(NaNAfter(A, 3, value), 2)
    with pytest.raises(ValueError, match="returned NaN/Inf"):
        hutchinson(NaNAfter(A, 0, value), 4)
    with pytest.raises(NonFiniteError):
        slq(NaNAfter(A, 5, value), 2, 10)


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------

class Duck:
    """Like landscape.functional.HessianOperator: shape, dtype, matvec, batched matmat, own counter."""

    def __init__(self, A: torch.Tensor, batched: bool = True) -> None:
        self.A, self.shape, self.dtype, self.matvecs, self.matmat_calls = A, tuple(A.shape), A.dtype, 0, 0
        if not batched:
            self.matmat = None

    def matvec(self, v):
        self.matvecs += 1
        return self.A @ v

    def matmat(self, V):  # noqa: F811 - replaced by None for the unbatched variant
        self.matvecs += V.shape[1]
        self.matmat_calls += 1
        return self.A @ V


def test_duck_operator_counts_and_batches():
    A, Q, lam = known(torch.cat([f64([7., 6, 5]), uniform(97, 0.0, 1.0, seed=14)]), seed=14)
    duck = Duck(A)
    op = as_operator(duck)
    assert isinstance(op, SymmetricOperator) and op.dim == 100 and op.dtype == torch.float64
    assert op.device == torch.device("cpu") and as_operator(op) is op
    res = lanczos(op, 3, tol=1e-10, warm_start=torch.randn(100, 3, generator=gen(0), dtype=torch.float64))
    assert res.matvecs == op.matvecs == duck.matvecs
    assert duck.matmat_calls == res.iterations  # one batched call per block step
    np.testing.assert_allclose(res.eigenvalues.numpy(), [7, 6, 5], rtol=1e-10)
    loop = Duck(A, batched=False)
    out = as_operator(loop).matmat(torch.eye(100, 4, dtype=torch.float64))
    np.testing.assert_allclose(out.numpy(), A[:, :4].numpy())
    assert loop.matvecs == 4


def test_operator_dtype_device_and_shape_checks():
    A, _, _ = known(torch.linspace(-1, 1, 10), seed=15)
    op = as_operator(A, dtype=torch.float32)
    assert op.dtype == torch.float32
    v = torch.ones(10, dtype=torch.float64)
    y = op.matvec(v)
    assert y.dtype == torch.float32 and op.matvecs == 1
    np.testing.assert_allclose(y.numpy(), (A @ v).numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        op.matvec(torch.ones(9))
    with pytest.raises(ValueError, match=r"\(10, p\)"):
        op.matmat(torch.ones(9, 2))
    assert op.matmat(torch.ones(10, 0)).shape == (10, 0) and op.matvecs == 1
    wrapped = as_operator(op, dtype=torch.float64)
    assert wrapped is not op and wrapped.matvec(v).dtype == torch.float64 and op.matvecs == 2

    class WrongShape(Duck):
        def matvec(self, v):
            return (self.A @ v)[:-1]

    with pytest.raises(ValueError, match="returned shape"):
        as_operator(WrongShape(A, batched=False)).matvec(v)


def test_scipy_roundtrip():
    lam = torch.cat([f64([12., 11, 9, 8.5, 8]), uniform(195, -2.0, 3.0, seed=16)])
    A, Q, lam = known(lam, seed=16)
    op = as_operator(A)
    lo = to_scipy(op)
    assert lo.shape == (200, 200) and lo.dtype == np.float64
    vals = np.sort(scipy.sparse.linalg.eigsh(lo, k=5, which="LA", tol=1e-12)[0])[::-1]
    assert op.matvecs > 0
    ours = lanczos(A, 5, tol=1e-10).eigenvalues.numpy()
    np.testing.assert_allclose(vals, ours, rtol=1e-10)
    np.testing.assert_allclose(ours, [12, 11, 9, 8.5, 8], rtol=1e-10)
    X = np.random.default_rng(0).standard_normal((200, 3))
    np.testing.assert_allclose(lo.matmat(X), A.numpy() @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lo.rmatvec(X[:, 0]), A.numpy() @ X[:, 0], rtol=1e-12, atol=1e-12)
    # and back: a scipy LinearOperator (float64 numpy) under lanczos, and a numpy array
    back = from_scipy(scipy.sparse.linalg.aslinearoperator(A.numpy()))
    res = lanczos(back, 5, tol=1e-10, block_size=2)
    np.testing.assert_allclose(res.eigenvalues.numpy(), [12, 11, 9, 8.5, 8], rtol=1e-10)
    assert back.matvecs == res.matvecs
    np.testing.assert_allclose(lanczos(A.numpy(), 5, tol=1e-10).eigenvalues.numpy(), ours, rtol=1e-12)
    sparse = scipy.sparse.diags([np.arange(1.0, 51.0)], [0])
    np.testing.assert_allclose(lanczos(sparse, 2, which="both", tol=1e-12).eigenvalues.numpy(), [50, 49, 1, 2])


def dense_transformed(A, s, h):
    return torch.diag(s) @ (A + torch.diag(h)) @ torch.diag(s)


def test_transformed_and_restricted_match_dense():
    lam = torch.cat([f64([6., 4, -3]), uniform(57, -1.0, 1.0, seed=17)])
    A, _, _ = known(lam, seed=17)
    g = gen(17)
    s = 0.5 + torch.rand(60, generator=g, dtype=torch.float64)
    h = torch.rand(60, generator=g, dtype=torch.float64)
    inner = as_operator(A)
    T = transformed(inner, s, h)
    D = dense_transformed(A, s, h)
    V = torch.randn(60, 4, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(T.matmat(V).numpy(), (D @ V).numpy(), rtol=1e-12, atol=1e-12)
    assert inner.matvecs == 4 and T.matvecs == 4
    res = lanczos(T, 2, which="both", tol=1e-12)
    ev = torch.linalg.eigvalsh(D)
    np.testing.assert_allclose(res.eigenvalues.numpy(), [ev[-1], ev[-2], ev[0], ev[1]], rtol=1e-10)
    np.testing.assert_allclose(transformed(A, s, 0.25).matvec(V[:, 0]).numpy(),
                               (dense_transformed(A, s, torch.full((60,), 0.25, dtype=torch.float64)) @ V[:, 0]).numpy(),
                               rtol=1e-12, atol=1e-12)
    idx = torch.tensor([3, 0, 17, 42, 59, 8])
    R = restricted(A, idx)
    sub = A[idx][:, idx]
    np.testing.assert_allclose(R.matmat(V[:6]).numpy(), (sub @ V[:6]).numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lanczos(R, 6, tol=1e-12).eigenvalues.numpy(), torch.linalg.eigvalsh(sub).flip(0).numpy(),
                               rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="repeated"):
        restricted(A, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="out of range"):
        restricted(A, torch.tensor([60]))
    with pytest.raises(ValueError, match="integer"):
        restricted(A, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"scale must have shape \(60,\)"):
        transformed(A, torch.ones(5))
    with pytest.raises(ValueError, match="shift must be"):
        transformed(A, s, torch.ones(5))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**31 - 1), st.data())
def test_transformed_restricted_property(d, seed, data):
    g = gen(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = M + M.T
    s = torch.rand(d, generator=g, dtype=torch.float64) + 0.1
    h = torch.randn(d, generator=g, dtype=torch.float64)
    idx = torch.tensor(data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True)))
    V = torch.randn(d, 3, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(transformed(A, s, h).matmat(V).numpy(), (dense_transformed(A, s, h) @ V).numpy(),
                               rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(transformed(A, s).matvec(V[:, 0]).numpy(), (s * (A @ (s * V[:, 0]))).numpy(),
                               rtol=1e-10, atol=1e-10)
    sub = A[idx][:, idx]
    W = V[: idx.numel()]
    np.testing.assert_allclose(restricted(A, idx).matmat(W).numpy(), (sub @ W).numpy(), rtol=1e-10, atol=1e-10)
    # composing: the restriction of a transformed operator is the transformed restriction
    both = restricted(transformed(A, s, h), idx)
    np.testing.assert_allclose(both.matmat(W).numpy(), (dense_transformed(A, s, h)[idx][:, idx] @ W).numpy(),
                               rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Trace
# ---------------------------------------------------------------------------------------------

def outliers_decay(d: int = 300, seed: int = 18):
    """Five outliers at 100 and a decaying bulk 20 / i: where Hutch++ pays off."""
    i = torch.arange(1, d - 4, dtype=torch.float64)
    return known(torch.cat([torch.full((5,), 100.0, dtype=torch.float64), 20 / i]), seed=seed)


def test_hutchinson_unbiased_and_stderr_honest():
    A, _, lam = known(uniform(200, -1.0, 3.0, seed=19), seed=19)
    tr = float(lam.sum())
    m, reps = 40, 300
    op = as_operator(A)
    est = [hutchinson(op, m, generator=gen(s)) for s in range(reps)]
    t = np.array([e.trace for e in est])
    se = np.array([e.stderr for e in est])
    assert all(e.matvecs == m and e.samples == m and e.method == "hutchinson" for e in est)
    # unbiased: the mean over repeats is within 3 standard errors of the truth
    assert abs(t.mean() - tr) < 3 * t.std(ddof=1) / math.sqrt(reps)
    # the spread matches the theory: Var = 2 (||A||_F^2 - sum A_ii^2) / m
    theory = math.sqrt(2 * (float((A ** 2).sum()) - float((torch.diagonal(A) ** 2).sum())) / m)
    assert 0.85 < t.std(ddof=1) / theory < 1.15
    # honest stderr: z-scores roughly N(0, 1)
    z = (t - tr) / se
    assert abs(z.mean()) < 0.2 and 0.85 < z.std(ddof=1) < 1.2
    assert 0.9 < np.mean(np.abs(z) < 1.96) / 0.95 < 1.05
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3


def test_hutchinson_blocks_do_not_change_the_answer():
    A, _, _ = outliers_decay(100)
    a = hutchinson(A, 37, generator=gen(1))
    b = hutchinson(A, 37, generator=gen(1), block=5)
    assert a.trace == pytest.approx(b.trace, rel=1e-12) and a.stderr == pytest.approx(b.stderr, rel=1e-9)
    one = hutchinson(A, 1)
    assert math.isnan(one.stderr)
    with pytest.raises(ValueError, match="matvecs >= 1"):
        hutchinson(A, 0)


def test_hutchpp_unbiased_and_exact_matvec_count():
    A, _, lam = outliers_decay()
    tr = float(lam.sum())
    op = as_operator(A)
    est = [hutchpp(op, 31, generator=gen(s)) for s in range(200)]
    assert op.matvecs == 200 * 31 and all(e.matvecs == 31 and e.samples == 11 for e in est)
    t = np.array([e.trace for e in est])
    assert abs(t.mean() - tr) < 3 * t.std(ddof=1) / math.sqrt(len(t))
    z = (t - tr) / np.array([e.stderr for e in est])
    assert 0.6 < z.std(ddof=1) < 1.6  # the residual part's stderr; Q's randomness is not in it
    with pytest.raises(ValueError, match="matvecs >= 3"):
        hutchpp(A, 2)
    # low rank: Q captures everything, the estimate is exact
    L, _, _ = known(torch.cat([f64([5.0, -2.0, 1.0]), torch.zeros(47)]), seed=20)
    assert hutchpp(L, 12).trace == pytest.approx(4.0, abs=1e-10)


def test_hutchpp_beats_hutchinson_on_outliers():
    A, _, lam = outliers_decay()
    op = as_operator(A)
    tr = float(lam.sum())

    def rms(fn, m):
        return math.sqrt(np.mean([(fn(op, m, generator=gen(s)).trace - tr) ** 2 for s in range(50)]))

    h99, p99 = rms(hutchinson, 99), rms(hutchpp, 99)
    assert p99 < h99 / 5, (p99, h99)
    assert p99 / tr < 0.01
    fall_h = rms(hutchinson, 30) / rms(hutchinson, 300)
    fall_p = rms(hutchpp, 30) / rms(hutchpp, 300)
    assert 1.5 < fall_h < 6.0  # ~sqrt(10): O(1/sqrt(m)) (50 repeats: the ratio itself is +-15%)
    assert fall_p > 2 * fall_h, (fall_p, fall_h)


# ---------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# ---------------------------------------------------------------------------------------------

def two_clusters(d: int = 300, seed: int = 21):
    """30% of the eigenvalues near -1, 70% near 5."""
    n1 = int(0.3 * d)
    lam = torch.cat([uniform(n1, -1.05, -0.95, seed), uniform(d - n1, 4.9, 5.1, seed + 1)])
    return known(lam, seed=seed)


def test_slq_two_clusters():
    A, _, lam = two_clusters()
    op = as_operator(A)
    res = slq(op, vectors=20, steps=40, generator=gen(0))
    assert res.nodes.shape == res.weights.shape and res.nodes.shape[0] == 20
    assert res.matvecs == op.matvecs <= 20 * 40
    np.testing.assert_allclose(res.weights.sum(1).numpy(), 1.0, atol=1e-12)
    assert bool((res.weights >= 0).all())
    lo, hi = float(lam.min()), float(lam.max())
    live = res.weights > 1e-14
    assert float(res.nodes[live].min()) >= lo - 1e-8 and float(res.nodes[live].max()) <= hi + 1e-8
    grid = np.linspace(-3, 7, 20001)
    dens = spectral_density(res.nodes, res.weights, grid)
    dx = grid[1] - grid[0]
    assert abs(dens.sum() * dx - 1) < 1e-3
    left = dens[grid < 2].sum() * dx
    assert abs(left - 0.3) < 0.03 and abs(dens[grid >= 2].sum() * dx - 0.7) < 0.03
    # flat input (already divided by n_v) gives the same density
    flat = spectral_density(res.nodes.flatten(), res.weights.flatten() / 20, grid)
    np.testing.assert_allclose(flat, dens, rtol=1e-12, atol=1e-12)
    tr = float(lam.sum())
    assert abs(slq_trace(res.nodes, res.weights, 300) - tr) < 0.05 * tr
    assert slq_trace(res.nodes.flatten(), res.weights.flatten() / 20, 300) == pytest.approx(
        slq_trace(res.nodes, res.weights, 300), rel=1e-12)


def test_slq_exact_quadrature_and_breakdown_padding():
    # 3 distinct eigenvalues (5 on u = (e1 - e2)/sqrt 2, -2 on e3, 1 elsewhere): every probe breaks
    # down after at most 3 steps and its quadrature is then exact: nodes = eigenvalues, weights =
    # squared projections of the probe on each eigenspace. A Rademacher probe with v1 == v2 misses u:
    # it stops after 2 steps and its row is padded with a weight-0 copy of its largest node.
    d = 8
    u = torch.zeros(d, dtype=torch.float64)
    u[0], u[1] = 1 / math.sqrt(2), -1 / math.sqrt(2)
    e3 = torch.zeros(d, dtype=torch.float64)
    e3[2] = 1.0
    P5, P2 = torch.outer(u, u), torch.outer(e3, e3)
    A = 5 * P5 - 2 * P2 + (torch.eye(d, dtype=torch.float64) - P5 - P2)
    nv = 12
    res = slq(A, vectors=nv, steps=30, generator=gen(1))
    # the probes are the generator's first draws, as (nv, d) rows of +-1
    probes = (torch.randint(0, 2, (nv, d), generator=gen(1)) * 2 - 1).to(torch.float64) / math.sqrt(d)
    assert res.nodes.shape == (nv, 3)
    short = 0
    for c in range(nv):
        v = probes[c]
        truth = {-2.0: float(v @ P2 @ v), 1.0: float(v @ v) - float(v @ P5 @ v) - float(v @ P2 @ v), 5.0: float(v @ P5 @ v)}
        live = res.weights[c] > 0
        if truth[5.0] == 0:
            short += 1
            assert int(live.sum()) == 2 and float(res.weights[c, 2]) == 0.0
            assert float(res.nodes[c, 2]) == float(res.nodes[c, :2].max())
        for x, w in zip(res.nodes[c][live].tolist(), res.weights[c][live].tolist()):
            lam = min(truth, key=lambda t: abs(t - x))
            assert x == pytest.approx(lam, abs=1e-12) and w == pytest.approx(truth[lam], abs=1e-12)
    assert 0 < short < nv
    assert res.matvecs == 3 * nv - short


def test_slq_steps_capped_at_dimension_and_density_defaults():
    A, _, lam = known(torch.linspace(-2, 2, 12, dtype=torch.float64), seed=23)
    res = slq(A, vectors=3, steps=50)
    assert res.nodes.shape == (3, 12)
    # 12 steps on a 12-dim space: every node is an eigenvalue
    for c in range(3):
        np.testing.assert_allclose(np.sort(res.nodes[c].numpy()), lam.numpy(), atol=1e-10)
    d1 = slq(torch.tensor([[3.0]], dtype=torch.float64), 2, 5)
    np.testing.assert_allclose(d1.nodes.numpy(), [[3.0], [3.0]])
    grid = np.linspace(-10, 10, 40001)
    dens = spectral_density(res.nodes, res.weights, grid)
    assert abs(dens.sum() * (grid[1] - grid[0]) - 1) < 1e-6
    wide = spectral_density(res.nodes, res.weights, grid, sigma2=0.5)
    assert abs(wide.sum() * (grid[1] - grid[0]) - 1) < 1e-6 and wide.max() < dens.max()
    with pytest.raises(ValueError, match="sigma2 must be > 0"):
        spectral_density(res.nodes, res.weights, grid, sigma2=0.0)
    with pytest.raises(ValueError, match="same shape"):
        spectral_density(res.nodes, res.weights[:, :3], grid)
    with pytest.raises(ValueError, match="vectors >= 1"):
        slq(A, 0)
    with pytest.raises(ValueError, match="steps >= 1"):
        slq(A, 1, 0)


def test_spectral_density_sorted_and_unsorted_grids_agree():
    nodes = f64([[-1.0, 0.5, 2.0], [0.0, 0.4, 3.0]])
    weights = f64([[0.2, 0.5, 0.3], [0.6, 0.4, 0.0]])
    grid = np.linspace(-2, 4, 601)
    sorted_d = spectral_density(nodes, weights, grid, sigma2=0.01)
    perm = np.random.default_rng(0).permutation(grid.size)
    np.testing.assert_allclose(spectral_density(nodes, weights, grid[perm], sigma2=0.01), sorted_d[perm],
                               rtol=1e-12, atol=1e-14)
    # by hand at one point
    t = 0.45
    by_hand = sum(w * math.exp(-0.5 * (t - x) ** 2 / 0.01) / math.sqrt(2 * math.pi * 0.01)
                  for x, w in zip(nodes.flatten().tolist(), (weights.flatten() / 2).tolist()))
    assert spectral_density(nodes, weights, [t], sigma2=0.01)[0] == pytest.approx(by_hand, rel=1e-12)
    assert spectral_density(nodes, weights, grid, sigma2=0.01).sum() * 0.01 == pytest.approx(1.0, abs=1e-6)
