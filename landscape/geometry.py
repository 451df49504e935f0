"""Geometry of a scalar function along lines: valley widths and interpolation barriers
(REFERENCE.md §4). Pure numerics on callables ``phi(t) -> float``: nothing here knows a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generator, Sequence

import numpy as np


@dataclass
class WidthResult:
    """``t``: the exit distance (inf when the level is never crossed within the search range);
    ``lo``/``hi``: the final bracket (phi(lo) <= tau < phi(hi)); ``evaluations`` of phi."""

    t: float
    lo: float
    hi: float
    evaluations: int


def _exit_search(tau: float, t0: float, rtol: float, max_doublings: int, max_halvings: int
                 ) -> Generator[float, float, WidthResult]:
    """The search of :func:`exit_distance` as a generator: yields the next t, receives phi(t)."""
    evals = 0

    def below(v: float) -> bool:
        return bool(math.isfinite(v) and v <= tau)

    evals += 1
    if below((yield t0)):
        lo, hi = t0, math.inf
        for _ in range(max_doublings):
            t = 2 * lo
            evals += 1
            if below((yield t)):
                lo = t
            else:
                hi = t
                break
        if math.isinf(hi):
            return WidthResult(math.inf, lo, hi, evals)
    else:
        lo, hi = 0.0, t0
        for _ in range(max_halvings):
            t = hi / 2
            evals += 1
            if below((yield t)):
                lo = t
                break
            hi = t
        if lo == 0.0:  # the level is crossed arbitrarily close to 0 (e.g. a kink)
            return WidthResult(0.0, 0.0, hi, evals)
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        evals += 1
        if below((yield mid)):
            lo = mid
        else:
            hi = mid
    return WidthResult(0.5 * (lo + hi), lo, hi, evals)


def _check_search(tau: float, t0: float, rtol: float) -> None:
    if not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"tau (the loss increase that defines the valley) must be a positive number, got {tau!r}")
    if not (t0 > 0 and math.isfinite(t0)):
        raise ValueError(f"t0 must be a positive number, got {t0!r}")
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")


def exit_distance(phi: Callable[[float], float], tau: float, *, t0: float = 1.0, rtol: float = 1e-3,
                  max_doublings: int = 40, max_halvings: int = 60) -> WidthResult:
    """How far the ray t -> phi(t) (phi(0) = 0) stays at or below ``tau``: the first crossing of
    the level, found by doubling (or halving) from ``t0`` to bracket it, then bisection until
    the bracket is within ``rtol`` relative. For a profile that rises monotonically (a valley
    wall) this is sup{t >= 0: phi(t) <= tau}; a non-finite phi counts as above the level.
    """
    return exit_distances(lambda queries: [phi(t) for _, t in queries], 1, tau, t0=t0, rtol=rtol,
                          max_doublings=max_doublings, max_halvings=max_halvings)[0]


def exit_distances(phis: Callable[[list[tuple[int, float]]], Sequence[float]], rays: int, tau: float, *,
                   t0: float | Sequence[float] = 1.0, rtol: float = 1e-3, max_doublings: int = 40,
                   max_halvings: int = 60) -> list[WidthResult]:
    """:func:`exit_distance` along ``rays`` rays at once, in lockstep: each round asks
    ``phis([(ray, t), ...])`` for one value per unfinished ray, so a caller can evaluate them
    together (e.g. several parameter vectors in one vmapped forward). Same results as one search
    per ray."""
    t0s = [float(t0)] * rays if isinstance(t0, (int, float)) else [float(t) for t in t0]
    if len(t0s) != rays:
        raise ValueError(f"t0 must be one number or one per ray ({rays}), got {len(t0s)}")
    for t in t0s:
        _check_search(tau, t, rtol)
    searches = [_exit_search(tau, t, rtol, max_doublings, max_halvings) for t in t0s]
    results: list[WidthResult | None] = [None] * rays
    asks = {i: next(s) for i, s in enumerate(searches)}
    while asks:
        queries = list(asks.items())
        values = list(phis(queries))
        if len(values) != len(queries):
            raise ValueError(f"phis returned {len(values)} values for {len(queries)} queries")
        asks = {}
        for (i, _), v in zip(queries, values):
            try:
                asks[i] = searches[i].send(float(v))
            except StopIteration as stop:
                results[i] = stop.value
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


@dataclass
class InterpolationStats:
    """``barrier``: max_a [L(a) - ((1 - a) L(0) + a L(1))] (0 for a convex profile);
    ``violations``: how many consecutive steps along alpha raise the loss by more than ``tol``
    (monotonic linear interpolation, Lucas et al. 2021: 0 means monotone); ``max_rise``: the
    largest L(a_j) - min_{i < j} L(a_i) (how high a bump rises above the best earlier point)."""

    barrier: float
    violations: int
    max_rise: float


def interpolation_stats(alphas: Sequence[float], losses: Sequence[float], *, tol: float = 0.0) -> InterpolationStats:
    """Barrier and monotonicity of a loss profile along a linear path from a = 0 to a = 1."""
    a = np.asarray(alphas, dtype=np.float64)
    L = np.asarray(losses, dtype=np.float64)
    if a.ndim != 1 or a.shape != L.shape or a.size < 2:
        raise ValueError("alphas and losses must be 1-D of the same length >= 2")
    if np.any(np.diff(a) <= 0):
        raise ValueError("alphas must be strictly increasing")
    i0, i1 = np.flatnonzero(a == 0.0), np.flatnonzero(a == 1.0)
    if not (i0.size and i1.size):
        raise ValueError("alphas must include the end points 0 and 1 (the barrier is measured against them)")
    L0, L1 = L[i0[0]], L[i1[0]]
    inside = (a >= 0) & (a <= 1)
    chord = (1 - a) * L0 + a * L1
    barrier = float(np.max(L[inside] - chord[inside]))
    Li = L[inside]
    rises = np.diff(Li)
    running_min = np.minimum.accumulate(Li)
    max_rise = float(np.max(Li[1:] - running_min[:-1])) if Li.size > 1 else 0.0
    return InterpolationStats(barrier, int(np.sum(rises > tol)), max(max_rise, 0.0))
