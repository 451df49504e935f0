"""The estimator behind the paired benchmark's "writer measured" figure, on synthetic timelines
where the writer's effect is known."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_spine import writer_interference  # noqa: E402


def _timeline(added: float, seed: int, steps: int = 400) -> tuple[np.ndarray, np.ndarray, list, np.ndarray]:
    """Two sides stepped alternately; step times lognormal around 5 ms and drifting; the writer
    runs 36 batches of 1-4 ms at random times, and a step that overlaps one takes ``added`` more.
    Returns starts, times, the batches and what was added per side."""
    rng = np.random.default_rng(seed)
    base = 0.005 * rng.lognormal(0.0, 0.25, (steps, 2)) * (1 + 0.5 * np.sin(np.arange(steps) / 60))[:, None]
    span = base.sum() * 1.1
    begins = np.sort(rng.uniform(0.0, span, 36))
    busy = [(b, b + rng.uniform(0.001, 0.004)) for b in begins]
    starts, times, truth = np.zeros((steps, 2)), np.zeros((steps, 2)), np.zeros(2)
    t = 0.0
    for i in range(steps):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            d = base[i, side]
            if any(t < b and t + d > a for a, b in busy):
                d += added
                truth[side] += added
            starts[i, side], times[i, side] = t, d
            t += d
    return starts, times, busy, truth


SEEDS = range(12)  # one timeline's estimate scatters by about 8 ms per side; the mean over 12 by about 2


def _mean_estimate(added: float, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
    got, truth = [], []
    for seed in SEEDS:
        starts, times, busy, added_per_side = _timeline(added, seed)
        got.append(writer_interference(starts, times, busy, **kwargs))
        truth.append(added_per_side)
    return np.mean(got, axis=0), np.mean(truth, axis=0)


def test_writer_interference_recovers_what_the_batches_added() -> None:
    got, truth = _mean_estimate(0.002)
    assert truth.min() > 0.02  # enough overlapping steps for the check to mean something
    np.testing.assert_allclose(got, truth, rtol=0.1)


def test_writer_interference_is_near_zero_when_the_batches_cost_nothing() -> None:
    got, _ = _mean_estimate(0.0)
    assert np.all(np.abs(got) < 0.005), got
    # without the shifted-batch correction, slow steps' extra overlaps read as about 11 ms per side
    uncorrected, _ = _mean_estimate(0.0, shifts=(1e9,))
    assert np.all(uncorrected > 0.008), uncorrected


def test_writer_interference_without_batches_is_zero() -> None:
    starts, times, _, _ = _timeline(0.0, 0)
    assert np.array_equal(writer_interference(starts, times, []), np.zeros(2))
