"""landscape.plot over time (timeseries.py): every figure on datasets with and without its
variables, and its content (traces, legend groups, axis titles, plotted values) checked against
numpy on the dataset: small synthetic datasets shaped like open_run/open_runs, and two tiny
recorded runs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

import landscape
import probes
from landscape import plot
from landscape.models import DigitsMLP
from landscape.plot import MissingVariableError
from landscape.plot._style import color, runs
from landscape.schema import attrs_for
from probes.curvature import density_on_grid
from tests._helpers import digits, train

pytestmark = pytest.mark.usefixtures("one_thread")

RUNS = [("adam", 0), ("sgd", 0), ("sgd", 1)]  # run labels adam-0, sgd-0, sgd-1
STEPS, SAMPLES, NODES = 12, 5, 6


def _synthetic(seed: int = 0) -> xr.Dataset:
    """An open_runs-shaped dataset: dims run, step, sample, block, kind, radius, null, bound, node;
    the secant variables measured every 2nd step, the curvature ones every 3rd (NaN elsewhere)."""
    rng = np.random.default_rng(seed)
    R, labels = len(RUNS), [f"{o}-{s}" for o, s in RUNS]
    every2 = np.arange(STEPS) % 2 == 0
    every3 = np.arange(STEPS) % 3 == 0

    def per_sample(lo: float, hi: float) -> np.ndarray:
        v = rng.uniform(lo, hi, (R, STEPS, SAMPLES))
        v[:, ~every2] = np.nan
        return v

    def curv(scale: np.ndarray) -> np.ndarray:
        v = scale[:, None, None] * rng.uniform(0.5, 1.5, (R, STEPS, 2))
        v[:, ~every3] = np.nan
        return v

    eb = per_sample(0.5, 2.0)
    rsi = eb * per_sample(-0.1, 0.6)
    nodes = np.sort(rng.uniform(-1, 10, (R, STEPS, 2, NODES)), axis=-1)
    weights = rng.uniform(0.1, 1, (R, STEPS, 2, NODES))
    weights /= weights.sum(-1, keepdims=True)
    nodes[:, ~every3], weights[:, ~every3] = np.nan, np.nan
    sharp = rng.uniform(0, 1, (R, STEPS, 3, 1))
    sharp[:, ~every3] = np.nan
    lr = np.repeat(np.array([1e-3, 0.1, 0.1])[:, None], STEPS, 1)
    bound = {"source": "rsi", "tail_excluded": 0.1, "bound_quantile": 0.05}
    data = {
        "rsi": (("run", "step", "sample"), rsi, attrs_for("rsi")),
        "eb": (("run", "step", "sample"), eb, attrs_for("eb")),
        "gamma": (("run", "step", "sample"), per_sample(-0.2, 0.6), attrs_for("gamma")),
        "eta_star": (("run", "step", "sample"), per_sample(0.01, 2.0), attrs_for("eta_star")),
        "rsi_train": (("run", "step"), rsi[..., 0], attrs_for("rsi_train")),
        "eb_train": (("run", "step"), eb[..., 0], attrs_for("eb_train")),
        "gamma_null": (("run", "null"), np.tile([-0.03, 0.03], (R, 1)), attrs_for("gamma_null", level=0.95)),
        "mu_hat": (("run", "bound"), rng.uniform(0.01, 0.1, (R, 2)), attrs_for("mu_hat", **bound)),
        "L_hat": (("run", "bound"), rng.uniform(1.0, 3.0, (R, 2)), attrs_for("L_hat", **bound)),
        "lr": (("run", "step"), lr, attrs_for("lr")),
        "loss": (("run", "step"), rng.uniform(0.1, 2.0, (R, STEPS)), attrs_for("loss")),
        "lambda_max": (("run", "step", "block"), curv(np.array([1.0, 3.0, 5.0])), attrs_for("lambda_max")),
        "preconditioned_lambda_max": (("run", "step", "block"), curv(np.array([1e3, 5.0, 8.0])),
                                      attrs_for("preconditioned_lambda_max")),
        "eos_threshold": (("run", "step"), np.where(every3, 2.0 * 1.9 / lr, np.nan), attrs_for("eos_threshold")),
        "slq_nodes": (("run", "step", "block", "node"), nodes, attrs_for("slq_nodes")),
        "slq_weights": (("run", "step", "block", "node"), weights, attrs_for("slq_weights")),
        "sharpness": (("run", "step", "kind", "radius"), sharp, attrs_for("sharpness")),
        "mli_barrier": (("run",), rng.uniform(0, 1, R), attrs_for("mli_barrier")),
    }
    coords = {"run": labels, "optimizer": ("run", [o for o, _ in RUNS]), "seed": ("run", [s for _, s in RUNS]),
              "step": np.arange(STEPS), "sample": np.arange(SAMPLES), "block": ["model", "fc"],
              "kind": ["average", "sam", "asam"], "radius": [0.05], "null": ["lower", "upper"],
              "bound": ["extreme", "quantile"]}
    return xr.Dataset(data, coords=coords, attrs={"landscape_schema": "1.0"})


def _single(ds: xr.Dataset, i: int) -> xr.Dataset:
    """Run i as open_run gives it: no run dim, the metadata in attrs["run"]."""
    meta = {"optimizer": str(ds["optimizer"].values[i]), "seed": int(ds["seed"].values[i])}
    out = ds.isel(run=i).drop_vars(["run", "optimizer", "seed"])
    out.attrs = {"landscape_schema": "1.0", "run": meta}
    return out


@pytest.fixture(scope="module")
def ds() -> xr.Dataset:
    return _synthetic()


def _lines(fig, name: str | None = None) -> list:
    """Data lines (no fill, visible data), optionally of one optimizer."""
    return [t for t in fig.data if t.type == "scatter" and t.fill is None and t.x is not None and t.x[0] is not None
            and (name is None or t.name == name) and not (t.legendgroup or "").startswith(("key", "contr"))]


def _bands(fig) -> list:
    return [t for t in fig.data if t.type == "scatter" and t.fill == "toself" and t.legendgroup != "gamma_null"]


def _median_band(ds: xr.Dataset, var: str, i: int, band=(0.25, 0.75)):
    v = ds[var].values[i]
    ok = np.isfinite(v).any(axis=1)
    return (ds["step"].values[ok], np.median(v[ok], axis=1), np.quantile(v[ok], band[0], axis=1),
            np.quantile(v[ok], band[1], axis=1))


def _legend_entries(fig) -> list[str]:
    return [t.name for t in fig.data if t.showlegend is not False]


# -- missing variables -----------------------------------------------------------------------------
@pytest.mark.parametrize("call, drop, probe", [
    (lambda d: plot.over_time(d, "rsi"), ["rsi"], "RestrictedSecant"),
    (lambda d: plot.gamma(d), ["gamma"], "RestrictedSecant"),
    (lambda d: plot.gamma(d, variant="_train"), [], "RestrictedSecant"),  # gamma_train was not recorded
    (lambda d: plot.eta_star(d), ["eta_star"], "RestrictedSecant"),
    (lambda d: plot.rsi_eb_plane(d), ["eb"], "RestrictedSecant"),
    (lambda d: plot.edge_of_stability(d), ["eos_threshold"], "PreconditionedSharpness"),
    (lambda d: plot.edge_of_stability(d), ["eos_threshold", "lambda_max", "preconditioned_lambda_max"], "HessianSpectrum"),
    (lambda d: plot.spectral_density(d), ["slq_nodes", "slq_weights"], "SpectralDensity"),
    (lambda d: plot.compare(d, "lambda_max"), ["lambda_max"], "HessianSpectrum"),
])
def test_missing_variable_names_the_probe(ds, call, drop, probe):
    for d in (ds.drop_vars(drop), _single(ds, 0).drop_vars(drop)):
        with pytest.raises(MissingVariableError, match=probe):
            call(d)
    assert issubclass(MissingVariableError, ValueError)


# -- over_time -----------------------------------------------------------------------------------
def test_over_time_median_band_per_run(ds):
    fig = plot.over_time(ds, "rsi")
    lines, bands = _lines(fig), _bands(fig)
    assert len(fig.data) == 6 and len(lines) == 3 and len(bands) == 3
    assert [t.name for t in lines] == ["adam", "sgd", "sgd"]
    assert [t.legendgroup for t in lines] == ["adam", "sgd", "sgd"] == [t.legendgroup for t in bands]
    assert sorted(_legend_entries(fig)) == ["adam", "sgd"]  # one legend entry per optimizer, none for bands
    for i, (line, bnd) in enumerate(zip(lines, bands)):
        steps, med, lo, hi = _median_band(ds, "rsi", i)
        np.testing.assert_array_equal(line.x, steps)  # NaN steps dropped: the measured ones, every 2nd
        np.testing.assert_allclose(line.y, med, rtol=1e-12)
        np.testing.assert_array_equal(bnd.x, np.concatenate([steps, steps[::-1]]))
        np.testing.assert_allclose(bnd.y, np.concatenate([hi, lo[::-1]]), rtol=1e-12)
        assert line.line.color == color(line.name, ["adam", "sgd"]) and bnd.fillcolor.startswith("rgba(")
        assert line.text == ["adam-0", "sgd-0", "sgd-1"][i]
        assert all(s in line.hovertemplate for s in ("%{text}", "%{x}", "%{y"))
    assert lines[1].line.color == lines[2].line.color != lines[0].line.color
    assert fig.layout.yaxis.title.text == "RSI (probe batch)" and fig.layout.xaxis.title.text == "step"
    assert fig.layout.yaxis.type != "log"  # RSI crosses zero


def test_over_time_band_levels_and_single_run(ds):
    fig = plot.over_time(ds, "rsi", band=(0.1, 0.9))
    steps, _, lo, hi = _median_band(ds, "rsi", 2, band=(0.1, 0.9))
    np.testing.assert_allclose(_bands(fig)[2].y, np.concatenate([hi, lo[::-1]]), rtol=1e-12)
    assert len(plot.over_time(ds, "rsi", band=None).data) == 3
    one = plot.over_time(_single(ds, 1), "rsi")
    assert len(one.data) == 2 and _lines(one)[0].name == "sgd" and _lines(one)[0].text == "sgd-0"
    np.testing.assert_allclose(_lines(one)[0].y, _median_band(ds, "rsi", 1)[1], rtol=1e-12)
    with pytest.raises(ValueError, match="band"):
        plot.over_time(ds, "rsi", band=(0.8, 0.2))


def test_over_time_scalar_dims_and_log_axis(ds):
    fig = plot.over_time(ds, "preconditioned_lambda_max")  # block: "model" chosen by default
    assert len(fig.data) == 3 and not _bands(fig)
    for i, line in enumerate(fig.data):
        v = ds["preconditioned_lambda_max"].sel(block="model").values[i]
        np.testing.assert_array_equal(line.x, np.arange(0, STEPS, 3))
        np.testing.assert_array_equal(line.y, v[np.isfinite(v)])
    assert fig.layout.yaxis.type == "log"  # positive, from ~1 to ~1e3: more than two decades
    assert fig.layout.yaxis.title.text == "preconditioned sharpness" and "block=model" in fig.layout.title.text
    assert plot.over_time(ds, "preconditioned_lambda_max", logy=False).layout.yaxis.type != "log"
    assert plot.over_time(ds, "lambda_max").layout.yaxis.type != "log"  # positive but within two decades
    fc = plot.over_time(ds, "lambda_max", sel={"block": "fc"})
    np.testing.assert_array_equal(fc.data[0].y, ds["lambda_max"].sel(block="fc").values[0][::3])
    np.testing.assert_array_equal(plot.over_time(ds, "loss").data[2].y, ds["loss"].values[2])


def test_over_time_extra_dims_must_be_chosen(ds):
    with pytest.raises(ValueError, match=r"kind \(labels \['average', 'sam', 'asam'\]\)"):
        plot.over_time(ds, "sharpness")
    fig = plot.over_time(ds, "sharpness", sel={"kind": "sam"})  # radius has one label: no choice needed
    np.testing.assert_array_equal(fig.data[1].y, ds["sharpness"].values[1, ::3, 1, 0])
    assert "kind=sam" in fig.layout.title.text
    with pytest.raises(ValueError, match="labels are"):
        plot.over_time(ds, "sharpness", sel={"kind": "worst"})
    with pytest.raises(ValueError, match="does not have"):
        plot.over_time(ds, "sharpness", sel={"direction": "x"})
    with pytest.raises(ValueError, match="no step dim"):
        plot.over_time(ds, "mli_barrier")


# -- gamma, eta_star -----------------------------------------------------------------------------
def test_gamma_null_band_and_zero_line(ds):
    fig = plot.gamma(ds)
    null = [t for t in fig.data if t.legendgroup == "gamma_null"]
    assert len(null) == 1 and null[0].name == "random direction (95%)" and null[0].showlegend
    assert sorted(set(null[0].y)) == [-0.03, 0.03] and min(null[0].x) == 0 and max(null[0].x) == 10
    assert fig.data[0].legendgroup == "gamma_null"  # drawn first: behind the data
    assert len(_lines(fig)) == 3 and len(_bands(fig)) == 3 and sorted(_legend_entries(fig)) == ["adam", "random direction (95%)", "sgd"]
    np.testing.assert_allclose(_lines(fig)[0].y, _median_band(ds, "gamma", 0)[1], rtol=1e-12)
    assert [(s.y0, s.y1) for s in fig.layout.shapes] == [(0, 0)]
    assert fig.layout.yaxis.title.text == "gamma = cos(g, w - w*) (probe batch)"
    # runs with different null bands (different dimension d): one band each
    other = ds.copy()
    other["gamma_null"] = ds["gamma_null"].copy(data=np.array([[-0.03, 0.03], [-0.03, 0.03], [-0.1, 0.1]]))
    null = [t for t in plot.gamma(other).data if t.legendgroup == "gamma_null"]
    assert len(null) == 2 and "sgd-1" in null[1].name and sorted(set(null[1].y)) == [-0.1, 0.1]
    assert not [t for t in plot.gamma(ds.drop_vars("gamma_null")).data if t.legendgroup == "gamma_null"]
    one = plot.gamma(_single(ds, 0))
    assert [t.name for t in one.data if t.legendgroup == "gamma_null"] == ["random direction (95%)"]


def test_eta_star_with_learning_rate(ds):
    fig = plot.eta_star(ds)
    dashed = [t for t in _lines(fig) if t.line.dash == "dash"]
    solid = [t for t in _lines(fig) if t.line.dash != "dash"]
    assert len(solid) == 3 and len(dashed) == 3 and len(_bands(fig)) == 3
    for i, (s, d) in enumerate(zip(solid, dashed)):
        np.testing.assert_allclose(s.y, _median_band(ds, "eta_star", i)[1], rtol=1e-12)
        np.testing.assert_array_equal(d.y, ds["lr"].values[i])
        assert d.line.color == s.line.color and d.legendgroup == s.legendgroup and d.showlegend is False
    assert sorted(_legend_entries(fig)) == ["adam", "learning rate (dashed)", "sgd"]
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.title.text == "locally optimal step eta* (probe batch)"
    neg = ds.copy()
    neg["eta_star"] = -ds["eta_star"]
    assert plot.eta_star(neg).layout.yaxis.type != "log"  # negative eta* cannot be drawn on a log axis
    assert len(plot.eta_star(ds.drop_vars("lr")).data) == 6


# -- RSI-EB plane ----------------------------------------------------------------------------------
def test_rsi_eb_plane(ds):
    fig = plot.rsi_eb_plane(ds)
    clouds = [t for t in fig.data if t.mode == "markers" and t.x[0] is not None and "L_hat" not in t.name]
    assert [t.name for t in clouds] == ["adam", "sgd", "sgd"] and [t.legendgroup for t in clouds] == ["adam", "sgd", "sgd"]
    for i, t in enumerate(clouds):
        e, r = ds["eb"].values[i], ds["rsi"].values[i]
        ok = np.isfinite(e)
        np.testing.assert_array_equal(t.x, e[ok])
        np.testing.assert_array_equal(t.y, r[ok])
        np.testing.assert_array_equal(t.customdata, np.repeat(np.arange(STEPS), SAMPLES).reshape(STEPS, SAMPLES)[ok])
        assert "%{customdata}" in t.hovertemplate and t.text == ["adam-0", "sgd-0", "sgd-1"][i]
    contours = [t for t in fig.data if t.legendgroup == "contractions"]
    assert len(contours) == 4 and [t.showlegend for t in contours] == [True, False, False, False]
    for t, c in zip(contours, (0.9, 0.99, 0.999, 0.9999)):
        np.testing.assert_allclose(np.asarray(t.y[1:]) / np.asarray(t.x[1:]), math.sqrt(1 - c))
        assert f"{c:g}" in t.text and t.line.color == "#7f7f7f"
        assert max(t.y) <= fig.layout.yaxis.range[1] + 1e-12 and max(t.x) <= fig.layout.xaxis.range[1] + 1e-12
    stars = [t for t in fig.data if "L_hat" in t.name and t.x[0] is not None]
    assert len(stars) == 3 and all(t.marker.symbol == "star" for t in stars)
    for i, t in enumerate(stars):
        assert (t.x[0], t.y[0]) == (ds["L_hat"].values[i, 1], ds["mu_hat"].values[i, 1])  # bound="quantile"
        assert t.legendgroup == clouds[i].legendgroup and t.marker.color == clouds[i].marker.color
    assert fig.layout.xaxis.title.text == "EB (probe batch)" and fig.layout.yaxis.title.text == "RSI (probe batch)"
    assert sorted(_legend_entries(fig)) == ["(L_hat, mu_hat), quantile bound", "adam", "contraction 1 - mu²/L² = c", "sgd"]
    # the training-gradient variant: no samples, and the bounds (from rsi) are not its own
    tr = plot.rsi_eb_plane(ds, variant="_train")
    clouds = [t for t in tr.data if t.mode == "markers" and t.x[0] is not None]
    assert len(clouds) == 3 and not any("L_hat" in t.name for t in tr.data)
    np.testing.assert_array_equal(clouds[0].y, ds["rsi_train"].values[0, ::2])
    assert len(plot.rsi_eb_plane(_single(ds, 2)).data) == 4 + 1 + 1 + 1  # contours, cloud, star, key


# -- edge of stability ---------------------------------------------------------------------------
def test_edge_of_stability(ds):
    fig = plot.edge_of_stability(ds)
    solid = [t for t in _lines(fig) if t.line.dash != "dash"]
    dashed = [t for t in _lines(fig) if t.line.dash == "dash"]
    assert len(solid) == len(dashed) == 3
    for i, (s, d) in enumerate(zip(solid, dashed)):
        v = ds["preconditioned_lambda_max"].sel(block="model").values[i]
        np.testing.assert_array_equal(s.y, v[np.isfinite(v)])
        np.testing.assert_array_equal(d.y, ds["eos_threshold"].values[i, ::3])
        assert d.line.color == s.line.color and d.legendgroup == s.name
    assert fig.layout.yaxis.type == "log" and fig.layout.yaxis.title.text == "preconditioned sharpness"
    assert sorted(_legend_entries(fig)) == ["adam", "edge of stability c / eta (dashed)", "sgd"]
    raw = plot.edge_of_stability(ds.drop_vars("preconditioned_lambda_max"), block="fc")
    assert raw.layout.yaxis.title.text == "lambda_max (sharpness)"
    np.testing.assert_array_equal(raw.data[0].y, ds["lambda_max"].sel(block="fc").values[0, ::3])
    with pytest.raises(ValueError, match=r"blocks are \['model', 'fc'\]"):
        plot.edge_of_stability(ds, block="conv")


# -- spectral density ----------------------------------------------------------------------------
def test_spectral_density_heatmap(ds):
    fig = plot.spectral_density(ds, run="sgd-1", grid=40, logz=False)
    assert len(fig.data) == 1 and fig.data[0].type == "heatmap" and "sgd-1" in fig.layout.title.text
    ref = density_on_grid(_single(ds, 2), grid=40)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), ref.values.T, rtol=1e-12)
    np.testing.assert_array_equal(fig.data[0].x, ref["step"].values)
    np.testing.assert_array_equal(fig.data[0].x, np.arange(0, STEPS, 3))
    np.testing.assert_allclose(fig.data[0].y, ref["eigenvalue"].values)
    assert fig.layout.xaxis.title.text == "step" and fig.layout.yaxis.title.text == "Hessian eigenvalue"
    logged = plot.spectral_density(ds, run=2, grid=40, logz=True)
    d = ref.values.T
    np.testing.assert_allclose(np.asarray(logged.data[0].z), np.log10(np.maximum(d, d.max() * 1e-6)), rtol=1e-12)
    assert logged.data[0].colorbar.title.text == "log10 density"
    fc = plot.spectral_density(ds, block="fc", grid=30, sigma2=0.1, logz=False)  # default: the first run
    ref = density_on_grid(_single(ds, 0), block="fc", grid=30, sigma2=0.1)
    np.testing.assert_allclose(np.asarray(fc.data[0].z), ref.values.T, rtol=1e-12)
    assert "adam-0" in fc.layout.title.text
    one = plot.spectral_density(_single(ds, 1), grid=40, logz=False)
    np.testing.assert_allclose(np.asarray(one.data[0].z), density_on_grid(_single(ds, 1), grid=40).values.T, rtol=1e-12)
    with pytest.raises(ValueError, match=r"its runs are: adam-0, sgd-0, sgd-1"):
        plot.spectral_density(ds, run="rmsprop-0")
    with pytest.raises(ValueError, match="out of range"):
        plot.spectral_density(ds, run=3)
    with pytest.raises(ValueError, match="blocks are"):
        plot.spectral_density(ds, block="conv")


# -- compare ---------------------------------------------------------------------------------------
def _reference_statistic(v: np.ndarray, statistic: str, tail: float = 0.1) -> float:
    v = v[np.isfinite(v)]
    n = max(1, math.ceil(tail * len(v)))
    return {"last": v[-1], "mean_tail": v[-n:].mean(), "max": v.max(), "min": v.min()}[statistic]


@pytest.mark.parametrize("statistic, tail", [("last", 0.1), ("mean_tail", 0.1), ("mean_tail", 0.5), ("max", 0.1), ("min", 0.1)])
def test_compare_points_are_the_per_run_statistic(ds, statistic, tail):
    fig = plot.compare(ds, "lambda_max", statistic=statistic, tail=tail)
    assert [t.type for t in fig.data] == ["box", "box"] and [t.name for t in fig.data] == ["adam", "sgd"]
    assert [t.legendgroup for t in fig.data] == ["adam", "sgd"] and all(t.boxpoints == "all" for t in fig.data)
    v = ds["lambda_max"].sel(block="model").values
    np.testing.assert_allclose(fig.data[0].y, [_reference_statistic(v[0], statistic, tail)], rtol=1e-12)
    np.testing.assert_allclose(fig.data[1].y, [_reference_statistic(v[i], statistic, tail) for i in (1, 2)], rtol=1e-12)
    assert list(fig.data[1].text) == ["sgd-0", "sgd-1"] and "%{text}" in fig.data[1].hovertemplate
    assert fig.layout.yaxis.title.text.startswith("lambda_max (sharpness)<br>")
    assert not fig.layout.annotations and not fig.layout.shapes  # nothing claimed without significance


def test_compare_samples_callable_violin_and_significance(ds):
    fig = plot.compare(ds, "rsi", statistic=lambda s: float(s.sel(step=slice(2, 6)).sum()), kind="violin")
    assert [t.type for t in fig.data] == ["violin", "violin"] and all(t.points == "all" for t in fig.data)
    med = np.median(ds["rsi"].values[:, 2:7:2], axis=2).sum(axis=1)  # median over samples, steps 2, 4, 6
    np.testing.assert_allclose(np.concatenate([fig.data[0].y, fig.data[1].y]), med, rtol=1e-12)
    fig = plot.compare(ds, "mli_barrier", significance={("adam", "sgd"): 0.004})  # no step dim: the value itself
    np.testing.assert_array_equal(np.concatenate([fig.data[0].y, fig.data[1].y]), ds["mli_barrier"].values)
    assert [a.text for a in fig.layout.annotations] == ["p = 0.004 **"] and len(fig.layout.shapes) == 3
    assert fig.layout.annotations[0].x == 0.5 and fig.layout.annotations[0].y > 1  # between the boxes, above
    assert "value" in fig.layout.yaxis.title.text
    one = plot.compare(_single(ds, 1), "lambda_max")
    assert len(one.data) == 1 and list(one.data[0].y) == [ds["lambda_max"].values[1, 9, 0]]
    with pytest.raises(ValueError, match=r"optimizers are \['adam', 'sgd'\]"):
        plot.compare(ds, "lambda_max", significance={("adam", "lion"): 0.1})
    with pytest.raises(ValueError, match="p-values"):
        plot.compare(ds, "lambda_max", significance={("adam", "sgd"): 1.5})
    with pytest.raises(ValueError, match="statistic must be"):
        plot.compare(ds, "lambda_max", statistic="median")
    with pytest.raises(ValueError, match="kind"):
        plot.compare(ds, "lambda_max", kind="bar")
    with pytest.raises(ValueError, match=r"kind \(labels"):
        plot.compare(ds, "sharpness")


# -- real recorded runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded_root(tmp_path_factory) -> Path:
    """Two tiny runs (SGD with momentum, Adam) of DigitsMLP(hidden=8), 20 steps: sgd-0.zarr, adam-0.zarr."""
    root = tmp_path_factory.mktemp("plot_runs")
    (X, y), _ = digits()
    for name, opt_cls, kw in (("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), ("adam", torch.optim.Adam, {"lr": 0.01})):
        torch.manual_seed(0)
        net = DigitsMLP(hidden=8)
        opt = opt_cls(net.parameters(), **kw)
        rec = landscape.attach(net, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64, seed=0,
                               store=root / f"{name}-0.zarr", run={"optimizer": name, "seed": 0},
                               probes=[probes.RestrictedSecant(every=2, samples=3), probes.HessianSpectrum(every=5, k=2),
                                       probes.PreconditionedSharpness(every=5), probes.SpectralDensity(every=5, steps=8)])
        train(net, opt, 20)
        rec.close()
    return root


@pytest.fixture(scope="module")
def recorded(recorded_root) -> xr.Dataset:
    return landscape.open_runs(sorted(recorded_root.glob("*.zarr")))


def test_figures_on_recorded_runs(recorded):
    ds = recorded
    assert list(ds["run"].values) == ["adam-0", "sgd-0"] and ds["rsi"].dims == ("run", "step", "sample")
    fig = plot.over_time(ds, "rsi")
    for i, line in enumerate(_lines(fig)):
        v = ds["rsi"].values[i]
        ok = np.isfinite(v).any(axis=1)
        np.testing.assert_array_equal(line.x, ds["step"].values[ok])
        np.testing.assert_allclose(line.y, np.median(v[ok], axis=1), rtol=1e-12)
    assert sorted(_legend_entries(fig)) == ["adam", "sgd"]
    assert len([t for t in plot.gamma(ds).data if t.legendgroup == "gamma_null"]) == 1  # same model: one band
    eta = plot.eta_star(ds)
    assert len([t for t in _lines(eta) if t.line.dash == "dash"]) == 2
    plane = plot.rsi_eb_plane(ds)
    assert len([t for t in plane.data if "L_hat" in t.name and t.x[0] is not None]) == 2
    eos = plot.edge_of_stability(ds)
    thr = [t for t in _lines(eos) if t.line.dash == "dash"]
    np.testing.assert_allclose(thr[1].y, ds["eos_threshold"].values[1][np.isfinite(ds["eos_threshold"].values[1])])
    assert eos.layout.yaxis.title.text == "preconditioned sharpness"
    dens = plot.spectral_density(ds, run="sgd-0", grid=50, logz=False)
    ref = density_on_grid(ds.isel(run=1).load(), grid=50)
    np.testing.assert_allclose(np.asarray(dens.data[0].z), ref.values.T, rtol=1e-12)
    np.testing.assert_array_equal(dens.data[0].x, [0, 5, 10, 15])
    cmp = plot.compare(ds, "lambda_max", statistic="max")
    np.testing.assert_allclose([cmp.data[0].y[0], cmp.data[1].y[0]],
                               np.nanmax(ds["lambda_max"].sel(block="model").values, axis=1), rtol=1e-12)


def test_figures_on_one_recorded_run(recorded_root):
    ds = landscape.open_run(recorded_root / "sgd-0.zarr")
    fig = plot.over_time(ds, "eb")
    assert [t.name for t in _lines(fig)] == ["sgd"] and _lines(fig)[0].text == "sgd-0"
    v = ds["eb"].values
    ok = np.isfinite(v).any(axis=1)
    np.testing.assert_allclose(_lines(fig)[0].y, np.median(v[ok], axis=1), rtol=1e-12)
    assert len(plot.edge_of_stability(ds).data) == 3  # lambda, threshold, key
    dens = plot.spectral_density(ds, grid=50, logz=False)
    np.testing.assert_allclose(np.asarray(dens.data[0].z), density_on_grid(ds, grid=50).values.T, rtol=1e-12)
    assert list(plot.compare(ds, "lambda_max").data[0].y) == [ds["lambda_max"].sel(block="model").values[15]]


def test_runs_select_a_run_only_when_its_dataset_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _synthetic()
    selected: list[int] = []
    isel = xr.Dataset.isel

    def counting(self: xr.Dataset, *args: Any, **kwargs: Any) -> xr.Dataset:
        if "run" in kwargs:
            selected.append(kwargs["run"])
        return isel(self, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "isel", counting)
    all_runs = list(runs(ds))
    assert [(r.label, r.optimizer, int(r.seed)) for r in all_runs] == [(f"{o}-{s}", o, s) for o, s in RUNS]
    assert selected == []  # labels and optimizers cost no selection
    second = all_runs[1]
    xr.testing.assert_identical(second.ds, isel(ds, run=1))
    assert second.ds is second.ds and selected == [1]  # selected once, then kept
    one = isel(ds, run=0)
    one.attrs["run"] = {"optimizer": "adam", "seed": 0}
    [only] = runs(one)  # a dataset from open_run: the run itself
    assert only.label == "adam-0" and only.ds is one
