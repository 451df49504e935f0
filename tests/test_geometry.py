"""Directions (landscape/directions.py) and line geometry (landscape/geometry.py) against closed
forms: filter normalisation per filter and its invariance under ReLU rescaling, the EMA
trajectory direction, exit distances by doubling + bisection to tolerance on profiles with known
level crossings, and interpolation barriers / monotonicity on convex and bumpy profiles."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from landscape.directions import (TrajectoryDirection, adaptive_scale, filter_normalized, normalized, random_direction,
                                  unit)
from landscape.functional import ParamLayout, trainable_parameters
from landscape.geometry import exit_distance, exit_distances, interpolation_stats


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4), nn.ReLU(), nn.Linear(4, 2)).double()


def _flat(model: nn.Module) -> tuple[torch.Tensor, ParamLayout]:
    named = trainable_parameters(model)
    return torch.cat([p.detach().reshape(-1) for _, p in named]), ParamLayout.of(named)


def test_filter_normalisation_matches_each_filter_norm():
    w, layout = _flat(_mlp())
    d = random_direction(w, layout, torch.Generator().manual_seed(1), normalization="filter", bias="zero")
    views_d, views_w = layout.views(d), layout.views(w)
    for name, shape in zip(layout.names, layout.shapes):
        if len(shape) == 1:
            assert torch.all(views_d[name] == 0), name
            continue
        nd = views_d[name].reshape(shape[0], -1).norm(dim=1)
        nw = views_w[name].reshape(shape[0], -1).norm(dim=1)
        torch.testing.assert_close(nd, nw, rtol=1e-12, atol=0)
    # bias="filter": a 1-D parameter is one filter; "layer": one norm per tensor
    d = random_direction(w, layout, torch.Generator().manual_seed(1), normalization="filter", bias="filter")
    for name, shape in zip(layout.names, layout.shapes):
        if len(shape) == 1:
            torch.testing.assert_close(layout.views(d)[name].norm(), layout.views(w)[name].norm(), rtol=1e-12, atol=0)
    d = random_direction(w, layout, torch.Generator().manual_seed(1), normalization="layer")
    name = layout.names[0]
    torch.testing.assert_close(layout.views(d)[name].norm(), layout.views(w)[name].norm(), rtol=1e-12, atol=0)
    assert float(unit(d).norm()) == pytest.approx(1.0, abs=1e-12)
    assert float(normalized(d, w, layout, "unit").norm()) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(a=st.floats(0.05, 20.0), seed=st.integers(0, 1000))
def test_filter_normalised_direction_follows_relu_rescaling(a, seed):
    """W1 -> a W1, b1 -> a b1, W2 -> W2 / a: the filter-normalised direction rescales the same
    way, so w + t d stays the same function for every t (Li et al. 2018's point)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    twin = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    twin.load_state_dict(net.state_dict())
    with torch.no_grad():
        twin[0].weight.mul_(a); twin[0].bias.mul_(a); twin[2].weight.div_(a)
    w, layout = _flat(net)
    w2, _ = _flat(twin)
    x = torch.randn(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for bias in ("zero", "filter"):
        d = random_direction(w, layout, torch.Generator().manual_seed(seed), bias=bias)
        d2 = random_direction(w2, layout, torch.Generator().manual_seed(seed), bias=bias)
        for t in (0.3, 1.0):
            out = torch.func.functional_call(net, layout.views(w + t * d), (x,))
            out2 = torch.func.functional_call(twin, layout.views(w2 + t * d2), (x,))
            torch.testing.assert_close(out, out2, rtol=1e-9, atol=1e-10)
    # a unit direction does not follow the rescaling
    d = random_direction(w, layout, torch.Generator().manual_seed(seed), normalization="unit")
    d2 = random_direction(w2, layout, torch.Generator().manual_seed(seed), normalization="unit")
    if abs(a - 1) > 0.2:
        out = torch.func.functional_call(net, layout.views(w + d), (x,))
        out2 = torch.func.functional_call(twin, layout.views(w2 + d2), (x,))
        assert not torch.allclose(out, out2, rtol=1e-3)


def test_direction_errors_and_edge_cases():
    w, layout = _flat(_mlp())
    with pytest.raises(ValueError, match="normalization"):
        normalized(w, w, layout, "filters")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bias"):
        normalized(w, w, layout, "filter", "keep")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flat vectors"):
        filter_normalized(w[:-1], w[:-1], layout)
    with pytest.raises(ValueError, match="zero"):
        unit(torch.zeros(3))
    zero_w = torch.zeros_like(w)  # a zero filter of w gives a zero filter of d, not NaN
    assert torch.all(filter_normalized(torch.ones_like(w), zero_w, layout) == 0)
    torch.testing.assert_close(adaptive_scale(torch.tensor([-2.0, 0.0, 3.0]), 0.01), torch.tensor([2.01, 0.01, 3.01]))
    with pytest.raises(ValueError, match="eta0"):
        adaptive_scale(w, -1.0)


def test_trajectory_direction_is_a_per_step_ema_independent_of_the_cadence():
    """Along a straight line at constant speed every cadence gives the velocity; along a
    changing velocity the EMA weights follow beta per optimizer step."""
    v = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for every in (1, 4, 10):
        td = TrajectoryDirection(beta=0.9)
        d = None
        for step in range(0, 40, every):
            d = td.observe(step, step * v, v)
        torch.testing.assert_close(d, v)
    # two phases: velocity v then u, observed every step: the EMA of per-step displacements
    u = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    td = TrajectoryDirection(beta=0.5)
    w = torch.zeros(3, dtype=torch.float64)
    ema = v.clone()
    td.observe(0, w.clone(), v)
    for step in range(1, 6):
        w = w + (v if step <= 3 else u)  # displacement from step-1 to step
        ema = 0.5 * ema + 0.5 * (v if step <= 3 else u)
        d = td.observe(step, w.clone(), None)
    torch.testing.assert_close(d, ema)
    assert TrajectoryDirection().observe(0, w, None) is None
    with pytest.raises(ValueError, match="beta"):
        TrajectoryDirection(1.0)


@pytest.mark.parametrize("t0", [1e-4, 1.0, 300.0])
@pytest.mark.parametrize("rtol", [1e-2, 1e-6])
def test_exit_distance_brackets_the_level_to_tolerance(t0, rtol):
    a, tau = 3.7, 0.25
    exact = math.sqrt(tau / a)
    calls = []
    res = exit_distance(lambda t: calls.append(t) or a * t * t, tau, t0=t0, rtol=rtol)
    assert res.lo <= exact <= res.hi and res.hi - res.lo <= rtol * res.hi
    assert abs(res.t - exact) <= rtol * exact
    assert res.evaluations == len(calls) <= 2 + abs(math.log2(t0 / exact)) + math.log2(1 / rtol) + 2


def test_exit_distance_special_profiles():
    # never leaves: inf; a kink at 0 that exceeds tau immediately: 0; NaN counts as outside
    assert math.isinf(exit_distance(lambda t: 0.0, 0.1).t)
    assert exit_distance(lambda t: 1.0 if t > 0 else 0.0, 0.1, max_halvings=10).t == 0.0
    res = exit_distance(lambda t: math.nan if t > 2.0 else 0.0, 0.1, t0=0.5, rtol=1e-6)
    assert res.t == pytest.approx(2.0, rel=1e-5)
    # first crossing of a wall, not a later dip below the level
    res = exit_distance(lambda t: math.sin(t) ** 2, 0.25, t0=0.1, rtol=1e-8)
    assert res.t == pytest.approx(math.pi / 6, rel=1e-7)
    for bad in ({"tau": 0.0}, {"tau": math.inf}):
        with pytest.raises(ValueError, match="tau"):
            exit_distance(lambda t: t, **bad)
    with pytest.raises(ValueError, match="t0"):
        exit_distance(lambda t: t, 1.0, t0=-1)
    with pytest.raises(ValueError, match="rtol"):
        exit_distance(lambda t: t, 1.0, rtol=2)


def test_interpolation_stats_closed_forms():
    a = np.linspace(0, 1, 11)
    convex = (a - 0.3) ** 2 + 2 * a
    st_c = interpolation_stats(a, convex)
    assert st_c.barrier == pytest.approx(0.0, abs=1e-15)  # at the end points, exactly on the chord
    bump = 1 - a + 0.5 * np.sin(np.pi * a)  # chord 1 - a, bump 0.5 sin(pi a): barrier 0.5 at a = 0.5
    st_b = interpolation_stats(a, bump)
    assert st_b.barrier == pytest.approx(0.5, abs=1e-12)
    rises = np.sum(np.diff(bump) > 0)
    assert st_b.violations == rises > 0
    assert st_b.max_rise == pytest.approx(np.max(bump[1:] - np.minimum.accumulate(bump)[:-1]))
    mono = interpolation_stats(a, 1 - a)
    assert mono.violations == 0 and mono.max_rise == 0.0
    # tolerance ignores rises below it; extrapolated positions outside [0, 1] do not count
    wiggle = 1 - a + 1e-9 * (np.arange(11) % 2)
    assert interpolation_stats(a, wiggle, tol=1e-8).violations == 0
    b = np.concatenate([[-0.5], a, [1.5]])
    out = interpolation_stats(b, np.concatenate([[10.0], 1 - a, [10.0]]))
    assert out.barrier == pytest.approx(0.0, abs=1e-15) and out.violations == 0
    with pytest.raises(ValueError, match="end points"):
        interpolation_stats([0.1, 0.5], [1.0, 2.0])
    with pytest.raises(ValueError, match="increasing"):
        interpolation_stats([0.0, 1.0, 0.5], [1.0, 2.0, 3.0])


def test_exit_distances_in_lockstep_equal_one_search_per_ray():
    """Several rays searched together give each ray's own result, with one query per unfinished
    ray per round (what lets a caller batch the evaluations)."""
    curvatures = [0.5, 3.0, 40.0, 0.0]  # the last never leaves the level: inf
    profiles = [lambda t, a=a: a * t * t for a in curvatures]
    rounds: list[int] = []

    def phis(queries):
        rounds.append(len(queries))
        assert len({ray for ray, _ in queries}) == len(queries)
        return [profiles[ray](t) for ray, t in queries]

    together = exit_distances(phis, 4, 0.2, t0=[1.0, 1.0, 1e-3, 1.0], rtol=1e-6, max_doublings=20)
    for ray, res in enumerate(together):
        alone = exit_distance(profiles[ray], 0.2, t0=[1.0, 1.0, 1e-3, 1.0][ray], rtol=1e-6, max_doublings=20)
        assert (res.t, res.lo, res.hi, res.evaluations) == (alone.t, alone.lo, alone.hi, alone.evaluations)
    assert math.isinf(together[3].t)
    assert sum(rounds) == sum(r.evaluations for r in together) and max(rounds) == 4
    with pytest.raises(ValueError, match="one per ray"):
        exit_distances(phis, 2, 0.2, t0=[1.0])
