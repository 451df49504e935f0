"""Sweeps on dask.distributed: a grid of (configuration x seed) runs on worker processes, failures
reported, resume after an interrupted sweep, argument checks.

The workers import the training functions from ``tests._sweep_jobs``: they are spawned with the
test process's cwd (the repository root) and sys.path."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import landscape
from landscape.cli import main as cli_main
from landscape.store import COMMIT
from landscape.sweeps import FAILED, SweepResult, digits_train, local_cluster, parse_optimizers, store_complete, sweep
from tests._sweep_jobs import tiny_train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """One 2-worker cluster shared by the tests that pass a scheduler address (starting a cluster
    costs seconds); the first test builds its own through sweep()'s default path."""
    with local_cluster(2) as c:
        yield c.scheduler_address


def _log(log_dir: Path) -> dict[str, list[dict]]:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in sorted(log_dir.glob("*.jsonl"))}


def test_sweep_on_local_cluster_then_open_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # an earlier default LocalCluster leaves it here
    logs = tmp_path / "log"
    logs.mkdir()
    configs = {"sgd": {"steps": 6, "log_dir": str(logs)}, "adam": {"steps": 6, "log_dir": str(logs)}}
    res = sweep(tiny_train, configs, seeds=[0, 1], out=tmp_path / "runs", workers=2, progress=False)
    assert isinstance(res, SweepResult) and res.ok, res.summary()
    expected = [tmp_path / "runs" / f"{n}-{s}.zarr" for n in ("sgd", "adam") for s in (0, 1)]
    assert res.finished == expected and res.skipped == [] and res.complete == expected
    assert all(store_complete(p) for p in expected)
    # the jobs ran in the two worker processes, not here, each once
    log = _log(logs)
    assert sorted(log) == sorted(p.stem for p in expected) and all(len(v) == 1 for v in log.values())
    pids = {v[0]["pid"] for v in log.values()}
    assert os.getpid() not in pids and len(pids) == 2
    # dask's default MALLOC_TRIM_THRESHOLD_=65536 made torch jobs 2-2.5x slower: the sweep unsets it
    assert all(v[0]["malloc_trim"] is None and v[0]["threads"] == 1 for v in log.values())

    ds = landscape.open_runs(str(tmp_path / "runs" / "*.zarr"))
    assert sorted(ds["run"].values.tolist()) == sorted(p.stem for p in expected)
    for run in ds["run"].values:
        name, seed = str(run).rsplit("-", 1)
        assert ds["optimizer"].sel(run=run).item() == name and int(ds["seed"].sel(run=run)) == int(seed)
    assert ds.sizes["step"] == 6 and (ds["steps"].values == 6).all()
    assert res.open_runs().sizes["run"] == 4

    # a worker trained exactly what the same function trains here (same seed, same configuration)
    local = tmp_path / "local" / "adam-1.zarr"
    tiny_train("adam", {"steps": 6}, 1, local)
    want = landscape.open_run(local)
    got = landscape.open_run(expected[3])
    assert got.attrs["run"]["optimizer"] == "adam" and got.attrs["run"]["seed"] == 1
    np.testing.assert_allclose(got["gamma_train"].values, want["gamma_train"].values, rtol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got["loss"].values, want["loss"].values, rtol=1e-5)
    other = landscape.open_run(expected[2])  # adam seed 0: a different trajectory
    assert not np.allclose(other["loss"].values, want["loss"].values)


def test_failed_jobs_are_reported_and_others_finish(tmp_path: Path, scheduler: str) -> None:
    out = tmp_path / "runs"
    (out / "sgd-1.zarr").mkdir(parents=True)  # something at a run's path that is not a store: left alone
    (out / "sgd-1.zarr" / "notes.txt").write_text("mine")
    configs = {"sgd": {"steps": 5},
               "bad": {"opt": "sgd", "fail": True},          # raises after 3 steps
               "open": {"opt": "sgd", "unclosed": True},     # returns with its store still open
               "none": {"opt": "sgd", "no_store": True}}     # returns without writing a store
    res = sweep(tiny_train, configs, seeds=2, out=out, scheduler=scheduler, progress=False)
    assert res.finished == [out / "sgd-0.zarr"] and res.skipped == [] and not res.ok
    failed = {(f.name, f.seed): f for f in res.failed}
    assert list(failed) == [("sgd", 1), ("bad", 0), ("bad", 1), ("open", 0), ("open", 1), ("none", 0), ("none", 1)]
    assert failed["sgd", 1].error.startswith("FileExistsError") and (out / "sgd-1.zarr" / "notes.txt").exists()
    for seed in (0, 1):
        f = failed["bad", seed]
        assert f.error == f"RuntimeError: boom in bad-{seed}" and f.path == out / f"bad-{seed}.zarr"
        assert "tiny_train" in f.traceback and "boom" in f.traceback
        # the recorder closed the store on the way out; the sweep marked it as not done
        assert json.loads((f.path / COMMIT).read_text())["closed"] and (f.path / FAILED).exists()
        assert not store_complete(f.path)
        assert "not closed" in failed["open", seed].error and not store_complete(out / f"open-{seed}.zarr")
        assert failed["none", seed].error.startswith("RuntimeError: train returned but left no store")
    text = res.summary()
    assert "1 finished" in text and "7 failed" in text and "FAILED bad seed 1" in text
    assert res.open_runs()["run"].values.tolist() == ["sgd-0"]


def test_resume_redoes_only_incomplete_runs(tmp_path: Path, scheduler: str) -> None:
    from distributed import Client

    out, logs = tmp_path / "runs", tmp_path / "log"
    out.mkdir()
    logs.mkdir()
    # sgd-1: the store a killed job leaves (3 committed steps, never closed), written on a worker
    killed = out / "sgd-1.zarr"
    with Client(scheduler) as client:
        client.submit(tiny_train, "sgd", {"steps": 5, "unclosed": True}, 1, killed, pure=False).result()
    assert not json.loads((killed / COMMIT).read_text())["closed"] and not store_complete(killed)
    assert landscape.open_run(killed).sizes["step"] == 3
    configs = {"sgd": {"steps": 5, "log_dir": str(logs)},
               "adam": {"steps": 5, "log_dir": str(logs), "fail_once": str(tmp_path / "marker"), "fail_seed": 1}}

    first = sweep(tiny_train, configs, seeds=[0, 1], out=out, scheduler=scheduler, progress=False)
    assert [p.name for p in first.finished] == ["sgd-0.zarr", "sgd-1.zarr", "adam-0.zarr"] and first.skipped == []
    assert [(f.name, f.seed) for f in first.failed] == [("adam", 1)]
    assert store_complete(killed) and landscape.open_run(killed).sizes["step"] == 5  # redone from scratch
    mtimes = {p: (p / "zarr.json").stat().st_mtime_ns for p in first.finished}

    second = sweep(tiny_train, configs, seeds=[0, 1], out=out, scheduler=scheduler, progress=False)
    assert second.ok and second.finished == [out / "adam-1.zarr"] and second.skipped == first.finished
    assert second.complete == [out / f"{n}-{s}.zarr" for n in ("sgd", "adam") for s in (0, 1)]
    assert {k: len(v) for k, v in _log(logs).items()} == {"sgd-0": 1, "sgd-1": 1, "adam-0": 1, "adam-1": 2}
    assert all((p / "zarr.json").stat().st_mtime_ns == t for p, t in mtimes.items())  # untouched
    assert not (out / "adam-1.zarr" / FAILED).exists() and landscape.open_run(out / "adam-1.zarr").sizes["step"] == 5

    # complete runs recorded with other settings are not taken for this sweep's
    with pytest.raises(ValueError, match=r"other settings.*steps=5 \(sweep: 6\)"):
        sweep(tiny_train, {**configs, "sgd": {**configs["sgd"], "steps": 6}}, seeds=[0, 1], out=out, scheduler=scheduler)

    third = sweep(tiny_train, configs, seeds=[0, 1], out=out, scheduler=scheduler, progress=False, resume=False,
                  threads_per_worker=2)
    assert third.ok and len(third.finished) == 4 and third.skipped == []
    log = _log(logs)
    assert {k: len(v) for k, v in log.items()} == {"sgd-0": 2, "sgd-1": 2, "adam-0": 2, "adam-1": 3}
    assert {v[-1]["threads"] for v in log.values()} == {2} and {v[0]["threads"] for v in log.values()} == {1}


def test_bad_arguments(tmp_path: Path) -> None:
    ok = {"sgd": {}}
    with pytest.raises(TypeError, match="train must be a function"):
        sweep("tiny_train", ok, 1, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="non-empty dict"):
        sweep(tiny_train, {}, 1, tmp_path)
    with pytest.raises(ValueError, match="names the store files"):
        sweep(tiny_train, {"a/b": {}}, 1, tmp_path)
    with pytest.raises(TypeError, match=r"configs\['sgd'\] must be a dict"):
        sweep(tiny_train, {"sgd": [0.1]}, 1, tmp_path)
    with pytest.raises(ValueError, match="sets optimizer"):
        sweep(tiny_train, {"sgd": {"seed": 3}}, 1, tmp_path)
    with pytest.raises(ValueError, match="at least one seed"):
        sweep(tiny_train, ok, 0, tmp_path)
    with pytest.raises(ValueError, match="repeats"):
        sweep(tiny_train, ok, [1, 1], tmp_path)
    with pytest.raises(TypeError, match="list of ints"):
        sweep(tiny_train, ok, "3", tmp_path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list of ints"):
        sweep(tiny_train, ok, [0, 1.5], tmp_path)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        sweep(tiny_train, ok, 1, tmp_path, workers=0)
    with pytest.raises(ValueError, match="threads_per_worker"):
        sweep(tiny_train, ok, 1, tmp_path, threads_per_worker=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="scheduler must be an address"):
        sweep(tiny_train, ok, 1, tmp_path, scheduler=8786)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        sweep(tiny_train, ok, 1, tmp_path / "file")
    with pytest.raises(ValueError, match="no complete run"):
        SweepResult(out=tmp_path).open_runs()
    # digits_train checks its settings before training
    with pytest.raises(ValueError, match="knows the optimizers"):
        digits_train("rmsprop", {}, 0, tmp_path / "rmsprop-0.zarr")
    with pytest.raises(ValueError, match="unknown settings"):
        digits_train("sgd", {"lr": 0.1}, 0, tmp_path / "sgd-0.zarr")
    assert parse_optimizers(" sgd,adam ") == ["sgd", "adam"]
    with pytest.raises(ValueError, match="unknown optimizers"):
        parse_optimizers("sgd,lbfgs")


def test_cli_sweep_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, msg in ((["--optimizers", "sgd,nope"], "unknown optimizers"), (["--seeds", "0"], ">= 1"),
                      (["--workers", "0"], ">= 1"), (["--epochs", "0"], ">= 1")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["sweep", "--out", str(tmp_path), *argv])
        assert exc.value.code == 2 and msg in capsys.readouterr().err
