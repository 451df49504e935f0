"""landscape.loggers: per-step scalars to TensorBoard and any dict-of-scalars logger."""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape
from landscape.loggers import DictLogger, TensorBoard, as_logger, export_scalars, step_scalars
from landscape.schema import Var
from probes import HessianSpectrum, RestrictedSecant, Sharpness
from tests._helpers import SMALL_MODELS, assert_same_weights, digits, train

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


def _run(loggers=(), probes=None, steps=STEPS, store=None):
    """A seeded digits-MLP run with the given loggers; returns (model, recorder)."""
    torch.manual_seed(0)
    net = SMALL_MODELS["mlp"]()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    (X, y), _ = digits()
    probes = [HessianSpectrum(every=2, samples=1, k=2)] if probes is None else probes
    rec = landscape.attach(net, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64, probes=probes,
                           store=store, loggers=loggers)
    train(net, opt, steps)
    rec.close()
    return net, rec


# -- step_scalars -----------------------------------------------------------------------------


def test_step_scalars_names_medians_labels_and_order():
    values = {
        "loss": Var((), np.float64(2.5), {}),
        "nonfinite": Var((), np.int8(2), {}),
        "rsi": Var(("sample",), np.array([3.0, 1.0, 2.0, 10.0, 0.0]), {}),   # median 2
        "eb": Var(("sample",), torch.tensor([1.0, np.nan, 5.0]), {}),        # NaN sample ignored: median 3
        "lambda_max": Var(("block",), np.array([4.0, 1.5]), {}),
        "sharpness": Var(("kind", "radius"), np.arange(6.0).reshape(2, 3), {}),
        "eigenvalues": Var(("block", "eig"), np.array([[9.0, 8.0], [np.nan, 7.0]]), {}),
        "converged": Var(("eig",), np.array([True, False]), {}),
        "slq_nodes": Var(("node",), np.arange(17.0), {}),                   # unlabelled, > 16 entries: skipped
        "profile": Var(("alpha",), np.arange(20.0), {}),                    # labelled: all entries kept
        "name": Var((), np.array("text"), {}),                              # not a number: skipped
        "gap": Var((), np.float64(np.nan), {}),                             # NaN: no measurement, left out
    }
    coords = {"block": ["model", "fc 1"], "kind": ["sam", "average"], "radius": [0.05, 0.1, 1e-5],
              "alpha": [float(a) for a in np.linspace(-1, 1, 20)]}
    out = step_scalars(values, coords)
    assert out["loss"] == 2.5 and out["nonfinite"] == 2.0 and isinstance(out["nonfinite"], float)
    assert out["rsi"] == 2.0 and out["eb"] == 3.0 and "rsi/sample=0" not in out
    assert out["lambda_max/block=model"] == 4.0 and out["lambda_max/block=fc_1"] == 1.5  # label made tag-safe
    assert out["sharpness/kind=sam,radius=0.05"] == 0.0
    assert out["sharpness/kind=average,radius=1e-05"] == 5.0
    assert out["sharpness/kind=average,radius=0.1"] == 4.0
    assert out["eigenvalues/block=model,eig=1"] == 8.0 and out["eigenvalues/block=fc_1,eig=1"] == 7.0
    assert "eigenvalues/block=fc_1,eig=0" not in out  # NaN entry dropped
    assert out["converged/eig=0"] == 1.0 and out["converged/eig=1"] == 0.0
    assert not any(k.startswith(("slq_nodes", "name", "gap")) for k in out)
    assert sum(k.startswith("profile/alpha=") for k in out) == 20 and out["profile/alpha=-1"] == 0.0
    # deterministic order: variables by name, entries in C order; tags only use TensorBoard-safe text
    names = [k.split("/")[0] for k in out]
    assert names == sorted(names)
    assert list(step_scalars(dict(reversed(values.items())), coords)) == list(out)
    assert all(all(c.isalnum() or c in "_.-/=," for c in k) for k in out)


def test_step_scalars_label_count_mismatch_falls_back_to_index():
    out = step_scalars({"v": Var(("block",), np.array([1.0, 2.0]), {})}, {"block": ["only_one"]})
    assert out == {"v/block=0": 1.0, "v/block=1": 2.0}


# -- DictLogger, as_logger --------------------------------------------------------------------


def test_dict_logger_series_and_names():
    log = DictLogger()
    log({"a": 1.0}, 3)
    log({"a": 2.0, "b": 5.0}, 1)
    steps, vals = log.series("a")
    np.testing.assert_array_equal(steps, [1, 3])
    np.testing.assert_array_equal(vals, [2.0, 1.0])
    assert log.names() == ["a", "b"] and log[1] == {"a": 2.0, "b": 5.0}
    with pytest.raises(KeyError, match="logged names include: a, b"):
        log.series("c")


def test_as_logger_accepts_and_rejects():
    seen = []
    fn = lambda scalars, step: seen.append((step, scalars))  # noqa: E731
    assert as_logger(fn) is fn

    class LightningLike:
        def log_metrics(self, metrics, step):
            seen.append(("lm", step, metrics))

        def save(self):
            seen.append("saved")

    wrapped = as_logger(LightningLike())
    wrapped({"x": 1.0}, 4)
    wrapped.flush()
    assert seen[-2:] == [("lm", 4, {"x": 1.0}), "saved"]

    class WriterLike:
        def __init__(self):
            self.rows, self.events = [], []

        def add_scalar(self, tag, value, global_step=None):
            self.rows.append((tag, value, global_step))

        def flush(self):
            self.events.append("flush")

        def close(self):
            self.events.append("close")

    w = WriterLike()
    tb = as_logger(w)
    assert isinstance(tb, TensorBoard)
    tb({"loss": 1.5}, 7)
    tb.close()
    assert w.rows == [("landscape/loss", 1.5, 7)]
    assert w.events == ["flush"]  # flushed, but not closed: the writer belongs to the caller

    with pytest.raises(TypeError, match="DictLogger"):
        as_logger({})
    with pytest.raises(TypeError, match=r"TensorBoard\(log_dir\)"):
        as_logger("runs/tb")
    with pytest.raises(TypeError, match="cannot be called as f\\(scalars, step\\)"):
        as_logger(lambda: None)
    with pytest.raises(TypeError, match="accepted"):
        as_logger(object())

    class WandbModule:  # the module, not its log function
        def log(self, d, step=None):
            pass

    with pytest.raises(TypeError, match="wandb.log"):
        as_logger(WandbModule())
    net = torch.nn.Linear(2, 1)
    with pytest.raises(TypeError, match="DictLogger"):  # the recorder checks at attach, before training
        landscape.attach(net, torch.optim.SGD(net.parameters(), lr=0.1), loss_fn=F.mse_loss, loggers=[{}])
    with pytest.raises(TypeError, match="prefix"):
        TensorBoard(w, prefix=3)
    with pytest.raises(TypeError, match="folder path or a torch.utils.tensorboard.SummaryWriter"):
        TensorBoard(3.0)


def test_tensorboard_missing_package_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ImportError, match=r"pip install tensorboard .*landscape\[tensorboard\]"):
        TensorBoard(tmp_path / "tb")


# -- live logging -----------------------------------------------------------------------------


def test_tensorboard_live_values_equal_the_store(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoard(tmp_path / "tb")
    log = DictLogger()
    _, rec = _run(loggers=[tb, log], store=tmp_path / "run.zarr")
    tb.close()
    ds = rec.dataset()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"landscape/" + name for name in log.names()}
    for name, expected in [("loss", ds.loss.values), ("lr", ds.lr.values),
                           ("lambda_max/block=model", ds.lambda_max.sel(block="model").values),
                           ("eigenvalues/block=model,eig=1", ds.eigenvalues.sel(block="model").isel(eig=1).values)]:
        events = acc.Scalars("landscape/" + name)
        steps = np.array([e.step for e in events])
        got = np.array([e.value for e in events])
        measured = np.flatnonzero(~np.isnan(expected))
        np.testing.assert_array_equal(steps, ds.step.values[measured])
        np.testing.assert_allclose(got, expected[measured], rtol=1e-6)  # TensorBoard keeps float32
    assert len(acc.Scalars("landscape/lambda_max/block=model")) == 3  # every=2 over 6 steps, NaN steps left out


def test_summary_writer_is_wrapped_and_left_open(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    _, rec = _run(loggers=writer, probes=[])
    writer.add_scalar("after", 1.0, 0)  # still open: the recorder only flushed it
    writer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    loss = [e.value for e in acc.Scalars("landscape/loss")]
    np.testing.assert_allclose(loss, rec.dataset().loss.values, rtol=1e-6)


def test_failing_logger_warns_once_and_changes_nothing(tmp_path):
    calls = []

    def broken(scalars, step):
        calls.append(step)
        raise RuntimeError("disk full")

    good = DictLogger()
    plain, _ = _run(probes=[], store=tmp_path / "plain.zarr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net, rec = _run(loggers=[broken, good], probes=[], store=tmp_path / "run.zarr")
    logger_warnings = [w for w in caught if "logger" in str(w.message)]
    assert len(logger_warnings) == 1 and "disk full" in str(logger_warnings[0].message)
    assert calls == list(range(STEPS))
    assert_same_weights(plain, net)
    ds = landscape.open_run(rec.path)
    np.testing.assert_array_equal(ds.loss.values, landscape.open_run(tmp_path / "plain.zarr").loss.values)
    err = ds.attrs["probe_errors"]["logger:broken"]
    assert err["count"] == STEPS and err["first_step"] == 0 and "disk full" in err["error"]
    assert sorted(good) == list(range(STEPS))  # the other logger got every step
    np.testing.assert_array_equal(good.series("loss")[1], ds.loss.values)


# -- export after training ----------------------------------------------------------------------


def test_export_equals_live_logging(tmp_path):
    live = DictLogger()
    probes = [HessianSpectrum(every=3, samples=1, k=2), Sharpness(every=2, samples=1, kinds=("average", "sam")),
              RestrictedSecant(every=2, samples=2)]
    _, rec = _run(loggers=[live], probes=probes, store=tmp_path / "run.zarr")
    exported = DictLogger()
    assert export_scalars(tmp_path / "run.zarr", exported) == STEPS
    ds = landscape.open_run(tmp_path / "run.zarr")
    finalize_only = {n for n in ds.data_vars if ds[n].attrs.get("probe") == "RestrictedSecant"}
    assert sorted(exported) == sorted(live) == list(range(STEPS))
    for step in live:
        common = {k: exported[step][k] for k in live[step]}
        assert common == live[step], step  # the same names and values (bitwise) as live logging
        extra = set(exported[step]) - set(live[step])
        # RSI/EB against the final iterate exist only after training: export adds them
        assert {k.split("/")[0] for k in extra} <= finalize_only
        assert ("rsi" in extra) == (step % 2 == 0)
    # integer results of a probe that did not run at a step (stored as -1) are not exported
    assert "spectrum_matvecs/block=model" not in exported[1] and exported[0]["spectrum_matvecs/block=model"] > 0
    # from the dataset, with a prefix; several runs must be narrowed to one
    again = DictLogger()
    assert export_scalars(ds, again, prefix="sgd/") == STEPS
    assert again[3] == {"sgd/" + k: v for k, v in exported[3].items()}
    _run(probes=[], store=tmp_path / "other.zarr")
    runs = landscape.open_runs([tmp_path / "run.zarr", tmp_path / "other.zarr"])
    with pytest.raises(ValueError, match="export one at a time"):
        export_scalars(runs, DictLogger())
    one = DictLogger()
    export_scalars(runs.isel(run=[1]), one)
    assert sorted(one) == list(range(STEPS)) and one[2]["loss"] == float(runs.loss.isel(run=1, step=2))
    with pytest.raises(TypeError, match="store path or its xarray Dataset"):
        export_scalars(42, DictLogger())
