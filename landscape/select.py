"""Choosing values out of a run's dataset: a label per extra dim, a run's series over steps
(median over probe batches), and one scalar per run. Shared by the statistics
(:mod:`landscape.compare`) and the figures (:mod:`landscape.plot`); reads datasets only.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import xarray as xr

STATISTICS = ("last", "mean_tail", "max", "min")


def labels(da: xr.DataArray, dim: str) -> list[Any]:
    """The labels of ``dim`` (its coordinate values, or 0..n-1 without one)."""
    if dim in da.coords:
        return [v.item() if hasattr(v, "item") else v for v in np.asarray(da[dim].values)]
    return list(range(da.sizes[dim]))


def pick(da: xr.DataArray, dim: str, label: Any, name: str) -> xr.DataArray:
    """``da`` at ``dim=label`` (numeric labels compared with a tolerance), or a ValueError listing the labels."""
    labs = labels(da, dim)
    if dim not in da.coords:
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool) and 0 <= int(label) < len(labs):
            return da.isel({dim: int(label)})
    else:
        for i, lab in enumerate(labs):
            if lab == label or (isinstance(lab, float) and isinstance(label, (int, float)) and math.isclose(lab, label)):
                return da.isel({dim: i})
    raise ValueError(f"{name!r} has no {dim}={label!r}; its {dim} labels are {labs}")


def select(da: xr.DataArray, sel: Mapping[str, Any] | None, keep: Sequence[str], name: str) -> xr.DataArray:
    """``da`` reduced to the dims in ``keep`` (those it has): ``sel`` picks a label per extra dim;
    without it a dim with one label, or with the label ``model``, takes that label."""
    sel = dict(sel or {})
    unknown = [d for d in sel if d not in da.dims]
    if unknown:
        raise ValueError(f"sel names dims {unknown} that {name!r} does not have; its dims are {list(da.dims)}")
    for dim, label in sel.items():
        da = pick(da, dim, label, name)
    ambiguous = []
    for dim in [d for d in da.dims if d not in keep]:
        labs = labels(da, dim)
        if len(labs) == 1:
            da = da.isel({dim: 0})
        elif "model" in labs:
            da = da.isel({dim: labs.index("model")})
        else:
            ambiguous.append(f"{dim} (labels {labs})")
    if ambiguous:
        first = ambiguous[0].split(" ")[0]
        raise ValueError(f"{name!r} has extra dims to choose from: {'; '.join(ambiguous)}; pass sel={{{first!r}: <label>, ...}}")
    return da


def series(da: xr.DataArray, band: tuple[float, float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """(steps, median over samples or the value, band low, band high) at the measured steps."""
    steps = np.asarray(da["step"].values)
    if "sample" in da.dims:
        v = np.asarray(da.transpose("step", "sample").values, dtype=np.float64)
        with warnings.catch_warnings():  # all-NaN rows are the steps the probe skipped
            warnings.simplefilter("ignore", RuntimeWarning)
            mid = np.nanmedian(v, axis=1)
            lo, hi = (np.nanquantile(v, q, axis=1) for q in band) if band is not None else (None, None)
    else:
        mid, lo, hi = np.asarray(da.values, dtype=np.float64), None, None
    ok = np.isfinite(mid)
    return steps[ok], mid[ok], (lo[ok] if lo is not None else None), (hi[ok] if hi is not None else None)


def statistic_name(statistic: str | Callable[[xr.DataArray], float], tail: float) -> str:
    if callable(statistic):
        return str(getattr(statistic, "__name__", "statistic"))
    return {"last": "last value", "mean_tail": f"mean of the last {tail * 100:g}% of steps",
            "max": "max over steps", "min": "min over steps"}[statistic]


def run_statistic(da: xr.DataArray, statistic: str | Callable[[xr.DataArray], float] = "last", tail: float = 0.1) -> float:
    """One run's scalar from its series over ``step`` (NaN steps dropped first; a sample dim is
    reduced by the median): the last value, the mean over the last ``tail`` fraction of the
    measured steps, the max, the min, or ``statistic(series)`` for a callable. A variable without a
    step dim is its own value. NaN when nothing was measured."""
    if "step" not in da.dims:
        return float(np.asarray(da.values, dtype=np.float64).reshape(-1)[0]) if da.size == 1 else float("nan")
    steps, mid, _, _ = series(da, None)
    if not len(steps):
        return float("nan")
    if callable(statistic):
        return float(statistic(xr.DataArray(mid, dims=("step",), coords={"step": steps}, attrs=dict(da.attrs))))
    if statistic == "last":
        return float(mid[-1])
    if statistic == "mean_tail":
        n = max(1, math.ceil(tail * len(mid)))
        return float(mid[-n:].mean())
    if statistic == "max":
        return float(mid.max())
    return float(mid.min())
