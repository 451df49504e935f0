"""The recorder: unchanged trajectories, what it captures, faults and bad input."""
from __future__ import annotations

import os
import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _helpers import digits, loader, train

import landscape
import landscape.recorder as recorder_module
import landscape.store as store_module
from landscape.models import DigitsCNN, DigitsMLP
from landscape.schema import var
from probes import Measurement, Probe, RestrictedSecant


@pytest.fixture(params=["inline", "thread"])
def write_mode(request, monkeypatch):  # type: ignore[no-untyped-def]
    """Both ways the store gets written: by the training thread between steps (no spare core)
    and by the store's writer thread."""
    monkeypatch.setattr(recorder_module, "_no_spare_core", lambda device: request.param == "inline")
    return request.param


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, (p, s) in enumerate(opt.state.items()):
        for k, v in s.items():
            if isinstance(v, torch.Tensor):
                state[f"opt.{i}.{k}"] = v.clone()
    return state


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
    lambda p: torch.optim.Adam(p, lr=2e-3, weight_decay=1e-4),
], ids=["sgd-momentum-wd", "adam"])
def test_trajectory_bitwise_unchanged(tmp_path, make_opt, write_mode):
    """Same seed, same final weights, BN buffers and optimizer state, with or without probes
    (the CNN has dropout, so a probe touching the global RNG would show)."""
    finals = []
    for recorded in (False, True):
        torch.manual_seed(0)
        model = DigitsCNN(channels=4)
        opt = make_opt(model.parameters())
        rec = None
        if recorded:
            rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=loader(seed=9, batch_size=32),
                                   probes=[RestrictedSecant(every=3, samples=2)], store=tmp_path / "r.zarr")
        torch.manual_seed(1)  # dropout draws from the global RNG from here on
        losses = train(model, opt, 25)
        if rec is not None:
            rec.close()
        finals.append((_snapshot(model, opt), losses))
    (a, la), (b, lb) = finals
    assert la == lb
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ds = landscape.open_run(tmp_path / "r.zarr")
    np.testing.assert_array_equal(ds.loss.values, np.asarray(la))  # the loss the loop saw, captured exactly
    assert np.isfinite(ds.gamma.values[::3]).all() and np.isnan(ds.gamma.values[1::3]).all()


def test_closure_accumulation_clipping_scheduler(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD([{"params": model.net[1].parameters(), "lr": 0.1},
                           {"params": [p for m in (model.net[3], model.net[5]) for p in m.parameters()], "lr": 0.05}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0)],
                           store=tmp_path / "r.zarr")
    batches = [b for b, _ in zip(loader(), range(6))]
    expected_loss, expected_lr, grads, updates = [], [], [], []
    for i, (xb, yb) in enumerate(batches):
        expected_lr.append([g["lr"] for g in opt.param_groups])
        before = torch.cat([p.detach().reshape(-1).clone() for p in rec.functional.params])
        if i % 3 == 0:  # closure
            def closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss
            value = opt.step(closure)
            expected_loss.append(float(value.detach()))
            grads.append(rec.functional.flat_grad())
        elif i % 3 == 1:  # gradient accumulation over two halves
            opt.zero_grad()
            halves = [(xb[:32], yb[:32]), (xb[32:], yb[32:])]
            total = 0.0
            for hx, hy in halves:
                part = F.cross_entropy(model(hx), hy) / 2
                part.backward()
                total += part.item()
            expected_loss.append(total)
            grads.append(rec.functional.flat_grad())
            opt.step()
        else:  # clipping: the recorded gradient is the clipped one the optimizer used
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            grads.append(rec.functional.flat_grad())
            expected_loss.append(float(loss.detach()))
            opt.step()
        after = torch.cat([p.detach().reshape(-1).clone() for p in rec.functional.params])
        updates.append(after - before)
        sched.step()
    rec.close()
    ds = landscape.open_run(tmp_path / "r.zarr")
    np.testing.assert_allclose(ds.loss.values, expected_loss, rtol=1e-6)
    lrs = np.asarray(expected_lr)
    np.testing.assert_array_equal(ds.lr.values, lrs[:, 0])
    np.testing.assert_array_equal(ds.lr_group.values, lrs)
    traj = landscape.open_trajectory(tmp_path / "r.zarr")
    np.testing.assert_allclose(traj["grad"].values, torch.stack(grads).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(traj["update"].values, torch.stack(updates).numpy(), rtol=1e-5, atol=1e-9)
    assert float(torch.linalg.vector_norm(grads[2])) == pytest.approx(0.01, rel=1e-4)


def test_log_overrides_and_extra_scalars(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, store=tmp_path / "r.zarr") as rec:
        for i, (xb, yb) in zip(range(3), loader()):
            opt.zero_grad()
            out = model(xb)
            F.cross_entropy(out, yb).backward()
            rec.log(loss=10.0 + i, accuracy=(out.argmax(1) == yb).float().mean())
            opt.step()
    ds = landscape.open_run(tmp_path / "r.zarr")
    assert ds.loss.values.tolist() == [10.0, 11.0, 12.0]
    assert ds.accuracy.shape == (3,) and ds.accuracy.attrs["probe"] == "user"


def test_no_loss_seen_warns_and_records_nan(tmp_path):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    model = torch.nn.Linear(3, 1)
    model.weight = w  # type: ignore[assignment]
    rec = landscape.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn=F.mse_loss, store=tmp_path / "r.zarr")
    with pytest.warns(RuntimeWarning, match="rec.log"):
        for _ in range(2):
            rec.optimizer.zero_grad()
            (w.sum() ** 2).backward()  # no model(...) call: nothing to capture
            rec.optimizer.step()
    rec.close()
    assert np.isnan(landscape.open_run(tmp_path / "r.zarr").loss.values).all()
    del opt


def test_nonfinite_loss_and_gradient_recorded_not_raised(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0)],
                           store=tmp_path / "r.zarr")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (xb, yb) in zip(range(6), loader()):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            if i >= 3:
                loss = loss * float("nan")  # the run diverges at step 3
            loss.backward()
            opt.step()
        rec.close()
    ds = landscape.open_run(tmp_path / "r.zarr")
    assert np.isfinite(ds.loss.values[:3]).all() and np.isnan(ds.loss.values[3:]).all()
    assert ds.nonfinite.values.tolist() == [0, 0, 0, 3, 3, 3]  # 1 = loss, 2 = gradient
    assert np.isnan(ds.rsi_train.values[3:]).all()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("non-finite training loss" in m for m in messages) == 1
    assert sum("non-finite gradient" in m for m in messages) == 1


class _Flaky(Probe):
    name = "Flaky"

    def measure(self, ctx):
        if ctx.step % 2:
            raise RuntimeError("boom at odd steps")
        return Measurement(values={"loss_probe": var("loss", np.float64(ctx.step), ())})


def test_probe_exception_is_recorded_and_training_goes_on(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=loader(batch_size=16),
                           probes=[_Flaky(every=1), RestrictedSecant(every=2, samples=1)], store=tmp_path / "r.zarr")
    with pytest.warns(RuntimeWarning, match="probe Flaky failed at step 1") as record:
        losses = train(model, opt, 6)
        rec.close()
    assert sum("Flaky" in str(w.message) for w in record) == 1  # warned once
    ds = landscape.open_run(tmp_path / "r.zarr")
    assert ds.probe_failed.values.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.attrs["probe_errors"]["Flaky"]["count"] == 3
    assert "boom at odd steps" in ds.attrs["probe_errors"]["Flaky"]["error"]
    np.testing.assert_array_equal(ds.loss.values, losses)
    assert np.isfinite(ds.rsi.values[::2]).all()  # the other probe is intact
    assert ds.loss_probe.values[0] == 0.0 and np.isnan(ds.loss_probe.values[1])


def test_bad_arguments_raise_before_training(tmp_path):
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.zarr"
    frozen = DigitsMLP(hidden=8).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        landscape.attach(frozen, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), loss_fn=F.cross_entropy, store=path)
    with pytest.raises(ValueError, match="none of the model's trainable parameters is in the optimizer"):
        landscape.attach(model, torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1), loss_fn=F.cross_entropy, store=path)
    with pytest.raises(ValueError, match="probe_data is required"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(samples=2)], store=path)
    with pytest.raises(ValueError, match="empty"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(samples=2)], probe_data=[], store=path)
    with pytest.raises(ValueError, match="tuple"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(samples=1)],
                         probe_data=[{"x": torch.ones(2, 64)}], store=path)
    with pytest.raises(ValueError, match="2 batches but the probes need 4"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(samples=4)],
                         probe_data=[b for b, _ in zip(loader(), range(2))], store=path)
    with pytest.raises(TypeError, match="sampels"):
        RestrictedSecant(every=5, sampels=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="not a cadence"):
        RestrictedSecant(every="weekly")
    with pytest.raises(ValueError, match="samples must be"):
        RestrictedSecant(samples=-1)
    with pytest.raises(TypeError, match="Probe instances"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=["RestrictedSecant"], store=path)  # type: ignore[list-item]
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        landscape.attach(model, opt, loss_fn="cross_entropy", store=path)  # type: ignore[arg-type]
    assert not path.exists()  # nothing was created by the failed attempts
    landscape.attach(model, opt, loss_fn=F.cross_entropy, store=path).close()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, store=path)
    assert not opt._optimizer_step_pre_hooks  # the refused attach left no hook behind


def test_close_detaches_and_is_idempotent(tmp_path):
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, store=tmp_path / "r.zarr") as rec:
        train(model, opt, 3)
    rec.close()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert not model._forward_hooks and not model._forward_pre_hooks
    train(model, opt, 2)  # training after close is not recorded and does not fail
    assert landscape.open_run(tmp_path / "r.zarr").sizes["step"] == 3


# log-spaced with 8 per decade: every step below 8, then round(10^(j/8)) -> 10 is the next one
@pytest.mark.parametrize("every, expected", [([0, 4, 5], [0, 4, 5]),
                                             ("log", sorted(set(range(8)) | {round(10 ** (j / 8)) for j in range(9)}))])
def test_cadences(tmp_path, every, expected):
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=every, samples=0)],
                          store=tmp_path / "r.zarr"):
        train(model, opt, 11)
    ds = landscape.open_run(tmp_path / "r.zarr")
    measured = ds.step.values[np.isfinite(ds.grad_norm_train.values)].tolist()
    assert measured == expected


class NotATensor:
    """An arbitrary pickled object: weights_only=True must refuse to load it."""


def test_reference_from_checkpoint_uses_weights_only(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    ref = {k: v + 0.1 for k, v in model.state_dict().items()}
    torch.save(ref, tmp_path / "ref.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=loader(batch_size=16),
                          probes=[RestrictedSecant(every=1, samples=1, reference=tmp_path / "ref.pt")], store=tmp_path / "r.zarr") as rec:
        w0 = rec.functional.flat_params()
        train(model, opt, 2)
    ds = landscape.open_run(tmp_path / "r.zarr")
    wref = torch.cat([ref[n].reshape(-1) for n in rec.functional.layout.names])
    assert ds.dist_to_ref.values[0] == pytest.approx(float(torch.linalg.vector_norm(w0 - wref)), rel=1e-6)
    torch.save({"net.1.weight": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=loader(batch_size=16),
                         probes=[RestrictedSecant(samples=1, reference=tmp_path / "evil.pt")], store=tmp_path / "s.zarr")


def test_probe_batches_from_dataloader_do_not_move_the_rng(tmp_path):
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = torch.get_rng_state()
    (X, y), _ = digits()
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True)  # global RNG
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=dl, probes=[RestrictedSecant(samples=3)],
                           store=tmp_path / "r.zarr")
    assert torch.equal(state, torch.get_rng_state())
    assert len(rec.probe_batches) == 3 and all(len(b[0]) == 16 for b in rec.probe_batches)
    rec.close()


def test_loss_capture_two_recorders_and_tap_removed(tmp_path):
    """Two models trained side by side each get their own loss; a backward outside a model's
    forward-to-step window (an auxiliary loss on another model) is not taken; after close
    torch.autograd.backward is torch's own again."""
    original = torch.autograd.backward
    (X, y), _ = digits()
    torch.manual_seed(0)
    m1, m2, aux = DigitsMLP(hidden=8), DigitsMLP(hidden=12), torch.nn.Linear(64, 10)
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    r1 = landscape.attach(m1, o1, loss_fn=F.cross_entropy, store=tmp_path / "a.zarr")
    r2 = landscape.attach(m2, o2, loss_fn=F.cross_entropy, store=tmp_path / "b.zarr")
    assert torch.autograd.backward is not original
    seen1, seen2 = [], []
    for i in range(6):
        xb, yb = X[32 * i:32 * (i + 1)], y[32 * i:32 * (i + 1)]
        o1.zero_grad(); o2.zero_grad()
        l1 = F.cross_entropy(m1(xb), yb); l1.backward(); o1.step()
        F.mse_loss(aux(xb.reshape(len(xb), -1)), torch.zeros(len(xb), 10)).backward()  # no recorder is waiting
        l2 = F.cross_entropy(m2(xb), yb); l2.backward(); o2.step()
        seen1.append(l1.item()); seen2.append(l2.item())
    r1.close()
    assert torch.autograd.backward is not original  # r2 still needs it
    r2.close()
    assert torch.autograd.backward is original
    assert landscape.open_run(tmp_path / "a.zarr").loss.values.tolist() == seen1
    assert landscape.open_run(tmp_path / "b.zarr").loss.values.tolist() == seen2


# -- the per-step fast path: lent buffers, quick steps measured in batches ------------------------


class _Copying(RestrictedSecant):
    """The same probe on the plain path: a fresh copy of the step's vectors, measured at once."""

    @property
    def holds_step_vectors(self) -> bool:
        return True

    @property
    def reads_only_step(self) -> bool:
        return False


class _Keeper(Probe):
    """Keeps the step's vectors, as the Context allows a probe to."""

    name = "Keeper"

    def __init__(self, every: int) -> None:
        super().__init__(every)
        self.kept: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def evaluates_model(self) -> bool:
        return False

    def measure(self, ctx):  # type: ignore[no-untyped-def]
        self.kept[ctx.step] = (ctx.params, ctx.grad, ctx.update)
        return Measurement()


def _record_mlp(store, probes, steps, **options):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    model.unused = torch.nn.Parameter(torch.ones(3))  # never gets a .grad: a zero gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    logged: list[tuple[int, float]] = []
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=probes, store=store,
                           loggers=[lambda scalars, step: logged.append((step, scalars["grad_norm_train"]))], **options)
    train(model, opt, steps)
    rec.close()
    return rec, logged


def test_lent_buffers_and_batched_steps_record_the_same_numbers(tmp_path, monkeypatch, write_mode):
    """RestrictedSecant(samples=0) gets each step in a reused buffer and is measured in batches of
    quick steps. With 3 buffers (the writer holds them until written, so most steps fall back to
    copies and the 3 are reused over and over) every stored number and every logged value equals
    the copy-and-measure-at-once path's, bit for bit, in step order; every buffer comes back."""
    monkeypatch.setattr(recorder_module._StepBuffers, "MAX_COUNT", 3)
    batches: list[int] = []
    drain = recorder_module.Recorder._drain

    def counted(self, **kwargs):  # type: ignore[no-untyped-def]
        batches.append(len(self._deferred))
        drain(self, **kwargs)

    monkeypatch.setattr(recorder_module.Recorder, "_drain", counted)
    fast, fast_log = _record_mlp(tmp_path / "fast.zarr", [RestrictedSecant(every=1, samples=0)], 70)
    assert max(batches) > 1  # steps were measured in batches
    assert fast._buffers.made == 3 and len(fast._buffers.free) == 3 and not fast.probe_errors
    batches.clear()
    slow, slow_log = _record_mlp(tmp_path / "slow.zarr", [_Copying(every=1, samples=0)], 70, commit_delay=0)
    assert max(batches, default=0) == 0 and slow._buffers.made == 0
    a, b = landscape.open_run(tmp_path / "fast.zarr"), landscape.open_run(tmp_path / "slow.zarr")
    assert set(a.data_vars) == set(b.data_vars) and a.sizes["step"] == 70
    for name in b.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    ta, tb = landscape.open_trajectory(tmp_path / "fast.zarr"), landscape.open_trajectory(tmp_path / "slow.zarr")
    for name in ("params", "grad", "update"):
        np.testing.assert_array_equal(ta[name].values, tb[name].values, err_msg=name)
    unused = fast.functional.layout.slices()["unused"]
    assert (ta["grad"].values[:, unused] == 0).all() and (ta["update"].values[:, unused] == 0).all()
    assert (ta["params"].values[:, unused] == 1).all()  # the optimizer skips a parameter without .grad
    assert fast_log == slow_log and [s for s, _ in fast_log] == list(range(70))


def test_a_probe_that_keeps_the_vectors_gets_copies(tmp_path):
    """At steps where a probe that may keep ctx vectors is due, nobody gets lent buffers: what it
    kept is still w_t, g_t and the update after later steps reused the buffers."""
    keeper = _Keeper(every=2)
    rec, _ = _record_mlp(tmp_path / "r.zarr", [RestrictedSecant(every=1, samples=0), keeper], 40)
    traj = landscape.open_trajectory(tmp_path / "r.zarr")
    assert rec._buffers.made > 0 and sorted(keeper.kept) == list(range(0, 40, 2))
    for step, (w, g, u) in keeper.kept.items():
        for name, v in (("params", w), ("grad", g), ("update", u)):
            np.testing.assert_array_equal(traj[name].values[step], v.numpy(), err_msg=f"{name} at {step}")


def test_a_step_that_raises_gives_its_buffer_back(tmp_path):
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0)],
                           store=tmp_path / "r.zarr")
    train(model, opt, 3)

    def failing() -> torch.Tensor:
        raise RuntimeError("the user's closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(failing)  # the pre-step hook took a buffer; no post-step hook comes
    train(model, opt, 3)
    rec.close()
    assert len(rec._buffers.free) == rec._buffers.made > 0
    ds = landscape.open_run(tmp_path / "r.zarr")
    assert ds.step.values.tolist() == list(range(6)) and np.isfinite(ds.rsi_train.values[:5]).all()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("commit_delay", [0.25, 0.0], ids=["batched", "at-once"])
def test_update_is_the_move_between_iterates(tmp_path, commit_delay):
    """The stored update is w_{t+1} - w_t, bit for bit, whether the step is measured in a batch
    (w_{t+1} read when the next step starts) or at once (read right after the step); the last
    one's w_{t+1} is the parameters at close."""
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0)],
                           store=tmp_path / "r.zarr", commit_delay=commit_delay)
    before, after = [], []
    opt.register_step_pre_hook(lambda *_: before.append(_flat(model)))
    opt.register_step_post_hook(lambda *_: after.append(_flat(model)))
    train(model, opt, 40)
    rec.close()
    assert not rec.probe_errors
    traj = landscape.open_trajectory(tmp_path / "r.zarr")
    w, u = traj["params"].values, traj["update"].values
    np.testing.assert_array_equal(w, torch.stack(before).numpy())
    np.testing.assert_array_equal(u, (torch.stack(after) - torch.stack(before)).numpy())
    np.testing.assert_array_equal(u[:-1], w[1:] - w[:-1])
    # batched steps store it as the next record's params minus these (but the last of a batch)
    flags = store_module._open_group(tmp_path / "r.zarr", "trajectory", None)["update_from_params"].values
    if commit_delay:
        assert flags.sum() >= 30 and flags[-1] == 0
    else:
        assert not flags.any()


def test_update_includes_edits_between_steps(tmp_path):
    """A loop that edits the weights after ``optimizer.step()`` (a projection, through ``p.data``):
    the update is the move between the iterates the gradients were taken at, edit included,
    whether the steps are measured in batches or one by one (commit_delay=0)."""
    stores = {}
    for name, delay in (("batched", 0.25), ("at_once", 0.0)):
        torch.manual_seed(0)
        model = DigitsMLP(hidden=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0)],
                               store=tmp_path / f"{name}.zarr", commit_delay=delay)
        optimizer_steps = []
        opt.register_step_pre_hook(lambda *_: optimizer_steps.append(-_flat(model)))
        opt.register_step_post_hook(lambda *_: optimizer_steps[-1].add_(_flat(model)))

        def project(step, loss):  # noqa: ARG001
            for p in model.parameters():
                p.data.clamp_(-0.06, 0.06)

        train(model, opt, 20, on_step=project)
        final = _flat(model)
        rec.close()
        assert not rec.probe_errors
        traj = landscape.open_trajectory(tmp_path / f"{name}.zarr")
        stores[name] = (traj["params"].values, traj["update"].values, final.numpy(), torch.stack(optimizer_steps).numpy())
    for name, (w, u, final, own) in stores.items():
        np.testing.assert_array_equal(u[:-1], w[1:] - w[:-1], err_msg=name)
        np.testing.assert_array_equal(u[-1], final - w[-1], err_msg=name)
        assert np.abs(u - own).max() > 1e-3  # the projection moved the weights
    np.testing.assert_array_equal(stores["batched"][1], stores["at_once"][1])


def test_update_at_steps_that_evaluate_the_model_is_the_optimizer_step(tmp_path):
    """Where a probe that evaluates the model is due, the step is measured right after
    ``optimizer.step()`` (the model as the step left it), and its update is the optimizer's own
    step: with an edit between steps, those rows differ from the move between iterates."""
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    keeper = _Keeper(every=4)  # reads_only_step is False: it may evaluate the model
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0), keeper],
                           store=tmp_path / "r.zarr")
    own = []
    opt.register_step_pre_hook(lambda *_: own.append(-_flat(model)))
    opt.register_step_post_hook(lambda *_: own[-1].add_(_flat(model)))
    train(model, opt, 12, on_step=lambda step, loss: [p.data.clamp_(-0.06, 0.06) for p in model.parameters()])
    rec.close()
    assert not rec.probe_errors
    traj = landscape.open_trajectory(tmp_path / "r.zarr")
    w, u, own = traj["params"].values, traj["update"].values, torch.stack(own).numpy()
    for t in range(11):
        if t % 4 == 0:
            np.testing.assert_allclose(u[t], own[t], rtol=1e-6, atol=1e-7, err_msg=str(t))
            np.testing.assert_array_equal(keeper.kept[t][2].numpy(), u[t])
        else:
            np.testing.assert_array_equal(u[t], w[t + 1] - w[t], err_msg=str(t))


class _UpdateReader(Probe):
    """Reads ctx.update during a batched step (lent buffers, measured once w_{t+1} is read)."""

    name = "UpdateReader"

    def __init__(self, every: int) -> None:
        super().__init__(every)
        self.seen: dict[int, np.ndarray] = {}

    @property
    def evaluates_model(self) -> bool:
        return False

    @property
    def holds_step_vectors(self) -> bool:
        return False

    @property
    def reads_only_step(self) -> bool:
        return True

    def measure(self, ctx):  # type: ignore[no-untyped-def]
        self.seen[ctx.step] = ctx.update.numpy().copy()
        return Measurement()


def test_a_batched_update_is_computed_only_when_read(tmp_path, monkeypatch):
    """In a batch, a step's update is computed on the first read of ``ctx.update``. Steps whose
    update only RestrictedSecant wants, stored as the next params minus these, never compute
    it; a probe that reads it gets w_{t+1} - w_t, bit for bit, as does the store."""
    settled: list[int] = []
    settle = recorder_module._StepBuffer.settle

    def counted(self):  # type: ignore[no-untyped-def]
        settled.append(1)
        settle(self)

    monkeypatch.setattr(recorder_module._StepBuffer, "settle", counted)
    reader = _UpdateReader(every=5)
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0), reader],
                           store=tmp_path / "r.zarr")
    before, after = [], []
    opt.register_step_pre_hook(lambda *_: before.append(_flat(model)))
    opt.register_step_post_hook(lambda *_: after.append(_flat(model)))
    train(model, opt, 40)
    rec.close()
    assert not rec.probe_errors and rec._buffers.made > 0
    traj = landscape.open_trajectory(tmp_path / "r.zarr")
    flags = store_module._open_group(tmp_path / "r.zarr", "trajectory", None)["update_from_params"].values
    stored = int((flags == 0).sum())  # written as is: computed for the store
    read_only = [t for t in reader.seen if flags[t] == 1]
    assert stored >= 1 and read_only and flags.sum() >= 30
    assert len(settled) == stored + len(read_only)
    own = (torch.stack(after) - torch.stack(before)).numpy()
    np.testing.assert_array_equal(traj["update"].values, own)
    assert sorted(reader.seen) == list(range(0, 40, 5))
    for t, u in reader.seen.items():
        np.testing.assert_array_equal(u, own[t], err_msg=str(t))


def test_a_step_whose_recording_fails_keeps_the_later_steps(tmp_path, monkeypatch):
    """An internal error while recording one step (not a probe's) is warned about; that step is
    stored as failed, with its loss, and every later step is still recorded."""
    queue = recorder_module.Recorder._queue_step

    def flaky(self, item, *args):  # type: ignore[no-untyped-def]
        if item.step == 5:
            raise RuntimeError("internal failure")
        return queue(self, item, *args)

    monkeypatch.setattr(recorder_module.Recorder, "_queue_step", flaky)
    ds = _record_through_a_fault(tmp_path / "r.zarr", "internal failure")
    assert ds.probe_failed.values.tolist() == [0] * 5 + [1] + [0] * 6


def _record_through_a_fault(store, match):  # type: ignore[no-untyped-def]
    """12 steps of RestrictedSecant(samples=0) where step 5 meets an internal error (warned as
    ``match``): every step has its row and its loss, only step 5 lacks the probe's numbers, and
    every buffer comes back."""
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0)], store=store)
    with pytest.warns(RuntimeWarning, match=match):
        losses = train(model, opt, 12)
        rec.close()
    ds = landscape.open_run(store)
    assert ds.step.values.tolist() == list(range(12)) and not rec.writer.errors
    np.testing.assert_allclose(ds.loss.values, losses, rtol=1e-6)
    rsi = ds.rsi_train.values
    assert np.isnan(rsi[5]) and np.isfinite(np.delete(rsi, 5)).all()
    assert len(rec._buffers.free) == rec._buffers.made
    return ds


def test_a_step_hook_that_fails_keeps_the_step_count(tmp_path, monkeypatch):
    """An internal error in the hook before a step (here: reading the step's vectors) is warned
    about; the step still gets its row (loss, no probes), later steps keep their indices, and the
    step before it, which waited for this step's w, stores a NaN update rather than a wrong one."""
    read = recorder_module._StepBuffer.read
    calls = []

    def flaky(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 6:  # step 5
            raise RuntimeError("read failed")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(recorder_module._StepBuffer, "read", flaky)
    _record_through_a_fault(tmp_path / "r.zarr", "read failed")
    traj = landscape.open_trajectory(tmp_path / "r.zarr")
    assert traj.step.values.tolist() == [s for s in range(12) if s != 5]
    u = traj["update"].values
    assert np.isnan(u[4]).all() and np.isfinite(np.delete(u, 4, axis=0)).all()


class _EvalProbe(Probe):
    """Evaluates the model at its steps: recorded at once, not in a batch."""

    name = "evalprobe"

    @property
    def samples_needed(self) -> int:
        return 1

    def measure(self, ctx):  # type: ignore[no-untyped-def]
        out = Measurement()
        out.values["probe_loss"] = var("loss", ctx.functional.loss(ctx.params, ctx.probe_batches[0]).double(), ())
        return out


def _traced_writes(monkeypatch) -> list[tuple[str, list[int]]]:  # type: ignore[no-untyped-def]
    seen: list[tuple[str, list[int]]] = []
    write = store_module.RunWriter._write_batch

    def traced(self, batch):  # type: ignore[no-untyped-def]
        seen.append((threading.current_thread().name, [r.step for r in batch]))
        write(self, batch)

    monkeypatch.setattr(store_module.RunWriter, "_write_batch", traced)
    return seen


def test_without_a_spare_core_the_training_thread_writes_the_store(tmp_path, monkeypatch):
    """With torch's threads on every core the training thread writes each batch of steps
    itself, right after measuring it (and a step measured at once when a group is due); with a
    core to spare the writer thread does. The stores are the same, bit for bit."""
    seen = _traced_writes(monkeypatch)
    probes = lambda: [RestrictedSecant(every=1, samples=0), _EvalProbe(every=7)]  # noqa: E731
    me = threading.current_thread().name
    stores = {}
    for inline in (True, False):
        monkeypatch.setattr(recorder_module, "_no_spare_core", lambda device: inline)
        seen.clear()
        torch.manual_seed(0)
        model = DigitsMLP(hidden=8)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        path = tmp_path / f"{inline}.zarr"
        rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=loader(seed=3, batch_size=32),
                               probes=probes(), store=path)
        assert rec.writer.inline is inline
        train(model, opt, 90)
        during = list(seen)
        rec.close()
        assert not rec.probe_errors and not rec.writer.errors
        written = [s for _, steps in seen for s in steps]
        assert written == list(range(90))  # each step once, in order
        if inline:
            assert during and all(name == me for name, _ in during)
            assert len(during) < 90 / 2  # in groups, not step by step
        else:
            assert during and all(name != me for name, _ in during)
        stores[inline] = path
    a, b = (landscape.open_run(stores[k]) for k in (True, False))
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    ta, tb = (landscape.open_trajectory(stores[k]) for k in (True, False))
    for name in ta.data_vars:
        np.testing.assert_array_equal(ta[name].values, tb[name].values, err_msg=name)


def test_a_slow_inline_write_hands_the_writing_to_the_writer_thread(tmp_path, monkeypatch):
    """An inline write that waited on the disk (here: slept) makes the writer thread write the
    rest of the run; nothing is lost."""
    seen = _traced_writes(monkeypatch)
    monkeypatch.setattr(recorder_module, "_no_spare_core", lambda device: True)
    traced = store_module.RunWriter._write_batch
    calls = []

    def first_slow(self, batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            time.sleep(2 * recorder_module._SLOW_WRITE_S + 0.05)
        traced(self, batch)

    monkeypatch.setattr(store_module.RunWriter, "_write_batch", first_slow)
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probes=[RestrictedSecant(every=1, samples=0)],
                           store=tmp_path / "r.zarr")
    train(model, opt, 100)
    assert rec.writer.inline is False
    during = list(seen)
    rec.close()
    me = threading.current_thread().name
    assert during[0][0] == me and any(name != me for name, _ in during[1:])
    assert [s for _, steps in seen for s in steps] == list(range(100))
    ds = landscape.open_run(tmp_path / "r.zarr")
    assert ds.sizes["step"] == 100 and np.isfinite(ds.rsi_train.values[:-1]).all()


def test_no_spare_core_means_cpu_training_on_every_core():
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        torch.set_num_threads(cores)
        assert recorder_module._no_spare_core(torch.device("cpu"))
        assert not recorder_module._no_spare_core(torch.device("meta"))  # not the CPU: the thread is free
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert not recorder_module._no_spare_core(torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
