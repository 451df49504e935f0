"""Geometry over time: a variable per run (median and quantile band over probe batches), gamma
with its random-direction null band, eta* against the learning rate, the RSI-EB plane, lambda_max
against the edge of stability, the SLQ spectral density as a heatmap, and a per-optimizer
comparison of a per-run statistic over seeds.

Every function takes a dataset from ``landscape.open_run`` (one run) or ``landscape.open_runs``
(dim ``run``) and returns a ``plotly.graph_objects.Figure``: one trace per run, coloured by
optimizer, ``legendgroup`` = optimizer with one legend entry per optimizer. Steps where a probe
did not run (NaN) are dropped, so lines connect the measured steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr

from landscape.plot._style import Run, axis_title, band_color, color, optimizers, pick_run, require, runs, styled
from landscape.select import STATISTICS, labels as _labels, pick as _pick, run_statistic, select as _select
from landscape.select import series as _series, statistic_name as _statistic_name

GREY = "#7f7f7f"
CONTRACTIONS = (0.9, 0.99, 0.999, 0.9999)
def _block(da: xr.DataArray, block: str, name: str) -> xr.DataArray:
    """The block of a curvature variable (strict: ``model`` is not replaced by another block)."""
    if "block" not in da.dims:
        return da
    labels = _labels(da, "block")
    if block not in labels:
        raise ValueError(f"block {block!r} was not recorded for {name!r}; its blocks are {labels}")
    return da.isel(block=labels.index(block))


def _of_run(da: xr.DataArray, i: int) -> xr.DataArray:
    return da.isel(run=i) if "run" in da.dims else da


# -- per-run series ------------------------------------------------------------------------------
@dataclass
class _Series:
    run: Run
    steps: np.ndarray
    mid: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None


def _collect(ds: xr.Dataset, da: xr.DataArray, band: tuple[float, float] | None) -> list[_Series]:
    out = []
    for i, run in enumerate(runs(ds)):
        steps, mid, lo, hi = _series(_of_run(da, i), band)
        if len(steps):
            out.append(_Series(run, steps, mid, lo, hi))
    return out


def _step_series(ds: xr.Dataset, var: str, figure: str, band: tuple[float, float] | None,
                 sel: Mapping[str, Any] | None = None) -> tuple[xr.DataArray, list[_Series], tuple[float, float] | None]:
    """What every over-time figure starts with: ``var`` checked, reduced to (run, step, sample)
    and split into per-run series at its measured steps."""
    require(ds, [var], figure)
    band = _check_band(band)
    if "step" not in ds[var].dims:
        raise ValueError(f"{var!r} has no step dim (dims {list(ds[var].dims)}): it is not a series over time; "
                         "compare it across runs with plot.compare")
    da = _select(ds[var], sel, ("run", "step", "sample"), var).load()
    series = _collect(ds, da, band)
    if not series:
        raise ValueError(f"{var!r} has no finite value at any step in this dataset")
    return da, series, band


def _check_band(band: tuple[float, float] | None) -> tuple[float, float] | None:
    if band is None:
        return None
    try:
        q0, q1 = (float(q) for q in band)
    except (TypeError, ValueError):
        raise TypeError(f"band must be a pair of quantile levels such as (0.25, 0.75) or None, got {band!r}") from None
    if not 0.0 <= q0 < q1 <= 1.0:
        raise ValueError(f"band must be two quantile levels 0 <= low < high <= 1, got {band!r}")
    return q0, q1


def _values(series: Sequence[_Series], lines_only: bool = False) -> np.ndarray:
    parts = [s.mid for s in series]
    if not lines_only:
        parts += [a for s in series for a in (s.lo, s.hi) if a is not None]
    v = np.concatenate(parts) if parts else np.array([])
    return v[np.isfinite(v)]


def _auto_log(values: np.ndarray) -> bool:
    """Log when every value is positive and they span more than two decades."""
    v = values[np.isfinite(values)]
    return bool(v.size and (v > 0).all() and v.max() / v.min() > 100)


def _hover(what: str) -> str:
    return f"%{{text}}<br>step %{{x}}<br>{what} %{{y:.4g}}<extra></extra>"


class _Legend:
    """One legend entry per optimizer: only its first trace shows in the legend."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def first(self, optimizer: str) -> bool:
        if optimizer in self.shown:
            return False
        self.shown.add(optimizer)
        return True


def _key(fig: go.Figure, name: str, *, dash: str | None = None, symbol: str | None = None) -> None:
    """A legend-only entry that explains a line style or marker shared by all optimizers."""
    if symbol is not None:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", name=name, legendgroup=f"key: {name}",
                                 marker={"color": GREY, "symbol": symbol, "size": 11}, hoverinfo="skip"))
    else:
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=name, legendgroup=f"key: {name}",
                                 line={"color": GREY, "dash": dash}, hoverinfo="skip"))


def _draw(fig: go.Figure, series: Sequence[_Series], opts: Sequence[str], what: str, *, logy: bool,
          band: tuple[float, float] | None, legend: _Legend, dash: str | None = None, show_legend: bool = True) -> None:
    """Per run: the band (filled polygon, no legend entry), then the median/value line."""
    floor = None
    if logy:  # a band edge <= 0 cannot be drawn on a log axis: it runs to below everything shown
        pos = _values(series)
        pos = pos[pos > 0]
        floor = pos.min() / 10 if pos.size else None
    for s in series:
        c, opt = color(s.run.optimizer, opts), s.run.optimizer
        if s.lo is not None and s.hi is not None and band is not None:
            lo = np.maximum(s.lo, floor) if floor is not None else s.lo
            fig.add_trace(go.Scatter(
                x=np.concatenate([s.steps, s.steps[::-1]]), y=np.concatenate([s.hi, lo[::-1]]), fill="toself",
                fillcolor=band_color(c), line={"width": 0, "color": c}, mode="lines", hoverinfo="skip",
                name=f"{opt} {band[0]:g}-{band[1]:g} quantiles", legendgroup=opt, showlegend=False))
        fig.add_trace(go.Scatter(
            x=s.steps, y=s.mid, mode="lines+markers" if len(s.steps) < 40 and dash is None else "lines", name=opt, legendgroup=opt,
            showlegend=show_legend and legend.first(opt), line={"color": c, "width": 1.8, "dash": dash},
            marker={"size": 4}, text=s.run.label, hovertemplate=_hover(what)))


def _what(da: xr.DataArray, samples: bool) -> str:
    name = str(da.attrs.get("long_name") or da.name)
    return f"median {name}" if samples else name


# -- figures -------------------------------------------------------------------------------------
def over_time(ds: xr.Dataset, var: str, *, sel: Mapping[str, Any] | None = None,
              band: tuple[float, float] | None = (0.25, 0.75), logy: bool | None = None,
              title: str | None = None) -> go.Figure:
    """``var`` over steps, one line per run coloured by optimizer.

    A variable with a ``sample`` dim is drawn as the median over samples with the ``band``
    quantiles as a filled area (``band=None``: median only). Other extra dims are chosen with
    ``sel`` (e.g. ``sel={"block": "model", "eig": 0}``); a dim with one label, or with the label
    ``model``, needs none. ``logy=None``: log y when every value is positive and they span more
    than two decades.
    """
    da, series, band = _step_series(ds, var, "over_time", band, sel)
    raw = ds[var]
    logy = _auto_log(_values(series)) if logy is None else bool(logy)
    fig = go.Figure()
    _draw(fig, series, optimizers(ds), _what(raw, "sample" in da.dims), logy=logy, band=band, legend=_Legend())
    # the labels chosen for the extra dims (isel keeps them as scalar coords)
    picked = ", ".join(f"{d}={da[d].item()}" for d in raw.dims if d not in da.dims and d in da.coords and d != "run")
    default = str(raw.attrs.get("long_name") or var) + (f" ({picked})" if picked else "")
    if "sample" in da.dims and band is not None:
        default += f": median and {band[0]:g}-{band[1]:g} quantiles over samples"
    return styled(fig, title if title is not None else default, x="step", y=axis_title(raw, var), logy=logy)


def gamma(ds: xr.Dataset, *, variant: str = "", band: tuple[float, float] | None = (0.25, 0.75),
          title: str | None = None) -> go.Figure:
    """gamma{variant} = cos(g, w - w*) over steps (median and band over samples for the probe-batch
    variant), with the random-direction null band ``gamma_null`` shaded (one band when the runs
    share it, else one per distinct band) and a zero line. Linear y."""
    name = f"gamma{variant}"
    da, series, band = _step_series(ds, name, "gamma", band)
    fig = go.Figure()
    if "gamma_null" in ds.variables:
        x0 = min(float(s.steps.min()) for s in series)
        x1 = max(float(s.steps.max()) for s in series)
        null = ds["gamma_null"].load()
        level = null.attrs.get("level")
        bands: dict[tuple[float, float], list[str]] = {}
        for i, run in enumerate(runs(ds)):
            nr = _of_run(null, i)
            lo, hi = (float(_pick(nr, "null", e, "gamma_null").values) for e in ("lower", "upper"))
            if np.isfinite(lo) and np.isfinite(hi):
                bands.setdefault((round(lo, 12), round(hi, 12)), []).append(run.label)
        what = f"random direction ({level * 100:g}%)" if isinstance(level, (int, float)) else "random direction"
        for (lo, hi), labels in bands.items():
            label = what if len(bands) == 1 else f"{what}: {', '.join(labels)}"
            fig.add_trace(go.Scatter(x=[x0, x1, x1, x0, x0], y=[lo, lo, hi, hi, lo], fill="toself", mode="lines",
                                     fillcolor="rgba(127,127,127,0.22)", line={"width": 0, "color": GREY}, name=label,
                                     legendgroup="gamma_null", showlegend=True,
                                     hovertemplate=f"{label}<br>[{lo:.3g}, {hi:.3g}]<extra></extra>"))
    _draw(fig, series, optimizers(ds), _what(ds[name], "sample" in da.dims), logy=False, band=band, legend=_Legend())
    fig.add_hline(y=0, line={"color": "black", "width": 1, "dash": "dot"})
    default = str(ds[name].attrs.get("long_name") or name) + " with the random-direction null band"
    return styled(fig, title if title is not None else default, x="step", y=axis_title(ds[name], name))


def eta_star(ds: xr.Dataset, *, variant: str = "", band: tuple[float, float] | None = (0.25, 0.75),
             logy: bool | None = None, title: str | None = None) -> go.Figure:
    """eta*{variant} (the locally optimal step <g, w - w*>/|g|^2) over steps, median and band for
    the probe-batch variant, with the actual learning rate ``lr`` as a dashed line of the run's
    colour. Log y unless a median or the learning rate is <= 0 (``logy`` forces it; band edges
    <= 0 then run to the bottom of the axis)."""
    name = f"eta_star{variant}"
    da, series, band = _step_series(ds, name, "eta_star", band)
    lr = _collect(ds, ds["lr"].load(), None) if "lr" in ds.variables else []
    if logy is None:
        lines = np.concatenate([_values(series, lines_only=True), _values(lr)])
        logy = bool(lines.size and (lines > 0).all())
    fig = go.Figure()
    legend = _Legend()
    opts = optimizers(ds)
    _draw(fig, series, opts, _what(ds[name], "sample" in da.dims), logy=logy, band=band, legend=legend)
    if lr:
        _draw(fig, lr, opts, "learning rate", logy=logy, band=None, legend=legend, dash="dash", show_legend=False)
        _key(fig, "learning rate (dashed)", dash="dash")
    default = str(ds[name].attrs.get("long_name") or name) + (" against the learning rate" if lr else "")
    return styled(fig, title if title is not None else default, x="step", y=axis_title(ds[name], name), logy=logy)


def rsi_eb_plane(ds: xr.Dataset, *, variant: str = "", contractions: Sequence[float] = CONTRACTIONS,
                 title: str | None = None) -> go.Figure:
    """The RSI-EB plane: x = eb{variant} (L), y = rsi{variant} (mu), one marker cloud per run
    (every measured (step, sample); the step in the hover), with the lines of constant contraction
    factor 1 - mu^2/L^2 = c (mu = L sqrt(1 - c)) in grey, and each run's uniform bound estimate
    (L_hat, mu_hat) at ``bound="quantile"`` as a star where ``mu_hat``/``L_hat`` were computed from
    this variant. Linear axes (RSI can be negative)."""
    xn, yn = f"eb{variant}", f"rsi{variant}"
    require(ds, [xn, yn], "rsi_eb_plane")
    for c in contractions:
        if not 0.0 < float(c) < 1.0:
            raise ValueError(f"contractions must lie in (0, 1), got {c!r}")
    ex = _select(ds[xn], None, ("run", "step", "sample"), xn).load()
    ry = _select(ds[yn], None, ("run", "step", "sample"), yn).load()
    opts = optimizers(ds)
    legend = _Legend()
    fig = go.Figure()
    xs, ys = [], []
    clouds = []
    for i, run in enumerate(runs(ds)):
        e, r = _of_run(ex, i), _of_run(ry, i)
        steps = np.asarray(e["step"].values)
        ev = np.asarray(e.transpose("step", ...).values, dtype=np.float64).reshape(len(steps), -1)
        rv = np.asarray(r.transpose("step", ...).values, dtype=np.float64).reshape(len(steps), -1)
        st = np.repeat(steps[:, None], ev.shape[1], axis=1)
        ok = np.isfinite(ev) & np.isfinite(rv)
        if ok.any():
            clouds.append((run, ev[ok], rv[ok], st[ok]))
            xs.append(ev[ok])
            ys.append(rv[ok])
    if not clouds:
        raise ValueError(f"{xn!r} and {yn!r} have no finite pair at any step in this dataset")
    stars = []
    if "mu_hat" in ds.variables and "L_hat" in ds.variables:
        mu, L = ds["mu_hat"].load(), ds["L_hat"].load()
        if mu.attrs.get("source", "rsi") == yn and "bound" in mu.dims:
            for i, run in enumerate(runs(ds)):
                m = float(_pick(_of_run(mu, i), "bound", "quantile", "mu_hat").values)
                lv = float(_pick(_of_run(L, i), "bound", "quantile", "L_hat").values)
                if np.isfinite(m) and np.isfinite(lv):
                    stars.append((run, lv, m))
                    xs.append(np.array([lv]))
                    ys.append(np.array([m]))
    xall, yall = np.concatenate(xs), np.concatenate(ys)
    xmax = max(float(xall.max()), 0.0) * 1.05 or 1.0
    ylo, yhi = min(float(yall.min()), 0.0), max(float(yall.max()), 0.0)
    pad = 0.05 * ((yhi - ylo) or 1.0)
    ylo, yhi = ylo - pad, yhi + pad
    # contours first, so the data lie on top; clipped to the data's box so they never set the range
    for j, c in enumerate(contractions):
        k = math.sqrt(1.0 - float(c))
        xe = min(xmax, yhi / k) if yhi > 0 else xmax
        fig.add_trace(go.Scatter(
            x=[0.0, 0.8 * xe, xe], y=[0.0, 0.8 * k * xe, k * xe], mode="lines+text", text=["", f"{c:g}", ""],
            textposition="top left", textfont={"color": GREY, "size": 11}, line={"color": GREY, "width": 0.8},
            name="contraction 1 - mu²/L² = c", legendgroup="contractions", showlegend=j == 0,
            hovertemplate=f"1 - mu²/L² = {c:g}<extra></extra>"))
    for run, ev, rv, st in clouds:
        cl, opt = color(run.optimizer, opts), run.optimizer
        fig.add_trace(go.Scatter(
            x=ev, y=rv, mode="markers", name=opt, legendgroup=opt, showlegend=legend.first(opt),
            marker={"color": cl, "size": 5, "opacity": 0.6}, text=run.label, customdata=st,
            hovertemplate=f"%{{text}}<br>step %{{customdata}}<br>{xn} %{{x:.4g}}<br>{yn} %{{y:.4g}}<extra></extra>"))
    for run, lv, m in stars:
        cl, opt = color(run.optimizer, opts), run.optimizer
        fig.add_trace(go.Scatter(
            x=[lv], y=[m], mode="markers", name=f"{opt} (L_hat, mu_hat)", legendgroup=opt, showlegend=False,
            marker={"color": cl, "symbol": "star", "size": 15, "line": {"color": "black", "width": 1}}, text=run.label,
            hovertemplate=(f"%{{text}}<br>L_hat %{{x:.4g}}<br>mu_hat %{{y:.4g}}<br>1 - mu²/L² "
                           f"{1 - m * m / (lv * lv) if lv else float('nan'):.4g}<extra></extra>")))
    if stars:
        _key(fig, "(L_hat, mu_hat), quantile bound", symbol="star")
    fig = styled(fig, title if title is not None else f"RSI-EB plane{f' ({variant[1:]})' if variant else ''}; "
                 "grey lines: contraction 1 - mu²/L² = c",
                 x=axis_title(ds[xn], xn), y=axis_title(ds[yn], yn))
    fig.update_xaxes(range=[0.0, xmax])
    fig.update_yaxes(range=[ylo, yhi])
    return fig


def edge_of_stability(ds: xr.Dataset, *, block: str = "model", logy: bool | None = None,
                      title: str | None = None) -> go.Figure:
    """The curvature the optimizer sees against its edge of stability: ``preconditioned_lambda_max``
    (``lambda_max`` where it is absent) per run, and ``eos_threshold`` = c / eta as a dashed line
    of the same colour. ``logy=None``: log y when every value is positive and they span more than
    two decades."""
    lam_name = "preconditioned_lambda_max" if "preconditioned_lambda_max" in ds.variables else "lambda_max"
    require(ds, [lam_name, "eos_threshold"], "edge_of_stability")
    lam = _select(_block(ds[lam_name], block, lam_name), None, ("run", "step"), lam_name).load()
    thr = _select(_block(ds["eos_threshold"], block, "eos_threshold"), None, ("run", "step"), "eos_threshold").load()
    series = _collect(ds, lam, None)
    if not series:
        raise ValueError(f"{lam_name!r} has no finite value at any step for block {block!r}")
    thresholds = _collect(ds, thr, None)  # non-finite steps dropped: c / eta is infinite where eta = 0 (warm-up)
    logy = _auto_log(np.concatenate([_values(series), _values(thresholds)])) if logy is None else bool(logy)
    fig = go.Figure()
    legend = _Legend()
    opts = optimizers(ds)
    _draw(fig, series, opts, lam_name, logy=logy, band=None, legend=legend)
    if thresholds:
        _draw(fig, thresholds, opts, "c / eta", logy=logy, band=None, legend=legend, dash="dash", show_legend=False)
        _key(fig, "edge of stability c / eta (dashed)", dash="dash")
    default = f"{ds[lam_name].attrs.get('long_name', lam_name)} (block {block}) against the edge of stability c / eta"
    return styled(fig, title if title is not None else default, x="step", y=axis_title(ds[lam_name], lam_name), logy=logy)


def spectral_density(ds: xr.Dataset, *, block: str = "model", run: str | int | None = None, grid: int | Sequence[float] = 200,
                     sigma2: float | None = None, logz: bool | None = None, title: str | None = None) -> go.Figure:
    """The Hessian spectral density over time as a heatmap (x = step, y = eigenvalue, colour =
    density), smoothed from ``slq_nodes``/``slq_weights`` by ``probes.curvature.density_on_grid``.
    One run: ``run=`` its label or index in a multi-run dataset (default the first; named in the
    title). ``logz=None``: colour by log10 density (floored at 1e-6 of the peak) when the density
    spans more than three decades."""
    from probes.curvature import density_on_grid  # probes imports torch: only load it when asked

    require(ds, ["slq_nodes", "slq_weights"], "spectral_density")
    chosen = pick_run(ds, run)
    _block(ds["slq_nodes"], block, "slq_nodes")
    dens = density_on_grid(chosen.ds[["slq_nodes", "slq_weights"]].load(), block=block, grid=grid, sigma2=sigma2)
    d = np.asarray(dens.transpose("step", "eigenvalue").values, dtype=np.float64)
    peak = float(d.max()) if d.size else 0.0
    pos = d[d > 0]
    if logz is None:
        logz = bool(pos.size and peak / pos.min() > 1e3)
    if logz and peak > 0:
        z, cbar = np.log10(np.maximum(d, peak * 1e-6)), "log10 density"
    else:
        z, cbar = d, "density"
    fig = go.Figure(go.Heatmap(
        x=np.asarray(dens["step"].values), y=np.asarray(dens["eigenvalue"].values), z=z.T, colorscale="Viridis",
        colorbar={"title": {"text": cbar}}, name=chosen.label,
        hovertemplate=f"{chosen.label}<br>step %{{x}}<br>eigenvalue %{{y:.4g}}<br>{cbar} %{{z:.3g}}<extra></extra>"))
    default = f"Hessian spectral density (SLQ, block {block}), run {chosen.label}"
    return styled(fig, title if title is not None else default, x="step", y="Hessian eigenvalue")


# -- comparison across seeds ---------------------------------------------------------------------
def _stars(p: float) -> str:
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else "n.s."


def compare(ds: xr.Dataset, var: str, *, sel: Mapping[str, Any] | None = None,
            statistic: str | Callable[[xr.DataArray], float] = "last", tail: float = 0.1, kind: str = "box",
            significance: Mapping[tuple[str, str], float] | None = None, logy: bool | None = None,
            title: str | None = None) -> go.Figure:
    """Per optimizer, the distribution over seeds of a per-run scalar of ``var``, as a box or violin
    with every run as a point (hover: run label). The scalar is ``statistic`` of the run's series
    (see :func:`run_statistic`; a variable without a step dim is used as is). ``significance``:
    ``{(optimizer_a, optimizer_b): p_value}`` drawn as brackets with the p-value above the boxes;
    without it nothing is claimed. ``logy=None``: log y when every value is positive and they span
    more than two decades."""
    require(ds, [var], "compare")
    if not callable(statistic) and statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS} or a callable(DataArray over step) -> float, got {statistic!r}")
    if not isinstance(tail, (int, float)) or not 0.0 < float(tail) <= 1.0:
        raise ValueError(f"tail must be a fraction in (0, 1], got {tail!r}")
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    raw = ds[var]
    da = _select(raw, sel, ("run", "step", "sample"), var).load()
    opts = optimizers(ds)
    values: dict[str, list[tuple[str, float]]] = {o: [] for o in opts}
    for i, run in enumerate(runs(ds)):
        v = run_statistic(_of_run(da, i), statistic, float(tail))
        if np.isfinite(v):
            values[run.optimizer].append((run.label, v))
    present = [o for o in opts if values[o]]
    if not present:
        raise ValueError(f"{var!r} has no finite value in any run of this dataset")
    fig = go.Figure()
    for o in present:
        labels = [lab for lab, _ in values[o]]
        y = np.array([v for _, v in values[o]])
        common = dict(x=[o] * len(y), y=y, name=o, legendgroup=o, showlegend=True, text=labels,
                      hovertemplate="%{text}<br>%{y:.4g}<extra></extra>", marker={"color": color(o, opts), "size": 7})
        if kind == "box":
            fig.add_trace(go.Box(boxpoints="all", jitter=0.3, pointpos=0, line={"color": color(o, opts)},
                                 fillcolor=band_color(color(o, opts)), **common))
        else:
            fig.add_trace(go.Violin(points="all", jitter=0.3, pointpos=0, box={"visible": True}, line={"color": color(o, opts)},
                                    fillcolor=band_color(color(o, opts)), **common))
    allv = np.concatenate([[v for _, v in values[o]] for o in present])
    logy = _auto_log(allv) if logy is None else bool(logy)
    stat = "value" if "step" not in raw.dims else _statistic_name(statistic, float(tail))
    ytitle = f"{axis_title(raw, var)}<br>{stat}"
    default = f"{raw.attrs.get('long_name', var)}: {stat} per run, by optimizer"
    fig = styled(fig, title if title is not None else default, x="optimizer", y=ytitle, logy=logy)
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=present)
    fig.update_layout(boxmode="overlay", violinmode="overlay")
    if significance:
        pairs = []
        for pair, p in significance.items():
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise TypeError(f"significance keys must be (optimizer_a, optimizer_b) pairs, got {pair!r}")
            a, b = (str(x) for x in pair)
            missing = [x for x in (a, b) if x not in present]
            if missing:
                raise ValueError(f"significance names optimizers {missing} that have no value here; optimizers are {present}")
            if not isinstance(p, (int, float, np.floating)) or not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"significance p-values must lie in [0, 1], got {p!r} for {pair!r}")
            pairs.append((present.index(a), present.index(b), float(p), a, b))
        # brackets in the axis's domain units (above the plot), so they do not depend on a log axis
        for k, (ia, ib, p, a, b) in enumerate(sorted(pairs, key=lambda t: abs(t[0] - t[1]))):
            lo, hi = sorted((ia, ib))
            yb = 1.03 + 0.09 * k
            for x0, y0, x1, y1 in ((lo, yb - 0.02, lo, yb), (lo, yb, hi, yb), (hi, yb, hi, yb - 0.02)):
                fig.add_shape(type="line", x0=x0, y0=y0, x1=x1, y1=y1, xref="x", yref="y domain",
                              line={"color": "black", "width": 1}, name=f"significance {a} vs {b}")
            fig.add_annotation(x=(lo + hi) / 2, y=yb, xref="x", yref="y domain", text=f"p = {p:.3g} {_stars(p)}",
                               showarrow=False, yanchor="bottom", font={"size": 11}, name=f"significance {a} vs {b}")
        fig.update_layout(margin={"t": 70 + 32 * len(pairs)})
    return fig
