"""Compare optimizers over seeds: per-run scalars, rank tests with effect sizes, hierarchical
bootstrap intervals and pointwise bands over steps (REFERENCE.md §6).

The seed is the unit of replication. Every function here reads a dataset from
``landscape.open_runs`` (dims ``run``, ``step``, ...; coordinates ``optimizer`` and ``seed`` along
``run``), never live objects:

- :func:`run_values`: one scalar per run (a variable at a step, a window summary, a functional).
- :func:`compare`: per optimizer n, mean, sd, median and the bootstrap CI of the mean; two arms:
  Mann-Whitney U with A12 and Cliff's delta, Wilcoxon signed-rank for paired seeds, KS and
  Anderson-Darling; more arms: Kruskal-Wallis, then pairwise Mann-Whitney with Holm correction.
  ``statistic="window"`` pools the last ``tail`` fraction of steps within seeds through the
  hierarchical bootstrap.
- :func:`hierarchical_bootstrap`: resample seeds, then observations within each chosen seed
  (numba kernel; a numpy implementation consuming the same random stream).
- :func:`pointwise`: per step, per-optimizer median with a bootstrap band over seeds and
  per-pair Mann-Whitney p-values, Holm-corrected across steps.
- :func:`holm`, :func:`min_p_mannwhitney`, :func:`min_p_wilcoxon`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numba
import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

# one definition of a run's scalar (shared with plot.compare, so figure and table agree)
from landscape.select import STATISTICS, run_statistic, select as _select

__all__ = ["run_values", "compare", "Comparison", "hierarchical_bootstrap", "BootstrapResult", "pointwise",
           "holm", "min_p_mannwhitney", "min_p_wilcoxon"]

Statistic = str | Callable[[xr.DataArray], float]


# -- minimum achievable p-values ------------------------------------------------------------------
def min_p_mannwhitney(n1: int, n2: int) -> float:
    """Smallest two-sided exact Mann-Whitney p with ``n1`` and ``n2`` untied values: complete
    separation has probability 1/C(n1+n2, n1) under the null, doubled for two sides."""
    if n1 < 1 or n2 < 1:
        return 1.0
    return min(1.0, 2.0 / math.comb(n1 + n2, n1))


def min_p_wilcoxon(n: int) -> float:
    """Smallest two-sided exact Wilcoxon signed-rank p with ``n`` nonzero untied differences:
    all signs equal has probability 2**-n, doubled for two sides."""
    if n < 1:
        return 1.0
    return min(1.0, 2.0 ** (1 - n))


def _needed(min_p: Callable[[int], float], alpha: float) -> int:
    n = 1
    while min_p(n) >= alpha and n < 10_000:
        n += 1
    return n


# -- Holm -------------------------------------------------------------------------------------------
def holm(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (same shape; NaN entries stay NaN and are not counted):
    sorted ascending, p_(i) -> max_{j<=i} min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    flat = p.reshape(-1)
    ok = np.flatnonzero(np.isfinite(flat))
    m = ok.size
    if m == 0:
        return out
    if np.any((flat[ok] < 0) | (flat[ok] > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    order = ok[np.argsort(flat[ok], kind="stable")]
    adj = np.minimum(1.0, (m - np.arange(m)) * flat[order])
    adj = np.maximum.accumulate(adj)
    res = out.reshape(-1)
    res[order] = adj
    return res.reshape(p.shape)


# -- hierarchical bootstrap -----------------------------------------------------------------------
class BootstrapResult(NamedTuple):
    """``estimate``: the statistic of the data; ``low``/``high``: the percentile interval at
    ``level``; ``distribution``: the ``n_boot`` resampled statistics."""
    estimate: float
    low: float
    high: float
    level: float
    distribution: np.ndarray


@numba.njit(cache=True)
def _select_kth(a: np.ndarray, k: int) -> float:
    """k-th smallest of ``a`` (reordered in place: a[:k] <= a[k] <= a[k+1:]). Hoare quickselect:
    np.median/np.sort would cost numba ~8 s of compilation, this well under one."""
    lo, hi = 0, a.size - 1
    while lo < hi:
        p = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < p:
                i += 1
            while a[j] > p:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:
            break
    return a[k]


@numba.njit(cache=True)
def _median_inplace(a: np.ndarray) -> float:
    m = a.size
    k = m // 2
    upper = _select_kth(a, k)
    if m % 2:
        return upper
    lower = a[0]
    for i in range(1, k):  # a loop: a[:k].max() alone would cost numba seconds to compile
        lower = max(lower, a[i])
    return (lower + upper) / 2.0


@numba.njit(cache=True)
def _hboot_numba(values: np.ndarray, offsets: np.ndarray, rng: Any, n_boot: int, median: bool) -> np.ndarray:
    # Random stream per resample: G uniforms pick the seeds, then for each pick in order n_g
    # uniforms pick its observations. _hboot_numpy consumes exactly the same stream.
    G = offsets.size - 1
    out = np.empty(n_boot)
    picks = np.empty(G, dtype=np.int64)
    maxn = 0
    for g in range(G):
        maxn = max(maxn, offsets[g + 1] - offsets[g])
    buf = np.empty(G * maxn)
    for b in range(n_boot):
        for j in range(G):
            picks[j] = min(int(rng.random() * G), G - 1)
        acc = 0.0
        m = 0
        for j in range(G):
            start = offsets[picks[j]]
            n = offsets[picks[j] + 1] - start
            for _ in range(n):
                x = values[start + min(int(rng.random() * n), n - 1)]
                acc += x
                buf[m] = x
                m += 1
        out[b] = _median_inplace(buf[:m]) if median else acc / m
    return out


def _hboot_numpy(values: np.ndarray, offsets: np.ndarray, rng: np.random.Generator, n_boot: int, median: bool) -> np.ndarray:
    G = offsets.size - 1
    sizes_all = np.diff(offsets)
    out = np.empty(n_boot)
    for b in range(n_boot):
        picks = np.minimum((rng.random(G) * G).astype(np.int64), G - 1)
        sizes = sizes_all[picks]
        rep = np.repeat(sizes, sizes)
        local = np.minimum((rng.random(rep.size) * rep).astype(np.int64), rep - 1)
        x = values[np.repeat(offsets[picks], sizes) + local]
        out[b] = np.median(x) if median else x.mean()
    return out


def _csr(values: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("hierarchical_bootstrap needs at least one value")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"values contain {int(np.sum(~np.isfinite(v)))} non-finite entries; drop the unmeasured steps first")
    if groups is None:
        return v, np.arange(v.size + 1, dtype=np.int64)
    g = np.asarray(groups).reshape(-1)
    if g.size != v.size:
        raise ValueError(f"groups must label every value: {g.size} groups for {v.size} values")
    _, inv = np.unique(g, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    return v[order], np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def hierarchical_bootstrap(values: Any, groups: Any = None, *, statistic: str = "mean", n_boot: int = 2000,
                           level: float = 0.95, seed: int = 0, backend: str = "numba") -> BootstrapResult:
    """Percentile CI of ``statistic`` ("mean" or "median") of pooled observations clustered in
    ``groups`` (e.g. steps within seeds): each resample draws as many groups as there are, with
    replacement, then within each drawn group as many observations as it has, with replacement,
    and takes the statistic of everything drawn. ``groups=None``: every value is its own group (the
    ordinary bootstrap). ``backend="numba"`` (compiled kernel) and ``"numpy"`` consume the same
    ``numpy.random.default_rng(seed)`` stream and give the same resamples (equal up to float
    summation order for the mean)."""
    if statistic not in ("mean", "median"):
        raise ValueError(f"statistic must be 'mean' or 'median', got {statistic!r}")
    if backend not in ("numba", "numpy"):
        raise ValueError(f"backend must be 'numba' or 'numpy', got {backend!r}")
    if not isinstance(n_boot, (int, np.integer)) or isinstance(n_boot, bool) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not isinstance(level, (int, float)) or not 0.0 < float(level) < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    v, offsets = _csr(values, groups)
    rng = np.random.default_rng(seed)
    median = statistic == "median"
    kernel = _hboot_numba if backend == "numba" else _hboot_numpy
    dist = kernel(v, offsets, rng, int(n_boot), median)
    est = float(np.median(v) if median else v.mean())
    lo, hi = np.quantile(dist, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return BootstrapResult(est, float(lo), float(hi), float(level), dist)


# -- per-run values ---------------------------------------------------------------------------------
def _check_runs(runs: xr.Dataset, var: str) -> None:
    if not isinstance(runs, xr.Dataset):
        raise TypeError(f"runs must be an xarray.Dataset from landscape.open_runs, got {type(runs).__name__}")
    if var not in runs.data_vars:
        raise ValueError(f"{var!r} is not a variable of this dataset; its variables are {sorted(map(str, runs.data_vars))}")
    for c in ("optimizer", "seed"):
        if c not in runs.coords or runs[c].dims != ("run",):
            raise ValueError(f"runs needs a {c!r} coordinate along 'run' (as landscape.open_runs gives); "
                             "record with run={'optimizer': ..., 'seed': ...}")


def _check_stat(statistic: Any, tail: Any, allowed: tuple[str, ...]) -> None:
    if not callable(statistic) and statistic not in allowed:
        raise ValueError(f"statistic must be one of {allowed} or a callable(DataArray over step) -> float, got {statistic!r}")
    if isinstance(tail, bool) or not isinstance(tail, (int, float)) or not 0.0 < float(tail) <= 1.0:
        raise ValueError(f"tail must be a fraction in (0, 1], got {tail!r}")


def _reduced(runs: xr.Dataset, var: str, sel: Mapping[str, Any] | None) -> xr.DataArray:
    """``var`` with extra dims chosen (run, step, sample left) and loaded."""
    return _select(runs[var], sel, ("run", "step", "sample"), var).load()


def _sample_median(da: xr.DataArray) -> xr.DataArray:
    if "sample" not in da.dims:
        return da
    with warnings.catch_warnings():  # all-NaN rows are steps the probe skipped
        warnings.simplefilter("ignore", RuntimeWarning)
        return da.median("sample", skipna=True)


def _pick_step(da: xr.DataArray, step: Any, var: str) -> xr.DataArray:
    if "step" not in da.dims:
        raise ValueError(f"{var!r} has no step dim (dims {list(da.dims)}); drop step=")
    steps = np.asarray(da["step"].values)
    hit = np.flatnonzero(steps == step)
    if not hit.size:
        raise ValueError(f"step={step!r} is not a step of {var!r}; its steps run {steps.min()}..{steps.max()} "
                         f"({steps.size} steps)")
    return da.isel(step=int(hit[0]))


def _as_run_array(runs: xr.Dataset, vals: Sequence[float], var: str, attrs: dict[str, Any]) -> xr.DataArray:
    return xr.DataArray(np.asarray(vals, dtype=np.float64), dims=("run",),
                        coords={"run": runs["run"].values, "optimizer": ("run", runs["optimizer"].values),
                                "seed": ("run", runs["seed"].values)}, name=var, attrs=attrs)


def run_values(runs: xr.Dataset, var: str, *, sel: Mapping[str, Any] | None = None, statistic: Statistic = "last",
               tail: float = 0.1, step: int | None = None) -> xr.DataArray:
    """One scalar per run of ``var``: its value at ``step``, or ``statistic`` of its series over
    steps ("last" finite value, "mean_tail" = mean over the last ``tail`` fraction of the
    measured steps, "max", "min", or a callable on the run's DataArray over ``step``). A
    ``sample`` dim is reduced by its median first; other extra dims are chosen with ``sel``.
    NaN for a run with nothing measured. Returns a DataArray over ``run`` with ``optimizer`` and
    ``seed`` coordinates."""
    _check_runs(runs, var)
    _check_stat(statistic, tail, STATISTICS)
    da = _reduced(runs, var, sel)
    if step is not None:
        da = _sample_median(_pick_step(da, step, var))
        vals = np.asarray(da.transpose("run").values, dtype=np.float64)
        label = f"at step {step}"
    else:
        vals = [run_statistic(da.isel(run=i), statistic, float(tail)) for i in range(runs.sizes["run"])]
        label = _label(statistic, tail)
    return _as_run_array(runs, vals, var, {"statistic": label, "sel": repr(dict(sel or {}))})


def _label(statistic: Statistic, tail: float) -> str:
    if callable(statistic):
        return getattr(statistic, "__name__", "callable")
    if statistic in ("mean_tail", "window"):
        return f"{statistic} (last {100 * float(tail):g}% of steps)"
    return str(statistic)


def _windows(runs: xr.Dataset, var: str, sel: Mapping[str, Any] | None, tail: float) -> list[np.ndarray]:
    """Per run, the values (sample medians) at the last ``tail`` fraction of its measured steps."""
    da = _reduced(runs, var, sel)
    if "step" not in da.dims:
        raise ValueError(f"statistic='window' needs a series over steps; {var!r} has dims {list(da.dims)}")
    da = _sample_median(da).transpose("run", "step")
    out = []
    for row in np.asarray(da.values, dtype=np.float64):
        row = row[np.isfinite(row)]
        out.append(row[-max(1, math.ceil(tail * row.size)):] if row.size else row)
    return out


# -- two-sample statistics --------------------------------------------------------------------------
def _a12(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(U of a, A12 = U / (n1 n2)): P(a > b) + P(a = b) / 2."""
    r = stats.rankdata(np.concatenate([a, b]))
    u = float(r[: a.size].sum() - a.size * (a.size + 1) / 2.0)
    return u, u / (a.size * b.size)


def _mw(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(np.concatenate([a, b])) == 0:
        return 1.0  # all values equal: no evidence of a shift (scipy returns nan here)
    return float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def _row(test: str, a: str, b: str, na: int, nb: int, stat: float, p: float, **kw: Any) -> dict[str, Any]:
    return {"test": test, "a": a, "b": b, "n_a": na, "n_b": nb, "statistic": stat, "p": p, **kw}


# -- result ------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """What :func:`compare` returns. ``summary``: one row per optimizer (n, mean, sd, median and
    the bootstrap CI of the mean); ``tests``: one row per test (columns test, a, b, n_a, n_b,
    statistic, p, p_holm, a12, cliffs_delta, significant; A12 = P(a > b) + P(a = b)/2);
    ``values``: the per-run scalars (DataArray over run); ``notes``: the warnings raised."""
    var: str
    statistic: str
    alpha: float
    summary: pd.DataFrame
    tests: pd.DataFrame
    values: xr.DataArray
    paired: bool
    notes: list[str] = field(default_factory=list)

    def to_string(self) -> str:
        head = f"compare {self.var!r}: {self.statistic}, alpha={self.alpha:g}" + (", paired by seed" if self.paired else "")
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            parts = [head, "", self.summary.to_string(float_format=lambda x: f"{x:.4g}"), ""]
            if len(self.tests):
                parts.append(self.tests.to_string(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-"))
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def significance(self, test: str = "mann_whitney") -> dict[tuple[str, str], float]:
        """{(a, b): p} of the pairwise ``test`` rows (Holm-corrected where there are several
        pairs), the form :func:`landscape.plot.compare` draws as brackets."""
        out: dict[tuple[str, str], float] = {}
        for _, r in self.tests[self.tests["test"] == test].iterrows() if len(self.tests) else ():
            p = r["p_holm"] if np.isfinite(r["p_holm"]) else r["p"]
            out[(str(r["a"]), str(r["b"]))] = float(p)
        return out

    def __str__(self) -> str:
        return self.to_string()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        notes = "".join(f"<p><b>note:</b> {n}</p>" for n in self.notes)
        return (f"<p>compare <code>{self.var}</code>: {self.statistic}, alpha={self.alpha:g}</p>"
                + self.summary.to_html(float_format=lambda x: f"{x:.4g}")
                + self.tests.to_html(index=False, float_format=lambda x: f"{x:.4g}", na_rep="-") + notes)


def _warn(notes: list[str], msg: str) -> None:
    notes.append(msg)
    warnings.warn(msg, UserWarning, stacklevel=3)


def _seed_map(seeds: np.ndarray, v: np.ndarray) -> dict[Any, float] | None:
    keys = [s.item() if hasattr(s, "item") else s for s in seeds]
    if any(k is None or (isinstance(k, float) and math.isnan(k)) for k in keys) or len(set(keys)) != len(keys):
        return None
    return dict(zip(keys, v))


def compare(runs: xr.Dataset, var: str, *, sel: Mapping[str, Any] | None = None, statistic: Statistic = "last",
            tail: float = 0.1, step: int | None = None, paired: bool | None = None, alpha: float = 0.05,
            reference: str | None = None, n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Per-optimizer distributions over seeds of a per-run scalar of ``var`` (see
    :func:`run_values`; ``statistic="window"``: the mean over the last ``tail`` fraction of steps,
    with its CI from the hierarchical bootstrap over (seed, step) instead of over seeds alone),
    and the tests between optimizers:

    - two arms: Mann-Whitney U (two-sided) with A12 = U/(n_a n_b) and Cliff's delta = 2 A12 - 1;
      Wilcoxon signed-rank on seed-matched differences when ``paired`` (``None``: paired when both
      arms have the same seeds); KS and Anderson-Darling k-sample for the whole distributions.
    - more arms: Kruskal-Wallis and Anderson-Darling over all arms, then pairwise Mann-Whitney
      (and Wilcoxon when paired) with Holm-corrected p-values (``p_holm``). ``reference``: compare
      every other arm with this one only (fewer comparisons, less correction).

    A UserWarning says when an arm has too few seeds for a test to reach ``alpha`` at all (the
    exact minimum p). Runs whose scalar is NaN (nothing measured) are left out."""
    _check_runs(runs, var)
    _check_stat(statistic, tail, STATISTICS + ("window",))
    if not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if paired not in (None, True, False):
        raise TypeError(f"paired must be None, True or False, got {paired!r}")
    window = statistic == "window"
    if window:
        if step is not None:
            raise ValueError("statistic='window' summarises the last tail fraction of steps; drop step=")
        wins = _windows(runs, var, sel, float(tail))
        vals = _as_run_array(runs, [w.mean() if w.size else np.nan for w in wins], var,
                             {"statistic": _label("window", tail)})
    else:
        vals = run_values(runs, var, sel=sel, statistic=statistic, tail=tail, step=step)
        wins = None
    opt = np.asarray(vals["optimizer"].values).astype(str)
    order = list(dict.fromkeys(opt))
    level = 1.0 - float(alpha)
    notes: list[str] = []
    arms: dict[str, np.ndarray] = {}
    seeds: dict[str, np.ndarray] = {}
    rows = []
    for o in order:
        idx = np.flatnonzero((opt == o) & np.isfinite(vals.values))
        dropped = int(np.sum(opt == o)) - idx.size
        if dropped:
            _warn(notes, f"{o}: {dropped} run(s) without a finite {var!r} value left out")
        if not idx.size:
            continue
        x = vals.values[idx]
        arms[o], seeds[o] = x, np.asarray(vals["seed"].values)[idx]
        if window:
            obs = np.concatenate([wins[i] for i in idx])
            grp = np.concatenate([np.full(wins[i].size, k) for k, i in enumerate(idx)])
            boot = hierarchical_bootstrap(obs, grp, n_boot=n_boot, level=level, seed=seed)
        else:
            boot = hierarchical_bootstrap(x, None, n_boot=n_boot, level=level, seed=seed)
        rows.append({"optimizer": o, "n": x.size, "mean": x.mean(), "sd": x.std(ddof=1) if x.size > 1 else np.nan,
                     "median": float(np.median(x)), f"ci{100 * level:g}_low": boot.low, f"ci{100 * level:g}_high": boot.high})
    if not arms:
        raise ValueError(f"{var!r} has no finite value in any run of this dataset")
    summary = pd.DataFrame(rows).set_index("optimizer")
    names = list(arms)
    if reference is not None:
        if reference not in arms:
            raise ValueError(f"reference {reference!r} is not an optimizer with values here; optimizers: {names}")
        pairs = [(o, reference) for o in names if o != reference]
    else:
        pairs = list(combinations(names, 2))

    # pairing: the same seeds in every arm involved
    maps = {o: _seed_map(seeds[o], arms[o]) for o in names}
    same = len(names) >= 2 and all(maps[o] is not None for o in names) and all(set(maps[o]) == set(maps[names[0]]) for o in names)
    if paired is True and not same:
        raise ValueError("paired=True needs the same seeds, each once, in every optimizer; seeds are "
                         + "; ".join(f"{o}: {sorted(map(str, seeds[o]))}" for o in names))
    is_paired = same if paired is None else bool(paired)

    tests: list[dict[str, Any]] = []
    if len(names) > 2:
        pooled = np.concatenate(list(arms.values()))
        if np.ptp(pooled) == 0:  # all values equal: scipy raises; there is no evidence of a difference
            hs, hp = float("nan"), 1.0
        else:
            h = stats.kruskal(*(arms[o] for o in names))
            hs, hp = float(h.statistic), float(h.pvalue)
        tests.append(_row("kruskal", "all", "", pooled.size, 0, hs, hp))
    if len(names) >= 2 and all(arms[o].size >= 2 for o in names):
        if np.unique(np.concatenate(list(arms.values()))).size < 2:  # one distinct value: scipy raises
            ad_s, ad_p = float("nan"), 1.0
        else:
            with warnings.catch_warnings():  # scipy warns when its tabulated p is capped to [0.001, 0.25]
                warnings.simplefilter("ignore", UserWarning)
                ad = stats.anderson_ksamp([arms[o] for o in names])
            ad_s, ad_p = float(ad.statistic), float(ad.pvalue)
        tests.append(_row("anderson_darling", "all" if len(names) > 2 else names[0], "" if len(names) > 2 else names[1],
                          arms[names[0]].size, arms[names[1]].size if len(names) == 2 else 0, ad_s, ad_p))
    mw_rows, wx_rows = [], []
    for a, b in pairs:
        x, y = arms[a], arms[b]
        u, a12 = _a12(x, y)
        mw_rows.append(_row("mann_whitney", a, b, x.size, y.size, u, _mw(x, y), a12=a12, cliffs_delta=2 * a12 - 1))
        mp = min_p_mannwhitney(x.size, y.size)
        if mp >= alpha:
            _warn(notes, f"{a} vs {b}: with {x.size} and {y.size} seeds the smallest two-sided Mann-Whitney p is "
                         f"{mp:.3g} >= alpha={alpha:g}: no result can be significant; use at least "
                         f"{_needed(lambda n: min_p_mannwhitney(n, n), alpha)} seeds per optimizer")
        if is_paired:
            keys = sorted(maps[a], key=str)
            d = np.array([maps[a][k] - maps[b][k] for k in keys])
            nz = int(np.sum(d != 0))
            wres = stats.wilcoxon(d) if nz else None  # all differences zero: no evidence either way
            wx_rows.append(_row("wilcoxon", a, b, len(keys), len(keys), float(wres.statistic) if nz else 0.0,
                                float(wres.pvalue) if nz else 1.0))
            mp = min_p_wilcoxon(nz)
            if mp >= alpha:
                _warn(notes, f"{a} vs {b}: with {nz} nonzero paired differences the smallest two-sided Wilcoxon p is "
                             f"{mp:.3g} >= alpha={alpha:g}: no result can be significant; use at least "
                             f"{_needed(min_p_wilcoxon, alpha)} paired seeds")
        if len(names) == 2:
            ks = stats.ks_2samp(x, y)
            tests_ks = _row("ks", a, b, x.size, y.size, float(ks.statistic), float(ks.pvalue))
    for group in (mw_rows, wx_rows):
        adj = holm([r["p"] for r in group]) if group else []
        for r, pa in zip(group, adj):
            r["p_holm"] = float(pa)
    tests += mw_rows + wx_rows
    if len(names) == 2:
        tests.append(tests_ks)
    table = pd.DataFrame(tests, columns=["test", "a", "b", "n_a", "n_b", "statistic", "p", "p_holm", "a12", "cliffs_delta"])
    if len(table):
        pcol = table["p_holm"].where(table["p_holm"].notna(), table["p"])
        table["significant"] = pcol < alpha
    stat_label = vals.attrs.get("statistic", str(statistic))
    return Comparison(var, stat_label, float(alpha), summary, table, vals, is_paired, notes)


# -- pointwise over steps ----------------------------------------------------------------------------
def pointwise(runs: xr.Dataset, var: str, *, sel: Mapping[str, Any] | None = None, alpha: float = 0.05,
              n_boot: int = 1000, seed: int = 0) -> xr.Dataset:
    """Per step: per optimizer the median over seeds (of the per-run sample medians) with a
    percentile bootstrap band of that median at level 1 - ``alpha`` (``n``: seeds measured), and
    per pair of optimizers the two-sided Mann-Whitney p (``p``), A12, and Holm-corrected p across
    the steps measured (``p_holm``, ``significant`` = p_holm < alpha). Returns a Dataset with dims
    (optimizer, step) and (pair, step); ``pair`` labels read "a vs b" (coords ``a``, ``b``)."""
    _check_runs(runs, var)
    if not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    da = _reduced(runs, var, sel)
    if "step" not in da.dims:
        raise ValueError(f"{var!r} has no step dim (dims {list(da.dims)}): nothing to compare pointwise; use compare()")
    da = _sample_median(da).transpose("run", "step")
    v = np.asarray(da.values, dtype=np.float64)
    steps = np.asarray(da["step"].values)
    opt = np.asarray(runs["optimizer"].values).astype(str)
    names = list(dict.fromkeys(opt))
    S = steps.size
    rng = np.random.default_rng(seed)
    med = np.full((len(names), S), np.nan)
    lo, hi = med.copy(), med.copy()
    n = np.zeros((len(names), S), dtype=np.int64)
    for k, o in enumerate(names):
        rows = v[opt == o]
        for s in range(S):
            x = rows[:, s][np.isfinite(rows[:, s])]
            n[k, s] = x.size
            if not x.size:
                continue
            med[k, s] = np.median(x)
            if x.size > 1:
                boot = np.median(x[rng.integers(0, x.size, size=(n_boot, x.size))], axis=1)
                lo[k, s], hi[k, s] = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    pairs = list(combinations(names, 2))
    p = np.full((len(pairs), S), np.nan)
    a12 = p.copy()
    for j, (a, b) in enumerate(pairs):
        ra, rb = v[opt == a], v[opt == b]
        for s in range(S):
            x, y = ra[:, s][np.isfinite(ra[:, s])], rb[:, s][np.isfinite(rb[:, s])]
            if x.size and y.size:
                p[j, s] = _mw(x, y)
                a12[j, s] = _a12(x, y)[1]
        mp = min_p_mannwhitney(int(np.sum(opt == a)), int(np.sum(opt == b)))
        if mp >= alpha:
            warnings.warn(f"{a} vs {b}: with {int(np.sum(opt == a))} and {int(np.sum(opt == b))} seeds the smallest "
                          f"two-sided Mann-Whitney p is {mp:.3g} >= alpha={alpha:g}: no step can be significant",
                          UserWarning, stacklevel=2)
    ph = np.stack([holm(row) for row in p]) if pairs else p
    labels = [f"{a} vs {b}" for a, b in pairs]
    return xr.Dataset(
        {"median": (("optimizer", "step"), med), "low": (("optimizer", "step"), lo), "high": (("optimizer", "step"), hi),
         "n": (("optimizer", "step"), n), "p": (("pair", "step"), p), "p_holm": (("pair", "step"), ph),
         "a12": (("pair", "step"), a12), "significant": (("pair", "step"), np.nan_to_num(ph, nan=1.0) < alpha)},
        coords={"optimizer": names, "step": steps, "pair": labels, "a": ("pair", [a for a, _ in pairs]),
                "b": ("pair", [b for _, b in pairs])},
        attrs={"var": var, "alpha": float(alpha), "level": 1.0 - float(alpha), "n_boot": int(n_boot),
               "correction": "holm across steps, per pair"})
