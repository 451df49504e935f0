"""The store: crash safety, the schema check, many runs, netCDF, overwrite/resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr
import zarr
from _helpers import loader, train
from hypothesis import given, settings
from hypothesis import strategies as st

import landscape
from landscape.cli import main as cli_main
from landscape.models import DigitsMLP
from landscape.schema import UPDATE_FROM_PARAMS, Unwritten, Var
from landscape.store import RunWriter, StoreError, run_attrs, stack_runs
from probes import RestrictedSecant

CHILD = textwrap.dedent("""
    import sys, torch, torch.nn.functional as F
    import landscape
    from landscape.data import load_digits
    from landscape.models import DigitsMLP
    from probes import RestrictedSecant
    store, log = sys.argv[1], sys.argv[2]
    import landscape.recorder  # who writes the store: the training thread, or the writer thread
    landscape.recorder._no_spare_core = lambda device: sys.argv[3] == "inline"
    torch.manual_seed(0)
    X, y = load_digits()
    model = DigitsMLP(hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=32,
                           probes=[RestrictedSecant(every=2, samples=2)], store=store)
    with open(log, "w") as f:
        step = 0
        while True:  # until killed
            i = (step * 32) % 1760
            opt.zero_grad(); loss = F.cross_entropy(model(X[i:i + 32]), y[i:i + 32]); loss.backward(); opt.step()
            f.write(f"{step} {loss.item()!r}\\n"); f.flush()
            step += 1
""")


@pytest.mark.parametrize("writes", ["inline", "thread"])
def test_kill_9_leaves_every_committed_step_readable(tmp_path, writes):
    store, log = tmp_path / "run.zarr", tmp_path / "steps.log"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(store), str(log), writes], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 600:
                break
            if proc.poll() is not None:
                pytest.fail(f"child died: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("child made no progress")
        os.kill(proc.pid, signal.SIGKILL)  # mid-run, no chance to flush or close
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log.read_text().splitlines()
    losses = {int(a): float(b) for a, b in (ln.split() for ln in lines if len(ln.split()) == 2)}
    ds = landscape.open_run(store)
    n = ds.sizes["step"]
    assert not ds.attrs["closed"]
    # The writer commits in groups and lags training by at most the batch it is writing plus
    # its queue (max_pending = 128 steps each; it runs at low priority, so on a busy machine it
    # does fall that far behind): every step the child finished, except those, is there.
    # Quick steps of a probe that reads only the step are measured in batches of up to 32 first.
    assert n >= len(losses) - 2 * 128 - 32 - 1 and n >= 300
    assert ds.step.values.tolist() == list(range(n))
    recorded = ds.loss.values
    assert np.isfinite(recorded).all()
    assert recorded.tolist() == [losses[i] for i in range(n)]  # bitwise the values training saw
    assert np.isfinite(ds.grad_norm.values[::2]).all()
    traj = landscape.open_trajectory(store)
    m = traj.sizes["record"]
    assert m >= (n - 1) // 2
    assert traj.step.values.tolist() == list(range(0, 2 * m, 2))
    for name in ("params", "grad", "update", "sample_grad"):
        assert np.isfinite(traj[name].values).all(), name
    # the killed run can be inspected and resumed
    assert cli_main(["info", str(store)]) == 0
    model = DigitsMLP(hidden=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, store=store, resume=True):
        train(model, opt, 3)
    resumed = landscape.open_run(store)
    assert resumed.sizes["step"] == n + 3 and resumed.step.values[-1] == n + 2
    np.testing.assert_array_equal(resumed.loss.values[:n], recorded)


def _small_run(path: Path, optimizer: str, seed: int, steps: int) -> None:
    torch.manual_seed(seed)
    model = DigitsMLP(hidden=8)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=0.01)
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=loader(batch_size=16),
                          probes=[RestrictedSecant(every=2, samples=2)], store=path,
                          run={"optimizer": optimizer, "seed": seed, "lr": 0.01}):
        train(model, opt, steps, seed=seed)


def test_open_runs_concatenates_lazily_with_run_coordinates(tmp_path):
    specs = [("sgd", 0, 8), ("sgd", 1, 8), ("adam", 0, 6)]
    for opt, seed, steps in specs:
        _small_run(tmp_path / f"{opt}-{seed}.zarr", opt, seed, steps)
    runs = landscape.open_runs(str(tmp_path / "*.zarr"))
    assert runs.sizes["run"] == 3 and runs.sizes["step"] == 8
    assert runs.loss.chunks is not None  # dask-backed, nothing loaded yet
    assert sorted(zip(runs.optimizer.values.tolist(), runs.seed.values.tolist())) == [("adam", 0), ("sgd", 0), ("sgd", 1)]
    adam = runs.sel(run="adam-0")
    assert np.isnan(adam.loss.values[6:]).all() and np.isfinite(adam.loss.values[:6]).all()
    one = landscape.open_run(tmp_path / "sgd-1.zarr")
    np.testing.assert_array_equal(runs.sel(run="sgd-1").gamma.values, one.gamma.values)
    assert (runs.lr == 0.01).all()
    by_opt = runs.loss.groupby("optimizer").mean("run")  # the comparison users make
    assert set(by_opt.optimizer.values.tolist()) == {"adam", "sgd"}
    # read into memory at once: the same dataset, without dask
    eager = landscape.open_runs(str(tmp_path / "*.zarr"), load=True)
    xr.testing.assert_identical(eager, runs.load())
    assert eager.loss.chunks is None
    with pytest.raises(TypeError, match="load must be True or False"):
        landscape.open_runs(str(tmp_path / "*.zarr"), load="yes")
    # runs opened one by one, then stacked: the same dataset again
    opened = [landscape.open_run(p) for p in sorted(tmp_path.glob("*.zarr"))]
    xr.testing.assert_identical(stack_runs(opened), eager)
    with pytest.raises(TypeError, match="datasets from landscape.open_run"):
        stack_runs([eager])
    with pytest.raises(StoreError, match="no runs"):
        stack_runs([])
    # a run's attrs without opening its arrays
    assert run_attrs(tmp_path / "adam-0.zarr") == landscape.open_run(tmp_path / "adam-0.zarr").attrs
    with pytest.raises(StoreError, match="no run store"):
        run_attrs(tmp_path / "nothing.zarr")
    with pytest.raises(StoreError, match="no run store matches"):
        landscape.open_runs(str(tmp_path / "nothing-*.zarr"))


def test_netcdf_export_round_trip(tmp_path):
    _small_run(tmp_path / "r.zarr", "sgd", 0, 6)
    ds = landscape.open_run(tmp_path / "r.zarr").load()
    out = landscape.to_netcdf(tmp_path / "r.zarr", tmp_path / "r.nc")
    nc = xr.open_dataset(out, engine="h5netcdf").load()
    for name in ("loss", "rsi", "gamma", "mu_hat", "gamma_null"):
        np.testing.assert_array_equal(nc[name].values, ds[name].values)
    assert nc["has_guarantee"].dtype == np.int8
    assert json.loads(nc.attrs["run"]) == {"optimizer": "sgd", "seed": 0, "lr": 0.01}
    assert nc["rsi"].attrs["long_name"] == ds["rsi"].attrs["long_name"]
    assert nc.bound.values.tolist() == ["extreme", "quantile"]


def test_schema_errors(tmp_path):
    with pytest.raises(StoreError, match="no run store"):
        landscape.open_run(tmp_path / "missing.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a zarr v3 store"):
        landscape.open_run(tmp_path / "plain")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w", zarr_format=3).attrs["hello"] = 1
    with pytest.raises(StoreError, match="not a landscape run"):
        landscape.open_run(tmp_path / "foreign.zarr")
    _small_run(tmp_path / "r.zarr", "sgd", 0, 2)
    meta = tmp_path / "r.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    assert doc["attributes"]["landscape_schema"] == "2.0"
    doc["attributes"]["landscape_schema"] = "3.0"
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match="schema 3.0.*reads 1.x and 2.x"):
        landscape.open_run(tmp_path / "r.zarr")
    for readable in ("2.7", "1.0"):  # a newer minor version, and stores without derived updates
        doc["attributes"]["landscape_schema"] = readable
        meta.write_text(json.dumps(doc))
        assert landscape.open_run(tmp_path / "r.zarr").sizes["step"] == 2
    (tmp_path / "r.zarr" / ".landscape-commit.json").unlink()
    with pytest.raises(StoreError, match="not written by landscape.attach"):
        landscape.open_run(tmp_path / "r.zarr")
    assert cli_main(["info", str(tmp_path / "foreign.zarr")]) == 2


def test_overwrite_and_resume_rules(tmp_path):
    path = tmp_path / "r.zarr"
    _small_run(path, "sgd", 0, 4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _small_run(path, "sgd", 0, 4)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="contradict"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, store=path, overwrite=True, resume=True)
    with pytest.raises(FileNotFoundError, match="resume=True"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, store=tmp_path / "none.zarr", resume=True)
    landscape.attach(model, opt, loss_fn=F.cross_entropy, store=path, overwrite=True).close()
    assert landscape.open_run(path).sizes["step"] == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(StoreError, match="not a zarr store"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, store=precious, overwrite=True)
    assert (precious / "thesis.tex").exists()


@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 2600), every=st.integers(1, 50), width=st.sampled_from([1, 3, 5000]))
def test_writer_round_trip_across_chunks(tmp_path_factory, rows, every, width):
    """Whatever the number of rows (crossing chunk and capacity boundaries) and the row width,
    what is read back is what was written, before and after close."""
    path = tmp_path_factory.mktemp("w") / "r.zarr"
    w = RunWriter(path, {})
    rng = np.random.default_rng(rows)
    expected = rng.standard_normal((rows, width))
    for i in range(rows):
        traj = {"v": Var(("param",), expected[i].astype(np.float32), {})} if i % every == 0 else None
        w.append(i, {"x": Var(("col",), expected[i], {})}, traj)
    w.flush()
    live = landscape.open_run(path)
    np.testing.assert_array_equal(live.x.values, expected.astype(live.x.dtype))
    w.close()
    done = landscape.open_run(path)
    assert zarr.open_array(str(path / "x"), mode="r").shape[0] == rows  # trimmed at close
    np.testing.assert_array_equal(done.x.values, expected.astype(done.x.dtype))
    traj = landscape.open_trajectory(path)
    np.testing.assert_array_equal(traj.v.values, expected[::every].astype(np.float32))
    np.testing.assert_array_equal(traj.step.values, np.arange(0, rows, every))


def test_absent_rows_read_as_fill_and_late_columns(tmp_path):
    """A variable measured on some steps only (probe cadence) reads NaN elsewhere, for scalars
    and for trajectory-sized vectors alike, also when it first appears late."""
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {}, batch_rows=3)
    rng = np.random.default_rng(0)
    vec = rng.standard_normal((40, 5000)).astype(np.float32)
    for i in range(40):
        row = {"loss": Var((), np.float64(i), {})}
        if i % 7 == 3:
            row["every7"] = Var((), np.float64(10 * i), {})
        if i >= 25 and i % 2:
            row["big"] = Var(("param",), vec[i], {})
        w.append(i, row)
    w.close()
    ds = landscape.open_run(path)
    assert ds.loss.values.tolist() == list(range(40))
    every7 = ds.every7.values
    assert np.isnan(every7[[i for i in range(40) if i % 7 != 3]]).all()
    assert every7[3::7].tolist() == [10.0 * i for i in range(3, 40, 7)]
    big = ds.big.values
    present = [i for i in range(40) if i >= 25 and i % 2]
    np.testing.assert_array_equal(big[present], vec[present])
    assert np.isnan(np.delete(big, present, axis=0)).all()


def test_resume_after_a_kill_forgets_uncommitted_rows(tmp_path):
    """Rows written but not committed before a kill (the writer died between its row writes
    and the commit record) must not leak into the resumed run."""
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {})
    for i in range(10):
        w.append(i, {"loss": Var((), np.float64(i), {}), "g": Var((), np.float64(-i), {})})
    w.flush()
    # simulate the kill: rows 10-12 reach the chunk files, the commit record does not
    w.steps.write_rows([{"step": Var((), np.int64(i), {}), "loss": Var((), np.float64(99), {}), "g": Var((), np.float64(99), {})}
                        for i in range(10, 13)])
    ds = landscape.open_run(path)
    assert ds.sizes["step"] == 10 and not ds.attrs["closed"]
    w2 = RunWriter(path, {}, resume=True)
    for i in range(10, 14):
        w2.append(i, {"loss": Var((), np.float64(i), {})})  # no "g" after the resume
    w2.close()
    ds = landscape.open_run(path)
    assert ds.loss.values.tolist() == list(range(14))
    assert ds.g.values[:10].tolist() == [-float(i) for i in range(10)]
    assert np.isnan(ds.g.values[10:]).all()
    assert ds.attrs["closed"]


def test_resume_a_closed_run_keeps_every_row(tmp_path):
    """Closing trims short arrays to one exact chunk; resuming re-chunks them and goes on."""
    path = tmp_path / "r.zarr"
    rng = np.random.default_rng(1)
    vec = rng.standard_normal((30, 4500)).astype(np.float32)
    w = RunWriter(path, {})
    for i in range(5):
        w.append(i, {"loss": Var((), np.float64(i), {})}, {"v": Var(("param",), vec[i], {})})
    w.close()
    assert zarr.open_array(str(path / "trajectory" / "v"), mode="r").chunks == (5, 4500)
    assert os.path.getsize(path / "trajectory" / "v" / "c.0.0") == 5 * 4500 * 4  # no preallocated tail
    w = RunWriter(path, {}, resume=True)
    for i in range(5, 30):
        w.append(i, {"loss": Var((), np.float64(i), {})}, {"v": Var(("param",), vec[i], {})})
    w.close()
    ds, traj = landscape.open_run(path), landscape.open_trajectory(path)
    assert ds.loss.values.tolist() == list(range(30))
    np.testing.assert_array_equal(traj.v.values, vec)


def test_results_go_on_their_rows_and_replace_earlier_ones(tmp_path):
    """``write_dataset`` (a probe's results at close): values over some steps land on those
    rows (NaN elsewhere), other dims and 0-d values as they are; a second write replaces the
    first (a resumed run closes again); results for a step never recorded are refused. A result
    folder without zarr.json (a kill between its chunk and its metadata) is no variable."""
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {})
    for i in range(10, 20):
        w.append(i, {"loss": Var((), np.float64(i), {})})
    first = xr.Dataset({"rsi": ("step", np.arange(3.0)), "mu_hat": ("bound", [1.0, 2.0]), "flag": ((), True),
                        "label": ("bound", np.array(["min", "q05"]))}, coords={"step": [11, 14, 19]})
    w.write_dataset(first)
    w.write_dataset(first.assign(rsi=("step", [7.0, 8.0, 9.0])))
    with pytest.raises(StoreError, match="never recorded"):
        w.write_dataset(xr.Dataset({"eb": ("step", [1.0])}, coords={"step": [25]}))
    (path / "orphan").mkdir()
    (path / "orphan" / "c.0").write_bytes(b"torn")
    w.close()
    ds = landscape.open_run(path)
    expected = np.full(10, np.nan)
    expected[[1, 4, 9]] = [7.0, 8.0, 9.0]
    np.testing.assert_array_equal(ds.rsi.values, expected)
    assert ds.mu_hat.values.tolist() == [1.0, 2.0] and bool(ds.flag) and ds.label.values.tolist() == ["min", "q05"]
    assert "eb" not in ds and "orphan" not in ds.variables


def test_commit_delay_bounds_what_a_kill_can_lose(tmp_path):
    """Steps become visible (committed) by themselves: with max_delay=0 at once, with a long
    delay only after it (or a flush), never by a later step's write."""
    slow = RunWriter(tmp_path / "slow.zarr", {}, max_delay=30.0)
    for i in range(3):
        slow.append(i, {"loss": Var((), np.float64(i), {})})
    time.sleep(0.5)
    assert landscape.open_run(tmp_path / "slow.zarr").sizes["step"] == 0  # still grouped
    slow.flush()
    assert landscape.open_run(tmp_path / "slow.zarr").sizes["step"] == 3
    slow.close()
    eager = RunWriter(tmp_path / "eager.zarr", {}, max_delay=0.0)
    eager.append(0, {"loss": Var((), np.float64(0.5), {})})
    deadline = time.time() + 10
    while landscape.open_run(tmp_path / "eager.zarr").sizes["step"] < 1 and time.time() < deadline:
        time.sleep(0.01)
    assert landscape.open_run(tmp_path / "eager.zarr").loss.values.tolist() == [0.5]  # no flush needed
    eager.close()
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="commit_delay"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, store=tmp_path / "x.zarr", commit_delay=-1)
    assert not (tmp_path / "x.zarr").exists()


def _threads_writing(w: RunWriter) -> list[tuple[str, list[int]]]:
    """Records which thread writes which steps."""
    seen: list[tuple[str, list[int]]] = []
    write = w._write_batch

    def traced(batch):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, [r.step for r in batch]))
        write(batch)

    w._write_batch = traced  # type: ignore[method-assign]
    return seen


def test_an_inline_writer_writes_on_the_calling_thread_and_its_thread_backs_it_up(tmp_path):
    """``inline=True``: the caller writes with write_pending (all of the queue, or with
    ``due_only`` a full group only); buffers come back on the caller's thread. A queue the caller
    leaves is committed by the writer thread after 2 * max_delay; a full queue by append."""
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {}, inline=True, batch_rows=4, max_delay=1.0)
    seen = _threads_writing(w)
    released: list[str] = []
    me = threading.current_thread().name
    rows = lambda: landscape.open_run(path).sizes["step"]  # noqa: E731
    for i in range(3):
        w.append(i, {"loss": Var((), np.float64(i), {})}, {"v": Var(("param",), np.full(3, i, np.float32), {})},
                 lambda: released.append(threading.current_thread().name))
    assert w.write_pending(due_only=True) == 0.0 and rows() == 0  # short of a group, and young
    w.append(3, {"loss": Var((), np.float64(3), {})})
    assert w.write_pending(due_only=True) >= 0.0 and rows() == 4  # a full group
    assert seen == [(me, [0, 1, 2, 3])] and released == [me] * 3
    assert w.write_pending() == 0.0 and len(seen) == 1  # nothing queued
    w.append(4, {"loss": Var((), np.float64(4), {})})
    w.append(5, {"loss": Var((), np.float64(5), {})})
    t0 = time.monotonic()
    assert rows() == 4  # the thread waits 2 * max_delay for the caller
    deadline = t0 + 30
    while rows() < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert rows() == 6 and time.monotonic() - t0 >= 1.5
    assert seen[1][1] == [4, 5] and seen[1][0] != me
    w.close()
    assert landscape.open_run(path).loss.values.tolist() == [0, 1, 2, 3, 4, 5]

    # a full queue (max_pending): append writes it on the caller's thread rather than wait
    full = RunWriter(tmp_path / "full.zarr", {}, inline=True, max_pending=3, max_delay=3600.0)
    seen = _threads_writing(full)
    for i in range(5):
        full.append(i, {"loss": Var((), np.float64(i), {})})
    assert seen == [(me, [0, 1, 2])] and landscape.open_run(tmp_path / "full.zarr").sizes["step"] == 3
    full.close()
    assert landscape.open_run(tmp_path / "full.zarr").loss.values.tolist() == [0, 1, 2, 3, 4]


def test_write_pending_waits_for_the_writer_thread_and_reports_time_on_the_disk(tmp_path):
    """While the writer thread writes a group, write_pending leaves the queue to it (one writer
    at a time, steps in order); its return value is the time the write waited (not CPU)."""
    w = RunWriter(tmp_path / "r.zarr", {}, batch_rows=2, max_delay=3600.0)
    write = w._write_batch
    started = threading.Event()
    order: list[list[int]] = []

    def slow(batch):  # type: ignore[no-untyped-def]
        order.append([r.step for r in batch])
        if threading.current_thread() is not threading.main_thread():
            started.set()
        time.sleep(0.3)  # waits like a slow disk
        write(batch)

    w._write_batch = slow  # type: ignore[method-assign]
    w.append(0, {"loss": Var((), np.float64(0), {})})
    w.append(1, {"loss": Var((), np.float64(1), {})})  # a full group wakes the thread
    assert started.wait(30)
    w.append(2, {"loss": Var((), np.float64(2), {})})
    assert w.write_pending() == 0.0  # the thread is writing: not two writers at once
    w.flush()
    assert order == [[0, 1], [2]]
    w.append(3, {"loss": Var((), np.float64(3), {})})
    assert 0.25 <= w.write_pending() < 30  # slept, so it was not CPU
    w.close()
    assert landscape.open_run(tmp_path / "r.zarr").loss.values.tolist() == [0, 1, 2, 3]


def test_iter_trajectory_reuse_reads_the_same_rows_into_one_set_of_arrays(tmp_path):
    rng = np.random.default_rng(0)
    w = RunWriter(tmp_path / "r.zarr", {})
    rows = [rng.standard_normal(5000).astype(np.float32) for _ in range(11)]
    for i, r in enumerate(rows):
        w.append(i, {"loss": Var((), np.float64(i), {})}, {"params": Var(("param",), r, {})})
    fresh = [(s.copy(), a["params"].copy()) for s, a in w.iter_trajectory(["params"], max_bytes=3 * 5000 * 4)]
    reused, bases = [], set()
    for s, a in w.iter_trajectory(["params"], max_bytes=3 * 5000 * 4, reuse=True):
        bases.add(a["params"].__array_interface__["data"][0])
        reused.append((s.copy(), a["params"].copy()))
    w.close()
    assert len(fresh) == len(reused) == 4 and len(bases) == 1  # blocks of 3, 3, 3, 2 in one buffer
    np.testing.assert_array_equal(np.concatenate([s for s, _ in reused]), np.arange(11))
    np.testing.assert_array_equal(np.concatenate([a for _, a in reused]), np.stack(rows))
    for (s1, a1), (s2, a2) in zip(fresh, reused):
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(a1, a2)


def test_close_cleans_what_a_failed_group_left_past_the_committed_rows(tmp_path):
    """A group that fails half-written (here: a vector changes shape) is given up; its bytes past
    the committed rows, a new chunk file included, are gone after close."""
    path = tmp_path / "r.zarr"
    w = RunWriter(path, {}, max_delay=30.0)
    vec = np.ones(4500, np.float32)
    chunk_rows = 4 * 2**20 // vec.nbytes
    for i in range(chunk_rows - 1):
        w.append(i, {"loss": Var((), np.float64(i), {})}, {"v": Var(("param",), vec, {}), "u": Var(("param",), vec, {})})
    w.flush()
    for i in range(chunk_rows - 1, chunk_rows + 2):  # v reaches chunk 1, then u fails
        w.append(i, {"loss": Var((), np.float64(i), {})}, {"v": Var(("param",), vec, {}), "u": Var(("param",), vec[:10], {})})
    with pytest.warns(RuntimeWarning, match="row shape changed"):
        w.flush()
    assert w.records.torn and not w.steps.torn and (path / "trajectory" / "v" / "c.1.0").exists()
    w.close()
    assert not (path / "trajectory" / "v" / "c.1.0").exists()
    assert landscape.open_run(path).sizes["step"] == chunk_rows + 2  # the step rows went in whole
    assert landscape.open_trajectory(path).sizes["record"] == chunk_rows - 1


def test_updates_derived_from_params_read_back(tmp_path):
    """``update`` rows flagged ``update_from_params`` are not stored; both readers give the next
    record's params minus these (NaN after a gap in the steps or at the last record), in blocks
    that split pairs too; a resumed store forgets a last derived update whose next record a kill
    lost."""
    rng = np.random.default_rng(0)
    steps = [0, 1, 2, 3, 5, 6, 7]  # step 4 missing: a gap
    P = rng.standard_normal((len(steps), 300)).astype(np.float32)
    U = rng.standard_normal((len(steps), 300)).astype(np.float32)
    derived = [1, 0, 1, 1, 1, 1, 1]  # row 3 (step 3) is followed by step 5: NaN; row 6 is last: NaN
    flag_attrs = {"long_name": "derived", "units": "1"}
    w = RunWriter(tmp_path / "r.zarr", {})
    for i, step in enumerate(range(8)):
        traj = None
        if step in steps:
            r = steps.index(step)
            upd = Unwritten((300,), np.dtype(np.float32)) if derived[r] else U[r]
            traj = {"params": Var(("param",), P[r], {}), "update": Var(("param",), upd, {}),
                    UPDATE_FROM_PARAMS: Var((), np.int8(derived[r]), flag_attrs)}
        w.append(step, {"loss": Var((), np.float64(step), {})}, traj)
    expected = U.copy()
    for r in range(len(steps)):
        if derived[r]:
            ok = r + 1 < len(steps) and steps[r + 1] == steps[r] + 1
            expected[r] = P[r + 1] - P[r] if ok else np.nan
    for max_bytes in (2 * 300 * 4, 3 * 300 * 4, 10**9):  # blocks of 1, 1 (params read too), all
        got = [(s.copy(), a["update"].copy()) for s, a in w.iter_trajectory(["update"], max_bytes=max_bytes, reuse=True)]
        np.testing.assert_array_equal(np.concatenate([s for s, _ in got]), steps)
        np.testing.assert_array_equal(np.concatenate([a for _, a in got]), expected)
    w.close()
    tr = landscape.open_trajectory(tmp_path / "r.zarr")
    assert UPDATE_FROM_PARAMS not in tr and tr["update"].dtype == np.float32
    np.testing.assert_array_equal(tr["update"].values, expected)
    np.testing.assert_array_equal(landscape.open_trajectory(tmp_path / "r.zarr", chunks={})["update"].values, expected)
    # after a kill that lost the record after the last one, resuming must not pair it with another step
    commit = tmp_path / "r.zarr" / ".landscape-commit.json"
    state = json.loads(commit.read_text())
    w = RunWriter(tmp_path / "r.zarr", {}, resume=True)
    w.append(8, {"loss": Var((), np.float64(8), {})}, {"params": Var(("param",), P[0], {}), "update": Var(("param",), U[0], {}),
                                                       UPDATE_FROM_PARAMS: Var((), np.int8(0), flag_attrs)})
    w.close()
    assert state["records"] == len(steps)
    tr = landscape.open_trajectory(tmp_path / "r.zarr")
    assert tr["step"].values.tolist() == [*steps, 8]
    assert np.isnan(tr["update"].values[len(steps) - 1]).all()  # not P[0] - P[-1]
