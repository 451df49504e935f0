"""The notebooks in notebooks/ execute (nbclient, a fresh python3 kernel running this interpreter, in
a temporary working directory) without an error and do their work, checked against the run
stores they wrote: notebook 1 ends with the recorded dataset's variables and shows the trajectory
unchanged by the probes; notebook 2 displays one plotly figure per figure cell, covering every
figure function but compare, with the values of the run; notebook 3 tabulates both optimizers
over 3 seeds with the means of the stored values, and its box plots hold the stored per-run
values. The notebooks are stored without outputs, so they never rot in git.

Each notebook takes about 20-35 s here (run time printed with ``-s``)."""
from __future__ import annotations

import ast
import base64
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

import landscape  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["01_attach_probes.ipynb", "02_geometry_over_time.ipynb", "03_compare_flatness.ipynb"]
PLOTLY = "application/vnd.plotly.v1+json"
CELL_TIMEOUT = 300  # seconds per cell; a whole notebook takes well under 2 minutes


@pytest.fixture(scope="module")
def kernel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A python3 kernelspec that runs this interpreter (an installed spec may say just "python",
    which on PATH can be another Python, without landscape)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return root


def execute(name: str, tmp_path: Path, kernel_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run a copy of the notebook with ``tmp_path`` as its working directory; return the executed notebook."""
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_path))  # searched before the installed kernelspecs
    shutil.copy(NOTEBOOKS / name, tmp_path / name)
    nb = nbformat.read(tmp_path / name, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, if a cell raises
    print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    return nb


def _code_cells(nb: Any) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def _text(output: dict) -> str:
    if output["output_type"] == "stream":
        return str(output["text"])
    return str(output.get("data", {}).get("text/plain", ""))


def _all_text(nb: Any) -> str:
    return "\n".join(_text(o) for c in _code_cells(nb) for o in c.outputs)


def _figure_call(source: str) -> str | None:
    """The ``plot.<function>`` a cell ends with as its displayed expression, or None."""
    body = ast.parse(source).body
    if not body or not isinstance(body[-1], ast.Expr) or not isinstance(body[-1].value, ast.Call):
        return None
    func = body[-1].value.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "plot":
        return func.attr
    return None


def _array(value: Any) -> np.ndarray:
    """A figure's array as plotly's JSON holds it: a list, or a typed array (base64 ``bdata``)."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        return out.reshape([int(n) for n in str(value["shape"]).split(",")]) if "shape" in value else out
    return np.asarray(value, dtype=float)


def _figures(nb: Any) -> list[tuple[str, Any, dict]]:
    """(plot function, cell, the figure's JSON) for every figure cell; asserts each displayed
    exactly one figure and no other cell displayed any."""
    out = []
    for cell in _code_cells(nb):
        shown = [o for o in cell.outputs if PLOTLY in o.get("data", {})]
        call = _figure_call(cell.source)
        if call is None:
            assert not shown, f"a figure was displayed by a cell that does not end with a plot call: {cell.source!r}"
            continue
        assert len(shown) == 1, f"{cell.source!r} displayed {len(shown)} figures"
        fig = shown[0]["data"][PLOTLY]
        assert fig["data"], f"empty figure from {cell.source!r}"
        assert fig["layout"].get("title", {}).get("text"), f"untitled figure from {cell.source!r}"
        out.append((call, cell, fig))
    return out


def test_the_three_notebooks_exist() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_stored_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, f"{name}: cells {dirty} hold outputs or execution counts; clear them before committing"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert _code_cells(nb) and sum(c.cell_type == "markdown" for c in nb.cells) >= 5, f"{name} lacks its narrative"


def test_every_notebook_in_the_folder_is_stored_without_outputs() -> None:
    """Also notebooks added later: the check is on the folder, not on the list above."""
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert all(not c.outputs and c.execution_count is None for c in _code_cells(nb)), path.name


@pytest.mark.slow
def test_01_attach_probes(tmp_path: Path, kernel_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("01_attach_probes.ipynb", tmp_path, kernel_path, monkeypatch)
    text = _all_text(nb)
    assert "final weights and buffers bitwise identical: True" in text
    assert "run store" in text and "(closed)" in text and "variables:" in text  # landscape info's summary
    store = tmp_path / "runs/notebooks/01/sgd-0.zarr"
    assert store.is_dir() and (tmp_path / "runs/notebooks/01/adam-1.zarr").is_dir()
    ds = landscape.open_run(store)
    # the last cell displays the recorded variables: exactly those of the store, every probe family among them
    last = _code_cells(nb)[-1].outputs
    assert len(last) == 1 and last[0]["output_type"] == "execute_result"
    shown = ast.literal_eval(last[0]["data"]["text/plain"])
    assert shown == sorted(ds.data_vars)
    for name in ("loss", "gamma", "rsi", "lambda_max", "trace", "stability_ratio", "sharpness", "valley_width",
                 "noise_scale"):
        assert name in shown, name
    # the printed lambda_max values are the stored ones
    lam = ds["lambda_max"].sel(block="model").dropna("step")
    line = next(ln for ln in text.splitlines() if ln.startswith("lambda_max at"))
    printed = [float(x) for x in re.findall(r"-?\d+\.\d+", line.split(":", 1)[1])]
    np.testing.assert_allclose(printed, lam.values, atol=0.006)


@pytest.mark.slow
def test_02_geometry_over_time(tmp_path: Path, kernel_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("02_geometry_over_time.ipynb", tmp_path, kernel_path, monkeypatch)
    figures = _figures(nb)
    calls = [call for call, _, _ in figures]
    assert len(figures) == 12
    assert set(calls) == {"over_time", "gamma", "eta_star", "rsi_eb_plane", "edge_of_stability", "spectral_density",
                          "profiles", "slice_2d", "interpolation"}
    ds = landscape.open_run(tmp_path / "runs/notebooks/02/sgd-0.zarr")
    # the lambda_max figure draws the stored values at the measured steps
    fig = next(f for call, cell, f in figures if call == "over_time" and '"lambda_max"' in cell.source)
    lam = ds["lambda_max"].sel(block="model").dropna("step")
    (line,) = [t for t in fig["data"] if t.get("name") == "sgd"]
    np.testing.assert_array_equal(_array(line["x"]), lam["step"].values)
    np.testing.assert_allclose(_array(line["y"]), lam.values, rtol=1e-12)
    # the 2-D slice is the stored surface
    fig = next(f for call, cell, f in figures if call == "slice_2d" and "surface" not in cell.source)
    (contour,) = [t for t in fig["data"] if t["type"] == "contour"]
    np.testing.assert_allclose(np.sort(_array(contour["z"]).ravel()),
                               np.sort(ds["surface_loss"].values.ravel()), rtol=1e-12)
    assert "probes.ValleyWidth" in _all_text(nb)  # the MissingVariableError shown at the end


def _table_value(html: str, measure: str) -> list[float]:
    """The means (before ±) of one row of the notebook's summary table, one per optimizer column."""
    row = re.search(rf"<th>{measure}</th>(.*?)</tr>", html, flags=re.S)
    assert row, f"no row {measure!r} in the table"
    return [float(m) for m in re.findall(r"<td>\s*([-+\d.e]+) ±", row.group(1))]


@pytest.mark.slow
def test_03_compare_flatness(tmp_path: Path, kernel_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nb = execute("03_compare_flatness.ipynb", tmp_path, kernel_path, monkeypatch)
    stores = sorted((tmp_path / "runs/notebooks/03").glob("*.zarr"))
    assert [p.name for p in stores] == [f"{o}-{s}.zarr" for o in ("adam", "sgd") for s in (0, 1, 2)]
    runs = landscape.open_runs(str(tmp_path / "runs/notebooks/03/*.zarr")).load()
    last = int(runs["step"].values[-1])
    final = runs.sel(step=last, radius=0.05)
    opt = runs["optimizer"].values

    tables = [o["data"]["text/html"] for c in _code_cells(nb) for o in c.outputs
              if o["output_type"] == "execute_result" and "±" in o.get("data", {}).get("text/html", "")]
    assert len(tables) == 1, "the mean ± sd table is displayed once"
    html = tables[0]
    assert re.search(r"<th>\s*adam\s*</th>\s*<th>\s*sgd\s*</th>", html), "one column per optimizer"
    for measure, da in [("lambda_max", final["lambda_max"].sel(block="model")),
                        ("average_adaptive", final["sharpness"].sel(kind="average_adaptive")),
                        ("worst_l2_adaptive", final["sharpness"].sel(kind="worst_l2_adaptive")),
                        ("width_eigenvector", final["valley_width"].sel(direction="eigenvector"))]:
        expected = [float(da.values[opt == o].mean()) for o in ("adam", "sgd")]
        np.testing.assert_allclose(_table_value(html, measure), expected, rtol=6e-3, err_msg=measure)

    figures = _figures(nb)
    assert [call for call, _, _ in figures].count("compare") >= 4
    fig = next(f for call, cell, f in figures if call == "compare" and "average_adaptive" in cell.source)
    assert {t["name"] for t in fig["data"]} == {"adam", "sgd"}
    for trace in fig["data"]:
        stored = final["sharpness"].sel(kind="average_adaptive").values[opt == trace["name"]]
        np.testing.assert_allclose(np.sort(_array(trace["y"])), np.sort(stored), rtol=1e-12)
