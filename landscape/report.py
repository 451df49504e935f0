"""``landscape report``: one self-contained HTML page of a set of runs.

The page embeds plotly.js once, inline, so it works offline and can be mailed or archived as one
file. It holds the figures of :mod:`landscape.plot` for the variables the runs recorded, grouped
by family (a family whose variables are absent is listed, not drawn), and a table of the runs'
metadata from the stores' attrs. A figure that fails is replaced by a note with the error: one
bad figure never costs the whole report.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.offline
import xarray as xr

import landscape
from landscape import plot
from landscape.plot._style import runs as _runs
from landscape.store import expand_runs, open_runs, run_attrs, stack_runs

RunsArg = str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | xr.Dataset | Sequence[xr.Dataset]


@dataclass
class Figure:
    """One figure of the report: drawn when any of ``needs`` is in the dataset."""

    key: str
    needs: tuple[str, ...]
    build: Callable[[xr.Dataset], go.Figure]


@dataclass
class Family:
    key: str
    title: str
    probes: str  # what records the family's variables, for the note on absent families
    needs: tuple[str, ...]
    figures: Callable[[xr.Dataset], list[Figure]]
    about: str = ""


# -- which figures ---------------------------------------------------------------------------------

def _labels(ds: xr.Dataset, dim: str) -> list[Any]:
    if dim not in ds.coords:
        return []
    return [v.item() if hasattr(v, "item") else v for v in np.asarray(ds[dim].values)]


def _variant(ds: xr.Dataset, base: str) -> str | None:
    """The secant variant to draw: the probe-batch one when recorded, else the first present."""
    for suffix in ("", "_train", "_wd", "_update"):
        if base + suffix in ds.variables:
            return suffix
    return None


def _finite(ds: xr.Dataset, name: str, **sel: Any) -> bool:
    """Whether ``name`` (at ``sel``) holds a finite value anywhere."""
    if name not in ds.variables:
        return False
    da = ds[name]
    try:
        da = da.sel({k: v for k, v in sel.items() if k in da.dims})
    except KeyError:
        return False
    return bool(np.isfinite(np.asarray(da.values, dtype=float)).any())


def _first_per_optimizer(ds: xr.Dataset, name: str) -> list[str]:
    """Labels of the first run of each optimizer that has ``name`` (per-run figures: one per optimizer)."""
    seen: dict[str, str] = {}
    for r in _runs(ds):
        if r.optimizer not in seen and _finite(r.ds, name):
            seen[r.optimizer] = r.label
    return list(seen.values())


def _training(ds: xr.Dataset) -> list[Figure]:
    return [Figure("loss", ("loss",), lambda d: plot.over_time(d, "loss")),
            Figure("lr", ("lr",), lambda d: plot.over_time(d, "lr"))]


def _secant(ds: xr.Dataset) -> list[Figure]:
    out = []
    g, re, e = _variant(ds, "gamma"), _variant(ds, "rsi"), _variant(ds, "eta_star")
    if g is not None:
        out.append(Figure("gamma", (f"gamma{g}",), lambda d: plot.gamma(d, variant=g)))
    if re is not None and f"eb{re}" in ds.variables:
        out.append(Figure("rsi_eb_plane", (f"rsi{re}",), lambda d: plot.rsi_eb_plane(d, variant=re)))
    if e is not None:
        out.append(Figure("eta_star", (f"eta_star{e}",), lambda d: plot.eta_star(d, variant=e)))
    return out


def _curvature(ds: xr.Dataset) -> list[Figure]:
    out = [Figure("lambda_max", ("lambda_max",), lambda d: plot.over_time(d, "lambda_max")),
           Figure("trace", ("trace",), lambda d: plot.over_time(d, "trace")),
           Figure("edge_of_stability", ("eos_threshold",), lambda d: plot.edge_of_stability(d))]
    for label in _first_per_optimizer(ds, "slq_nodes"):
        out.append(Figure(f"spectral_density/{label}", ("slq_nodes",),
                          lambda d, label=label: plot.spectral_density(d, run=label)))
    return out


def _flatness(ds: xr.Dataset) -> list[Figure]:
    out: list[Figure] = []
    if "sharpness" in ds.variables:
        many = ds.sizes.get("run", 1) > 1
        for kind in _labels(ds, "kind"):
            for radius in _labels(ds, "radius"):
                if not _finite(ds, "sharpness", kind=kind, radius=radius):
                    continue
                sel = {"kind": kind, "radius": radius}
                out.append(Figure(f"sharpness/{kind}/{radius:g}", ("sharpness",),
                                  lambda d, sel=sel: plot.over_time(d, "sharpness", sel=sel)))
                if many:
                    out.append(Figure(f"compare_sharpness/{kind}/{radius:g}", ("sharpness",),
                                      lambda d, sel=sel: plot.compare(d, "sharpness", sel=sel, statistic="last")))
    if "pac_bayes_flatness" in ds.variables:
        for pert in _labels(ds, "perturbation"):
            out.append(Figure(f"pac_bayes/{pert}", ("pac_bayes_flatness",),
                              lambda d, p=pert: plot.compare(d, "pac_bayes_flatness", sel={"perturbation": p})))
    return out


def _valleys(ds: xr.Dataset) -> list[Figure]:
    out: list[Figure] = []
    if "valley_width" in ds.variables:
        for direction in _labels(ds, "direction"):
            if _finite(ds, "valley_width", direction=direction):
                out.append(Figure(f"valley_width/{direction}", ("valley_width",),
                                  lambda d, s={"direction": direction}: plot.over_time(d, "valley_width", sel=s)))
    for name in ("valley_width_anisotropy", "floor_curvature", "valley_anisotropy", "hill_height", "gradient_overlap"):
        out.append(Figure(name, (name,), lambda d, n=name: plot.over_time(d, n)))
    out.append(Figure("interpolation", ("interpolation_loss", "mli_loss", "endpoint_loss"), lambda d: plot.interpolation(d)))
    return out


def _slices(ds: xr.Dataset) -> list[Figure]:
    out = [Figure(f"profiles/{label}", ("profile_loss",), lambda d, label=label: plot.profiles(d, run=label))
           for label in _first_per_optimizer(ds, "profile_loss")]
    # the 3-D surface needs WebGL, which a browser without a GPU may lack: the report shows the
    # contour (the same data, plus the residual panel); plot.slice_2d(kind="surface") on demand
    out += [Figure(f"slice_2d/{label}", ("surface_loss",), lambda d, label=label: plot.slice_2d(d, run=label))
            for label in _first_per_optimizer(ds, "surface_loss")]
    return out


def _noise(ds: xr.Dataset) -> list[Figure]:
    return [Figure(name, (name,), lambda d, n=name: plot.over_time(d, n)) for name in ("noise_scale", "grad_snr")]


FAMILIES: tuple[Family, ...] = (
    Family("training", "Training", "the recorder (every run)", ("loss", "lr"), _training,
           "The training minibatch loss and the learning rate at every step."),
    Family("secant", "RSI / EB", "probes.RestrictedSecant",
           tuple(f"{b}{s}" for b in ("gamma", "rsi", "eta_star") for s in ("", "_train", "_wd", "_update")), _secant,
           "Restricted secant inequality and error bound towards the reference point w*: gamma = cos(g, w - w*) "
           "against a random direction's null band, the RSI-EB plane with contraction contours, and the locally "
           "optimal step eta* against the learning rate."),
    Family("curvature", "Curvature", "probes.HessianSpectrum, HessianTrace, PreconditionedSharpness, SpectralDensity",
           ("lambda_max", "trace", "eos_threshold", "slq_nodes"), _curvature,
           "Top Hessian eigenvalue and trace over training, the (preconditioned) sharpness against the optimizer's "
           "edge of stability, and the spectral density (one run per optimizer)."),
    Family("flatness", "Flatness", "probes.Sharpness", ("sharpness", "pac_bayes_flatness"), _flatness,
           "Sharpness L(w + delta) - L(w) over training per measure and radius, and its final value per optimizer "
           "over seeds."),
    Family("valleys", "Valleys", "probes.ValleyWidth, StepCurvature, RiverHill, GradientOverlap, Interpolation "
           "(or landscape.interpolate)",
           ("valley_width", "valley_width_anisotropy", "floor_curvature", "valley_anisotropy", "hill_height",
            "gradient_overlap", "interpolation_loss", "mli_loss", "endpoint_loss"), _valleys,
           "Valley widths along the river (trajectory) and the walls (top eigenvector, random), the curvature "
           "along the step taken, and the loss along straight segments between checkpoints."),
    Family("slices", "Slices", "probes.LossProfile, TrajectoryPCA (or landscape.slice_run)",
           ("profile_loss", "surface_loss"), _slices,
           "1-D loss profiles through the last measured iterate, and the loss on the trajectory's principal plane "
           "with the projected path (one run per optimizer). Check the off-plane residual and the loss on the "
           "path against the plane before trusting the contour."),
    Family("noise", "Gradient noise", "probes.GradientNoise", ("noise_scale", "grad_snr"), _noise,
           "The gradient noise scale B_simple = tr(Sigma) / |G|^2 and the per-parameter signal-to-noise ratio."),
)


# -- the runs --------------------------------------------------------------------------------------

def _load(runs: RunsArg) -> tuple[xr.Dataset, list[dict[str, Any]]]:
    """The dataset to draw (loaded into memory) and each run's attrs for the metadata table."""
    if isinstance(runs, xr.Dataset):
        ds = runs
        if "run" in ds.dims:
            metas = [{"_label": r.label, "_partial": True, "run": {"optimizer": r.optimizer, "seed": r.seed}} for r in _runs(ds)]
        else:
            metas = [dict(ds.attrs)]
        return ds.load(), metas
    items = list(runs) if isinstance(runs, (list, tuple)) else None
    if items and any(isinstance(r, xr.Dataset) for r in items):  # each from open_run: their attrs are whole
        if not all(isinstance(r, xr.Dataset) for r in items):
            raise TypeError("runs: give store paths (or globs), or datasets from landscape.open_run, not a mix")
        ds = stack_runs([r.load() for r in items])
        return ds, [{**r.attrs, "_label": str(label)} for r, label in zip(items, ds["run"].values)]
    paths = expand_runs(runs)
    metas = []
    for p in paths:
        meta = run_attrs(p)
        meta["_label"] = p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name
        metas.append(meta)
    return open_runs(paths, load=True), metas


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _hyper(opt: Any) -> str:
    """``Class: lr=.., momentum=..`` without unset values and implementation switches."""
    if not isinstance(opt, dict):
        return ""
    skip = {"foreach", "differentiable", "fused", "capturable"}
    defaults = opt.get("defaults") or {}
    parts = [f"{k}={_fmt(v)}" for k, v in defaults.items() if k not in skip and v is not None and v is not False]
    text = f"{opt.get('class', '?')}: {', '.join(parts)}" if parts else str(opt.get("class", ""))
    groups = opt.get("param_groups") or []
    if len(groups) > 1:
        lrs = [_fmt(g.get("lr")) for g in groups]
        text += f" ({len(groups)} param groups, lr {', '.join(lrs)})"
    return text


def _probe_list(probes: Any) -> str:
    if not isinstance(probes, list):
        return ""
    out = []
    for p in probes:
        if isinstance(p, dict):
            out.append(f"{p.get('probe', '?')} (every {p.get('every', '?')})")
        else:
            out.append(str(p))
    return "<br>".join(html.escape(x) for x in out)


def _errors(errors: Any) -> str:
    if not errors:
        return "none"
    if isinstance(errors, dict):
        items = []
        for name, info in errors.items():
            if isinstance(info, dict):
                items.append(f"{name}: {info.get('count', '?')} x from step {info.get('first_step', '?')}: {info.get('error', '')}")
            else:
                items.append(f"{name}: {info}")
        return '<span class="bad">' + "<br>".join(html.escape(i) for i in items) + "</span>"
    return '<span class="bad">' + html.escape(json.dumps(errors, default=str)) + "</span>"


_KNOWN_ATTRS = {"landscape_schema", "run", "optimizer", "model", "loss_fn", "probes", "probe_batches", "torch_version",
                "landscape_version", "created", "probe_errors", "steps_recorded", "store_path", "closed", "_label", "_partial"}


def _metadata_table(metas: list[dict[str, Any]]) -> str:
    head = ["run", "optimizer", "seed", "model", "optimizer hyper-parameters", "probes", "steps", "versions",
            "probe errors", "notes"]
    rows = []
    for m in metas:
        run = m.get("run") if isinstance(m.get("run"), dict) else {}
        model = m.get("model") if isinstance(m.get("model"), dict) else {}
        label = m.get("_label") or (f"{run.get('optimizer', 'run')}-{run.get('seed')}" if run.get("seed") is not None
                                    else run.get("optimizer", "run"))
        model_text = f"{model.get('class')}, {model.get('parameters'):,} parameters" if model.get("class") else ""
        versions = ", ".join(f"{k} {m[v]}" for k, v in (("torch", "torch_version"), ("landscape", "landscape_version")) if v in m)
        notes = [f"{k}={_fmt(v)}" for k, v in m.items() if k not in _KNOWN_ATTRS and isinstance(v, (int, float, str, bool))]
        extra_run = [f"{k}={_fmt(v)}" for k, v in run.items() if k not in ("optimizer", "seed")]
        if m.get("closed") is False:
            notes.append("not closed (still running or interrupted)")
        opt = m.get("optimizer") if isinstance(m.get("optimizer"), dict) else {}
        cells = [html.escape(str(label)), html.escape(str(run.get("optimizer") or opt.get("class", ""))), html.escape(_fmt(run.get("seed", ""))),
                 html.escape(model_text), html.escape(_hyper(m.get("optimizer"))), _probe_list(m.get("probes")),
                 html.escape(_fmt(m.get("steps_recorded", ""))), html.escape(versions),
                 _errors(m.get("probe_errors")) if "probe_errors" in m else "", html.escape(", ".join(extra_run + notes))]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    partial = any(m.get("_partial") for m in metas)
    note = ('<p class="note">Only run, optimizer and seed are known for a dataset from <code>open_runs</code>: pass the '
            "store paths for the full metadata.</p>") if partial else ""
    return ('<table class="meta"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>" + note)


# -- the page --------------------------------------------------------------------------------------

_CSS = """
body { font-family: Inter, Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1280px; padding: 1em 2em 4em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
p.sub, p.about, p.note { color: #555; }
nav a { margin-right: 1em; }
table.meta { border-collapse: collapse; font-size: 0.85em; width: 100%; }
table.meta th, table.meta td { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; text-align: left; }
table.meta th { background: #f5f5f5; }
figure.landscape-figure { margin: 1.2em 0; }
div.figure-error { border-left: 4px solid #d62728; background: #fdf0f0; padding: 0.6em 1em; margin: 1em 0; font-size: 0.9em; }
span.bad { color: #d62728; }
"""


def _figure_html(fig_spec: Figure, ds: xr.Dataset, index: int) -> str:
    """The figure's HTML, or a note with the error."""
    key = html.escape(fig_spec.key)
    try:
        fig = fig_spec.build(ds)
        fig.update_layout(height=max(int(fig.layout.height or 0), 460))
        body = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{index}",
                           config={"displaylogo": False, "responsive": True})
    except Exception as exc:  # one bad figure must not cost the report
        msg = html.escape(f"{type(exc).__name__}: {exc}")
        return f'<div class="figure-error" data-figure="{key}">Figure <code>{key}</code> could not be drawn: {msg}</div>'
    return f'<figure class="landscape-figure" data-figure="{key}">{body}</figure>'


def write_report(runs: RunsArg, out: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write ONE self-contained HTML page of ``runs`` to ``out`` and return its path.

    ``runs``: run store paths, globs (``"runs/demo/*.zarr"``), a list of datasets from
    ``open_run`` (already loaded ones are not read again), or a dataset from ``open_run`` /
    ``open_runs`` (then only run, optimizer and seed are known for the metadata table of a
    multi-run dataset). The page embeds plotly.js once, inline (it works offline), a table of the
    runs' metadata, and the figures of :mod:`landscape.plot` for the variables present, grouped
    by family; families without variables are listed. A figure that raises is replaced by a note
    with the error.
    """
    ds, metas = _load(runs)
    optimizer_names = sorted({str(r.optimizer) for r in _runs(ds)} - {"", "run"})  # "", "run": no run= metadata
    n_runs = len(list(_runs(ds)))
    title = title or (f"landscape report: {n_runs} run{'s' if n_runs != 1 else ''}"
                      + (f" ({', '.join(optimizer_names)})" if optimizer_names else ""))
    sections, absent, nav = [], [], []
    index = 0
    for fam in FAMILIES:
        if not any(v in ds.variables for v in fam.needs):
            absent.append(f"<li><b>{html.escape(fam.title)}</b>: recorded by {html.escape(fam.probes)}</li>")
            continue
        parts = []
        for spec in fam.figures(ds):
            if not any(v in ds.variables for v in spec.needs):
                continue
            parts.append(_figure_html(spec, ds, index))
            index += 1
        sections.append(f'<section id="{fam.key}" class="family" data-family="{fam.key}"><h2>{html.escape(fam.title)}</h2>'
                        f'<p class="about">{html.escape(fam.about)}</p>{"".join(parts)}</section>')
        nav.append(f'<a href="#{fam.key}">{html.escape(fam.title)}</a>')
    absent_html = (f'<section id="absent" class="absent"><h2>Not recorded</h2><p class="note">These families have no '
                   f'variables in these runs:</p><ul>{"".join(absent)}</ul></section>') if absent else ""
    when = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{plotly.offline.get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="sub">Written {when} by landscape {html.escape(landscape.__version__)}; every figure is interactive '
        "(hover, zoom, click the legend to hide an optimizer); the page works offline.</p>",
        f'<nav><a href="#runs">Runs</a>{"".join(nav)}{"<a href=#absent>Not recorded</a>" if absent else ""}</nav>',
        f'<section id="runs"><h2>Runs</h2>{_metadata_table(metas)}</section>',
        *sections,
        absent_html,
        "</body></html>",
    ])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


__all__: Sequence[str] = ["FAMILIES", "write_report"]
