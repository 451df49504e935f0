"""What every figure shares: one look, axis titles from the schema's attrs, one colour per
optimizer, runs of a single- or multi-run dataset, and the error for a missing variable.

Figures are built from datasets only (``landscape.open_run`` / ``landscape.open_runs``), never
from live objects, and are returned, never shown.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import xarray as xr

from landscape.schema import VARIABLES

TEMPLATE = "plotly_white"
FONT = {"family": "Inter, Helvetica, Arial, sans-serif", "size": 13}
# Plotly's D3 palette: distinguishable, and stable: optimizers get colours in sorted name order
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
BAND_OPACITY = 0.18
_TEMPLATE_OBJ: Any = None


class MissingVariableError(ValueError):
    """A figure was asked of a dataset that lacks the variables it draws."""


def require(ds: xr.Dataset, names: Sequence[str], figure: str) -> None:
    """Raise :class:`MissingVariableError` naming the missing variables and the probes that record them."""
    missing = [n for n in names if n not in ds.variables]
    if not missing:
        return
    probes = sorted({VARIABLES[n].probe for n in missing if n in VARIABLES})
    how = f"; record it with probes.{', probes.'.join(probes)}" if probes else ""
    present = ", ".join(sorted(str(v) for v in ds.data_vars)[:12]) or "none"
    raise MissingVariableError(f"plot.{figure} needs {', '.join(repr(n) for n in missing)}, which the dataset does not "
                               f"have{how} (the dataset has: {present}{', ...' if len(ds.data_vars) > 12 else ''})")


def axis_title(da: xr.DataArray | None, fallback: str = "") -> str:
    """``long_name [units]`` from a variable's attrs (units "1" left out)."""
    if da is None:
        return fallback
    name = str(da.attrs.get("long_name") or da.name or fallback)
    units = str(da.attrs.get("units", "1"))
    return name if units in ("", "1") else f"{name} [{units}]"


def color(optimizer: str, optimizers: Sequence[str]) -> str:
    """The optimizer's colour: its position in the sorted list of the figure's optimizers."""
    order = sorted(set(optimizers))
    return PALETTE[order.index(optimizer) % len(PALETTE)] if optimizer in order else PALETTE[0]


def band_color(hex_color: str, opacity: float = BAND_OPACITY) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{opacity})"


@dataclass
class Run:
    """One run of a dataset: its label, optimizer, seed and its own (run-less) dataset ``ds``,
    selected from the runs' dataset when first asked for: most figures take only the labels
    (and the data through ``_of_run``), and selecting a run of every variable costs milliseconds."""

    label: str
    optimizer: str
    seed: Any
    source: xr.Dataset = field(repr=False)
    index: int | None = None  # its position along ``run`` in ``source``; None: ``source`` is this run

    @functools.cached_property
    def ds(self) -> xr.Dataset:
        return self.source if self.index is None else self.source.isel(run=self.index)


def runs(ds: xr.Dataset) -> Iterator[Run]:
    """The runs of a dataset from ``open_runs`` (dim ``run``, coords optimizer and seed) or the one
    run of a dataset from ``open_run`` (optimizer and seed from its attrs)."""
    if "run" in ds.dims:
        opt = ds["optimizer"].values if "optimizer" in ds.coords else np.full(ds.sizes["run"], "run")
        seed = ds["seed"].values if "seed" in ds.coords else np.full(ds.sizes["run"], None)
        for i, label in enumerate(ds["run"].values):
            # stores recorded without run={"optimizer": ...} have an empty optimizer: use the run
            yield Run(str(label), str(opt[i]) or str(label), seed[i], ds, i)
        return
    meta = ds.attrs.get("run") or {}
    optimizer = str(meta.get("optimizer", "run")) if isinstance(meta, dict) else "run"
    seed = meta.get("seed") if isinstance(meta, dict) else None
    label = optimizer if seed is None else f"{optimizer}-{seed}"
    yield Run(label, optimizer, seed, ds)


def optimizers(ds: xr.Dataset) -> list[str]:
    return sorted({r.optimizer for r in runs(ds)})


def styled(fig: go.Figure, title: str, *, x: str = "", y: str = "", logy: bool = False, logx: bool = False) -> go.Figure:
    """The one look every figure gets: template, font, title, axis titles, hover by x."""
    # the template object, not its name: a name is looked up and copied for every figure (~30 ms)
    global _TEMPLATE_OBJ
    if _TEMPLATE_OBJ is None:
        _TEMPLATE_OBJ = pio.templates[TEMPLATE]
    fig.update_layout(template=_TEMPLATE_OBJ, font=FONT, title={"text": title, "x": 0.01, "xanchor": "left"},
                      legend={"groupclick": "togglegroup"}, hovermode="closest", margin={"l": 70, "r": 20, "t": 60, "b": 60})
    fig.update_xaxes(title_text=x, type="log" if logx else None, showline=True, mirror=False, ticks="outside")
    fig.update_yaxes(title_text=y, type="log" if logy else None, showline=True, mirror=False, ticks="outside")
    return fig


def pick_run(ds: xr.Dataset, run: str | int | None) -> Run:
    """The run asked for by label or index (default: the first)."""
    all_runs = list(runs(ds))
    labels = [r.label for r in all_runs]
    if run is None:
        return all_runs[0]
    if isinstance(run, (int, np.integer)) and not isinstance(run, (bool, np.bool_)):
        if not -len(all_runs) <= int(run) < len(all_runs):
            raise ValueError(f"run={run} is out of range: the dataset has {len(all_runs)} run(s) ({', '.join(labels)})")
        return all_runs[int(run)]
    if isinstance(run, str):
        if run not in labels:
            raise ValueError(f"run={run!r} is not in the dataset; its runs are: {', '.join(labels)}")
        return all_runs[labels.index(run)]
    raise TypeError(f"run must be a run label (str), an index (int) or None, got {type(run).__name__}")
