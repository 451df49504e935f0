"""The figures of the landscape around points (landscape/plot/space.py): 1-D profiles,
interpolation segments and 2-D slices, on synthetic datasets whose values are known (the plotted
arrays must be the dataset's, the chord must join the end points, the barrier and the explained
variance must be the stored ones), on datasets without their variables (a clear error naming the
probe), and on a recorded run and a post-hoc ``landscape.slice_run`` of its store."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest
import torch.nn.functional as F
import xarray as xr

import landscape
from landscape.functional import draw_batches
from landscape.models import DigitsMLP
from landscape.plot import MissingVariableError, interpolation, profiles, slice_2d
from landscape.schema import attrs_for
from probes import Interpolation, LossProfile, TrajectoryPCA
from tests._helpers import digits, record

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = np.arange(6)
RUN_ATTRS = {"optimizer": "sgd", "seed": 3}


def _var(name: str, dims: tuple[str, ...], data, **settings) -> xr.Variable:
    return xr.Variable(dims, np.asarray(data, dtype=float), attrs_for(name, **settings))


# ---------------------------------------------------------------------------------------------
# synthetic datasets
# ---------------------------------------------------------------------------------------------

# alpha is the union of the probes' grids in a store: 0.25 belongs to another probe (NaN here)
ALPHAS = np.array([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0])
DIRECTIONS = ["trajectory", "eigenvector", "random_0"]
MEASURED = [0, 2, 4]


def _profile_ds(offset: float = 0.0, run_attrs: dict | None = None) -> xr.Dataset:
    prof = np.full((STEPS.size, len(DIRECTIONS), ALPHAS.size), np.nan)
    for s in MEASURED:
        for j in range(len(DIRECTIONS)):
            prof[s, j] = 1.0 + offset + 0.1 * s + (j + 1) * ALPHAS**2  # L(w_t) shared at alpha = 0
    prof[:, :, 3] = np.nan
    prof[0, 0] = np.nan  # no trajectory direction before the first displacement
    ds = xr.Dataset({"profile_loss": _var("profile_loss", ("step", "direction", "alpha"), prof, normalization="filter")},
                    coords={"step": STEPS, "direction": DIRECTIONS, "alpha": ALPHAS})
    ds.attrs["run"] = run_attrs or RUN_ATTRS
    return ds


def _multi(make, **kw) -> xr.Dataset:
    """Two runs stacked like ``open_runs``: dim run, coords optimizer and seed."""
    a, b = make(0.0, **kw), make(5.0, **kw)
    for d in (a, b):
        d.attrs = {}
    ds = xr.concat([a, b], dim=xr.DataArray(["sgd-0", "adam-1"], dims="run", name="run"))
    return ds.assign_coords(optimizer=("run", ["sgd", "adam"]), seed=("run", [0, 1]))


def test_profiles_draw_one_line_per_direction_at_the_last_measured_step():
    ds = _profile_ds()
    fig = profiles(ds)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in lines] == DIRECTIONS
    expect = ds["profile_loss"].sel(step=4)
    keep = ALPHAS != 0.25  # the other probe's alpha is not drawn
    for t in lines:
        np.testing.assert_array_equal(t.x, ALPHAS[keep])
        np.testing.assert_array_equal(t.y, expect.sel(direction=t.name).values[keep])
    marker = [t for t in fig.data if t.mode == "markers"]
    assert len(marker) == 1 and list(marker[0].x) == [0.0] and marker[0].y[0] == pytest.approx(1.0 + 0.1 * 4)
    assert fig.layout.xaxis.title.text == "alpha (filter-normalised)"
    assert fig.layout.yaxis.title.text == "loss profile L(w + alpha d)"
    assert "sgd-3" in fig.layout.title.text and "step 4" in fig.layout.title.text


def test_profiles_at_a_chosen_step_skip_a_missing_direction_and_reject_unmeasured_steps():
    ds = _profile_ds()
    fig = profiles(ds, step=0)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in lines] == ["eigenvector", "random_0"]  # trajectory is NaN at step 0
    np.testing.assert_array_equal(lines[1].y, ds["profile_loss"].sel(step=0, direction="random_0").dropna("alpha"))
    assert "step 0" in fig.layout.title.text
    with pytest.raises(ValueError, match="not measured at step 1.*measured steps: 0, 2, 4"):
        profiles(ds, step=1)
    with pytest.raises(TypeError, match="step must be an int"):
        profiles(ds, step=2.0)
    unit = ds.copy()
    unit["profile_loss"].attrs["normalization"] = "unit"
    assert profiles(unit).layout.xaxis.title.text == "alpha (unit direction)"


def test_profiles_of_a_multi_run_dataset_by_label_or_index():
    ds = _multi(lambda off: _profile_ds(off))
    first = profiles(ds)
    assert "sgd-0" in first.layout.title.text
    for run in ("adam-1", 1, -1):
        fig = profiles(ds, run=run)
        assert "adam-1" in fig.layout.title.text
        np.testing.assert_allclose(fig.data[0].y, ds["profile_loss"].sel(run="adam-1", step=4, direction="trajectory").dropna("alpha"))
    with pytest.raises(ValueError, match="run='momentum' is not in the dataset; its runs are: sgd-0, adam-1"):
        profiles(ds, run="momentum")
    with pytest.raises(ValueError, match="out of range"):
        profiles(ds, run=2)
    with pytest.raises(TypeError, match="run must be"):
        profiles(ds, run=1.0)


def test_profiles_without_the_variable_name_the_probe():
    with pytest.raises(MissingVariableError, match="profile_loss.*probes.LossProfile"):
        profiles(xr.Dataset({"loss": _var("loss", ("step",), np.ones(3))}))


# interpolation: a bump of known height above the chord
A = np.linspace(0.0, 1.0, 11)


def _bump(a: np.ndarray, start: float, end: float, height: float) -> np.ndarray:
    return (1 - a) * start + a * end + height * 4 * a * (1 - a)  # peak above the chord: height at a = 0.5


def _interp_ds(offset: float = 0.0, *, segment: bool = True, mli: bool = True, barriers: bool = True) -> xr.Dataset:
    data = {}
    if segment:
        seg = np.full((STEPS.size, A.size), np.nan)
        bar = np.full(STEPS.size, np.nan)
        for s in (2, 4):
            seg[s] = _bump(A, 2.0 - 0.1 * s, 1.9 - 0.1 * s, 0.01 * s)
            bar[s] = 0.01 * s
        data["interpolation_loss"] = _var("interpolation_loss", ("step", "alpha"), seg)
        if barriers:
            data["interpolation_barrier"] = _var("interpolation_barrier", ("step",), bar)
    if mli:
        data["mli_loss"] = _var("mli_loss", ("alpha",), _bump(A, 2.3 + offset, 0.4 + offset, 0.2 + offset / 100))
        if barriers:
            data["mli_barrier"] = _var("mli_barrier", (), 0.2 + offset / 100)
    ds = xr.Dataset(data, coords={"step": STEPS, "alpha": A} if segment else {"alpha": A})
    ds.attrs["run"] = RUN_ATTRS
    return ds


def _panel(fig: go.Figure, col: int) -> list:
    axis = "x" if col == 1 else f"x{col}"
    return [t for t in fig.data if (t.xaxis or "x") == axis]


def test_interpolation_draws_each_segment_with_its_chord_and_barrier():
    ds = _interp_ds()
    fig = interpolation(ds)
    seg, mli = _panel(fig, 1), _panel(fig, 2)
    assert len(seg) == 2 and len(mli) == 2
    line, chord = seg
    np.testing.assert_array_equal(line.x, A)
    np.testing.assert_array_equal(line.y, ds["interpolation_loss"].sel(step=4))  # the last measured step
    assert list(chord.x) == [0.0, 1.0] and list(chord.y) == [pytest.approx(1.6), pytest.approx(1.5)]
    assert chord.line.dash == "dot"
    np.testing.assert_array_equal(mli[0].y, ds["mli_loss"])
    assert list(mli[1].y) == [pytest.approx(2.3), pytest.approx(0.4)] and mli[1].line.dash == "dot"
    notes = {a.text: a for a in fig.layout.annotations}
    assert "barrier 0.04" in notes and "barrier 0.2" in notes
    assert notes["barrier 0.2"].x == pytest.approx(0.5)  # at the peak above the chord
    assert notes["barrier 0.2"].y == pytest.approx(_bump(np.array([0.5]), 2.3, 0.4, 0.2)[0])
    assert any("step 4" in a.text and "sgd-3" in a.text for a in fig.layout.annotations)  # the panel's title
    assert fig.layout.xaxis.title.text == "alpha (0: start, 1: end)"
    # an earlier step, and the barrier read off the curve when not stored
    early = interpolation(ds, step=2)
    np.testing.assert_array_equal(_panel(early, 1)[0].y, ds["interpolation_loss"].sel(step=2))
    assert "barrier 0.02" in [a.text for a in early.layout.annotations]
    bare = interpolation(_interp_ds(barriers=False), step=2)
    assert "barrier 0.02" in [a.text for a in bare.layout.annotations]
    with pytest.raises(ValueError, match="not measured at step 3"):
        interpolation(ds, step=3)


def test_interpolation_of_many_runs_colours_first_to_final_by_optimizer():
    ds = _multi(lambda off: _interp_ds(off, segment=False))
    fig = interpolation(ds)
    lines = [t for t in fig.data if t.name != "chord"]
    assert [t.name for t in lines] == ["sgd", "adam"] and [t.legendgroup for t in lines] == ["sgd", "adam"]
    assert lines[0].line.color != lines[1].line.color
    np.testing.assert_array_equal(lines[1].y, ds["mli_loss"].sel(run="adam-1"))
    assert "run adam-1" in lines[1].hovertemplate
    box = [a.text for a in fig.layout.annotations if "<br>" in a.text]
    assert box == ["sgd-0: barrier 0.2<br>adam-1: barrier 0.25"]
    # a run without checkpoint segments: its figure shows first -> final only; another run's has both
    both = _multi(lambda off: _interp_ds(off))
    both["interpolation_loss"][0] = np.nan
    assert {t.xaxis for t in interpolation(both).data} == {"x"} and len(interpolation(both).data) == 4
    fig = interpolation(both, run="adam-1")
    np.testing.assert_array_equal(_panel(fig, 1)[0].y, both["interpolation_loss"].sel(run="adam-1", step=4))
    assert len(_panel(fig, 2)) == 4
    with pytest.raises(ValueError, match="holds no finite value in run sgd-0"):
        interpolation(both[["interpolation_loss"]])


def test_interpolation_between_two_end_points_and_without_any_segment():
    ds = xr.Dataset({"endpoint_loss": _var("endpoint_loss", ("alpha",), _bump(A, 1.0, 1.2, 0.5)),
                     "endpoint_barrier": _var("endpoint_barrier", (), 0.5)}, coords={"alpha": A})
    fig = interpolation(ds)
    assert len(fig.data) == 2 and list(fig.data[1].y) == [pytest.approx(1.0), pytest.approx(1.2)]
    assert "barrier 0.5" in [a.text for a in fig.layout.annotations]
    with pytest.raises(MissingVariableError, match="probes.Interpolation.*landscape.interpolate"):
        interpolation(xr.Dataset({"loss": _var("loss", ("step",), np.ones(3))}))


# 2-D slice: the PCA plane, a path beside it
X = np.linspace(-1.0, 2.0, 7)
Y = np.linspace(-0.5, 0.5, 5)
PATH_STEPS = [0, 2, 3, 5]


def _slice_ds(offset: float = 0.0, *, path: bool = True, pca: bool = True) -> xr.Dataset:
    surface = offset + X[:, None] ** 2 + 3 * Y[None, :] ** 2 + 0.1 * X[:, None] * Y[None, :]
    data = {"surface_loss": _var("surface_loss", ("x", "y"), surface)}
    coords = {"x": ("x", X, {"long_name": "distance along the first principal direction", "units": "1"}),
              "y": ("y", Y, {"long_name": "distance along the second principal direction", "units": "1"})}
    if path:
        xy = np.full((STEPS.size, 2), np.nan)
        res, pl, ql = (np.full(STEPS.size, np.nan) for _ in range(3))
        for i, s in enumerate(PATH_STEPS):
            xy[s] = (1.8 - 0.6 * i, 0.3 - 0.1 * i)
            res[s] = 0.05 * (3 - i)
            pl[s] = 2.0 - 0.3 * i
            ql[s] = 2.1 - 0.35 * i
        pl[3] = np.nan  # path_loss is measured at fewer steps than there are snapshots
        data.update(path_coordinates=_var("path_coordinates", ("step", "component"), xy),
                    path_residual=_var("path_residual", ("step",), res), path_loss=_var("path_loss", ("step",), pl),
                    plane_loss=_var("plane_loss", ("step",), ql))
        coords.update(step=STEPS, component=[0, 1])
    if pca:
        data["pca_explained_variance"] = _var("pca_explained_variance", ("component",), [0.8312, 0.1204])
        coords["component"] = [0, 1]
    ds = xr.Dataset(data, coords=coords)
    ds.attrs["run"] = RUN_ATTRS
    return ds


def _trace(fig: go.Figure, name: str):
    hits = [t for t in fig.data if t.name == name]
    assert len(hits) == 1, [t.name for t in fig.data]
    return hits[0]


def test_slice_contour_with_the_projected_path_and_what_the_plane_hides():
    ds = _slice_ds()
    fig = slice_2d(ds)
    contour = fig.data[0]
    assert contour.type == "contour"
    np.testing.assert_array_equal(contour.x, X)
    np.testing.assert_array_equal(contour.y, Y)
    np.testing.assert_array_equal(np.asarray(contour.z), ds["surface_loss"].values.T)  # plotly: z[y][x]
    path = _trace(fig, "path (projected)")
    xy = ds["path_coordinates"].sel(step=PATH_STEPS).values
    np.testing.assert_array_equal(path.x, xy[:, 0])
    np.testing.assert_array_equal(path.y, xy[:, 1])
    np.testing.assert_array_equal(path.marker.color, PATH_STEPS)  # coloured by step
    custom = np.asarray(path.customdata, dtype=float)
    np.testing.assert_array_equal(custom[:, 0], PATH_STEPS)
    np.testing.assert_array_equal(custom[:, 1], ds["path_residual"].sel(step=PATH_STEPS))  # residual in the hover
    assert "off-plane residual" in path.hovertemplate
    start, end = _trace(fig, "start (step 0)"), _trace(fig, "end (step 5)")
    assert (start.x[0], start.y[0]) == tuple(xy[0]) and (end.x[0], end.y[0]) == tuple(xy[-1])
    assert _trace(fig, "centre: final iterate").x[0] == 0.0
    # second panel: residual vs step, loss on the path vs on the plane
    residual = _trace(fig, "off-plane residual")
    np.testing.assert_array_equal(residual.x, PATH_STEPS)
    np.testing.assert_array_equal(residual.y, ds["path_residual"].sel(step=PATH_STEPS))
    on_path = _trace(fig, "loss on the actual path")
    np.testing.assert_array_equal(on_path.x, [0, 2, 5])  # NaN at step 3 left out
    np.testing.assert_array_equal(on_path.y, ds["path_loss"].sel(step=[0, 2, 5]))
    on_plane = _trace(fig, "loss at the path's projection on the plane")
    np.testing.assert_array_equal(on_plane.y, ds["plane_loss"].sel(step=PATH_STEPS))
    assert (path.xaxis, on_path.xaxis, on_plane.xaxis, residual.xaxis) == ("x", "x2", "x2", "x3")  # three panels
    assert fig.layout.xaxis.title.text == "PC1 (83 % of the variance)"
    assert fig.layout.yaxis.title.text == "PC2 (12 % of the variance)"


def test_slice_surface_puts_the_path_on_the_plane_loss():
    ds = _slice_ds()
    fig = slice_2d(ds, kind="surface")
    assert [t.type for t in fig.data] == ["surface", "scatter3d"]
    np.testing.assert_array_equal(np.asarray(fig.data[0].z), ds["surface_loss"].values.T)
    path = fig.data[1]
    np.testing.assert_array_equal(path.x, ds["path_coordinates"].sel(step=PATH_STEPS, component=0))
    np.testing.assert_array_equal(path.z, ds["plane_loss"].sel(step=PATH_STEPS))
    assert fig.layout.scene.xaxis.title.text == "PC1 (83 % of the variance)"
    assert fig.layout.scene.zaxis.title.text == "loss on the PCA plane"


def test_slice_without_a_path_or_pca_and_bad_requests():
    ds = _slice_ds(path=False, pca=False)
    ds.attrs = {"center_step": 40}  # like slice_run along random directions
    fig = slice_2d(ds)
    assert [t.type for t in fig.data] == ["contour"]
    assert fig.layout.xaxis.title.text == "distance along the first principal direction"
    assert "around step 40" in fig.layout.title.text
    with pytest.raises(ValueError, match="kind must be 'contour' or 'surface'"):
        slice_2d(ds, kind="heatmap")
    with pytest.raises(MissingVariableError, match="surface_loss.*probes.TrajectoryPCA"):
        slice_2d(xr.Dataset({"loss": _var("loss", ("step",), np.ones(3))}))


def test_slice_of_one_run_of_many_on_the_union_grid():
    a, b = _slice_ds(0.0), _slice_ds(1.0)
    b = b.assign_coords(x=X + 10)  # another run's grid: the stacked dataset holds the union, NaN elsewhere
    for d in (a, b):
        d.attrs = {}
    ds = xr.concat([a, b], dim=xr.DataArray(["sgd-0", "adam-1"], dims="run", name="run"), join="outer")
    ds = ds.assign_coords(optimizer=("run", ["sgd", "adam"]), seed=("run", [0, 1]))
    fig = slice_2d(ds, run="adam-1")
    np.testing.assert_array_equal(fig.data[0].x, X + 10)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), b["surface_loss"].values.T)
    assert "adam-1" in fig.layout.title.text


# ---------------------------------------------------------------------------------------------
# a recorded run and a post-hoc slice of its store
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("space") / "run.zarr"
    probes = [LossProfile(every=4, alphas=[-0.5, -0.25, 0, 0.25, 0.5], directions=("trajectory", "random")),
              TrajectoryPCA(every=3, grid=5), Interpolation(every=4)]
    record(path, probes, model=lambda: DigitsMLP(hidden=8), steps=13)
    return path


def test_figures_of_a_recorded_run(recorded):
    ds = landscape.open_run(recorded)
    assert ds.attrs["probe_errors"] == {}
    fig = profiles(ds, step=8)
    lines = [t for t in fig.data if t.mode == "lines"]
    assert [t.name for t in lines] == ["trajectory", "random_0"]
    for t in lines:
        np.testing.assert_allclose(t.y, ds["profile_loss"].sel(step=8, direction=t.name).dropna("alpha"))
        np.testing.assert_array_equal(t.x, [-0.5, -0.25, 0, 0.25, 0.5])  # not the Interpolation probe's alphas
    fig = interpolation(ds)
    assert len(fig.data) == 4  # the last segment and first -> final, each with its chord
    np.testing.assert_allclose(fig.data[0].y, ds["interpolation_loss"].sel(step=12).dropna("alpha"))
    assert f"barrier {float(ds['mli_barrier']):.3g}" in [a.text for a in fig.layout.annotations]
    fig = slice_2d(ds)
    measured = [0, 3, 6, 9, 12]
    path = _trace(fig, "path (projected)")
    np.testing.assert_allclose(path.x, ds["path_coordinates"].sel(step=measured, component=0))
    np.testing.assert_allclose(np.asarray(fig.data[0].z), ds["surface_loss"].values.T)
    ev = ds["pca_explained_variance"].values
    assert fig.layout.xaxis.title.text == f"PC1 ({100 * ev[0]:.0f} % of the variance)"
    np.testing.assert_allclose(_trace(fig, "off-plane residual").y, ds["path_residual"].sel(step=measured))
    # after training: slice_run around a stored snapshot gives the same variables
    (Xd, yd), _ = digits()
    sliced = landscape.slice_run(recorded, DigitsMLP(hidden=8), F.cross_entropy, draw_batches((Xd, yd), 1, batch_size=64, seed=0),
                                 step=9, grid=5)
    fig = slice_2d(sliced)
    assert "around step 9" in fig.layout.title.text
    np.testing.assert_allclose(_trace(fig, "path (projected)").y, sliced["path_coordinates"].sel(component=1))
    assert _trace(fig, "centre (step 9)").x[0] == 0.0
    assert fig.layout.xaxis.title.text.startswith("PC1 (")
