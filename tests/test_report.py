"""The HTML report (landscape/report.py, ``landscape report``): two tiny recorded runs with probes
of several families give one self-contained page (plotly.js inline exactly once, nothing loaded
from the network) with the families present, their figures, the runs' metadata and a note on the
families absent; a figure that raises becomes a note; and the page, opened in headless Chromium,
raises no JavaScript error and renders every plot."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import plotly.offline
import pytest
import torch

import landscape
from landscape import plot
from landscape.cli import main
from landscape.models import DigitsMLP
from landscape.report import write_report
from landscape.store import StoreError
from probes import (HessianSpectrum, Interpolation, LossProfile, PreconditionedSharpness, RestrictedSecant, Sharpness,
                    SpectralDensity, TrajectoryPCA)
from tests._helpers import record

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 20
OPTIMIZERS = {"sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}), "adam": (torch.optim.Adam, {"lr": 0.01})}


def _probes() -> list:
    return [RestrictedSecant(every=4, samples=2), HessianSpectrum(every=5, k=2), PreconditionedSharpness(every=5),
            SpectralDensity(every=10, steps=8), Sharpness(every=10, kinds=("average", "sam")), Interpolation(every=5),
            LossProfile(every=10, alphas=[-0.5, 0, 0.5], directions=("random",)), TrajectoryPCA(every=5, grid=5)]


def _record(path: Path, name: str, seed: int) -> Path:
    cls, kw = OPTIMIZERS[name]
    return record(path, _probes(), model=lambda: DigitsMLP(hidden=8), steps=STEPS, seed=seed, opt_cls=cls,
                  run={"optimizer": name, "seed": seed}, **kw)[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report")
    _record(root / "sgd-0.zarr", "sgd", 0)
    _record(root / "adam-1.zarr", "adam", 1)
    return root


@pytest.fixture(scope="module")
def report(stores) -> tuple[Path, str]:
    out = write_report(str(stores / "*.zarr"), stores / "out" / "report.html")
    return out, out.read_text(encoding="utf-8")


def _figures(page: str) -> list[str]:
    return re.findall(r'<figure class="landscape-figure" data-figure="([^"]+)">', page)


EXPECTED = {"loss", "lr", "gamma", "rsi_eb_plane", "eta_star", "lambda_max", "edge_of_stability",
            "spectral_density/adam-1", "spectral_density/sgd-0", "sharpness/average/0.05", "sharpness/sam/0.05",
            "compare_sharpness/average/0.05", "compare_sharpness/sam/0.05", "interpolation", "profiles/adam-1",
            "profiles/sgd-0", "slice_2d/adam-1", "slice_2d/sgd-0"}


def test_report_is_one_self_contained_page(report):
    out, page = report
    assert out.name == "report.html" and page.startswith("<!DOCTYPE html>")
    js = plotly.offline.get_plotlyjs()
    assert page.count(js) == 1  # plotly.js inline, exactly once
    rest = page.replace(js, "")  # (plotly.js itself names its CDN in a default it does not use)
    assert rest.count("<script") == 1 + rest.count("Plotly.newPlot(")  # plotly.js, then one script per figure
    assert re.search(r"<script[^>]*\bsrc\s*=", rest, flags=re.I) is None  # nothing loaded from elsewhere
    assert re.search(r"<link[^>]*\bhref\s*=", rest, flags=re.I) is None
    assert re.search(r"https?://", rest) is None and "mathjax" not in rest.lower()
    # each figure: one plotly div drawn by Plotly.newPlot from the page's own plotly.js
    figures = _figures(page)
    assert len(page.split('class="plotly-graph-div"')) - 1 == len(figures) == page.count("Plotly.newPlot(")


def test_report_has_the_families_present_their_figures_and_notes_the_absent(report):
    _, page = report
    families = re.findall(r'<section id="[^"]+" class="family" data-family="([^"]+)">', page)
    assert families == ["training", "secant", "curvature", "flatness", "valleys", "slices"]
    assert set(_figures(page)) == EXPECTED
    assert "figure-error" not in page.replace("div.figure-error", "")  # every figure was drawn
    absent = page[page.index('<section id="absent"'):]
    assert "Gradient noise" in absent and "probes.GradientNoise" in absent
    assert "Curvature" not in absent
    # each family's figures sit in its section
    curvature = page[page.index('data-family="curvature"'):page.index('data-family="flatness"')]
    assert set(_figures(curvature)) == {k for k in EXPECTED if k.startswith(("lambda", "edge", "spectral"))}


def test_report_lists_the_runs_metadata(report, stores):
    _, page = report
    table = page[page.index('<section id="runs">'):page.index("</table>")]
    rows = re.findall(r"<tr><td>(.*?)</td></tr>", table, flags=re.S)
    assert len(rows) == 2
    cells = {r.split("</td><td>")[0]: r.split("</td><td>") for r in rows}
    assert set(cells) == {"adam-1", "sgd-0"}
    params = sum(p.numel() for p in DigitsMLP(hidden=8).parameters())
    sgd, adam = cells["sgd-0"], cells["adam-1"]
    assert sgd[1:3] == ["sgd", "0"] and adam[1:3] == ["adam", "1"]
    assert sgd[3] == f"DigitsMLP, {params:,} parameters"
    assert "SGD: lr=0.1, momentum=0.9" in sgd[4] and "Adam: lr=0.01" in adam[4]
    assert "foreach" not in sgd[4]  # implementation switches left out
    for name in ("RestrictedSecant (every 4)", "HessianSpectrum (every 5)", "TrajectoryPCA (every 5)"):
        assert name in sgd[5]
    assert sgd[6] == str(STEPS)
    assert sgd[7] == f"torch {torch.__version__}, landscape {landscape.__version__}"
    assert sgd[8] == "none"  # probe errors



def test_report_from_datasets_of_open_run_equals_the_one_from_paths(report, stores, tmp_path):
    _, want = report
    loaded = [landscape.open_run(p).load() for p in sorted(stores.glob("*.zarr"))]  # as the demo passes them
    got = write_report(loaded, tmp_path / "loaded.html").read_text(encoding="utf-8")

    def runs_table(page: str) -> str:
        return page[page.index('<section id="runs">'):page.index("</table>")]

    assert runs_table(got) == runs_table(want) and "pass the store paths" not in got  # the whole metadata
    assert _figures(got) == _figures(want)
    with pytest.raises(TypeError, match="not a mix"):
        write_report([loaded[0], stores / "sgd-0.zarr"], tmp_path / "x.html")

SECANT = ["loss", "lr", "gamma", "gamma_null", "gamma_quantiles", "eta_star", "rsi", "eb", "mu_hat", "L_hat"]


def test_a_figure_that_raises_becomes_a_note(stores, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("boom from gamma")

    monkeypatch.setattr(plot, "gamma", broken)
    one = landscape.open_run(stores / "sgd-0.zarr")[SECANT]  # a single run's dataset, with its attrs
    page = write_report(one, tmp_path / "r.html").read_text()
    assert re.search(r'<div class="figure-error" data-figure="gamma">.*RuntimeError: boom from gamma', page)
    assert set(_figures(page)) == {"loss", "lr", "rsi_eb_plane", "eta_star"}  # the others are drawn
    assert "DigitsMLP" in page and "1 run (sgd)" in page  # the metadata from the run's attrs


def test_report_of_a_multi_run_dataset_and_bad_inputs(stores, tmp_path):
    ds = landscape.open_runs(str(stores / "*.zarr"))[SECANT]
    page = write_report(ds, tmp_path / "ds.html", title="From a dataset").read_text()
    assert "<title>From a dataset</title>" in page
    assert re.findall(r'data-family="([^"]+)"><h2>', page) == ["training", "secant"]
    assert set(_figures(page)) == {"loss", "lr", "gamma", "rsi_eb_plane", "eta_star"}
    assert "pass the store paths for the full metadata" in page  # open_runs keeps only run, optimizer, seed
    table = page[page.index('<section id="runs">'):page.index("</table>")]
    assert re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td>", table) == [("adam-1", "adam", "1"),
                                                                                        ("sgd-0", "sgd", "0")]
    with pytest.raises(StoreError, match="no run store matches"):
        write_report(str(stores / "nothing-*.zarr"), tmp_path / "x.html")
    with pytest.raises(StoreError, match="does not exist"):
        write_report([stores / "missing.zarr"], tmp_path / "x.html")


def test_cli_writes_the_report(tmp_path, capsys):
    store = record(tmp_path / "plain.zarr", [], model=lambda: DigitsMLP(hidden=8), steps=5)[1]  # no probe, no run=
    out = tmp_path / "cli" / "page.html"
    # a glob and a path naming the same store: one run
    assert main(["report", str(tmp_path / "pl*.zarr"), str(store), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    assert "landscape report: 1 run (plain)</title>" in page  # without run metadata, runs are named by their store
    assert set(_figures(page)) == {"loss", "lr"}
    absent = page[page.index('<section id="absent"'):]
    assert all(f"<b>{name}</b>" in absent for name in ("RSI / EB", "Curvature", "Flatness", "Valleys", "Slices", "Gradient noise"))
    row = re.findall(r"<tr><td>(.*?)</td></tr>", page, flags=re.S)
    assert len(row) == 1 and row[0].startswith("plain</td><td>SGD</td>")  # the optimizer's class without run metadata
    assert main(["report", str(tmp_path / "none.zarr"), "-o", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the page in a browser
# ---------------------------------------------------------------------------------------------

# records JavaScript errors, unhandled promise rejections and console.error calls into a hidden
# element, which --dump-dom then shows
_ERROR_PROBE = """<script>(function () {
  var errors = [];
  function note(msg) {
    errors.push(String(msg));
    var el = document.getElementById("__landscape_errors");
    if (el) el.textContent = JSON.stringify(errors);
  }
  window.addEventListener("error", function (e) {
    note("error: " + (e.message || (e.target && (e.target.src || e.target.href)) || e));
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    note("unhandledrejection: " + (e.reason && e.reason.stack || e.reason));
  });
  var original = console.error;
  console.error = function () {
    note("console.error: " + Array.prototype.join.call(arguments, " "));
    return original.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", function () {
    var el = document.createElement("pre");
    el.id = "__landscape_errors"; el.hidden = true; el.textContent = JSON.stringify(errors);
    document.body.appendChild(el);
  });
})();</script>"""


class _Rendered(HTMLParser):
    """Per plotly div of a dumped DOM: its main SVGs, drawn trace groups, heatmap images and
    canvases; and the recorded errors."""

    def __init__(self) -> None:
        super().__init__()
        self.plots: list[dict[str, object]] = []
        self.depth = 0  # div nesting inside the current plot div
        self.errors: str | None = None
        self._in_errors = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if self.depth:
            plot_ = self.plots[-1]
            self.depth += tag == "div"
            if tag == "svg" and "main-svg" in cls:
                plot_["svg"] += 1
            if tag == "g" and ("trace" in cls or "hm" in cls):
                plot_["drawn"] += 1
            if tag == "canvas":
                plot_["canvas"] += 1
        elif tag == "div" and "plotly-graph-div" in cls:
            self.plots.append({"id": a.get("id"), "svg": 0, "drawn": 0, "canvas": 0})
            self.depth = 1
        if tag == "pre" and a.get("id") == "__landscape_errors":
            self._in_errors, self.errors = True, ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self.depth:
            self.depth -= 1
        if tag == "pre":
            self._in_errors = False

    def handle_data(self, data: str) -> None:
        if self._in_errors:
            self.errors = (self.errors or "") + data


def _chromium() -> str:
    path = "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else shutil.which("chromium")
    if path:
        return path
    if os.environ.get("LANDSCAPE_REQUIRE_CHROMIUM") == "1":
        pytest.fail("LANDSCAPE_REQUIRE_CHROMIUM=1 but chromium is missing: apt-get install chromium (Debian)")
    pytest.skip("headless Chromium (/usr/bin/chromium, Debian's chromium package) is not installed")


def _open_in_chromium(page: str, where: Path) -> _Rendered:
    """Load ``page`` (with the error probe injected first in <head>) and parse the DOM after load."""
    i = page.index("<head>") + len("<head>")
    probe_page = where / "probed.html"
    probe_page.write_text(page[:i] + _ERROR_PROBE + page[i:], encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=10000", "--dump-dom",
             probe_page.as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = _Rendered()
    parsed.feed(done.stdout)
    assert parsed.errors is not None, "the error probe did not run: " + done.stdout[:500]
    return parsed


def test_the_browser_check_sees_javascript_errors(tmp_path):
    """The harness itself: a page with an exception, a console.error and a rejected promise."""
    page = ("<!DOCTYPE html><html><head></head><body><script>console.error('logged');</script>"
            "<script>undefined_function();</script><script>Promise.reject(new Error('rejected'));</script></body></html>")
    errors = json.loads(_open_in_chromium(page, tmp_path).errors or "[]")
    assert any("logged" in e for e in errors)
    assert any("undefined_function" in e for e in errors)
    assert any("rejected" in e for e in errors)


def test_report_renders_in_headless_chromium_without_javascript_errors(report, tmp_path):
    _, page = report
    parsed = _open_in_chromium(page, tmp_path)
    assert json.loads(parsed.errors or "[]") == []
    assert len(parsed.plots) == len(_figures(page)) == len(EXPECTED)
    for p in parsed.plots:  # every plot drawn: its SVG and at least one trace (or heatmap image)
        assert p["svg"] >= 1 and (p["drawn"] >= 1 or p["canvas"] >= 1), p
