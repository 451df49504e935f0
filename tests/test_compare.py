"""landscape.compare: every statistic against scipy (or a brute-force count) on the same numbers,
Holm against a hand computation, the exact minimum p behind the too-few-seeds warnings, bootstrap
coverage on synthetic hierarchical data with a known mean, numba vs numpy, pointwise bands on data
where one optimizer is better only after a given step, and compare() on real recorded runs."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats

import landscape
import probes
from landscape.compare import (Comparison, compare, hierarchical_bootstrap, holm, min_p_mannwhitney, min_p_wilcoxon,
                               pointwise, run_values)
from landscape.models import DigitsMLP
from tests._helpers import record

pytestmark = pytest.mark.usefixtures("one_thread")


def runs_ds(arms: dict[str, np.ndarray], seeds: dict[str, list] | None = None, dims: tuple[str, ...] = ("step",),
            coords: dict | None = None) -> xr.Dataset:
    """A dataset shaped like open_runs output: per arm an array (seeds, *dims) of variable 'x'."""
    names, opts, sds, blocks = [], [], [], []
    for o, v in arms.items():
        s = (seeds or {}).get(o, list(range(v.shape[0])))
        for i in range(v.shape[0]):
            names.append(f"{o}-{s[i]}")
            opts.append(o)
            sds.append(s[i])
            blocks.append(v[i])
    data = np.stack(blocks)
    c = {"run": names, "optimizer": ("run", opts), "seed": ("run", sds)}
    if "step" in dims:
        c["step"] = np.arange(data.shape[1 + dims.index("step")]) * 2
    c.update(coords or {})
    return xr.Dataset({"x": (("run",) + dims, data)}, coords=c)


def scalars(arms: dict[str, np.ndarray], seeds=None) -> xr.Dataset:
    """One value per run, at a single step."""
    return runs_ds({o: np.asarray(v, dtype=np.float64)[:, None] for o, v in arms.items()}, seeds)


def row(cmp: Comparison, test: str, a: str = None, b: str = None):
    t = cmp.tests
    sel = t["test"] == test
    if a is not None:
        sel &= (t["a"] == a) & (t["b"] == b)
    assert sel.sum() == 1, cmp.tests
    return t[sel].iloc[0]


def quiet(fn, *a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*a, **kw)


# -- statistics against scipy ----------------------------------------------------------------------
def test_two_arms_agree_with_scipy_and_brute_force():
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(0.0, 1.0, 9), 1)  # rounded: ties exercise the midrank conventions
    y = np.round(rng.normal(0.8, 1.0, 7), 1)
    cmp = compare(scalars({"sgd": x, "adam": y}), "x")
    assert not cmp.paired
    mw = row(cmp, "mann_whitney")
    ref = stats.mannwhitneyu(x, y, alternative="two-sided")
    assert mw["statistic"] == pytest.approx(ref.statistic, abs=1e-12) and mw["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    greater = sum(float(a > b) + 0.5 * float(a == b) for a in x for b in y)
    assert mw["a12"] == pytest.approx(greater / (x.size * y.size), abs=1e-12)
    dominance = sum(np.sign(a - b) for a in x for b in y) / (x.size * y.size)
    assert mw["cliffs_delta"] == pytest.approx(dominance, abs=1e-12)
    ks = row(cmp, "ks")
    ref = stats.ks_2samp(x, y)
    assert ks["statistic"] == pytest.approx(ref.statistic) and ks["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    ad = row(cmp, "anderson_darling")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ref = stats.anderson_ksamp([x, y])
    assert ad["statistic"] == pytest.approx(ref.statistic) and ad["p"] == pytest.approx(ref.pvalue)
    s = cmp.summary
    for o, v in (("sgd", x), ("adam", y)):
        assert s.loc[o, "n"] == v.size
        assert s.loc[o, "mean"] == pytest.approx(v.mean()) and s.loc[o, "sd"] == pytest.approx(v.std(ddof=1))
        assert s.loc[o, "median"] == pytest.approx(np.median(v))
        assert s.loc[o, "ci95_low"] < v.mean() < s.loc[o, "ci95_high"]
    text = str(cmp)
    assert "mann_whitney" in text and "sgd" in text and "ci95_low" in text and "a12" in text


def test_paired_seeds_use_wilcoxon_like_scipy():
    rng = np.random.default_rng(2)
    seeds = [3, 1, 4, 0, 5, 9, 2, 6]
    base = rng.normal(size=8)
    x = base + rng.normal(0.5, 0.3, 8)
    y = base.copy()
    # y listed in a different seed order: pairing must go by seed, not by position
    perm = np.array([2, 0, 1, 3, 7, 6, 5, 4])
    ds = scalars({"sam": x, "sgd": y[perm]}, seeds={"sam": seeds, "sgd": [seeds[i] for i in perm]})
    cmp = compare(ds, "x")
    assert cmp.paired
    w = row(cmp, "wilcoxon")
    ref = stats.wilcoxon(x - y)
    assert w["statistic"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    # the same arms with paired=False: no Wilcoxon row
    unpaired = compare(ds, "x", paired=False)
    assert not unpaired.paired and not (unpaired.tests["test"] == "wilcoxon").any()
    with pytest.raises(ValueError, match="same seeds"):
        compare(scalars({"a": x, "b": y}, seeds={"a": list(range(8)), "b": list(range(1, 9))}), "x", paired=True)


def test_three_arms_kruskal_then_holm_pairwise():
    rng = np.random.default_rng(3)
    arms = {"sgd": rng.normal(0, 1, 6), "adam": rng.normal(1.5, 1, 7), "sam": rng.normal(0.5, 1, 8)}
    cmp = compare(scalars(arms), "x")
    k = row(cmp, "kruskal")
    ref = stats.kruskal(*arms.values())
    assert k["statistic"] == pytest.approx(ref.statistic) and k["p"] == pytest.approx(ref.pvalue)
    ad = row(cmp, "anderson_darling")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert ad["statistic"] == pytest.approx(stats.anderson_ksamp(list(arms.values())).statistic)
    pairs = [("sgd", "adam"), ("sgd", "sam"), ("adam", "sam")]
    raw = [stats.mannwhitneyu(arms[a], arms[b], alternative="two-sided").pvalue for a, b in pairs]
    for (a, b), p, ph in zip(pairs, raw, holm(raw)):
        r = row(cmp, "mann_whitney", a, b)
        assert r["p"] == pytest.approx(p, rel=1e-12) and r["p_holm"] == pytest.approx(ph, rel=1e-12)
        assert r["significant"] == (ph < 0.05)
    # reference: only comparisons with it, Holm over those two
    ref_cmp = compare(scalars(arms), "x", reference="sgd")
    mw = ref_cmp.tests[ref_cmp.tests["test"] == "mann_whitney"]
    assert set(zip(mw["a"], mw["b"])) == {("adam", "sgd"), ("sam", "sgd")}
    raw2 = [stats.mannwhitneyu(arms[o], arms["sgd"], alternative="two-sided").pvalue for o in ("adam", "sam")]
    assert np.allclose(mw["p_holm"].to_numpy(), holm(raw2))
    flat = quiet(compare, scalars({o: np.ones(4) for o in arms}), "x")  # identical values: no evidence, no crash
    assert (flat.tests["p"] == 1.0).all() and not flat.tests["significant"].any()
    with pytest.raises(ValueError, match="reference 'rmsprop'"):
        compare(scalars(arms), "x", reference="rmsprop")


def test_holm_against_hand_computation():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06
    assert np.allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, np.nan, 0.02])  # NaN not counted: m = 2
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.02, 0.02])
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    assert np.allclose(holm(np.array([[0.01, 0.2], [0.03, 0.04]])), [[0.04, 0.2], [0.09, 0.09]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.2, 1.5])


# -- too few seeds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n1,n2", [(2, 2), (3, 3), (3, 4), (4, 4), (5, 3)])
def test_min_p_mannwhitney_is_scipys_exact_p_at_complete_separation(n1, n2):
    p = stats.mannwhitneyu(np.arange(n1), np.arange(n2) + n1, alternative="two-sided", method="exact").pvalue
    assert min_p_mannwhitney(n1, n2) == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("n", [3, 5, 6, 8])
def test_min_p_wilcoxon_is_scipys_exact_p_when_all_signs_agree(n):
    assert min_p_wilcoxon(n) == pytest.approx(stats.wilcoxon(np.arange(1.0, n + 1), method="exact").pvalue, rel=1e-12)


def test_too_few_seeds_warn_with_the_minimum_p_and_enough_do_not():
    rng = np.random.default_rng(4)
    few = scalars({"a": rng.normal(size=3), "b": rng.normal(size=3) + 5}, seeds={"a": [0, 1, 2], "b": [3, 4, 5]})
    with pytest.warns(UserWarning, match=r"smallest two-sided Mann-Whitney p is 0\.1 .*at least 4 seeds"):
        cmp = compare(few, "x")
    assert row(cmp, "mann_whitney")["p"] == pytest.approx(0.1) and cmp.notes
    enough = scalars({"a": rng.normal(size=4), "b": rng.normal(size=4) + 5}, seeds={"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cmp = compare(enough, "x")
    assert row(cmp, "mann_whitney")["p"] == pytest.approx(2 / 70) and row(cmp, "mann_whitney")["significant"]
    # paired: 5 pairs cannot reach 0.05 with Wilcoxon (min p = 1/16), 6 can
    paired5 = scalars({"a": rng.normal(size=5), "b": rng.normal(size=5) + 5})
    with pytest.warns(UserWarning, match=r"Wilcoxon p is 0\.0625 .*at least 6 paired"):
        compare(paired5, "x")
    paired6 = scalars({"a": rng.normal(size=6), "b": rng.normal(size=6) + 5})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        cmp = compare(paired6, "x")
    assert cmp.paired and row(cmp, "wilcoxon")["p"] == pytest.approx(1 / 32)


# -- hierarchical bootstrap -------------------------------------------------------------------------
def hier_data(rng, G=12, n=15, mu=3.0, tau=1.0, sigma=1.0):
    means = mu + tau * rng.normal(size=G)
    values = (means[:, None] + sigma * rng.normal(size=(G, n))).ravel()
    return values, np.repeat(np.arange(G), n)


def test_hierarchical_bootstrap_coverage_is_about_95_percent():
    rng = np.random.default_rng(5)
    hits = 0
    repeats = 200
    for r in range(repeats):
        v, g = hier_data(rng)
        res = hierarchical_bootstrap(v, g, n_boot=1000, seed=r)
        hits += res.low <= 3.0 <= res.high
    assert 0.90 <= hits / repeats <= 0.99, hits / repeats


def test_hierarchical_bootstrap_variance_matches_closed_forms():
    rng = np.random.default_rng(6)
    # constant within seeds: the hierarchical bootstrap is the bootstrap of the seed means, whose
    # mean has variance mean((m - mean(m))^2) / G
    m = rng.normal(size=8)
    res = hierarchical_bootstrap(np.repeat(m, 5), np.repeat(np.arange(8), 5), n_boot=20000, seed=1)
    assert res.estimate == pytest.approx(m.mean())
    assert res.distribution.mean() == pytest.approx(m.mean(), abs=0.02)
    assert res.distribution.var() == pytest.approx(np.mean((m - m.mean()) ** 2) / 8, rel=0.05)
    # one group: the ordinary bootstrap of the values within it
    x = rng.normal(size=30)
    one = hierarchical_bootstrap(x, np.zeros(30), n_boot=20000, seed=2)
    assert one.distribution.var() == pytest.approx(np.mean((x - x.mean()) ** 2) / 30, rel=0.05)
    none = hierarchical_bootstrap(x, None, n_boot=20000, seed=2)  # every value its own group: the same law
    assert none.distribution.var() == pytest.approx(np.mean((x - x.mean()) ** 2) / 30, rel=0.05)
    lo, hi = np.quantile(none.distribution, [0.025, 0.975])
    assert (none.low, none.high) == (pytest.approx(lo), pytest.approx(hi))


def test_numba_and_numpy_backends_agree():
    rng = np.random.default_rng(7)
    v, g = hier_data(rng, G=6, n=9)
    g = np.array(list("abcdef"))[g]  # any labels
    v, g = v[:-4], g[:-4]  # unequal group sizes
    for stat in ("mean", "median"):
        a = hierarchical_bootstrap(v, g, statistic=stat, n_boot=300, seed=11, backend="numba")
        b = hierarchical_bootstrap(v, g, statistic=stat, n_boot=300, seed=11, backend="numpy")
        if stat == "median":
            assert np.array_equal(a.distribution, b.distribution)
        else:  # same resamples; only the summation order differs
            assert np.allclose(a.distribution, b.distribution, rtol=0, atol=1e-12)
    # different seeds: the same distribution (two-sample KS), not the same numbers
    a = hierarchical_bootstrap(v, g, n_boot=4000, seed=1, backend="numba").distribution
    b = hierarchical_bootstrap(v, g, n_boot=4000, seed=2, backend="numpy").distribution
    assert not np.allclose(a[:10], b[:10])
    assert stats.ks_2samp(a, b).pvalue > 1e-3
    assert a.std() == pytest.approx(b.std(), rel=0.08)


def test_bootstrap_rejects_bad_input():
    with pytest.raises(ValueError, match="non-finite"):
        hierarchical_bootstrap([1.0, np.nan], [0, 1])
    with pytest.raises(ValueError, match="groups must label"):
        hierarchical_bootstrap([1.0, 2.0], [0])
    with pytest.raises(ValueError, match="backend"):
        hierarchical_bootstrap([1.0, 2.0], backend="cuda")
    with pytest.raises(ValueError, match="statistic"):
        hierarchical_bootstrap([1.0, 2.0], statistic="mode")
    with pytest.raises(ValueError, match="level"):
        hierarchical_bootstrap([1.0, 2.0], level=95)


def test_window_pools_steps_through_the_hierarchical_bootstrap():
    rng = np.random.default_rng(8)
    arms = {o: mu + rng.normal(size=(6, 1)) + 0.3 * rng.normal(size=(6, 40)) for o, mu in (("sgd", 0.0), ("adam", 2.0))}
    ds = runs_ds(arms, seeds={"sgd": list(range(6)), "adam": list(range(10, 16))})
    cmp = compare(ds, "x", statistic="window", tail=0.25, n_boot=500, seed=3)
    for o, v in arms.items():
        w = v[:, -10:]
        ref = hierarchical_bootstrap(w.ravel(), np.repeat(np.arange(6), 10), n_boot=500, level=0.95, seed=3)
        assert cmp.summary.loc[o, "mean"] == pytest.approx(w.mean(axis=1).mean())
        assert (cmp.summary.loc[o, "ci95_low"], cmp.summary.loc[o, "ci95_high"]) == (pytest.approx(ref.low), pytest.approx(ref.high))
    mw = row(cmp, "mann_whitney")
    ref = stats.mannwhitneyu(arms["sgd"][:, -10:].mean(1), arms["adam"][:, -10:].mean(1), alternative="two-sided")
    assert mw["p"] == pytest.approx(ref.pvalue)
    with pytest.raises(ValueError, match="drop step="):
        compare(ds, "x", statistic="window", step=4)


# -- run_values -----------------------------------------------------------------------------------------
def test_run_values_statistics_steps_samples_and_sel():
    rng = np.random.default_rng(9)
    v = rng.normal(size=(2, 10, 3, 2))
    v[0, 7:] = np.nan  # run 0 stopped measuring after step index 6
    ds = runs_ds({"sgd": v[:1], "adam": v[1:]}, dims=("step", "sample", "kind"), coords={"kind": ["a", "b"]})
    with pytest.raises(ValueError, match=r"kind \(labels \['a', 'b'\]\)"):
        run_values(ds, "x")
    with pytest.raises(ValueError, match="no kind='c'"):
        run_values(ds, "x", sel={"kind": "c"})
    med = np.median(v[..., 1], axis=2)  # sample median, kind b
    last = run_values(ds, "x", sel={"kind": "b"})
    assert last.dims == ("run",) and list(last["optimizer"].values) == ["sgd", "adam"] and list(last["seed"].values) == [0, 0]
    assert np.allclose(last.values, [med[0, 6], med[1, 9]])
    tail = run_values(ds, "x", sel={"kind": "b"}, statistic="mean_tail", tail=0.3)
    assert np.allclose(tail.values, [med[0, 4:7].mean(), med[1, 7:].mean()])  # ceil(0.3*7) = 3, ceil(0.3*10) = 3
    assert np.allclose(run_values(ds, "x", sel={"kind": "b"}, statistic="max").values, [med[0, :7].max(), med[1].max()])
    assert np.allclose(run_values(ds, "x", sel={"kind": "b"}, statistic="min").values, [med[0, :7].min(), med[1].min()])
    at = run_values(ds, "x", sel={"kind": "b"}, step=4)  # step labels are 0, 2, 4, ...
    assert np.allclose(at.values, med[:, 2])
    span = run_values(ds, "x", sel={"kind": "b"}, statistic=lambda s: float(s.max() - s.min()))
    assert np.allclose(span.values, [np.ptp(med[0, :7]), np.ptp(med[1])])
    with pytest.raises(ValueError, match="step=5 is not a step"):
        run_values(ds, "x", sel={"kind": "b"}, step=5)
    with pytest.raises(ValueError, match="statistic must be one of"):
        run_values(ds, "x", sel={"kind": "b"}, statistic="median")
    with pytest.raises(ValueError, match="tail"):
        run_values(ds, "x", sel={"kind": "b"}, statistic="mean_tail", tail=0)
    with pytest.raises(ValueError, match="not a variable"):
        run_values(ds, "loss")
    with pytest.raises(ValueError, match="'seed' coordinate"):
        run_values(ds.drop_vars("seed"), "x", sel={"kind": "b"})
    with pytest.raises(TypeError, match="open_runs"):
        run_values(ds["x"], "x")


# -- pointwise ------------------------------------------------------------------------------------------
def test_pointwise_finds_the_steps_where_one_optimizer_is_better():
    rng = np.random.default_rng(10)
    S, n, change = 24, 10, 12
    a = rng.normal(size=(n, S))
    b = rng.normal(size=(n, S))
    a[:, change:] -= 6.0  # a is better (lower) only from step index 12 on
    c = rng.normal(size=(n, S))
    ds = runs_ds({"a": a, "b": b, "c": c})
    # Holm keeps the chance of any false step per pair below alpha: 1% here, while the true
    # differences reach p = 2/C(20, 10) * 24 steps = 2.6e-4 after correction
    pw = pointwise(ds, "x", alpha=0.01)
    assert pw["p"].dims == ("pair", "step") and pw["median"].dims == ("optimizer", "step")
    assert list(pw["pair"].values) == ["a vs b", "a vs c", "b vs c"]
    for pair in ("a vs b", "a vs c"):
        sig = pw["significant"].sel(pair=pair).values
        assert sig[change:].all() and not sig[:change].any()
        assert np.all(pw["a12"].sel(pair=pair).values[change:] == 0.0)
    assert not pw["significant"].sel(pair="b vs c").values.any()
    # the numbers: scipy per step, Holm across steps, medians over seeds, band around them
    p = [stats.mannwhitneyu(a[:, s], b[:, s], alternative="two-sided").pvalue for s in range(S)]
    assert np.allclose(pw["p"].sel(pair="a vs b").values, p, rtol=1e-12)
    assert np.allclose(pw["p_holm"].sel(pair="a vs b").values, holm(p))
    assert np.allclose(pw["median"].sel(optimizer="a").values, np.median(a, axis=0))
    assert pw.attrs["level"] == pytest.approx(0.99)
    lo, hi = pw["low"].values, pw["high"].values
    assert np.all(lo <= pw["median"].values) and np.all(pw["median"].values <= hi) and np.all(hi > lo)
    assert (pw["n"].values == n).all()


def test_pointwise_band_covers_the_median_over_seeds_of_synthetic_data():
    # the band is a bootstrap interval of the median over seeds: its width shrinks like 1/sqrt(n)
    rng = np.random.default_rng(11)
    small = pointwise(runs_ds({"a": rng.normal(size=(10, 5)), "b": rng.normal(size=(10, 5))}), "x")
    big = pointwise(runs_ds({"a": rng.normal(size=(160, 5)), "b": rng.normal(size=(160, 5))}), "x")
    w_small = float((small["high"] - small["low"]).mean())
    w_big = float((big["high"] - big["low"]).mean())
    assert 2.5 < w_small / w_big < 6.0  # sqrt(16) = 4
    # median 0: the big band contains it at most steps
    assert ((big["low"] <= 0) & (big["high"] >= 0)).mean() >= 0.8


# -- real recorded runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> xr.Dataset:
    """Two optimizers x three seeds of DigitsMLP(hidden=8), 10 steps, RestrictedSecant every 2 steps."""
    root = tmp_path_factory.mktemp("compare_runs")
    for name, opt_cls, kw in (("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), ("adam", torch.optim.Adam, {"lr": 0.01})):
        for seed in range(3):
            record(root / f"{name}-{seed}.zarr", [probes.RestrictedSecant(every=2, samples=2)], model=lambda: DigitsMLP(hidden=8),
                   steps=10, seed=seed, opt_cls=opt_cls, run={"optimizer": name, "seed": seed}, **kw)
    return landscape.open_runs(sorted(root.glob("*.zarr")))


def test_compare_on_recorded_runs(recorded):
    ds = recorded
    assert ds["rsi"].dims == ("run", "step", "sample")
    with pytest.warns(UserWarning) as caught:
        cmp = compare(ds, "rsi", statistic="mean_tail", tail=0.5)
    said = [str(w.message) for w in caught]
    assert any("Mann-Whitney p is 0.1 " in m for m in said) and any("Wilcoxon p is 0.25 " in m for m in said)
    with warnings.catch_warnings():  # all-NaN rows: the steps RSI was not measured
        warnings.simplefilter("ignore", RuntimeWarning)
        rsi = np.nanmedian(ds["rsi"].load().values, axis=2)  # (run, step)
    manual = {}
    for i, o in enumerate(ds["optimizer"].values):
        r = rsi[i][np.isfinite(rsi[i])]
        manual.setdefault(str(o), []).append(r[-math.ceil(0.5 * r.size):].mean())
    assert cmp.paired  # same seeds 0, 1, 2 in both arms
    for o, v in manual.items():
        assert cmp.summary.loc[o, "mean"] == pytest.approx(np.mean(v))
    ref = stats.mannwhitneyu(manual["adam"], manual["sgd"], alternative="two-sided")
    mw = row(cmp, "mann_whitney")
    assert (mw["a"], mw["b"]) == ("adam", "sgd") and mw["p"] == pytest.approx(ref.pvalue)
    seeds = list(ds["seed"].values)
    d = [manual["adam"][seeds[i]] - manual["sgd"][seeds[i + 3]] for i in range(3)]
    assert row(cmp, "wilcoxon")["p"] == pytest.approx(stats.wilcoxon(d).pvalue)
    pw = quiet(pointwise, ds, "rsi")
    measured = ~np.isnan(pw["median"].sel(optimizer="sgd").values)
    assert measured.sum() >= 4 and (pw["n"].values[:, measured] == 3).all()


def test_significance_feeds_the_comparison_figure():
    """Comparison.significance() gives plot.compare its brackets: the Mann-Whitney p per pair."""
    from landscape import plot

    rng = np.random.default_rng(3)
    values = np.r_[rng.normal(0, 1, (6, 4)), rng.normal(3, 1, (6, 4)), rng.normal(0.2, 1, (6, 4))]
    runs = xr.Dataset({"x": (("run", "step"), values, {"long_name": "x", "units": "1"})},
                      coords={"run": [f"r{i}" for i in range(18)], "optimizer": ("run", ["a"] * 6 + ["b"] * 6 + ["c"] * 6),
                              "seed": ("run", list(range(6)) * 3), "step": np.arange(4)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compare(runs, "x")
    sig = result.significance()
    mw = result.tests[result.tests["test"] == "mann_whitney"]
    assert set(sig) == {(a, b) for a, b in zip(mw["a"], mw["b"])} and len(sig) == 3
    for (a, b), p in sig.items():
        row = mw[(mw["a"] == a) & (mw["b"] == b)].iloc[0]
        assert p == row["p_holm"]
    fig = plot.compare(runs, "x", significance=sig)
    assert sum("p =" in (ann.text or "") for ann in fig.layout.annotations) == 3
