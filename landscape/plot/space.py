"""Figures of the landscape around points of a run: 1-D loss profiles, interpolation segments and
2-D slices (the trajectory's PCA plane or any plane of ``landscape.slice_run``) with the projected
path and how far it lies off the plane.

Each figure draws one run (``run=``: a label or an index of a multi-run dataset; default the
first), except the interpolation from the first checkpoint to the final iterate, drawn for every
run.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
import xarray as xr
from plotly.subplots import make_subplots

from landscape.plot._style import (PALETTE, MissingVariableError, Run, axis_title, color, optimizers, pick_run, require,
                                   runs, styled)

_NORMALIZED = {"filter": "filter-normalised", "layer": "layer-normalised", "unit": "unit direction",
               "none": "raw direction"}
_SEGMENT_COLOUR = "#444444"  # one run's segment: not an optimizer's colour
_SEGMENTS = {  # loss variable: (its barrier, what the segment joins, legend name)
    "interpolation_loss": ("interpolation_barrier", "previous checkpoint -> w_t", "checkpoint segment"),
    "mli_loss": ("mli_barrier", "first checkpoint -> final iterate", "first -> final"),
    "endpoint_loss": ("endpoint_barrier", "end point a -> end point b", "a -> b"),
}


# -- shared pieces ---------------------------------------------------------------------------------

def _measured_steps(da: xr.DataArray) -> np.ndarray:
    """Steps where ``da`` holds at least one finite value (a probe that did not run left NaN)."""
    other = [d for d in da.dims if d != "step"]
    finite = np.isfinite(np.asarray(da.values, dtype=float))
    if other:
        finite = finite.reshape(finite.shape[0], -1).any(axis=1) if finite.ndim > 1 else finite
    return np.asarray(da["step"].values)[finite]


def _pick_step(da: xr.DataArray, step: int | None, what: str) -> int:
    measured = _measured_steps(da)
    if measured.size == 0:
        raise ValueError(f"{da.name} holds no finite value in {what}: the probe never measured it")
    if step is None:
        return int(measured[-1])
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int (an optimizer step), got {step!r}")
    if int(step) not in measured:
        shown = ", ".join(str(int(s)) for s in measured[:20]) + (", ..." if measured.size > 20 else "")
        raise ValueError(f"{da.name} was not measured at step {step} in {what}; measured steps: {shown}")
    return int(step)


def _finite_along(da: xr.DataArray, dim: str) -> xr.DataArray:
    """Drop the labels of ``dim`` where nothing is finite (coordinate unions of other probes)."""
    keep = np.isfinite(np.asarray(da.values, dtype=float))
    axes = tuple(i for i, d in enumerate(da.dims) if d != dim)
    if axes:
        keep = keep.any(axis=axes)
    return da.isel({dim: np.flatnonzero(keep)})


def _percent(ratio: float) -> str:
    p = 100.0 * float(ratio)
    return f"{p:.0f}" if p >= 1 else f"{p:.2g}"


# -- 1-D profiles ----------------------------------------------------------------------------------

def profiles(ds: xr.Dataset, *, step: int | None = None, run: str | int | None = None) -> go.Figure:
    """``profile_loss`` (probes.LossProfile) at one measured ``step`` (default the last) of one run:
    one line per direction over alpha, and a marker at alpha = 0 (the iterate w_t itself)."""
    require(ds, ["profile_loss"], "profiles")
    r = pick_run(ds, run)
    da = r.ds["profile_loss"].load()
    s = _pick_step(da, step, f"run {r.label}")
    prof = _finite_along(da.sel(step=s), "alpha")
    alphas = np.asarray(prof["alpha"].values, dtype=float)
    fig = go.Figure()
    center = np.nan
    labels = [str(x) for x in prof["direction"].values]
    for i, direction in enumerate(labels):
        y = np.asarray(prof.sel(direction=direction).values, dtype=float)
        ok = np.isfinite(y)
        if not ok.any():
            continue  # e.g. the trajectory direction before the first displacement
        fig.add_trace(go.Scatter(
            x=alphas[ok], y=y[ok], mode="lines", name=direction, line={"color": PALETTE[i % len(PALETTE)], "width": 2},
            customdata=np.full(int(ok.sum()), r.label),
            hovertemplate=f"direction {direction}<br>alpha %{{x:.4g}}<br>loss %{{y:.5g}}<br>run %{{customdata}}, step {s}<extra></extra>"))
        at0 = alphas == 0
        if at0.any() and np.isfinite(y[at0]).any() and not np.isfinite(center):
            center = float(y[at0][0])
    if np.isfinite(center):
        fig.add_trace(go.Scatter(x=[0.0], y=[center], mode="markers", name="w_t (alpha = 0)",
                                 marker={"color": "black", "size": 10, "symbol": "circle"},
                                 hovertemplate=f"w_t at step {s}<br>loss %{{y:.5g}}<extra></extra>"))
    norm = str(da.attrs.get("normalization", ""))
    x_title = f"alpha ({_NORMALIZED[norm]})" if norm in _NORMALIZED else "alpha"
    return styled(fig, f"Loss profiles through w_t: run {r.label}, step {s}", x=x_title, y=axis_title(da))


# -- interpolation ---------------------------------------------------------------------------------

def _chord(alphas: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """L(0) and L(1): the end points of the chord (None when one is missing)."""
    ends = []
    for a in (0.0, 1.0):
        hit = np.flatnonzero(np.isclose(alphas, a, rtol=0, atol=1e-12))
        if hit.size == 0 or not np.isfinite(y[hit[0]]):
            return None
        ends.append(float(y[hit[0]]))
    return ends[0], ends[1]


def _barrier_point(alphas: np.ndarray, y: np.ndarray, ends: tuple[float, float]) -> tuple[float, float, float]:
    """(alpha, loss, height above the chord) where the segment rises most above its chord on [0, 1]."""
    inside = (alphas >= 0) & (alphas <= 1) & np.isfinite(y)
    a, v = alphas[inside], y[inside]
    excess = v - ((1 - a) * ends[0] + a * ends[1])
    i = int(np.argmax(excess))
    return float(a[i]), float(v[i]), float(excess[i])


def _segment_traces(fig: go.Figure, col: int, alphas: np.ndarray, y: np.ndarray, barrier: float | None, *, name: str,
                    colour: str, legendgroup: str, showlegend: bool, hover: str, annotate: bool) -> str | None:
    """The loss along one segment and its dotted chord; returns the barrier's text."""
    ok = np.isfinite(y)
    fig.add_trace(go.Scatter(x=alphas[ok], y=y[ok], mode="lines+markers", name=name, legendgroup=legendgroup,
                             showlegend=showlegend, line={"color": colour, "width": 2}, marker={"size": 5},
                             hovertemplate=hover + "<br>alpha %{x:.3g}<br>loss %{y:.5g}<extra></extra>"),
                  row=1, col=col)
    ends = _chord(alphas, y)
    if ends is None:
        return None
    fig.add_trace(go.Scatter(x=[0.0, 1.0], y=list(ends), mode="lines", name="chord", legendgroup=legendgroup,
                             showlegend=False, line={"color": colour, "dash": "dot", "width": 1.5},
                             hovertemplate=hover + "<br>chord (1 - a) L(0) + a L(1)<extra></extra>"), row=1, col=col)
    a_max, loss_max, excess = _barrier_point(alphas, y, ends)
    value = excess if barrier is None or not np.isfinite(barrier) else float(barrier)
    text = f"barrier {value:.3g}"
    if annotate:
        fig.add_annotation(x=a_max, y=loss_max, text=text, showarrow=True, arrowhead=2, ax=30, ay=-30,
                           font={"color": colour}, row=1, col=col)
    return text


def interpolation(ds: xr.Dataset, *, step: int | None = None, run: str | int | None = None) -> go.Figure:
    """The loss along straight segments, one panel per variable present: ``interpolation_loss``
    (previous checkpoint -> w_t at ``step``, default the last measured, of one run),
    ``mli_loss`` (first checkpoint -> final iterate; one trace per run, coloured by optimizer)
    and ``endpoint_loss`` (``landscape.interpolate`` between two given points). Each segment has
    its chord (1 - a) L(0) + a L(1) dotted and its barrier (max height above the chord on [0, 1],
    the stored ``*_barrier``) annotated."""
    present = [v for v in _SEGMENTS if v in ds.variables]
    if not present:
        raise MissingVariableError(
            "plot.interpolation needs 'interpolation_loss' or 'mli_loss' (record them with probes.Interpolation) or "
            "'endpoint_loss' (computed by landscape.interpolate); the dataset has none of them")
    titles = []
    chosen = pick_run(ds, run)
    s = None
    if "interpolation_loss" in present:
        seg = chosen.ds["interpolation_loss"].load()
        if step is None and _measured_steps(seg).size == 0 and len(present) > 1:
            present.remove("interpolation_loss")  # this run has no segment between checkpoints; draw the rest
        else:
            s = _pick_step(seg, step, f"run {chosen.label}")
    for v in present:
        what = _SEGMENTS[v][1]
        titles.append(f"{what} (step {s}, run {chosen.label})" if v == "interpolation_loss" else what)
    fig = make_subplots(rows=1, cols=len(present), subplot_titles=titles, horizontal_spacing=0.08)
    opts = optimizers(ds)
    for col, v in enumerate(present, start=1):
        barrier_name, _, name = _SEGMENTS[v]
        if v == "mli_loss":
            shown: set[str] = set()
            all_runs = list(runs(ds))
            texts = []
            for r in all_runs:
                da = _finite_along(r.ds[v].load(), "alpha")
                y = np.asarray(da.values, dtype=float)
                if not np.isfinite(y).any():
                    continue
                b = float(r.ds[barrier_name].values) if barrier_name in r.ds.variables else None
                c = color(r.optimizer, opts)
                text = _segment_traces(fig, col, np.asarray(da["alpha"].values, dtype=float), y, b, name=r.optimizer,
                                       colour=c, legendgroup=r.optimizer, showlegend=r.optimizer not in shown,
                                       hover=f"run {r.label}", annotate=len(all_runs) == 1)
                shown.add(r.optimizer)
                if text is not None:
                    texts.append(f"{r.label}: {text}")
            if len(all_runs) > 1 and texts:
                fig.add_annotation(text="<br>".join(texts), xref=f"x{col if col > 1 else ''} domain",
                                   yref=f"y{col if col > 1 else ''} domain", x=0.02, y=0.98, xanchor="left",
                                   yanchor="top", showarrow=False, align="left", font={"size": 11},
                                   bgcolor="rgba(255,255,255,0.7)")
            continue
        r = chosen
        da = r.ds[v].load()
        b_da = r.ds[barrier_name].load() if barrier_name in r.ds.variables else None
        if v == "interpolation_loss":
            da = da.sel(step=s)
            b_da = b_da.sel(step=s) if b_da is not None else None
        da = _finite_along(da, "alpha")
        b = float(b_da.values) if b_da is not None else None
        hover = name
        if v == "interpolation_loss":
            hover = f"run {r.label}, {name} at step {s}"
        elif "run" in ds.dims or ds.attrs.get("run"):
            hover = f"run {r.label}, {name}"
        _segment_traces(fig, col, np.asarray(da["alpha"].values, dtype=float), np.asarray(da.values, dtype=float), b,
                        name=name, colour=_SEGMENT_COLOUR, legendgroup=v, showlegend=True, hover=hover, annotate=True)
    styled(fig, "Loss along straight segments (dotted: the chord; barrier = largest rise above it)")
    for col, v in enumerate(present, start=1):
        fig.update_xaxes(title_text="alpha (0: start, 1: end)", row=1, col=col)
        fig.update_yaxes(title_text=axis_title(ds[v]) if col == 1 else "loss", row=1, col=col)
    return fig


# -- 2-D slices ------------------------------------------------------------------------------------

def _path(r: Run) -> dict[str, np.ndarray] | None:
    """The projected path of one run at its snapshots (steps with finite coordinates)."""
    if "path_coordinates" not in r.ds.variables:
        return None
    pc = r.ds["path_coordinates"].load()
    xy = np.asarray(pc.transpose("step", "component").values, dtype=float)[:, :2]
    keep = np.isfinite(xy).all(axis=1)
    if not keep.any():
        return None
    steps = np.asarray(pc["step"].values)
    out = {"step": steps[keep], "x": xy[keep, 0], "y": xy[keep, 1]}
    for name in ("path_residual", "path_loss", "plane_loss"):
        if name in r.ds.variables and "step" in r.ds[name].dims:
            out[name] = np.asarray(r.ds[name].load().sel(step=steps[keep]).values, dtype=float)
        else:
            out[name] = np.full(int(keep.sum()), np.nan)
    return out


def _axis_titles(r: Run, surf: xr.DataArray) -> tuple[str, str]:
    if "pca_explained_variance" in r.ds.variables:
        ev = np.asarray(r.ds["pca_explained_variance"].load().values, dtype=float)
        if ev.size >= 2 and np.isfinite(ev[:2]).all():
            return (f"PC1 ({_percent(ev[0])} % of the variance)", f"PC2 ({_percent(ev[1])} % of the variance)")
    return axis_title(surf["x"], "x"), axis_title(surf["y"], "y")


def _path_hover(p: dict[str, np.ndarray], label: str) -> tuple[np.ndarray, str]:
    custom = np.stack([p["step"], p["path_residual"], p["path_loss"], p["plane_loss"]], axis=1)
    return custom, (f"run {label}, " "step %{customdata[0]}<br>(%{x:.4g}, %{y:.4g})<br>off-plane residual %{customdata[1]:.4g}"
                    "<br>loss on the path %{customdata[2]:.5g}<br>loss on the plane %{customdata[3]:.5g}<extra></extra>")


def slice_2d(ds: xr.Dataset, *, kind: str = "contour", run: str | int | None = None) -> go.Figure:
    """``surface_loss`` (x, y) of one run as a contour (``kind="contour"``) or a 3-D surface
    (``kind="surface"``), from probes.TrajectoryPCA or ``landscape.slice_run``. Overlaid, when
    present, the projected path ``path_coordinates`` (markers coloured by step, start and end
    marked; the off-plane residual in the hover). With the contour, a second panel shows what the
    plane hides: ``path_loss`` (the loss on the actual path) against ``plane_loss`` (what the
    contour shows at the projected point) over steps, and ``path_residual`` (distance of w_t
    from the plane) over steps. With the surface, the path is drawn at z = ``plane_loss``.
    Axis titles carry the explained variance of each principal direction when recorded."""
    if kind not in ("contour", "surface"):
        raise ValueError(f"kind must be 'contour' or 'surface', got {kind!r}")
    require(ds, ["surface_loss"], "slice_2d")
    r = pick_run(ds, run)
    surf = _finite_along(_finite_along(r.ds["surface_loss"].load().transpose("x", "y"), "x"), "y")
    if surf.size == 0:
        raise ValueError(f"surface_loss holds no finite value for run {r.label}: that run has no slice")
    xs = np.asarray(surf["x"].values, dtype=float)
    ys = np.asarray(surf["y"].values, dtype=float)
    z = np.asarray(surf.values, dtype=float).T  # plotly: z[row = y][col = x]
    xt, yt = _axis_titles(r, surf)
    p = _path(r)
    where = f"run {r.label}" if "run" in ds.dims or ds.attrs.get("run") else ""
    center = ds.attrs.get("center_step", surf.attrs.get("center_step"))
    origin = f"around step {center}" if center is not None else "around the final iterate"
    title = f"Loss on the plane {origin}" + (f": {where}" if where else "")
    zt = axis_title(surf)
    if kind == "surface":
        fig = go.Figure(go.Surface(x=xs, y=ys, z=z, colorscale="Viridis", name="surface_loss", opacity=0.9,
                                   colorbar={"title": {"text": "loss"}},
                                   hovertemplate="x %{x:.4g}<br>y %{y:.4g}<br>loss %{z:.5g}<extra></extra>"))
        if p is not None:
            custom, hover = _path_hover(p, r.label)
            ok = np.isfinite(p["plane_loss"])
            fig.add_trace(go.Scatter3d(x=p["x"][ok], y=p["y"][ok], z=p["plane_loss"][ok], mode="lines+markers",
                                       name="path (projected)", customdata=custom[ok],
                                       marker={"size": 4, "color": p["step"][ok], "colorscale": "Plasma", "showscale": False},
                                       line={"color": "#d62728", "width": 4},
                                       hovertemplate=hover.replace("(%{x:.4g}, %{y:.4g})", "(%{x:.4g}, %{y:.4g}), z %{z:.5g}")))
        styled(fig, title)
        fig.update_layout(scene={"xaxis": {"title": {"text": xt}}, "yaxis": {"title": {"text": yt}},
                                 "zaxis": {"title": {"text": zt}}})
        return fig

    if p is None:
        fig = go.Figure()
        panel: dict[str, Any] = {}
        cbar_x = 1.02
    else:
        fig = make_subplots(rows=2, cols=2, specs=[[{"rowspan": 2}, {}], [None, {}]], column_widths=[0.6, 0.4],
                            horizontal_spacing=0.14, vertical_spacing=0.2,
                            subplot_titles=("", "loss on the path vs on the plane", "off-plane residual"))
        panel = {"row": 1, "col": 1}
        cbar_x = float(fig.layout.xaxis.domain[1]) + 0.01
    fig.add_trace(go.Contour(x=xs, y=ys, z=z, colorscale="Viridis", name="surface_loss", ncontours=25,
                             colorbar={"title": {"text": "loss"}, "x": cbar_x, "thickness": 12, "len": 0.9},
                             hovertemplate="x %{x:.4g}<br>y %{y:.4g}<br>loss %{z:.5g}<extra></extra>"), **panel)
    if p is not None:
        custom, hover = _path_hover(p, r.label)
        fig.add_trace(go.Scatter(x=p["x"], y=p["y"], mode="lines+markers", name="path (projected)", customdata=custom,
                                 line={"color": "white", "width": 1.5},
                                 marker={"size": 7, "color": p["step"], "colorscale": "Plasma", "showscale": False,
                                         "line": {"color": "black", "width": 0.5}},
                                 hovertemplate=hover), row=1, col=1)
        for i, label, symbol in ((0, "start", "circle"), (-1, "end", "star")):
            fig.add_trace(go.Scatter(x=[p["x"][i]], y=[p["y"][i]], mode="markers+text", name=f"{label} (step {p['step'][i]})",
                                     text=[label], textposition="top center", textfont={"color": "white"},
                                     marker={"size": 14, "symbol": symbol, "color": "white", "line": {"color": "black", "width": 1.5}},
                                     customdata=custom[[i]], hovertemplate=hover), row=1, col=1)
        center_name = f"centre (step {center})" if center is not None else "centre: final iterate"
        fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", name=center_name,
                                 marker={"size": 12, "symbol": "x", "color": "black", "line": {"color": "white", "width": 1}},
                                 hovertemplate=center_name + " (0, 0)<extra></extra>"), row=1, col=1)
        steps = p["step"]
        for name, colour, dash in (("path_loss", "#1f77b4", "solid"), ("plane_loss", "#ff7f0e", "dash")):
            y = p[name]
            ok = np.isfinite(y)
            if ok.any():
                fig.add_trace(go.Scatter(x=steps[ok], y=y[ok], mode="lines+markers", name=axis_title(r.ds[name]) if name in r.ds.variables else name,
                                         line={"color": colour, "dash": dash}, marker={"size": 5},
                                         hovertemplate=f"step %{{x}}<br>{name} %{{y:.5g}}<extra></extra>"), row=1, col=2)
        ok = np.isfinite(p["path_residual"])
        if ok.any():
            fig.add_trace(go.Scatter(x=steps[ok], y=p["path_residual"][ok], mode="lines+markers", name="off-plane residual",
                                     line={"color": "#2ca02c"}, marker={"size": 5},
                                     hovertemplate="step %{x}<br>residual %{y:.4g}<extra></extra>"), row=2, col=2)
    styled(fig, title)
    fig.update_xaxes(title_text=xt, **panel)
    fig.update_yaxes(title_text=yt, **panel)
    if p is not None:
        fig.update_xaxes(title_text="step", row=2, col=2)
        fig.update_yaxes(title_text="loss", row=1, col=2)
        fig.update_yaxes(title_text=axis_title(r.ds["path_residual"]) if "path_residual" in r.ds.variables else "residual",
                         row=2, col=2)
        # the legend below the x axis title, the panels tall enough for their titles and ticks
        fig.update_layout(height=600, legend={"orientation": "h", "yanchor": "top", "y": -0.17, "x": 0},
                          margin={"b": 130})
    return fig


__all__: Sequence[str] = ["interpolation", "profiles", "slice_2d"]
