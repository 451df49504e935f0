"""``landscape demo`` end to end on a small configuration: training with the demo's probes, the
tables, the comparison over seeds and the report; in this process and as a sweep on two worker
processes (the default), which must train the same runs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import landscape
from landscape.cli import main as cli_main
from landscape.demo import DemoConfig, comparison_table, curvature_table, flatness_table, run_demo, summary_table, train_all
from landscape.store import run_attrs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_on_workers_and_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DemoConfig(out=tmp_path / "demo", seeds=(0, 1), optimizers=("sgd", "sam"), epochs=1)
    paths = run_demo(cfg, progress=False)  # the default: a sweep on two single-threaded worker processes
    assert paths == [cfg.out / f"{name}-{seed}.zarr" for name in ("sgd", "sam") for seed in (0, 1)]
    out = capsys.readouterr().out
    assert "4 runs in" in out and "(2 worker processes)" in out
    for header in ("optimizer | runs | train loss", "optimizer | final lambda_max", "optimizer | average (raw)",
                   "outcome | sgd | sam | sgd vs sam: A12, p"):
        assert header in out
    assert "sgd | 2 | " in out and "sam | 2 | " in out
    assert (cfg.out / "report.html").stat().st_size > 1_000_000  # plotly.js inline: works offline
    # metadata: the settings that differ from the demo's defaults, as both paths record them
    meta = run_attrs(paths[3])
    assert meta["run"] == {"optimizer": "sam", "seed": 1, "epochs": 1} and meta["closed"]
    assert meta == landscape.open_run(paths[3]).attrs
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    # the tables read store paths or loaded datasets alike
    loaded = [landscape.open_run(p).load() for p in paths]
    for table in (summary_table, curvature_table, flatness_table, comparison_table):
        assert table(paths) == table(loaded)

    # workers=1: in this process, the same run as on a worker
    one = dataclasses.replace(cfg, out=tmp_path / "here", seeds=(1,), optimizers=("sam",))
    [here] = train_all(one, progress=False, workers=1)
    want, got = landscape.open_run(paths[3]), landscape.open_run(here)
    assert got.attrs["run"] == want.attrs["run"]
    for var in ("loss", "gamma", "lambda_max", "sharpness"):
        np.testing.assert_allclose(got[var].values, want[var].values, rtol=1e-4, equal_nan=True, err_msg=var)


def test_demo_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for workers in (0, 1.5, True):
        with pytest.raises(ValueError, match="workers must be an int >= 1"):
            train_all(DemoConfig(out=tmp_path), workers=workers)
    for argv in (["--workers", "0"], ["--seeds", "0"], ["--epochs", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli_main(["demo", "--out", str(tmp_path), *argv])
        assert exc.value.code == 2 and "must be >= 1" in capsys.readouterr().err
