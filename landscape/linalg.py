"""Layer 2: matrix-free numerics that know nothing about models.

Everything here works on "a function v -> Av" for a symmetric A (see :func:`as_operator`):

- :class:`GaussianSketch`: the seeded Gaussian sketch used to store large trajectories compactly;
- :func:`lanczos`: extreme eigenpairs (block Lanczos, full reorthogonalisation, warm starts);
- :func:`hutchinson`, :func:`hutchpp`: trace estimates;
- :func:`slq`, :func:`spectral_density`, :func:`slq_trace`: stochastic Lanczos quadrature;
- :func:`transformed`, :func:`restricted`: preconditioned and per-block operators.

Random vectors always come from an explicit ``torch.Generator`` (default: a fresh one seeded 0),
never from the global RNG, so a measurement does not perturb the training it observes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg
import torch
from torch import Tensor


class GaussianSketch:
    """A seeded Gaussian random projection S = G / sqrt(k), G_ij ~ N(0, 1), of shape (k, d).

    Inner products are preserved in expectation: E<Sx, Sy> = <x, y>, with variance
    (|x|^2 |y|^2 + <x, y>^2) / k. What that means for the secant quantities (standard deviations,
    with gamma = cos(g, w - w*)):

    - gamma:      absolute error ~ (1 - gamma^2) / sqrt(k)   (it cannot resolve |gamma| << 1/sqrt(k))
    - EB, norms:  relative error ~ sqrt((1 - gamma^2) / k) <= 1 / sqrt(k)
    - RSI:        absolute error ~ EB * sqrt(1 - gamma^2) / sqrt(k) <= EB / sqrt(k)

    S is generated block by block from ``seed`` on the CPU generator (columns in blocks of
    ``block``), so a given (k, d, seed, block) gives the same S on every machine and device, and
    memory stays at one block when the whole of S (k*d*4 bytes) exceeds ``cache_bytes``.
    """

    def __init__(self, k: int, d: int, seed: int = 0, *, block: int = 65536, cache_bytes: int = 256 * 2**20,
                 device: torch.device | str = "cpu") -> None:
        if k < 1:
            raise ValueError(f"sketch dimension k must be >= 1, got {k}")
        if k >= d:
            raise ValueError(f"sketch dimension k={k} must be smaller than the parameter count d={d}: store full vectors instead")
        self.k, self.d, self.seed, self.block = int(k), int(d), int(seed), int(block)
        self.device = torch.device(device)
        self._cache: list[Tensor] | None = None
        if self.k * self.d * 4 <= cache_bytes:
            self._cache = [self._block(i) for i in range(self._nblocks)]

    @property
    def _nblocks(self) -> int:
        return math.ceil(self.d / self.block)

    def _block(self, i: int) -> Tensor:
        lo = i * self.block
        width = min(self.block, self.d - lo)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        g = torch.randn(self.k, width, generator=gen, dtype=torch.float32)
        return (g / math.sqrt(self.k)).to(self.device)

    def __call__(self, x: Tensor) -> Tensor:
        """Sketch a vector (d,) -> (k,) or a batch (..., d) -> (..., k), in float32."""
        if x.shape[-1] != self.d:
            raise ValueError(f"sketch expects vectors of length {self.d}, got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        out = torch.zeros(*x.shape[:-1], self.k, dtype=torch.float32, device=self.device)
        for i in range(self._nblocks):
            S = self._cache[i] if self._cache is not None else self._block(i)
            lo = i * self.block
            out += x[..., lo:lo + S.shape[1]] @ S.T
        return out

    def describe(self) -> dict[str, int | str]:
        """JSON-able settings stored with the sketched data."""
        return {"kind": "gaussian", "k": self.k, "d": self.d, "seed": self.seed, "block": self.block}


# ---------------------------------------------------------------------------------------------
# Symmetric operators: everything below works on "a function v -> Av" and counts the products.
# ---------------------------------------------------------------------------------------------

_MATVEC = Callable[[Tensor], Tensor]


class NonFiniteError(FloatingPointError, ValueError):
    """The operator returned NaN or Inf (caught as FloatingPointError or ValueError)."""


class SymmetricOperator:
    """A symmetric (d, d) operator seen only through products, with a product counter.

    Vectors go in and come out in ``dtype`` on ``device``; ``matvecs`` counts products (a matmat
    of p columns counts p). Every product is checked for NaN/Inf, because one bad product silently
    poisons a whole Krylov basis.
    """

    def __init__(self, dim: int, matvec: _MATVEC, matmat: _MATVEC | None = None, *, dtype: torch.dtype,
                 device: torch.device | str, name: str = "operator") -> None:
        if dim < 1:
            raise ValueError(f"operator dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.matvecs = 0
        self.name = name
        self._matvec = matvec
        self._matmat = matmat

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def __repr__(self) -> str:
        return (f"SymmetricOperator({self.name}, dim={self.dim}, dtype={self.dtype}, device={self.device}, "
                f"matvecs={self.matvecs})")

    def _check(self, out: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(f"{self.name}.{what} returned {type(out).__name__}, expected a torch.Tensor")
        if tuple(out.shape) != shape:
            raise ValueError(f"{self.name}.{what} returned shape {tuple(out.shape)}, expected {shape}")
        out = out.detach().to(dtype=self.dtype, device=self.device)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(f"the operator ({self.name}) returned NaN/Inf in {what}")
        return out

    def matvec(self, v: Tensor) -> Tensor:
        """A v for one vector (d,) -> (d,)."""
        if v.shape != (self.dim,):
            raise ValueError(f"matvec expects a vector of shape ({self.dim},), got {tuple(v.shape)}")
        v = v.to(dtype=self.dtype, device=self.device)
        out = self._matvec(v)
        self.matvecs += 1
        return self._check(out, (self.dim,), "matvec")

    def matmat(self, V: Tensor) -> Tensor:
        """A V for a block (d, p) -> (d, p): the wrapped matmat (batched) when there is one, else a loop."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise ValueError(f"matmat expects a ({self.dim}, p) matrix, got {tuple(V.shape)}")
        p = V.shape[1]
        V = V.to(dtype=self.dtype, device=self.device)
        if p == 0:
            return V.clone()
        if self._matmat is not None:
            out = self._matmat(V)
        else:
            out = torch.stack([self._matvec(V[:, j]) for j in range(p)], dim=1)
        self.matvecs += p
        return self._check(out, (self.dim, p), "matmat")


def _native(op: Any) -> tuple[torch.dtype, torch.device]:
    dtype = getattr(op, "dtype", None)
    device = getattr(op, "device", None)
    return (dtype if isinstance(dtype, torch.dtype) else torch.get_default_dtype(),
            torch.device(device) if isinstance(device, (str, torch.device)) else torch.device("cpu"))


def _square_dim(shape: Any, what: str) -> int:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError as err:
        raise TypeError(f"{what}: .shape must be a (d, d) tuple, got {shape!r}") from err
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"{what} must be square (d, d), got shape {shape}")
    return shape[0]


def _from_dense(A: Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> SymmetricOperator:
    d = _square_dim(A.shape, "dense operator")
    if not A.is_floating_point():
        A = A.to(torch.get_default_dtype())
    A = A.detach().to(dtype=dtype or A.dtype, device=device or A.device)
    if not bool(torch.isfinite(A).all()):
        raise ValueError("dense operator contains NaN/Inf")
    scale = float(A.abs().max()) if A.numel() else 0.0
    # sqrt(eps): loose enough for Q diag(l) Q^T rounded in float32, tight enough to catch a real asymmetry
    if float((A - A.T).abs().max()) > math.sqrt(torch.finfo(A.dtype).eps) * max(scale, 1e-30):
        raise ValueError("dense operator is not symmetric: these routines need A == A.T")
    return SymmetricOperator(d, lambda v: A @ v, lambda V: A @ V, dtype=A.dtype, device=A.device, name="dense")


def _from_scipy_lo(lo: scipy.sparse.linalg.LinearOperator, dtype: torch.dtype | None,
                   device: torch.device | str | None) -> SymmetricOperator:
    d = _square_dim(lo.shape, "LinearOperator")
    dtype = dtype or torch.float64
    device = torch.device(device or "cpu")

    def mv(v: Tensor) -> Tensor:
        y = lo.matvec(v.detach().to("cpu", torch.float64).numpy())
        return torch.from_numpy(np.asarray(y, dtype=np.float64).reshape(d)).to(dtype=dtype, device=device)

    def mm(V: Tensor) -> Tensor:
        Y = lo.matmat(V.detach().to("cpu", torch.float64).numpy())
        return torch.from_numpy(np.asarray(Y, dtype=np.float64).reshape(d, V.shape[1])).to(dtype=dtype, device=device)

    return SymmetricOperator(d, mv, mm, dtype=dtype, device=device, name=type(lo).__name__)


def as_operator(op: Any, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None) -> SymmetricOperator:
    """Normalise ``op`` into a :class:`SymmetricOperator`.

    Accepted: a dense symmetric torch Tensor or numpy array (d, d), a scipy sparse matrix or
    ``LinearOperator`` (computed in float64 numpy), any object with ``.shape`` (d, d) and
    ``.matvec`` (optionally ``.matmat``, ``.dtype``, ``.device``), or a SymmetricOperator (returned
    as is unless ``dtype``/``device`` ask for another one, then wrapped). ``dtype``/``device``: in
    what the returned operator takes and gives vectors (default: the wrapped object's own).
    """
    if isinstance(op, SymmetricOperator):
        if (dtype is None or dtype == op.dtype) and (device is None or torch.device(device) == op.device):
            return op
        return SymmetricOperator(op.dim, op.matvec, op.matmat, dtype=dtype or op.dtype, device=device or op.device,
                                 name=op.name)
    if isinstance(op, Tensor):
        return _from_dense(op, dtype, device)
    if isinstance(op, np.ndarray):
        if op.dtype.kind not in "fiub":
            raise TypeError(f"numpy operator must be real, got dtype {op.dtype}")
        return _from_dense(torch.from_numpy(np.ascontiguousarray(op, dtype=np.float64)), dtype, device)
    if scipy.sparse.issparse(op):
        return _from_scipy_lo(scipy.sparse.linalg.aslinearoperator(op), dtype, device)
    if isinstance(op, scipy.sparse.linalg.LinearOperator):
        return _from_scipy_lo(op, dtype, device)
    if hasattr(op, "matvec") and hasattr(op, "shape"):
        d = _square_dim(op.shape, type(op).__name__)
        n_dtype, n_device = _native(op)
        out_dtype, out_device = dtype or n_dtype, torch.device(device or n_device)

        def mv(v: Tensor) -> Tensor:
            return op.matvec(v.to(dtype=n_dtype, device=n_device))

        mm = None
        if callable(getattr(op, "matmat", None)):
            def mm(V: Tensor) -> Tensor:
                return op.matmat(V.to(dtype=n_dtype, device=n_device))

        return SymmetricOperator(d, mv, mm, dtype=out_dtype, device=out_device, name=type(op).__name__)
    raise TypeError(f"cannot use {type(op).__name__} as an operator: pass a symmetric Tensor/ndarray, a scipy "
                    "LinearOperator, or an object with .shape and .matvec")


def from_scipy(lo: scipy.sparse.linalg.LinearOperator) -> SymmetricOperator:
    """A scipy ``LinearOperator`` (or sparse matrix) as a SymmetricOperator (float64)."""
    return as_operator(lo)


def to_scipy(op: Any) -> scipy.sparse.linalg.LinearOperator:
    """``op`` as a float64 scipy ``LinearOperator`` (matvec, matmat; rmatvec = matvec by symmetry).

    Products go through (and are counted by) ``as_operator(op)``, kept as ``.operator``.
    """
    A = as_operator(op)

    def mv(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(A.dim))
        return A.matvec(v.to(dtype=A.dtype, device=A.device)).detach().to("cpu", torch.float64).numpy()

    def mm(X: np.ndarray) -> np.ndarray:
        V = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
        return A.matmat(V.to(dtype=A.dtype, device=A.device)).detach().to("cpu", torch.float64).numpy()

    lo = scipy.sparse.linalg.LinearOperator((A.dim, A.dim), matvec=mv, rmatvec=mv, matmat=mm, rmatmat=mm,
                                            dtype=np.float64)
    lo.operator = A
    return lo


def transformed(op: Any, scale: Tensor, shift: Tensor | float | None = None) -> SymmetricOperator:
    """D^{1/2} (A + diag(shift)) D^{1/2} with D^{1/2} = diag(scale): v -> s * (A(s v) + shift s v).

    E.g. preconditioned sharpness with s = P^{-1/2}. Batched products go through A's matmat.
    """
    A = as_operator(op)
    s = torch.as_tensor(scale).to(dtype=A.dtype, device=A.device)
    if s.shape != (A.dim,):
        raise ValueError(f"scale must have shape ({A.dim},), got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scale contains NaN/Inf")
    h: Tensor | None = None
    if shift is not None:
        h = torch.as_tensor(shift).to(dtype=A.dtype, device=A.device)
        if h.dim() == 0:
            h = h.expand(A.dim)
        if h.shape != (A.dim,):
            raise ValueError(f"shift must be a scalar or have shape ({A.dim},), got {tuple(h.shape)}")

    def mv(v: Tensor) -> Tensor:
        sv = s * v
        out = A.matvec(sv)
        return s * (out + h * sv) if h is not None else s * out

    def mm(V: Tensor) -> Tensor:
        sV = s[:, None] * V
        out = A.matmat(sV)
        return s[:, None] * (out + h[:, None] * sV) if h is not None else s[:, None] * out

    return SymmetricOperator(A.dim, mv, mm, dtype=A.dtype, device=A.device, name=f"transformed({A.name})")


def restricted(op: Any, index: Tensor) -> SymmetricOperator:
    """The diagonal block A[index][:, index] (n, n): embed into zeros of length d, apply, gather."""
    A = as_operator(op)
    idx = torch.as_tensor(index)
    if idx.dim() != 1 or idx.numel() == 0 or idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError(f"index must be a non-empty 1-D integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
    idx = idx.to(dtype=torch.long, device=A.device)
    if int(idx.min()) < 0 or int(idx.max()) >= A.dim:
        raise ValueError(f"index out of range for an operator of dimension {A.dim}")
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError("index has repeated entries: a restriction needs distinct coordinates")
    n = idx.numel()

    def mv(v: Tensor) -> Tensor:
        z = torch.zeros(A.dim, dtype=A.dtype, device=A.device)
        z[idx] = v
        return A.matvec(z)[idx]

    def mm(V: Tensor) -> Tensor:
        Z = torch.zeros(A.dim, V.shape[1], dtype=A.dtype, device=A.device)
        Z[idx] = V
        return A.matmat(Z)[idx]

    return SymmetricOperator(n, mv, mm, dtype=A.dtype, device=A.device, name=f"restricted({A.name})")


# ---------------------------------------------------------------------------------------------
# Random vectors (always from an explicit generator, never the global RNG)
# ---------------------------------------------------------------------------------------------

def _generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _randn(gen: torch.Generator, d: int, p: int, A: SymmetricOperator) -> Tensor:
    # drawn as (p, d) so each vector is a contiguous run of the stream, whatever the blocking
    return torch.randn(p, d, generator=gen, dtype=A.dtype, device=gen.device).T.to(device=A.device)


def _rademacher(gen: torch.Generator, d: int, p: int, A: SymmetricOperator) -> Tensor:
    x = torch.randint(0, 2, (p, d), generator=gen, device=gen.device).to(A.dtype).mul_(2).sub_(1)
    return x.T.to(device=A.device)


# ---------------------------------------------------------------------------------------------
# Orthogonalisation helpers
# ---------------------------------------------------------------------------------------------

def _project_out(V: Tensor, W: Tensor) -> tuple[Tensor, Tensor]:
    """W - V V^T W by classical Gram-Schmidt twice (a third pass only for columns that lost more
    than half their norm in the second: Kahan-Parlett "twice is enough" needs that check).
    Returns the projected block and the accumulated coefficients V^T W (float64, CPU)."""
    m, p = V.shape[1], W.shape[1]
    C = torch.zeros(m, p, dtype=torch.float64)
    if m == 0 or p == 0:
        return W, C
    prev = torch.linalg.vector_norm(W, dim=0)
    for it in range(3):
        c = V.T @ W
        W = W - V @ c
        C += c.to("cpu", torch.float64)
        if it == 1:
            now = torch.linalg.vector_norm(W, dim=0)
            if not bool((now < 0.5 * prev).any()):
                break
        elif it == 0:
            prev = torch.linalg.vector_norm(W, dim=0)
    return W, C


def _new_directions(V: Tensor, W: Tensor, tiny: Tensor, gen: torch.Generator,
                    A: SymmetricOperator) -> tuple[Tensor, np.ndarray, int]:
    """Orthonormalise the columns of W (already orthogonal to V) one by one.

    A column whose norm is <= tiny (the Krylov space is invariant there: breakdown) is replaced by
    a fresh random vector orthogonal to everything so far, so the block keeps its size; when the
    space is exhausted (d directions) it is dropped. Returns Q (d, q), B (q, p) float64 with
    W ~= Q B (exact up to the dropped parts, each <= tiny), and how many columns were replaced.
    """
    d, p = W.shape
    replaced = 0
    cols: list[Tensor] = []
    B = np.zeros((p, p))
    for c in range(p):
        w = W[:, c:c + 1]
        before = float(torch.linalg.vector_norm(w))
        if cols:
            w, cc = _project_out(torch.cat(cols, dim=1), w)
            B[:len(cols), c] = cc[:, 0].numpy()
        n = float(torch.linalg.vector_norm(w))
        if n > float(tiny[c]):
            if cols and n < 0.5 * before:
                # heavy cancellation within the block can bring back components along V
                w, _ = _project_out(V, w)
                n = float(torch.linalg.vector_norm(w))
            B[len(cols), c] = n
            cols.append(w / n)
        elif V.shape[1] + len(cols) < d:
            z = _randn(gen, d, 1, A)
            z, _ = _project_out(V, z)
            if cols:
                z, _ = _project_out(torch.cat(cols, dim=1), z)
                z, _ = _project_out(V, z)
            z = z / torch.linalg.vector_norm(z)
            B[len(cols), c] = float((z.T @ w).item())
            cols.append(z)
            replaced += 1
    q = len(cols)
    Q = torch.cat(cols, dim=1) if cols else W.new_zeros(d, 0)
    return Q, B[:q], replaced


class _Basis:
    """Krylov basis (d, m) in the operator's dtype, grown by doubling (amortised O(d m) copies)."""

    def __init__(self, d: int, dtype: torch.dtype, device: torch.device) -> None:
        self.data = torch.empty(d, 0, dtype=dtype, device=device)
        self.size = 0

    def view(self) -> Tensor:
        return self.data[:, :self.size]

    def append(self, Q: Tensor) -> None:
        need = self.size + Q.shape[1]
        if need > self.data.shape[1]:
            cap = min(self.data.shape[0], max(need, 2 * self.data.shape[1], 8))
            grown = torch.empty(self.data.shape[0], max(cap, need), dtype=self.data.dtype, device=self.data.device)
            grown[:, :self.size] = self.view()
            self.data = grown
        self.data[:, self.size:need] = Q
        self.size = need


# ---------------------------------------------------------------------------------------------
# Lanczos
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class LanczosResult:
    """Ritz pairs: top-k descending, then (which="both") bottom-k ascending."""
    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    error_bounds: Tensor
    converged: Tensor
    kind: tuple[str, ...]
    matvecs: int
    iterations: int


def _band(T: np.ndarray, bw: int) -> np.ndarray:
    m = T.shape[0]
    ab = np.zeros((bw + 1, m))
    for i in range(min(bw, m - 1) + 1):
        ab[i, :m - i] = np.diagonal(T, -i)
    return ab


def _ritz(T: np.ndarray, bw: int, k: int, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All Ritz values (ascending) plus the wanted ones and their eigenvectors of T (in output order)."""
    m = T.shape[0]
    ab = _band(T, bw)
    k = min(k, m)
    # eig_banded with a selected range: O(m^2 bw) instead of a dense O(m^3) eigh at every step
    if m <= 4 * k + 8:
        theta, S = scipy.linalg.eig_banded(ab, lower=True)
        ranges = {"top": [np.arange(m - 1, m - k - 1, -1)], "bottom": [np.arange(k)],
                  "both": [np.arange(m - 1, m - k - 1, -1), np.arange(k)]}[which]
        idx = np.concatenate(ranges)
        return theta, idx, S[:, idx]
    theta = scipy.linalg.eig_banded(ab, lower=True, eigvals_only=True)
    parts_idx, parts_vec = [], []
    if which in ("top", "both"):
        _, S = scipy.linalg.eig_banded(ab, lower=True, select="i", select_range=(m - k, m - 1))
        parts_idx.append(np.arange(m - 1, m - k - 1, -1))
        parts_vec.append(S[:, ::-1])
    if which in ("bottom", "both"):
        _, S = scipy.linalg.eig_banded(ab, lower=True, select="i", select_range=(0, k - 1))
        parts_idx.append(np.arange(k))
        parts_vec.append(S)
    return theta, np.concatenate(parts_idx), np.concatenate(parts_vec, axis=1)


def _epoch_state(T: np.ndarray, e0: int, s: int, B: np.ndarray, bw: int, theta: np.ndarray, idx: np.ndarray,
                 k: int, which: str, tol: float, breakdown: bool, steps: int) -> str:
    """Where the random restart that began at basis index e0 stands (T is block diagonal there).

    "renew": it broke down in turn after adding wanted values (a multiple eigenvalue may have more
    copies: restart again); "settled": it broke down without changing the wanted values, or its own
    extreme Ritz value(s) converged (loosely: only the side of the wanted set matters), or after 3
    steps they stay below the wanted set even moved by their residual (a hidden outlier would have
    pushed them up by then); "pending": none of these yet.
    """
    th, ix, S = _ritz(T[e0:, e0:], bw, 1, which)
    big = np.abs(theta).max()
    wanted = theta[idx]
    slack = tol * big  # ties with the edge of the wanted set change no value
    if which == "bottom":
        adds = th[ix[0]] < wanted[:k].max() - slack
    else:
        adds = th[ix[0]] > wanted[:k].min() + slack
        if which == "both":
            adds = adds or th[ix[-1]] < wanted[k:].max() - slack
    if breakdown:
        return "renew" if adds else "settled"
    res = np.linalg.norm(B @ S[s - e0:], axis=0) if B.shape[0] else np.zeros(ix.size)
    bound = _error_bounds(res, th, ix)
    if bool((bound <= max(tol, 1e-3) * np.maximum(np.abs(th[ix]), 1e-2 * big)).all()):
        return "settled"
    if steps >= 3:
        clear = th[ix[0]] - res[0] > wanted[:k].max() + slack if which == "bottom" else \
            th[ix[0]] + res[0] < wanted[:k].min() - slack
        if which == "both":
            clear = clear and th[ix[-1]] - res[-1] > wanted[k:].max() + slack
        if clear:
            return "settled"
    return "pending"


def _error_bounds(res: np.ndarray, theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """min(r, r^2 / gap), gap = distance to the nearest other Ritz value (r alone when there is none)."""
    gap = _gaps(theta, idx)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.isfinite(gap) & (gap > 0), np.minimum(res, res ** 2 / gap), res)


def _gaps(theta: np.ndarray, idx: np.ndarray) -> np.ndarray:
    m = theta.size
    gap = np.full(idx.size, np.inf)
    for n, i in enumerate(idx):
        if i > 0:
            gap[n] = min(gap[n], theta[i] - theta[i - 1])
        if i < m - 1:
            gap[n] = min(gap[n], theta[i + 1] - theta[i])
    return gap


def _as_block(x: Tensor, d: int, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[0] != d or x.shape[1] < 1:
        raise ValueError(f"{what} must have shape ({d}, p) with p >= 1 (or ({d},)), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN/Inf")
    return x


def lanczos(op: Any, k: int = 1, *, which: Literal["top", "bottom", "both"] = "top", tol: float = 1e-6,
            max_matvecs: int | None = None, warm_start: Tensor | None = None, extra_random: int = 1,
            block_size: int = 1, generator: torch.Generator | None = None) -> LanczosResult:
    """Extreme eigenpairs of a symmetric operator by (block) Lanczos with full reorthogonalisation.

    Cold start: one random unit vector (``block_size`` > 1: a random block) from ``generator``
    (default: a fresh ``torch.Generator().manual_seed(0)``; the global RNG is never touched).
    Warm start: the block is [``warm_start``, ``extra_random`` random vectors] orthonormalised (at
    least ``block_size`` columns), and every step is one batched ``matmat`` of the whole block.

    Value i is converged when min(r_i, r_i^2 / gap_i) <= tol * max(|theta_i|, 1e-2 max_j |theta_j|),
    r_i the Ritz residual from the recurrence and gap_i the distance to the nearest other Ritz value.
    Stops when the wanted k (k top and k bottom for "both") are converged, when the next block would
    exceed ``max_matvecs`` (default min(d, max(30 n, 100)), n = k or 2k), or when the Krylov space is
    the whole space (then the Ritz pairs are exact).

    Breakdown (the basis spans an invariant subspace, residual block ~ 0): the Ritz pairs are exact
    but may not be the extreme ones (a multiple eigenvalue shows once per Krylov space; a warm start
    may span the wrong subspace), so the iteration goes on from fresh random vectors orthogonal to
    the basis until that restart settles: it breaks down in turn without adding wanted values, or
    its own extreme Ritz values converge outside the wanted set. Small d (e.g. 10) thus returns
    exact eigenpairs with their multiplicities. Without a breakdown, single-vector Lanczos
    (``block_size=1``) sees one direction per eigenspace, so an exactly repeated eigenvalue shows
    once: to resolve multiplicity m use ``block_size >= m`` (or a warm start with m vectors).

    Warm starts cost at least one block (k + extra_random products); they beat a cold start when
    the change since the vectors were computed is small enough for 1-2 block steps and the cold
    run needs many steps (top eigenvalues close to each other or to a dense bulk). When a cold run
    needs only ~2k-3k products (well separated outliers), a block cannot beat it by 3x; a
    single-vector warm start, ``warm_start=V.sum(1), extra_random=0``, is then often cheaper.
    """
    if which not in ("top", "bottom", "both"):
        raise ValueError(f"which must be 'top', 'bottom' or 'both', got {which!r}")
    A = as_operator(op)
    d = A.dim
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > d:
        raise ValueError(f"k={k} exceeds the operator dimension d={d}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if block_size < 1 or block_size > d:
        raise ValueError(f"block_size must be in [1, d={d}], got {block_size}")
    if extra_random < 0:
        raise ValueError(f"extra_random must be >= 0, got {extra_random}")
    n_want = k if which != "both" else 2 * k
    if max_matvecs is None:
        max_matvecs = min(d, max(30 * n_want, 100))
    gen = _generator(generator)

    if warm_start is not None:
        X = _as_block(warm_start, d, "warm_start")
        if X.shape[1] > d:
            raise ValueError(f"warm_start has {X.shape[1]} columns, more than the dimension d={d}")
        X = X.to(dtype=A.dtype, device=A.device)
        n_rand = min(max(extra_random, block_size - X.shape[1]), d - X.shape[1])
        start = torch.cat([X, _randn(gen, d, n_rand, A)], dim=1)
    else:
        start = _randn(gen, d, block_size, A)
    if max_matvecs < max(k, start.shape[1]):
        raise ValueError(f"max_matvecs={max_matvecs} is smaller than k={k} or the first block ({start.shape[1]} "
                         "vectors)")

    eps = torch.finfo(A.dtype).eps
    V = _Basis(d, A.dtype, A.device)
    Q, _, _ = _new_directions(V.view(), start, 16 * eps * torch.linalg.vector_norm(start, dim=0).cpu(), gen, A)
    V.append(Q)
    T = np.zeros((0, 0))
    bw = Q.shape[1]
    s, s_prev, B_prev = 0, 0, None
    used, steps, anorm = 0, 0, 0.0
    epoch: int | None = None  # where the random restart after the last full breakdown began, until settled
    epoch_steps = 0
    while True:
        p = Q.shape[1]
        e = s + p
        W = A.matmat(Q)
        used += p
        steps += 1
        anorm = max(anorm, float(torch.linalg.vector_norm(W, dim=0).max()))
        R, C = _project_out(V.view(), W)
        grown = np.zeros((e, e))
        grown[:s, :s] = T
        T = grown
        alpha = C[s:e].numpy()
        T[s:e, s:e] = 0.5 * (alpha + alpha.T)
        if B_prev is not None:
            # block tridiagonal: the coefficients against older blocks are reorthogonalisation noise
            T[s:e, s_prev:s] = B_prev
            T[s_prev:s, s:e] = B_prev.T
        Qn, B, replaced = _new_directions(V.view(), R, torch.full((p,), 16 * eps * anorm), gen, A)

        theta, idx, S = _ritz(T, bw, k, which)
        # Ritz residuals from the recurrence: A V = V T + Q_next B E^T, so r_i = ||B S[last block, i]||
        res = np.linalg.norm(B @ S[s:e], axis=0) if B.shape[0] else np.zeros(idx.size)
        bound = _error_bounds(res, theta, idx)
        scale = np.maximum(np.abs(theta[idx]), 1e-2 * np.abs(theta).max())
        # with fewer Ritz values than wanted, top and bottom overlap: nothing counts as converged yet
        conv = (bound <= tol * scale) & (e >= min(n_want, d))
        all_conv = bool(conv.all())
        # Full breakdown: the basis spans an invariant subspace (to ~sqrt(eps)), so its Ritz pairs are
        # exact, but it may miss eigenvectors: a multiple eigenvalue shows once per Krylov space, a
        # warm start sees only its own subspace. The next block (random) explores the complement;
        # the answer stands once that restart has settled without changing the wanted values.
        breakdown = Qn.shape[1] > 0 and (replaced == Qn.shape[1] or float(np.linalg.norm(B)) <= math.sqrt(eps) * anorm)
        if epoch is None:
            done = all_conv and not breakdown
            if breakdown:
                epoch, epoch_steps = e, 0
        else:
            epoch_steps += 1
            state = _epoch_state(T, epoch, s, B, bw, theta, idx, k, which, tol, breakdown, epoch_steps)
            if state == "settled":
                epoch = None
            elif state == "renew":
                epoch, epoch_steps = e, 0
            done = all_conv and epoch is None
        if done or Qn.shape[1] == 0 or used + Qn.shape[1] > max_matvecs:
            break
        V.append(Qn)
        bw = max(bw, Qn.shape[1])
        B_prev, s_prev, s, Q = B, s, e, Qn

    Y = V.view() @ torch.from_numpy(np.ascontiguousarray(S)).to(dtype=A.dtype, device=A.device)
    kind = ("top",) * k + ("bottom",) * k if which == "both" else (which,) * k
    return LanczosResult(
        eigenvalues=torch.from_numpy(theta[idx].copy()), eigenvectors=Y, residuals=torch.from_numpy(res),
        error_bounds=torch.from_numpy(bound), converged=torch.from_numpy(conv), kind=kind, matvecs=used,
        iterations=steps)


# ---------------------------------------------------------------------------------------------
# Trace estimation
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TraceEstimate:
    trace: float
    stderr: float
    matvecs: int
    method: str
    samples: int


def _mean_stderr(x: Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = float(x.mean())
    # one sample has no spread to estimate: nan, not a fake 0
    return mean, float(x.std(correction=1)) / math.sqrt(n) if n > 1 else float("nan")


def hutchinson(op: Any, matvecs: int, *, generator: torch.Generator | None = None,
               block: int | None = None) -> TraceEstimate:
    """Hutchinson's trace estimate with Rademacher vectors: mean of v^T A v over ``matvecs`` vectors.

    stderr = sample std (ddof=1) / sqrt(m) (nan for m = 1). Products go through ``matmat`` in blocks
    of ``block`` vectors (default: all at once, capped at ~64 MB of vectors per block); the vectors
    do not depend on the blocking.
    """
    A = as_operator(op)
    if matvecs < 1:
        raise ValueError(f"hutchinson needs matvecs >= 1, got {matvecs}")
    if block is None:
        block = max(1, (64 * 2**20) // (A.dim * A.dtype.itemsize))
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    gen = _generator(generator)
    vals = []
    done = 0
    while done < matvecs:
        b = min(block, matvecs - done)
        Z = _rademacher(gen, A.dim, b, A)
        # Z is +-1, so Z * AZ is exact; accumulate in float64
        vals.append((Z * A.matmat(Z)).sum(0, dtype=torch.float64).cpu())
        done += b
    trace, stderr = _mean_stderr(torch.cat(vals))
    return TraceEstimate(trace=trace, stderr=stderr, matvecs=matvecs, method="hutchinson", samples=matvecs)


def hutchpp(op: Any, matvecs: int, *, generator: torch.Generator | None = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021) with exactly ``matvecs`` products.

    S and G Rademacher with m//3 columns each (the remainder goes to G); Q = qr(A S);
    trace = tr(Q^T A Q) + mean_j g_j^T (I - QQ^T) A (I - QQ^T) g_j. stderr is the std of the
    residual terms / sqrt(#G) (the low-rank part is exact given Q; nan when #G = 1). If m//3 > d,
    Q spans the whole space and fewer products are used.
    """
    A = as_operator(op)
    if matvecs < 3:
        raise ValueError(f"hutchpp needs matvecs >= 3 (one each for S, Q and G), got {matvecs}")
    gen = _generator(generator)
    d = A.dim
    n_s = matvecs // 3
    n_g = matvecs - 2 * n_s
    S = _rademacher(gen, d, n_s, A)
    G = _rademacher(gen, d, n_g, A)
    Q, _ = torch.linalg.qr(A.matmat(S))
    low = float((Q * A.matmat(Q)).sum(dtype=torch.float64))
    PG = G - Q @ (Q.T @ G)
    PG = PG - Q @ (Q.T @ PG)  # second pass: keeps the residual part orthogonal to Q in float32 too
    terms = (PG * A.matmat(PG)).sum(0, dtype=torch.float64).cpu()
    rest, stderr = _mean_stderr(terms)
    return TraceEstimate(trace=low + rest, stderr=stderr, matvecs=n_s + Q.shape[1] + n_g, method="hutch++",
                         samples=n_g)


# ---------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SLQResult:
    """Gauss quadrature nodes/weights per probe vector (rows); padding nodes carry weight 0."""
    nodes: Tensor
    weights: Tensor
    matvecs: int


def slq(op: Any, vectors: int = 1, steps: int = 90, *, generator: torch.Generator | None = None) -> SLQResult:
    """Stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019).

    ``vectors`` normalised Rademacher probes run simultaneously: one ``matmat`` per step on the block
    of still-active probes, each fully reorthogonalised (CGS twice) against its own basis. Steps are
    capped at d. A probe whose Krylov space becomes invariant (breakdown) stops early: its quadrature
    is then exact with fewer nodes, and its row is padded with copies of its largest node at weight 0.
    """
    A = as_operator(op)
    if vectors < 1:
        raise ValueError(f"slq needs vectors >= 1, got {vectors}")
    if steps < 1:
        raise ValueError(f"slq needs steps >= 1, got {steps}")
    gen = _generator(generator)
    d, nv = A.dim, vectors
    m_max = min(steps, d)
    eps = torch.finfo(A.dtype).eps
    basis = torch.empty(nv, m_max, d, dtype=A.dtype, device=A.device)
    basis[:, 0] = (_rademacher(gen, d, nv, A) / math.sqrt(d)).T
    alpha = np.zeros((nv, m_max))
    beta = np.zeros((nv, m_max))
    length = np.zeros(nv, dtype=int)
    anorm = np.zeros(nv)
    active = np.arange(nv)
    used = 0
    for j in range(m_max):
        everyone = active.size == nv
        act = torch.from_numpy(active).to(A.device)
        W = A.matmat(basis[:, j].T if everyone else basis[act, j].T)  # (d, na)
        used += active.size
        anorm[active] = np.maximum(anorm[active], torch.linalg.vector_norm(W, dim=0).cpu().double().numpy())
        Bas = basis[:, :j + 1] if everyone else basis[act, :j + 1]  # (na, j+1, d)
        w = W.T.unsqueeze(-1)  # (na, d, 1)
        coef = torch.zeros(active.size, j + 1, dtype=torch.float64)
        for _ in range(2):
            c = Bas @ w
            w = w - Bas.transpose(1, 2) @ c
            coef += c[..., 0].to("cpu", torch.float64)
        alpha[active, j] = coef[:, j].numpy()
        length[active] = j + 1
        if j + 1 == m_max:
            break
        nrm = torch.linalg.vector_norm(w[..., 0], dim=1).cpu().double().numpy()
        beta[active, j] = nrm
        alive = nrm > 16 * eps * anorm[active]
        if alive.any():
            keep = torch.from_numpy(np.flatnonzero(alive)).to(A.device)
            basis[act[keep], j + 1] = (w[keep, :, 0] / torch.from_numpy(nrm[alive]).to(A.dtype).to(A.device)[:, None])
        active = active[alive]
        if active.size == 0:
            break
    m_out = int(length.max())
    nodes = np.zeros((nv, m_out))
    weights = np.zeros((nv, m_out))
    for c in range(nv):
        L = int(length[c])
        theta, S = scipy.linalg.eigh_tridiagonal(alpha[c, :L], beta[c, :L - 1])
        nodes[c, :L] = theta
        nodes[c, L:] = theta[-1]
        weights[c, :L] = S[0] ** 2
    return SLQResult(nodes=torch.from_numpy(nodes), weights=torch.from_numpy(weights), matvecs=used)


def _flat_quadrature(nodes: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(nodes.cpu() if isinstance(nodes, Tensor) else nodes, dtype=np.float64)
    w = np.asarray(weights.cpu() if isinstance(weights, Tensor) else weights, dtype=np.float64)
    if x.shape != w.shape or x.ndim not in (1, 2):
        raise ValueError(f"nodes and weights must have the same shape, (n_v, m) or (N,); got {x.shape} and {w.shape}")
    if x.ndim == 2:
        w = w / x.shape[0]
    return x.ravel(), w.ravel()


def spectral_density(nodes: Any, weights: Any, grid: Any, *, sigma2: float | None = None) -> np.ndarray:
    """Gaussian-smoothed spectral density on ``grid``: mean over probes of sum_j w_j N(t; node_j, sigma2).

    ``nodes``/``weights`` of shape (n_v, m), or flat (N,) already divided by n_v. Default
    sigma2 = 1e-5 * max(1, lmax - lmin). Integrates to 1 up to the grid's truncation.
    """
    x, w = _flat_quadrature(nodes, weights)
    t = np.asarray(grid, dtype=np.float64)
    if t.ndim != 1:
        raise ValueError(f"grid must be 1-D, got shape {t.shape}")
    if sigma2 is None:
        sigma2 = 1e-5 * max(1.0, float(x.max() - x.min())) if x.size else 1e-5
    if not sigma2 > 0:
        raise ValueError(f"sigma2 must be > 0, got {sigma2}")
    keep = w != 0
    x, w = x[keep], w[keep]
    norm = 1.0 / math.sqrt(2 * math.pi * sigma2)
    reach = 9.0 * math.sqrt(sigma2)  # the Gaussian mass beyond 9 sigma is ~2e-19
    out = np.zeros(t.size)
    if t.size > 1 and bool(np.all(np.diff(t) >= 0)):
        # sorted grid (the usual case): each node touches only the grid points within its reach
        lo = np.searchsorted(t, x - reach, side="left")
        hi = np.searchsorted(t, x + reach, side="right")
        for j in np.flatnonzero(hi > lo):
            z = t[lo[j]:hi[j]] - x[j]
            out[lo[j]:hi[j]] += (w[j] * norm) * np.exp(-0.5 * z * z / sigma2)
        return out
    chunk = max(1, 2**22 // max(1, x.size))  # bound the (grid x nodes) temporary
    for a in range(0, t.size, chunk):
        z = t[a:a + chunk, None] - x[None, :]
        out[a:a + chunk] = norm * (np.exp(-0.5 * np.minimum(z * z / sigma2, 1e3)) @ w)
    return out


def slq_trace(nodes: Any, weights: Any, dim: int) -> float:
    """Trace estimate from SLQ: dim * mean over probes of sum_j w_j node_j."""
    x, w = _flat_quadrature(nodes, weights)
    return float(dim * np.sum(w * x))
