"""Loss slices and trajectory PCA (REFERENCE.md §4, last bullet; Li et al. 2018).

Model-evaluating but probe-free: usable inside a probe or after training on a run's store.

- :func:`trajectory_pca`: PCA of the checkpoint differences x_t = w_t - w_T, centred on the
  final point (Li et al.), streamed over chunks of snapshots through the exact Gram matrix
  X X^T (n x n): memory O(n^2 + chunk), never n x d unless the snapshots fit in one chunk.
- :func:`loss_profile` / :func:`loss_surface`: L(w + a d) and L(w + x d1 + y d2) on fixed
  batches, several points at once through ``torch.func.vmap`` where that is faster.
- :func:`slice_run`: after training, a 2-D slice of a recorded run around any stored snapshot,
  along its trajectory's principal directions (with the path, its off-plane residual and the
  loss on the actual path) or along random or given directions.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, Union

import numpy as np
import scipy.linalg
import torch
import xarray as xr
from torch import Tensor, nn

from landscape.directions import NORMALIZATIONS, random_direction
from landscape.functional import (Batch, BNMode, FunctionalModel, check_batch, draw_batches, flat_point,
                                  move_batch, probe_guard)
from landscape.functional import batch_size as _batch_size
from landscape.geometry import interpolation_stats
from landscape.schema import attrs_for

Blocks = Iterator[tuple[np.ndarray, np.ndarray]]
Batched = Union[bool, Literal["auto"]]

# -- trajectory PCA -------------------------------------------------------------------------------


@dataclass
class PCAResult:
    """Principal components of the path x_t = w_t - w_T (uncentred: the origin is the final point).

    ``steps`` (n,): the snapshots' steps. ``directions`` (d, k) float64: unit principal
    directions p_i, mutually orthogonal. ``eigenvalues`` (k,): lambda_i = sum_t <x_t, p_i>^2 (the
    Gram matrix's top eigenvalues). ``explained_variance_ratio`` (k,): lambda_i / sum_t |x_t|^2.
    ``coordinates`` (n, k): <x_t, p_i>. ``residual`` (n,): |x_t - sum_i <x_t, p_i> p_i| over the
    valid components, i.e. how far snapshot t lies off the span of the plotted directions.

    A component is valid when lambda_i > 10 n eps lambda_1 (the path spans it; eps = float64
    epsilon). Components beyond the path's rank, or beyond n, have NaN directions and
    coordinates, and their (near-zero) share of the variance as ratio (0 when i >= n).
    ``valid`` says which. Signs: each direction is oriented so that the snapshot farthest along
    it has a positive coordinate (reproducible, whatever the eigensolver returns).
    """

    steps: np.ndarray
    directions: np.ndarray
    eigenvalues: np.ndarray
    explained_variance_ratio: np.ndarray
    coordinates: np.ndarray
    residual: np.ndarray
    total_variance: float
    valid: np.ndarray

    @property
    def components(self) -> int:
        """Number of valid components."""
        return int(self.valid.sum())


def _as_final(final: Any) -> np.ndarray:
    if isinstance(final, Tensor):
        final = final.detach().cpu().double().numpy()
    f = np.asarray(final, dtype=np.float64)
    if f.ndim != 1 or f.size == 0:
        raise ValueError(f"final must be a flat parameter vector (d,), got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("final (the point the path is centred on) contains NaN/Inf: the run diverged")
    return f


def _snapshots(blocks_factory: Callable[[], Iterable[tuple[Any, Any]]], final: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(steps, X) per non-empty chunk with X = rows - final in float64; all-NaN rows skipped."""
    for steps, rows in blocks_factory():
        rows = np.asarray(rows)
        steps = np.asarray(steps)
        if rows.ndim != 2 or rows.shape[1] != final.size:
            raise ValueError(f"trajectory chunks must be (m, d={final.size}) arrays of flat parameters, got shape {rows.shape}")
        if steps.shape != (rows.shape[0],):
            raise ValueError(f"a chunk has {rows.shape[0]} rows but {steps.size} steps")
        missing = np.isnan(rows).all(axis=1)
        if missing.any():
            rows, steps = rows[~missing], steps[~missing]
        if rows.shape[0] == 0:
            continue
        X = rows.astype(np.float64)
        if not np.all(np.isfinite(X)):
            bad = steps[~np.isfinite(X).all(axis=1)]
            raise ValueError(f"parameter snapshots at steps {bad[:5].tolist()} contain NaN/Inf (the run diverged): "
                             "slice a run (or a range of steps) where the parameters are finite")
        X -= final
        yield steps, X


def trajectory_pca(blocks_factory: Callable[[], Iterable[tuple[Any, Any]]], final: Tensor | np.ndarray, *,
                   components: int = 2, memory: int = 512 * 2**20) -> PCAResult:
    """PCA of the checkpoint differences x_t = w_t - w_T, centred on the final point (Li et al. 2018).

    ``blocks_factory()`` returns a fresh iterator of ``(steps (m,), rows (m, d))`` chunks of
    snapshots (rows that are all NaN are absent snapshots and are skipped), e.g. the "params"
    arrays of ``RunWriter.iter_trajectory``. It is iterated several times (the same chunks each
    time): the exact Gram matrix G = X X^T is built in float64 by passes that each hold up to
    ``memory`` bytes of chunks and multiply every later chunk against them (one pass when the
    whole path fits), then the top ``components`` eigenpairs (lambda_i, u_i) of G give the unit
    principal directions p_i = X^T u_i / sqrt(lambda_i) (one more pass unless the path was held
    whole), coordinates <x_t, p_i> = sqrt(lambda_i) u_i[t] and the off-plane residual
    sqrt(max(|x_t|^2 - sum_i <x_t, p_i>^2, 0)) (accurate to about sqrt(eps) |x_t| = 1.5e-8 |x_t|:
    a difference of float64 squares). See :class:`PCAResult` for rank-deficient paths. Raises ValueError when
    there is no snapshot or the path does not move.
    """
    if isinstance(components, bool) or not isinstance(components, (int, np.integer)) or components < 1:
        raise ValueError(f"components must be an int >= 1, got {components!r}")
    if not callable(blocks_factory):
        raise TypeError("blocks_factory must be a callable returning a fresh iterator of (steps, rows) chunks")
    k = int(components)
    f = _as_final(final)
    grams: dict[tuple[int, int], np.ndarray] = {}
    sizes: list[int] = []
    step_parts: list[np.ndarray] = []
    done = 0  # chunks [0, done) have been anchors: their products with every later chunk are known
    held_all: list[np.ndarray] | None = None
    while True:
        anchors: list[tuple[int, np.ndarray]] = []
        held, full, count = 0, False, 0
        for j, (steps, X) in enumerate(_snapshots(blocks_factory, f)):
            count = j + 1
            if done == 0:
                sizes.append(X.shape[0])
                step_parts.append(steps)
            elif j >= len(sizes) or sizes[j] != X.shape[0] or not np.array_equal(step_parts[j], steps):
                raise ValueError("blocks_factory() returned different chunks on a second pass: it must give a fresh "
                                 "iterator over the same snapshots each time it is called")
            if j < done:
                continue
            for i, A in anchors:
                grams[(i, j)] = A @ X.T
            if not full and (not anchors or held + X.nbytes <= memory):
                anchors.append((j, X))
                held += X.nbytes
                grams[(j, j)] = X @ X.T
            else:
                full = True
        if done == 0 and count == 0:
            raise ValueError("the trajectory holds no parameter snapshot: nothing to analyse")
        if count != len(sizes):
            raise ValueError("blocks_factory() returned a different number of chunks on a second pass")
        if done == 0 and not full:
            held_all = [X for _, X in anchors]
        done = anchors[-1][0] + 1
        if done >= count:
            break
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    G = np.empty((n, n))
    for (i, j), B in grams.items():
        G[offsets[i]:offsets[i + 1], offsets[j]:offsets[j + 1]] = B
        if i != j:
            G[offsets[j]:offsets[j + 1], offsets[i]:offsets[i + 1]] = B.T
    del grams
    steps_all = np.concatenate(step_parts)
    sq = np.diag(G).copy()
    total = float(sq.sum())
    if not total > 0:
        raise ValueError("the recorded path does not move: every snapshot equals the point it is centred on")
    r = min(k, n)
    lam, U = scipy.linalg.eigh(G, subset_by_index=[n - r, n - 1])
    lam, U = lam[::-1].copy(), U[:, ::-1].copy()
    valid = np.zeros(k, dtype=bool)
    valid[:r] = lam > 10 * n * np.finfo(np.float64).eps * lam[0]
    for i in range(r):  # orientation: the farthest snapshot along p_i has a positive coordinate
        if U[np.argmax(np.abs(U[:, i])), i] < 0:
            U[:, i] = -U[:, i]
    eig = np.zeros(k)
    eig[:r] = np.maximum(lam, 0.0)
    ratio = eig / total
    coords = np.full((n, k), np.nan)
    v = np.flatnonzero(valid)
    coords[:, v] = U[:, v] * np.sqrt(lam[v])
    residual = np.sqrt(np.maximum(sq - np.sum(coords[:, v] ** 2, axis=1), 0.0))
    d = f.size
    P = np.zeros((d, len(v)))
    if held_all is not None:
        for j, X in enumerate(held_all):
            P += X.T @ U[offsets[j]:offsets[j + 1], v]
    else:
        for j, (_, X) in enumerate(_snapshots(blocks_factory, f)):
            P += X.T @ U[offsets[j]:offsets[j + 1], v]
    directions = np.full((d, k), np.nan)
    directions[:, v] = P / np.sqrt(lam[v])
    return PCAResult(steps=steps_all, directions=directions, eigenvalues=eig, explained_variance_ratio=ratio,
                     coordinates=coords, residual=residual, total_variance=total, valid=valid)


# -- loss at many points -----------------------------------------------------------------------

def _flat(fm: FunctionalModel, v: Any, what: str) -> Tensor:
    if not isinstance(v, Tensor):
        v = torch.as_tensor(np.asarray(v))
    if v.dim() != 1 or v.numel() != fm.dim:
        raise ValueError(f"{what} must be a flat vector of the model's {fm.dim} trainable parameters, got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{what} contains NaN/Inf")
    return v.detach().to(device=fm.device, dtype=fm.dtype)


def _positions(values: Any, what: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64)
    if a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a)):
        raise ValueError(f"{what} must be a non-empty 1-D sequence of finite numbers, got {values!r}")
    return a


def losses_on_span(fm: FunctionalModel, w: Tensor, directions: Tensor, coefficients: np.ndarray,
                   batches: Batch | Sequence[Batch], *, batched: Batched = "auto") -> np.ndarray:
    """L(w + D c_j) for each row c_j of ``coefficients`` (m, r), D = ``directions`` (d, r)."""
    C = torch.as_tensor(np.asarray(coefficients, dtype=np.float64)).to(device=fm.device, dtype=fm.dtype)
    D = directions.to(device=fm.device, dtype=fm.dtype)
    if C.dim() != 2 or D.dim() != 2 or C.shape[1] != D.shape[1] or D.shape[0] != fm.dim:
        raise ValueError(f"coefficients (m, r) and directions (d, r) disagree: {tuple(C.shape)} and {tuple(D.shape)}")
    w = w.detach().to(device=fm.device, dtype=fm.dtype)
    return fm.losses(lambda lo, hi: w + C[lo:hi] @ D.T, C.shape[0], batches, batched=batched)


def loss_profile(fm: FunctionalModel, w: Tensor, direction: Tensor, alphas: Sequence[float] | np.ndarray,
                 batches: Batch | Sequence[Batch], *, batched: Batched = "auto") -> np.ndarray:
    """The 1-D profile L(w + a d) for each a in ``alphas`` (float64, in the order given)."""
    a = _positions(alphas, "alphas")
    w, d = _flat(fm, w, "w"), _flat(fm, direction, "direction")
    return losses_on_span(fm, w, d[:, None], a[:, None], batches, batched=batched)


def loss_surface(fm: FunctionalModel, w: Tensor, d1: Tensor, d2: Tensor, xs: Sequence[float] | np.ndarray,
                 ys: Sequence[float] | np.ndarray, batches: Batch | Sequence[Batch], *,
                 batched: Batched = "auto") -> np.ndarray:
    """The 2-D slice: ``out[i, j] = L(w + xs[i] d1 + ys[j] d2)`` (float64, (len(xs), len(ys)))."""
    x, y = _positions(xs, "xs"), _positions(ys, "ys")
    w = _flat(fm, w, "w")
    D = torch.stack([_flat(fm, d1, "d1"), _flat(fm, d2, "d2")], dim=1)
    C = np.stack(np.meshgrid(x, y, indexing="ij"), axis=-1).reshape(-1, 2)
    return losses_on_span(fm, w, D, C, batches, batched=batched).reshape(x.size, y.size)


def alpha_grid(alphas: Any, *, need: Sequence[float] = ()) -> np.ndarray:
    """Positions along a line: sorted float64, rounded to 12 decimals (so that 0.1 from one
    linspace and from another are one label of the ``alpha`` dim, and a rounding-level zero is
    0); at least 2, finite, no repeats, containing each of ``need``."""
    try:
        a = np.asarray(alphas, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise TypeError(f"alphas must be a sequence of numbers, got {alphas!r}") from None
    if a.size < 2 or not np.all(np.isfinite(a)):
        raise ValueError(f"alphas must hold at least 2 finite positions, got {alphas!r}")
    a = np.sort(np.round(a, 12)) + 0.0  # + 0.0 turns -0.0 into 0.0
    if np.any(np.diff(a) == 0):
        raise ValueError("alphas contain a repeated value")
    missing = [x for x in need if x not in a]
    if missing:
        raise ValueError(f"alphas must include {' and '.join(f'{x:g}' for x in need)} (got {a.tolist()}): the "
                         "values are read against those points")
    return a


def segment_losses(fm: FunctionalModel, batches: Batch | Sequence[Batch], w1: Tensor, w2: Tensor,
                   alphas: np.ndarray) -> np.ndarray:
    """L((1 - a) w1 + a w2) for each a (several points per forward through vmap where faster)."""
    d = w2 - w1
    a = torch.as_tensor(np.asarray(alphas, dtype=np.float64), dtype=w1.dtype, device=w1.device)
    return fm.losses(lambda lo, hi: w1 + a[lo:hi, None] * d, a.numel(), batches)


def interpolate(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any, start: Any, end: Any, *,
                alphas: Any = np.linspace(0.0, 1.0, 21), tol: float = 0.0, samples: int | None = None,
                batch_size: int | None = None, seed: int = 0) -> xr.Dataset:
    """The loss on the segment between two points, e.g. the final iterates of two runs (one
    linearly connected basin, or a barrier between them?), with dropout off and BN in eval mode.

    ``start``/``end``: modules of ``model``'s architecture, state_dicts, checkpoint paths (loaded
    with ``weights_only=True``) or flat parameter vectors. ``data`` as in :func:`slice_run`.
    ``alphas`` must include 0 and 1 (values outside extrapolate). Returns ``endpoint_loss``
    (alpha), ``endpoint_barrier``, ``endpoint_violations`` (rises above ``tol``) and
    ``endpoint_max_rise`` (:func:`landscape.geometry.interpolation_stats`).
    """
    a = alpha_grid(alphas, need=(0.0, 1.0))
    fm = FunctionalModel(model, loss_fn)
    w1, w2 = (flat_point(p, fm) for p in (start, end))
    batches = _slice_batches(data, samples, batch_size, seed, fm.device)
    with probe_guard(model, "eval"):
        losses = segment_losses(fm, batches, w1, w2, a)
    st = interpolation_stats(a, losses, tol=tol)
    s = {"batch_sizes": [_batch_size(b) for b in batches], "bn_mode": "eval", "tol": tol}
    return xr.Dataset({
        "endpoint_loss": (("alpha",), losses, attrs_for("endpoint_loss", **s)),
        "endpoint_barrier": ((), st.barrier, attrs_for("endpoint_barrier", **s)),
        "endpoint_violations": ((), np.int64(st.violations), attrs_for("endpoint_violations", **s)),
        "endpoint_max_rise": ((), st.max_rise, attrs_for("endpoint_max_rise", **s)),
    }, coords={"alpha": a})


def grid_through_zero(lo: float, hi: float, points: int) -> np.ndarray:
    """``points`` evenly spaced values covering [lo, hi] (lo <= 0 <= hi) with 0 exactly on the
    grid: the slice's centre is a grid point, so its value can be read off the surface."""
    if points < 3:
        raise ValueError(f"a grid needs at least 3 points, got {points}")
    if not (lo <= 0 <= hi) or not hi > lo:
        raise ValueError(f"grid range must satisfy lo <= 0 <= hi and lo < hi, got [{lo}, {hi}]")
    neg = int(round((points - 1) * (-lo) / (hi - lo)))
    if lo < 0 and neg == 0:
        neg = 1
    if hi > 0 and neg == points - 1:
        neg = points - 2
    pos = points - 1 - neg
    h = max(-lo / neg if neg else 0.0, hi / pos if pos else 0.0)
    return h * np.arange(-neg, pos + 1, dtype=np.float64)


def symmetric_grid(extent: float, points: int) -> np.ndarray:
    """linspace(-extent, extent, points), exactly symmetric (0 on the grid when points is odd)."""
    g = np.linspace(-extent, extent, points)
    return (g - g[::-1]) / 2


def pca_grid(coordinates: np.ndarray, points: int, margin: float) -> np.ndarray:
    """A grid over one component: the projected path and the origin, widened by ``margin`` times
    the range on each side, with 0 on the grid."""
    c = coordinates[np.isfinite(coordinates)]
    lo, hi = min(float(c.min(initial=0.0)), 0.0), max(float(c.max(initial=0.0)), 0.0)
    span = hi - lo
    if not span > 0:
        raise ValueError("the path has no extent along this component")
    return grid_through_zero(lo - margin * span, hi + margin * span, points)


# -- after training -------------------------------------------------------------------------------

_MISSING_PARAMS = ("holds no full parameter trajectory ('params' with dim 'param'): slicing a run afterwards needs "
                   "the stored w_t. Record it with TrajectoryPCA, or RestrictedSecant without reference= or sketch=")
_CHUNK_BYTES = 64 * 2**20


def _slice_batches(data: Any, samples: int | None, batch_size_: int | None, seed: int, device: torch.device) -> list[Batch]:
    """``data`` as the recorder's probe_data: a list of (x, y) batches (all of them, or the first
    ``samples``), an (X, Y) pair (one batch, or batches of ``batch_size``), or an iterable."""
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be a positive int (number of batches) or None (all), got {samples!r}")
    if data is None:
        raise ValueError("data is required: the slice evaluates the loss on it (a list of (x, y) batches, a DataLoader "
                         "or an (X, Y) pair of tensors)")
    pair = (isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, Tensor) for t in data)
            and all(t.dim() > 0 for t in data))
    if pair:
        n = int(data[0].shape[0])
        count = samples or (max(1, n // batch_size_) if batch_size_ else 1)
        batches = draw_batches(data, count, batch_size=batch_size_, seed=seed)
    elif isinstance(data, (tuple, list)):
        batches = [check_batch(b, "data") for b in data]
        if not batches:
            raise ValueError("data is an empty list of batches")
        if samples is not None:
            batches = draw_batches(batches, samples)
    elif isinstance(data, Iterable):
        if samples is not None:
            batches = draw_batches(data, samples)
        else:
            batches = [check_batch(b, "data") for b in data]
            if not batches:
                raise ValueError("data yielded no batch")
    else:
        raise ValueError(f"data must be a list of (x, y) batches, a DataLoader or an (X, Y) pair; got {type(data).__name__}")
    return [move_batch(b, device) for b in batches]


class _StoredPath:
    """The stored snapshots w_t of a run, read lazily in chunks."""

    def __init__(self, path: str | os.PathLike[str], dim: int) -> None:
        from landscape.store import open_trajectory

        try:
            tr = open_trajectory(path)
        except (FileNotFoundError, KeyError) as exc:  # no trajectory group at all
            raise ValueError(f"the store {path} {_MISSING_PARAMS} ({type(exc).__name__})") from None
        if "params" not in tr.variables or tr["params"].dims != ("record", "param"):
            sketched = "params" in tr.variables and "sketch" in tr["params"].dims
            extra = " (it holds sketches: RestrictedSecant(sketch=k) keeps only k numbers per vector)" if sketched else ""
            raise ValueError(f"the store {path} {_MISSING_PARAMS}{extra}")
        self.params = tr["params"]
        if self.params.shape[1] != dim:
            raise ValueError(f"the store's parameters have {self.params.shape[1]} entries, the model's trainable "
                             f"parameters {dim}: pass a model of the architecture the run trained")
        self.steps = np.asarray(tr["step"].values).astype(np.int64)
        self.rows = max(1, _CHUNK_BYTES // max(1, dim * self.params.dtype.itemsize))

    def read(self, lo: int, hi: int) -> np.ndarray:
        return np.asarray(self.params.isel(record=slice(lo, hi)).values)

    def center(self, step: int | None) -> tuple[int, np.ndarray]:
        """The snapshot at ``step`` (None: the last stored one) as (step, row)."""
        n = self.steps.size
        if step is None:
            for hi in range(n, 0, -self.rows):
                lo = max(0, hi - self.rows)
                rows = self.read(lo, hi)
                present = np.flatnonzero(~np.isnan(rows).all(axis=1))
                if present.size:
                    return int(self.steps[lo + present[-1]]), rows[present[-1]]
            raise ValueError("the store's trajectory holds no parameter snapshot")
        where = np.flatnonzero(self.steps == int(step))
        if where.size:
            row = self.read(int(where[-1]), int(where[-1]) + 1)[0]
            if not np.isnan(row).all():
                return int(step), row
        shown = self.steps[:8].tolist()
        raise ValueError(f"no parameters were stored at step {step}; records exist at steps "
                         f"{shown}{' ...' if self.steps.size > 8 else ''} (a snapshot is stored where a probe that "
                         "writes 'params' ran)")

    def blocks(self, until: int) -> Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]:
        def factory() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for lo in range(0, self.steps.size, self.rows):
                hi = min(self.steps.size, lo + self.rows)
                keep = self.steps[lo:hi] <= until
                if keep.any():
                    yield self.steps[lo:hi][keep], self.read(lo, hi)[keep]
        return factory


def _given_directions(fm: FunctionalModel, directions: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
        raise ValueError("directions must be 'pca', 'random' or a pair (d1, d2) of flat tensors")
    d1, d2 = (_flat(fm, d, f"directions[{i}]") for i, d in enumerate(directions))
    for i, d in enumerate((d1, d2)):
        if not float(torch.linalg.vector_norm(d)) > 0:
            raise ValueError(f"directions[{i}] is the zero vector")
    return d1, d2


def slice_run(path: str | os.PathLike[str], model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], data: Any, *,
              step: int | None = None, directions: Any = "pca", grid: int = 21, margin: float = 0.25,
              extent: float = 1.0, normalization: str = "filter", bias: str = "zero", seed: int = 0,
              batch_size: int | None = None, samples: int | None = None, bn_mode: BNMode = "eval",
              components: int = 2, batched: Batched = "auto") -> xr.Dataset:
    """A 2-D slice of a recorded run around the stored parameters at ``step``.

    ``model`` supplies the architecture (its trainable parameters, in order, must match the
    store's); its current weights are not used, the store's w_t are. ``data`` is evaluated as the
    recorder's probe_data: a list of (x, y) batches (all of them, or the first ``samples``), an
    (X, Y) pair (one batch, or batches of ``batch_size`` shuffled with ``seed``), or an iterable
    such as a DataLoader. The model runs in eval mode (BN in ``bn_mode``) and is left as found.

    ``step``: a step with a stored snapshot (None: the last one; note that it is w_t before
    update t, not the weights after the last update). ``directions``:

    - ``"pca"``: the top principal directions of the stored path up to ``step``, centred on
      w_step (:func:`trajectory_pca`). Returns ``pca_explained_variance`` (component),
      ``path_coordinates`` (step, component), ``path_residual`` (step), ``path_loss`` (step:
      L(w_t) at each stored snapshot), ``plane_loss`` (step: L at each snapshot's projection on
      the plane) and ``surface_loss`` (x, y) on a grid of ``grid`` x ``grid`` points covering
      the projected path plus ``margin`` of its range on each side; x, y are distances along the
      unit principal directions, and (0, 0) is w_step.
    - ``"random"``: two Gaussian directions drawn with ``seed``, normalised by ``normalization``
      (``"filter"``: Li et al., scale-aware; ``"unit"``: |d| = 1) with 1-D parameters handled
      by ``bias``; ``surface_loss`` on [-extent, extent]^2.
    - a pair ``(d1, d2)`` of flat tensors, used as given (normalise them first with
      :func:`landscape.directions.normalized` if wanted); ``surface_loss`` on [-extent, extent]^2.

    Raises ValueError when the store holds no full ``params`` trajectory (written by
    TrajectoryPCA, or RestrictedSecant without reference= or sketch=).
    """
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or grid < 3:
        raise ValueError(f"grid must be an int >= 3 (points per axis), got {grid!r}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a number >= 0 (fraction of the path's range added on each side), got {margin!r}")
    if not (isinstance(extent, (int, float)) and math.isfinite(extent) and extent > 0):
        raise ValueError(f"extent must be a positive number, got {extent!r}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if isinstance(components, bool) or not isinstance(components, int) or components < 2:
        raise ValueError(f"components must be an int >= 2, got {components!r}")
    if isinstance(directions, str) and directions not in ("pca", "random"):
        raise ValueError(f"directions must be 'pca', 'random' or a pair (d1, d2) of flat tensors, got {directions!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module of the run's architecture, got {type(model).__name__}")
    fm = FunctionalModel(model, loss_fn)
    stored = _StoredPath(path, fm.dim)
    center_step, row = stored.center(step)
    w = torch.as_tensor(row).to(device=fm.device, dtype=fm.dtype)
    batches = _slice_batches(data, samples, batch_size, seed, fm.device)
    settings: dict[str, Any] = {"computed_by": "slice_run", "center_step": center_step, "samples": len(batches),
                                "batch_sizes": [_batch_size(b) for b in batches], "bn_mode": bn_mode}
    with probe_guard(model, bn_mode):
        if isinstance(directions, str) and directions == "pca":
            ds = _pca_slice(fm, stored, center_step, row, w, batches, grid, margin, components, batched, settings)
            ds.attrs.update(store=str(path), center_step=center_step, directions="pca")
            return ds
        if isinstance(directions, str):  # random
            gen = torch.Generator().manual_seed(int(seed))
            d1 = random_direction(w, fm.layout, gen, normalization=normalization, bias=bias)  # type: ignore[arg-type]
            d2 = random_direction(w, fm.layout, gen, normalization=normalization, bias=bias)  # type: ignore[arg-type]
            settings.update(directions="random", normalization=normalization, bias=bias, seed=int(seed))
        else:
            d1, d2 = _given_directions(fm, directions)
            settings.update(directions="given")
        xs = ys = symmetric_grid(float(extent), int(grid))
        surface = loss_surface(fm, w, d1, d2, xs, ys, batches, batched=batched)
    settings.update(grid=int(grid), extent=float(extent))
    ds = xr.Dataset({"surface_loss": (("x", "y"), surface, attrs_for("surface_loss", **settings))},
                    coords={"x": ("x", xs, {"long_name": "coefficient of d1", "units": "1"}),
                            "y": ("y", ys, {"long_name": "coefficient of d2", "units": "1"})})
    ds.attrs.update(store=str(path), center_step=center_step, directions=settings["directions"])
    return ds


def _pca_slice(fm: FunctionalModel, stored: _StoredPath, center_step: int, row: np.ndarray, w: Tensor,
               batches: list[Batch], grid: int, margin: float, components: int, batched: Batched,
               settings: dict[str, Any]) -> xr.Dataset:
    factory = stored.blocks(center_step)
    pca = trajectory_pca(factory, row.astype(np.float64), components=components)
    if pca.components < 2:
        raise ValueError(f"the stored path up to step {center_step} spans {pca.components} dimension(s) around it: "
                         "a PCA plane needs two (record more snapshots, or slice along 'random' directions)")
    # the stored snapshots themselves: L on the actual path
    path_loss = np.concatenate([
        fm.losses(lambda lo, hi, R=rows: torch.as_tensor(R[lo:hi]).to(device=fm.device, dtype=fm.dtype),
                  rows.shape[0], batches, batched=batched)
        for _, rows in _present(factory)
    ])
    return pca_dataset(fm, pca, w, batches, grid, margin, dict(settings, directions="pca", grid=int(grid), margin=float(margin)),
                       path_loss, batched=batched)


def _present(factory: Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for steps, rows in factory():
        keep = ~np.isnan(rows).all(axis=1)
        if keep.any():
            yield steps[keep], rows[keep]


def pca_dataset(fm: FunctionalModel, pca: PCAResult, w: Tensor, batches: Sequence[Batch], grid: int, margin: float,
                settings: dict[str, Any], path_loss: np.ndarray | None = None, *, batched: Batched = "auto") -> xr.Dataset:
    """The PCA variables of a path centred on ``w``, with ``plane_loss`` (step) and
    ``surface_loss`` (x, y) when the path spans two dimensions (else without them), and
    ``path_loss`` (step) when given. Attrs: ``settings`` plus components and snapshots."""
    s = dict(settings, components=int(pca.valid.size), snapshots=int(pca.steps.size))
    data: dict[str, Any] = {
        "pca_explained_variance": (("component",), pca.explained_variance_ratio, attrs_for("pca_explained_variance", **s)),
        "path_coordinates": (("step", "component"), pca.coordinates, attrs_for("path_coordinates", **s)),
        "path_residual": (("step",), pca.residual, attrs_for("path_residual", **s)),
    }
    coords: dict[str, Any] = {"step": pca.steps, "component": np.arange(pca.valid.size)}
    if path_loss is not None:
        data["path_loss"] = (("step",), np.asarray(path_loss, dtype=np.float64), attrs_for("path_loss", **s))
    if pca.valid[:2].all():
        P = torch.as_tensor(pca.directions[:, :2]).to(device=fm.device, dtype=fm.dtype)
        data["plane_loss"] = (("step",), losses_on_span(fm, w, P, pca.coordinates[:, :2], batches, batched=batched),
                              attrs_for("plane_loss", **s))
        xs = pca_grid(pca.coordinates[:, 0], grid, margin)
        ys = pca_grid(pca.coordinates[:, 1], grid, margin)
        data["surface_loss"] = (("x", "y"), loss_surface(fm, w, P[:, 0], P[:, 1], xs, ys, batches, batched=batched),
                                attrs_for("surface_loss", **s))
        coords["x"] = ("x", xs, {"long_name": "distance along the first principal direction", "units": "1"})
        coords["y"] = ("y", ys, {"long_name": "distance along the second principal direction", "units": "1"})
    return xr.Dataset(data, coords=coords)
