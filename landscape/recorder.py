"""Layer 4: attach probes to a model and optimizer through the optimizer's step hooks.

The recorder owns the schedule, builds each step's :class:`probes.base.Context`, runs the probes
under :func:`landscape.functional.probe_guard` and hands their arrays to the store. It reads
the training state and never writes it, so the trajectory is bitwise the same with and without
it; and it never raises into the user's loop: a failing probe or a failing write is recorded,
warned once, and training goes on.

How the training loss reaches it (the loop stays unchanged): while the model's forward output
may be turned into a loss (from the end of ``model(...)`` to ``optimizer.step()``), a
pass-through wrapper of ``torch.autograd.backward`` (installed while a recorder is attached)
notes the scalars ``.backward()`` is called on; their sum is the step's ``loss`` (with gradient
accumulation, the sum of the micro-batch losses as scaled by the user).
A closure passed to ``optimizer.step(closure)`` is wrapped and its first value taken instead, and
``rec.log(loss=...)`` overrides both.
"""
from __future__ import annotations

import collections
import contextlib
import datetime as _dt
import functools
import json
import math
import os
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from landscape.functional import FunctionalModel, batch_size, draw_batches, move_batch, probe_guard, trainable_parameters
from landscape.schema import Var, attrs_for
from landscape.store import RunWriter, _fill, open_run
# Module import, not names: probes.base imports landscape.functional, which runs this package's
# __init__ (and so this module) while probes.base is half-initialised when probes is imported first.
from probes import base as _probe_base

if TYPE_CHECKING:
    from probes.base import Context, Probe


# Built once: the writer reads a variable's attrs only when it creates the array.
_ATTRS = {name: attrs_for(name) for name in ("loss", "lr", "lr_group", "nonfinite", "probe_failed")}
# The usual row flags, shared by every row (nothing writes to a Var once it is queued).
_NO_FLAG = {name: Var((), np.int8(0), _ATTRS[name]) for name in ("nonfinite", "probe_failed")}
# Steps measured in one batch at most, and the longest step (seconds) that is deferred at all:
# past it the measuring costs too little of the step to matter, and is done at once.
_DEFER_STEPS = 32
_QUICK_STEP_S = 0.05
# An inline write (the training thread writing its queued steps) that waited this long for the
# disk hands the writing back to the store's thread for the rest of the run.
_SLOW_WRITE_S = 0.02


def _no_spare_core(device: torch.device) -> bool:
    """Whether training leaves no core for the store's writer thread: on the CPU, with torch's
    threads on every core this process may use. The training thread then writes the store
    itself between steps. The thread's batches there preempt torch's threads mid-step and cost
    the loop more than their CPU time (A/B on 2 cores, digits CNN, every-step vectors, 20 paired
    runs each: 1.093x with the thread against 1.083x inline, README "Spine")."""
    if device.type != "cpu":
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() >= cores


class _Step(NamedTuple):
    """What one optimizer step leaves for the probes, read at the step."""

    step: int
    due: list[Probe]
    params: Tensor | None  # w_t
    grad: Tensor | None  # g_t
    update: Tensor | None  # w_{t+1} - w_t
    lrs: list[float]
    buf: _StepBuffer | None  # where params, grad and update live when lent
    roots: list[Tensor]  # what .backward() was called on
    closure_loss: float | None
    logged: dict[str, float] | None  # rec.log(...)


class _BackwardTap:
    """Notes the tensors ``torch.autograd.backward`` starts from (``loss.backward()`` calls it),
    for the recorders waiting for their step's loss.

    While at least one recorder is attached, ``torch.autograd.backward`` is wrapped by a
    pass-through that appends the roots to the sinks of recorders between their model's forward
    and ``optimizer.step()``. A ``TorchFunctionMode`` did the same through torch's
    ``__torch_function__`` dispatch and measured about 5 % of a digits-CNN training step; this
    costs one Python call per backward.
    """

    def __init__(self) -> None:
        self.sinks: list[list[Tensor]] = []
        self.users = 0
        self.original: Callable[..., Any] | None = None

    def acquire(self) -> None:
        if self.users == 0:
            original = self.original = torch.autograd.backward

            @functools.wraps(original)
            def backward(tensors: Any, *args: Any, **kwargs: Any) -> Any:
                if self.sinks:
                    for t in tensors if isinstance(tensors, (list, tuple)) else (tensors,):
                        if isinstance(t, Tensor):
                            root = t.detach()
                            for sink in self.sinks:
                                sink.append(root)
                return original(tensors, *args, **kwargs)

            backward.__landscape_tap__ = True  # type: ignore[attr-defined]
            torch.autograd.backward = backward
        self.users += 1

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self.original is not None:
            if getattr(torch.autograd.backward, "__landscape_tap__", False):
                torch.autograd.backward = self.original  # else someone wrapped us: leave theirs
            self.original = None
            self.sinks.clear()


_TAP = _BackwardTap()


def _json_hparams(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k == "params":
            continue
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = repr(v)
    return out


class Recorder:
    """Records a training run; create it with :func:`landscape.attach`.

    Args:
        model: the module being trained.
        optimizer: its optimizer; the recorder hooks into ``optimizer.step()``.
        loss_fn: ``loss_fn(model(*inputs), target)`` -> mean loss; the probes evaluate it.
        probe_data: fixed evaluation batches: a list of ``(x, y)``, a DataLoader (batches drawn
            once, without touching the global RNG), or an ``(X, Y)`` pair split into batches.
        probes: probe instances, e.g. ``[RestrictedSecant(every=10, samples=8)]``.
        store: path of the run's zarr store (a temporary folder if omitted).
        run: metadata such as ``{"optimizer": "sgd", "seed": 0}``; becomes coordinates in
            :func:`landscape.open_runs`.
        overwrite: replace an existing store; ``resume``: append to an existing one.
        probe_batch_size: batch size when ``probe_data`` is an ``(X, Y)`` pair.
        seed: seed for splitting ``probe_data``.
        commit_delay: seconds by which the store may lag training: steps are committed in
            groups (32 steps, or half this long after the first), which keeps the writer thread
            from waking at every step (when torch's threads take every core, the training thread
            writes each group itself between two steps, and the writer thread only backs it up);
            and quick steps (under 50 ms) whose due probes read only
            the step's own values (:attr:`probes.base.Probe.reads_only_step`, e.g.
            ``RestrictedSecant(samples=0)``) are measured in batches (32 steps, or half this
            long after the first), which costs a CPU training loop several times less than
            measuring each step between two others. ``0`` measures and commits each step as soon
            as possible: a step whose probes read only the step's values once the next step
            starts (when its w_{t+1} is known), the others right after ``optimizer.step()``
            (what a ``kill -9`` can lose is then the last step and the step being written).
        loggers: where each recorded step's scalars also go, beside the store: callables
            ``logger(scalars: dict[str, float], step: int)`` (``wandb.log``, a Lightning logger's
            ``log_metrics``, ``mlflow.log_metrics``), a ``torch.utils.tensorboard.SummaryWriter``,
            or :class:`landscape.loggers.TensorBoard` (see :mod:`landscape.loggers`). A failing
            logger is warned about once and skipped; the store is unaffected.
        probe_chunk_size: examples per forward pass in probe computations; bigger probe batches
            are evaluated in chunks and accumulated (activation memory of one chunk; HVPs then
            rebuild one chunk's graph at a time). None: whole batches.
        distributed: under ``torch.distributed`` (``"auto"``: when a process group of more than
            one rank is initialised), attach on every rank with the same arguments: each rank
            evaluates its slice of every probe batch and the results are summed across ranks, so
            the numbers equal one process on the whole batches; only rank 0 writes the store and
            the loggers. ``False`` records each rank on its own (give each rank its own store).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        loss_fn: Callable[[Any, Any], Tensor],
        probe_data: Any = None,
        probes: Sequence[Probe] | Probe = (),
        store: str | Path | None = None,
        run: dict[str, Any] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        probe_batch_size: int | None = None,
        seed: int = 0,
        commit_delay: float = 0.25,
        loggers: Sequence[Any] | Any = (),
        probe_chunk_size: int | None = None,
        distributed: bool | str = "auto",
    ) -> None:
        # -- validate everything before training starts ------------------------------------
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        probes = [probes] if isinstance(probes, _probe_base.Probe) else list(probes)
        for p in probes:
            if not isinstance(p, _probe_base.Probe):
                raise TypeError(f"probes must be Probe instances (e.g. RestrictedSecant(every=10)), got {p!r}")
        names = [p.name for p in probes]
        if len(set(names)) != len(names):
            raise ValueError(f"two probes of the same kind would write the same variables: {names}")
        if run is not None and not isinstance(run, dict):
            raise TypeError("run= must be a dict of metadata such as {'optimizer': 'sgd', 'seed': 0}")
        self.rank, self.world, self.group = _distributed_setting(distributed)
        # Probes evaluate the module itself (functional_call), never a DDP wrapper, whose forward
        # synchronises buffers and arms the gradient all-reduce; parameter names stay unprefixed.
        inner = model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
        self.model, self.optimizer, self.probes = inner, optimizer, probes
        named = trainable_parameters(inner, optimizer)
        self.functional = FunctionalModel(inner, loss_fn, named)
        self.functional.set_chunk_size(probe_chunk_size)
        self.functional.group = self.group
        self._buffers = _StepBuffers(self.functional.params)
        self.loggers = _check_loggers(loggers)
        needed = max([p.samples_needed for p in probes] + [0])
        batches = draw_batches(probe_data, needed, batch_size=probe_batch_size, seed=seed) if needed else []
        if self.world > 1:
            batches = [_shard(b, self.rank, self.world) for b in batches]
        self.probe_batches = [move_batch(b, self.functional.device) for b in batches]
        for p in probes:
            p.setup(self.functional, optimizer)
        self.weight_decay = self._weight_decay_vector()
        if store is None and self.rank == 0:
            store = Path(tempfile.mkdtemp(prefix="landscape-")) / "run.zarr"
        self.path = Path(store) if store is not None else None
        if isinstance(commit_delay, bool) or not isinstance(commit_delay, (int, float)) or not 0 <= commit_delay <= 3600:
            raise ValueError(f"commit_delay must be a number of seconds in [0, 3600], got {commit_delay!r}")
        self.coords = _union_coords(probes)
        _check_trajectory_names(probes)
        self.writer: Any
        if self.world > 1:
            self.writer = self._open_distributed(run or {}, loss_fn, overwrite, resume, float(commit_delay))
        else:
            # half of the delay for the writer's groups, half for steps measured in batches
            self.writer = RunWriter(self.path, self._run_attrs(run or {}, loss_fn), overwrite=overwrite, resume=resume,
                                    max_delay=float(commit_delay) / 2, inline=_no_spare_core(self.functional.device))
        if self.coords:
            self.writer.write_dataset(xr.Dataset(coords={k: (k, np.asarray(v)) for k, v in self.coords.items()}))

        # -- state ---------------------------------------------------------------------------
        self.step = (self.writer.step0 or 0) + self.writer.rows if resume else 0
        self.probe_errors: dict[str, dict[str, Any]] = {}
        self._warned: set[str] = set()
        self._roots: list[Tensor] = []
        self._capturing = False
        self._closure_loss: float | None = None
        self._logged: dict[str, float] = {}
        self._pending: tuple[Any, ...] | None = None
        self._deferred: list[_Step] = []
        # the last deferred step still waits for w_{t+1}, read when the next step starts; and
        # whether the deferred steps are measured then
        self._awaiting = False
        self._drain_next = False
        self._deferred_since = self._last_step = -math.inf
        # deferring reorders nothing but the recorder's own work, which under torch.distributed
        # includes collectives: those must run at the same point on every rank
        self._defer_s = float(commit_delay) / 2 if self.world == 1 else 0.0
        self._closed = False
        _TAP.acquire()
        self._tapped = True
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            # on the module the loop calls (a DDP wrapper included): its forward starts the loss capture
            model.register_forward_pre_hook(self._forward_pre),
            model.register_forward_hook(self._forward_post),
        ]

    def _open_distributed(self, run: dict[str, Any], loss_fn: Any, overwrite: bool, resume: bool,
                          commit_delay: float) -> Any:
        """Rank 0 opens the store; the others keep a count of the rows. An error opening it is
        raised on every rank (else the others would wait for rank 0 forever)."""
        writer: Any = None
        error = None
        if self.rank == 0:
            try:
                attrs = self._run_attrs(run, loss_fn)
                attrs["distributed"] = {"world_size": self.world, "backend": str(_dist().get_backend(self.group))}
                writer = RunWriter(self.path, attrs, overwrite=overwrite, resume=resume, max_delay=commit_delay)
            except Exception as exc:
                error = exc
        message = _broadcast(None if error is None else f"{type(error).__name__}: {error}", self.group)
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"landscape: rank 0 could not open the store: {message}")
        state = _broadcast((writer.step0, writer.rows) if self.rank == 0 else None, self.group)
        if self.rank == 0:
            return writer
        return _RankWriter(state[0], state[1], self.group)

    # -- metadata ---------------------------------------------------------------------------
    def _run_attrs(self, run: dict[str, Any], loss_fn: Any) -> dict[str, Any]:
        import landscape

        opt = self.optimizer
        return {
            "run": run,
            "optimizer": {"class": type(opt).__name__, "defaults": _json_hparams(opt.defaults),
                          "param_groups": [_json_hparams(g) for g in opt.param_groups]},
            "model": {"class": type(self.model).__name__, "parameters": self.functional.dim,
                      "parameter_names": list(self.functional.layout.names)},
            "loss_fn": getattr(loss_fn, "__name__", type(loss_fn).__name__),
            "probes": [p.config() for p in self.probes],
            "probe_batches": {"count": len(self.probe_batches), "batch_sizes": [batch_size(b) for b in self.probe_batches]},
            "torch_version": torch.__version__,
            "landscape_version": landscape.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def _weight_decay_vector(self) -> Tensor | None:
        by_param = {id(p): float(g.get("weight_decay", 0.0) or 0.0) for g in self.optimizer.param_groups for p in g["params"]}
        lam = [by_param.get(id(p), 0.0) for p in self.functional.params]
        if not any(lam):
            return None
        return torch.cat([torch.full((p.numel(),), l, dtype=p.dtype, device=p.device) for p, l in zip(self.functional.params, lam)])

    # -- loss capture -------------------------------------------------------------------------
    def _forward_pre(self, module: nn.Module, args: Any) -> None:
        self._stop_capture()

    def _forward_post(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._closed and not self._capturing and torch.is_grad_enabled():
            _TAP.sinks.append(self._roots)
            self._capturing = True

    def _stop_capture(self) -> None:
        if self._capturing:
            self._capturing = False
            sinks = _TAP.sinks
            for i, sink in enumerate(sinks):  # by identity: list.remove compares lists by value
                if sink is self._roots:
                    del sinks[i]
                    break

    def log(self, **scalars: float) -> None:
        """Record extra scalars (or the loss) for the current step: ``rec.log(loss=loss, acc=acc)``."""
        for k, v in scalars.items():
            self._logged[k] = float(v.detach()) if isinstance(v, Tensor) else float(v)

    def annotate(self, **attrs: Any) -> None:
        """Store run-level results in the dataset attrs (e.g. ``test_accuracy=0.97``)."""
        self.writer.set_attrs(**attrs)

    def _take_loss(self, step: _Step) -> tuple[float, bool]:
        """The step's loss and whether one was seen at all."""
        if step.logged and "loss" in step.logged:
            return step.logged.pop("loss"), True
        if step.closure_loss is not None:
            return step.closure_loss, True
        if step.roots:
            scalars = [float(r) for r in step.roots if r.numel() == 1]
            return (math.fsum(scalars) if scalars else math.nan), True
        if step.step == 0:
            self._warn_once("noloss", "landscape saw no loss at step 0 (no .backward() after model(...), no closure): "
                                      "call rec.log(loss=loss) in the loop to record it")
        return math.nan, False

    # -- the hooks ----------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        # Runs at every optimizer step: kept to a few operations when no probe is due.
        if self._closed:
            return None
        buf = None
        try:
            if self._capturing:
                self._stop_capture()
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            step = self.step
            due = [p for p in self.probes if p.due(step)]
            params = grad = None
            if self._pending is not None and self._pending[4] is not None:
                self._release_unfinished(self._pending[4])  # the last step() raised before its post-hook
            if due:  # w_t, and g_t unless a closure computes it during step()
                if not any(p.holds_step_vectors for p in due):
                    buf = self._buffers.take()
                if buf is not None:
                    buf.read(with_grad=closure is None)
                    params, grad = buf.w, (buf.g if closure is None else None)
                elif closure is None:
                    params, grad = self.functional.flat_params_and_grad()
                else:
                    params = self.functional.flat_params()
            if self._awaiting:  # w_{t+1} of the last deferred step: just read, if this step is recorded
                self._give_next_iterate(buf.w if buf is not None else params)
            if self._drain_next:
                self._drain()
            # float(): also a 1-element lr tensor
            self._pending = (due, params, grad, [float(g["lr"]) for g in optimizer.param_groups], buf)
            if closure is not None:
                return self._wrap_closure(args, kwargs, closure)
        except Exception as exc:
            if self._awaiting:  # its w_{t+1} was not read
                self._lose_next_iterate()
            # the step still counts and gets its row (loss, lr), without probes: later steps
            # keep their indices
            if buf is not None:
                self._release_unfinished(buf)
            lrs = [math.nan]
            with contextlib.suppress(Exception):
                lrs = [float(g["lr"]) for g in optimizer.param_groups]
            self._pending = ([], None, None, lrs, None)
            self._internal_error(exc)
        return None

    def _wrap_closure(self, args: tuple, kwargs: dict, closure: Callable[[], Any]) -> tuple[tuple, dict]:
        def recorded_closure() -> Any:
            value = closure()
            if self._closure_loss is None and isinstance(value, (Tensor, float, int)):
                self._closure_loss = float(value.detach()) if isinstance(value, Tensor) else float(value)
            return value

        if len(args) > 1:
            return (args[0], recorded_closure, *args[2:]), kwargs
        return args, {**kwargs, "closure": recorded_closure}

    def _post_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        if self._closed or self._pending is None:
            return
        pending, self._pending = self._pending, None
        step = self.step
        self.step += 1
        try:
            self._capture(step, pending)
        except Exception as exc:
            self._internal_error(exc)

    def _capture(self, index: int, pending: tuple[list[Probe], Tensor | None, Tensor | None, list[float], _StepBuffer | None]) -> None:
        """Read what the step leaves behind (the parameters move on at the next one), then
        measure it now or, when its due probes read nothing else
        (:attr:`probes.base.Probe.reads_only_step`), once w_{t+1} is read: at the next step's
        start, or together with the next few steps if the step was quick."""
        due, params, grad, lrs, buf = pending
        update = None
        if self._capturing:
            self._stop_capture()
        now = time.monotonic()
        quick = now - self._last_step < _QUICK_STEP_S
        self._last_step = now
        # Due probes that read only the step's own values wait for w_{t+1} (read when the next
        # step starts, where w is read anyway): their update is the move to the next iterate.
        # Probes that evaluate the model are measured now, with the model as the step left it.
        wait = all(p.reads_only_step for p in due)
        if due:
            try:
                if buf is not None:
                    if grad is None:  # a closure computed it during step()
                        buf.read_grad()
                        grad = buf.g
                    if not wait:
                        buf.finish()
                    update = buf.u
                else:
                    if grad is None:
                        grad = self.functional.flat_grad()
                    assert params is not None
                    if not wait:
                        update = self.functional.flat_params().sub_(params)
            except BaseException:
                if buf is not None:
                    self._release_unfinished(buf)
                raise
        logged = None
        if self._logged:
            logged, self._logged = self._logged, {}
        step = _Step(index, due, params, grad, update, lrs, buf, self._roots, self._closure_loss, logged)
        self._roots, self._closure_loss = [], None
        if wait:
            if self._awaiting:  # the step hook missed it (an internal error)
                self._lose_next_iterate()
            if not self._deferred:
                self._deferred_since = now
            self._deferred.append(step)
            self._awaiting = bool(due)
            # On a CPU every distinct call after the optimizer step runs cold (its code and data
            # were evicted by forward and backward), several times slower than in a loop; quick
            # steps are measured back to back in batches, which run warm. The rest are measured
            # at the next step's start, once their w_{t+1} is read.
            batch = self._defer_s > 0 and quick
            if not batch or len(self._deferred) >= _DEFER_STEPS or now - self._deferred_since >= self._defer_s:
                self._drain_next = True
        else:
            self._drain(write=False)  # the store takes steps in order
            self._record(step)
            self._write_inline(due_only=True)

    def _give_next_iterate(self, w_next: Tensor | None) -> None:
        """Complete the last deferred step's update u_t = w_{t+1} - w_t with w_{t+1}: ``w_next``
        (w read at the start of the next recorded step, kept until the step is measured) or the
        parameters now (None)."""
        self._awaiting = False
        step = self._deferred[-1]
        try:
            if step.buf is not None:
                if w_next is None:
                    step.buf.read_next()
                else:
                    step.buf.next = w_next
            else:
                assert step.params is not None
                nxt = w_next if w_next is not None else self.functional.flat_params()
                self._deferred[-1] = step._replace(update=nxt - step.params)
        except BaseException:
            self._lose_next_iterate()
            raise

    def _lose_next_iterate(self) -> None:
        """The last deferred step's w_{t+1} was not read: its update is unknown (NaN), and never
        another step's numbers."""
        self._awaiting = False
        step = self._deferred[-1]
        if step.buf is not None:
            step.buf.next = None
            step.buf.u.fill_(math.nan)
        elif step.params is not None:
            self._deferred[-1] = step._replace(update=torch.full_like(step.params, math.nan))

    def _release_unfinished(self, buf: _StepBuffer) -> None:
        """Return the buffer of a step whose ``optimizer.step()`` raised; a deferred step whose
        w_{t+1} it holds takes its update first."""
        for step in self._deferred:
            if step.buf is not None and step.buf.next is buf.w:
                step.buf.settle()
        buf.release()

    def _drain(self, write: bool = True) -> None:
        """Measure and queue the deferred steps, in order (the last one's w_{t+1}: the
        parameters now, if the next step has not read it); an inline writer writes them unless
        ``write`` is False. Before a step measured at once (a probe that evaluates the model)
        they wait for the next batch: written there, between ``optimizer.step()`` and such a
        probe, they cost (b) of benchmarks/bench_spine.py 1.23-1.26x against 1.20-1.21x (A/B)."""
        self._drain_next = False
        if self._awaiting:
            self._give_next_iterate(None)
        drained = bool(self._deferred)
        while self._deferred:
            steps, self._deferred = self._deferred, []
            for i, step in enumerate(steps):
                try:
                    follows = ()  # the next step, measured next with w_{t+1} as its w
                    if step.buf is not None and step.buf.next is not None:
                        nxt = steps[i + 1] if i + 1 < len(steps) else None
                        if nxt is not None and nxt.buf is not None and step.buf.next is nxt.buf.w:
                            follows = nxt.due
                    self._record(step, follows)  # settles the update if a probe reads it
                except Exception as exc:
                    self._internal_error(exc)
        if drained and write:
            self._write_inline(due_only=False)  # the batch is the group: written while warm

    def _write_inline(self, due_only: bool) -> None:
        """Write the queued steps on this thread when the store is in inline mode; a write that
        waited on the disk hands writing back to the store's thread."""
        writer = self.writer
        if getattr(writer, "inline", False) and writer.write_pending(due_only) > _SLOW_WRITE_S:
            writer.inline = False

    def _record(self, step: _Step, next_due: Sequence[Probe] = ()) -> None:
        lent = False
        try:
            values, lent = self._queue_step(step, next_due)
        except Exception:
            self._queue_failed(step)
            raise
        finally:
            if step.buf is not None and not lent:  # else the writer returns it once written
                step.buf.release()
        if self.loggers and self.rank == 0:
            self._emit(step.step, values)

    def _queue_failed(self, item: _Step) -> None:
        """The row of a step whose recording raised: its loss and lr, every due probe counted as
        failed. The store's steps are contiguous: without it, every later step would be refused."""
        loss = math.nan
        with contextlib.suppress(Exception):
            loss = self._take_loss(item)[0]
        values = {"loss": Var((), np.float64(loss), _ATTRS["loss"]), "lr": Var((), np.float64(item.lrs[0]), _ATTRS["lr"]),
                  "nonfinite": _NO_FLAG["nonfinite"],
                  "probe_failed": Var((), np.int8(min(127, max(1, len(item.due)))), _ATTRS["probe_failed"])}
        with contextlib.suppress(Exception):  # a store that refuses it reports that itself
            self.writer.append(item.step, values)

    def _queue_step(self, item: _Step, next_due: Sequence[Probe] = ()) -> tuple[dict[str, Var], bool]:
        """Measure the step and queue its row: (the row, whether its buffer went with it)."""
        step, due, params, grad, update, lrs, buf = item.step, item.due, item.params, item.grad, item.update, item.lrs, item.buf
        loss, seen = self._take_loss(item)
        if self.world > 1:  # the global loss: the mean of the ranks' losses (equal-sized shards, as DDP assumes)
            both = torch.tensor([loss if seen else 0.0, float(seen)], dtype=torch.float64)
            _dist().all_reduce(both, group=self.group)
            seen = both[1].item() > 0
            loss = both[0].item() / both[1].item() if seen else math.nan
        flags = 0
        if seen and not math.isfinite(loss):
            flags |= 1
            self._warn_once("nonfinite-loss", f"non-finite training loss at step {step}: recorded as NaN (flag `nonfinite`)")
            loss = math.nan
        values: dict[str, Var] = {
            "loss": Var((), np.float64(loss), _ATTRS["loss"]),
            "lr": Var((), np.float64(lrs[0]), _ATTRS["lr"]),
        }
        if len(lrs) > 1 and len(set(lrs)) > 1:
            values["lr_group"] = Var(("param_group",), np.asarray(lrs, np.float64), _ATTRS["lr_group"])
        if item.logged:
            for k, v in item.logged.items():
                values[k] = Var((), np.float64(v), {"long_name": k, "units": "1", "probe": "user"})
        trajectory: dict[str, Var] | None = None
        failed = 0
        lent = False
        if due:
            assert params is not None and grad is not None and update is not None
            fm = self.functional
            # The norm doubles as the finiteness check (any NaN/Inf makes it non-finite).
            grad_norm = self._buffers.norm(grad, buf)
            if not math.isfinite(grad_norm):
                flags |= 2
                self._warn_once("nonfinite-grad", f"non-finite gradient at step {step}: its geometry is recorded as NaN (flag `nonfinite`)")
            if self.world > 1:
                self._sync_buffers()
            # w_{t+1} read but u not computed yet (the next step's w_t is kept for it): on first read
            settle = buf.settle if buf is not None and buf.next is not None else None
            ctx = _probe_base.Context(step=step, functional=fm, model=self.model, optimizer=self.optimizer,
                                      probe_batches=self.probe_batches, params=params, grad=grad,
                                      update=update, loss=loss, lr=lrs[0],
                                      weight_decay=self.weight_decay, grad_norm=grad_norm, next_step_due=next_due,
                                      _finish_update=settle)
            trajectory = {}
            for probe in due:
                out = self._run_probe(probe, probe.measure, ctx)
                if out is None:
                    failed += 1
                    continue
                values.update(out.values)
                trajectory.update(out.trajectory)
            arrays = buf.arrays if buf is not None else {}
            for v in trajectory.values():  # the writer thread gets arrays, never live tensors
                shared = arrays.get(id(v.data))
                if shared is not None:  # a lent buffer: the writer writes from it and returns it
                    v.data, lent = shared, True
                else:
                    v.data = _to_numpy(v.data)
        values["nonfinite"] = _NO_FLAG["nonfinite"] if not flags else Var((), np.int8(flags), _ATTRS["nonfinite"])
        values["probe_failed"] = _NO_FLAG["probe_failed"] if not failed else Var((), np.int8(failed), _ATTRS["probe_failed"])
        self.writer.append(step, values, trajectory or None, buf.release if lent else None)  # type: ignore[union-attr]
        return values, lent

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm running statistics) for the probes of every rank, without
        touching the model's own: each rank then evaluates the same function."""
        named = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        if not named:
            return
        flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for _, b in named])
        _dist().broadcast(flat, group=self.group, group_src=0)
        out, i = {}, 0
        for n, b in named:
            out[n] = flat[i:i + b.numel()].reshape(b.shape).to(b.dtype)
            i += b.numel()
        self.functional.buffers = out

    def _emit(self, step: int, values: dict[str, Var]) -> None:
        """Hand the step's scalars to the loggers; a failing logger is warned about and skipped."""
        from landscape.loggers import step_scalars

        scalars = step_scalars(values, self.coords)
        for i, log in enumerate(self.loggers):
            try:
                log(scalars, step)
            except Exception as exc:
                name = f"logger:{getattr(log, '__name__', type(log).__name__)}"
                info = self.probe_errors.setdefault(name, {"count": 0, "first_step": step, "error": ""})
                info["count"] += 1
                if not info["error"]:
                    info["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                self._warn_once(f"logger:{i}", f"landscape logger {name} failed at step {step}: {info['error']} "
                                               "(the store is unaffected; training goes on)")

    def _run_probe(self, probe: Probe, fn: Callable[[Context], Any], ctx: Context) -> Any:
        try:
            if probe.finalize_evaluates_model if fn == probe.finalize else probe.evaluates_model:
                with probe_guard(self.model, probe.bn_mode):
                    out = fn(ctx)
            else:
                out = fn(ctx)
            if isinstance(out, _probe_base.Measurement):
                own = probe.coords() if self.coords else {}
                for v in out.values.values():
                    v.data = _to_numpy(v.data)
                if own:
                    out.values = {k: _aligned(v, own, self.coords) for k, v in out.values.items()}
            return out
        except Exception as exc:
            info = self.probe_errors.setdefault(probe.name, {"count": 0, "first_step": ctx.step, "error": ""})
            info["count"] += 1
            if not info["error"]:
                info["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._warn_once(f"probe:{probe.name}", f"probe {probe.name} failed at step {ctx.step}: {info['error']} "
                                                   "(recorded in attrs['probe_errors']; training goes on)")
            return None

    def _internal_error(self, exc: Exception) -> None:
        info = self.probe_errors.setdefault("recorder", {"count": 0, "first_step": self.step, "error": ""})
        info["count"] += 1
        if not info["error"]:
            info["error"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-2000:]
        self._warn_once("internal", f"landscape recorder error at step {self.step}: {exc!r} (training goes on)")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # -- the end ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Wait until every recorded step is committed to the store."""
        self._drain()
        self.writer.flush()

    def close(self) -> None:
        """Detach from training, run the probes' end-of-run computations, close the store."""
        if self._closed:
            return
        self._stop_capture()
        self._closed = True
        for h in self._handles:
            h.remove()
        self._untap()
        try:
            self._drain()
            self.writer.flush()
            final = self.functional.flat_params()
            if self.world > 1:
                self._sync_buffers()
            steps = np.arange(self.writer.step0 or 0, (self.writer.step0 or 0) + self.writer.rows)
            for probe in self.probes:
                if type(probe).finalize is _probe_base.Probe.finalize:
                    continue
                shared_run = self.world > 1 and probe.finalize_evaluates_model
                if self.rank > 0 and not shared_run:
                    continue  # reads stored results only: rank 0 does it
                trajectory: Callable[..., Any] = self.writer.iter_trajectory
                dataset: Callable[[], Any] = lambda: open_run(self.path)  # noqa: E731
                if shared_run and self.rank == 0:  # the other ranks run the same finalize on rank 0's data
                    trajectory = _sending(self.writer.iter_trajectory, self.group)
                    dataset = _sending(lambda: open_run(self.path).load(), self.group, single=True)
                elif shared_run:
                    trajectory = _receiving(self.group)
                    dataset = _receiving(self.group, single=True)
                ctx = _probe_base.Context(step=self.step, functional=self.functional, model=self.model, optimizer=self.optimizer,
                              probe_batches=self.probe_batches, final_params=final, weight_decay=self.weight_decay,
                              trajectory=trajectory, dataset=dataset, steps=steps)
                ds = self._run_probe(probe, probe.finalize, ctx)
                if ds is not None and self.rank == 0:
                    try:
                        # finalize results share the run's labels of each dim (NaN where absent)
                        shared = {d: self.coords[d] for d in ds.dims if d in self.coords}
                        if shared:
                            ds = ds.reindex(shared)
                        self.writer.write_dataset(ds)
                    except Exception as exc:
                        self._internal_error(exc)
            for log in self.loggers if self.rank == 0 else ():
                flush = getattr(log, "flush", None)
                if callable(flush):
                    with contextlib.suppress(Exception):
                        flush()
            self.writer.set_attrs(probe_errors=self.probe_errors, steps_recorded=self.writer.rows)
        finally:
            self.writer.close()

    def dataset(self):  # type: ignore[no-untyped-def]
        """The run recorded so far, as an ``xarray.Dataset`` (see :func:`landscape.open_run`)."""
        if self.rank > 0:
            raise RuntimeError(f"this is rank {self.rank}: under torch.distributed only rank 0 writes the store "
                               f"({self.path}); read it there, or after training with landscape.open_run")
        if not self._closed:
            self.flush()
        return open_run(self.path)

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _untap(self) -> None:
        if getattr(self, "_tapped", False):
            self._tapped = False
            _TAP.release()

    def __del__(self) -> None:  # a forgotten close() must not leave the tap on
        try:
            if not self._closed:
                self._stop_capture()
                self._untap()
        except Exception:
            pass


class _StepBuffers:
    """Reused flat buffers for a recorded step's w_t, g_t and w_{t+1} - w_t.

    Lent to the step's probes when none of them keeps the vectors
    (:attr:`probes.base.Probe.holds_step_vectors` False). Reading a step is then one
    ``_foreach_copy_`` into memory that is allocated and paged in already, where a flatten
    allocates and copies tensor by tensor; the vectors a probe streams go to the writer thread as
    numpy views of the buffer, which it writes from directly and hands back after. Between a
    backward pass and the optimizer step every distinct torch call measured 40-150 us on a 2-core
    CPU (cold caches), so the number of calls matters more than the bytes.

    A buffer is taken by the training thread and returned by whoever holds it last (the writer
    thread for streamed vectors); ``deque`` appends and pops are atomic. When all ``limit``
    buffers are out (a slow disk), the recorder copies the step the usual way.
    """

    MAX_BYTES = 64 * 2**20  # all buffers together; bigger models copy each step (it is rarer there)
    MAX_COUNT = 160  # the writer's queue (128 steps) plus a batch of steps being measured (32)

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        p0 = self.params[0]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = p0.dtype, p0.device
        same = all(p.dtype == p0.dtype and p.device == p0.device and p.layout == torch.strided for p in self.params)
        size = 3 * self.dim * p0.element_size()
        self.limit = min(self.MAX_COUNT, self.MAX_BYTES // size) if same else 0
        # numpy views only where the store writes these bytes as they are (float32 on the CPU)
        self.numpy = p0.device.type == "cpu" and p0.dtype == torch.float32
        self.free: collections.deque[_StepBuffer] = collections.deque()
        self.made = 0
        self._scratch = np.empty(0)

    def norm(self, grad: Tensor, buf: _StepBuffer | None) -> float:
        """|grad| in float64 (NaN or inf where it has one). On the CPU: a copy into a float64
        scratch vector and a BLAS dot, half the time of torch's float64 norm, the same way for
        lent and copied vectors (so both give the same bits). Training thread only."""
        g = buf.arrays.get(id(grad)) if buf is not None else None
        if g is None:
            if grad.device.type != "cpu" or grad.dtype not in (torch.float32, torch.float64, torch.float16):
                return torch.linalg.vector_norm(grad, dtype=torch.float64).item()
            g = grad.detach().numpy()
        if self._scratch.shape != g.shape:
            self._scratch = np.empty(g.shape)
        np.copyto(self._scratch, g)
        return math.sqrt(float(np.dot(self._scratch, self._scratch)))

    def take(self) -> _StepBuffer | None:
        """A free buffer, a new one while under the limit, or None."""
        try:
            return self.free.popleft()
        except IndexError:
            if self.made >= self.limit:
                return None
            self._grow(min(8, self.limit - self.made))
            return self.free.popleft()

    def _grow(self, count: int) -> None:
        """``count`` more buffers from one allocation, with one split for all their
        parameter-shaped views (made one by one, they cost 3x as much)."""
        d = self.dim
        block = torch.empty(count * 3 * d, dtype=self.dtype, device=self.device)
        shapes = [p.shape for p in self.params] * 3
        parts = torch.split_with_sizes(block, [s.numel() for s in shapes] * count)
        views = [t if len(s) == 1 else t.view(s) for t, s in zip(parts, shapes * count)]
        flat = block.numpy() if self.numpy else None
        per = len(shapes)
        for i in range(count):
            lo = 3 * d * i
            arrays = flat[lo:lo + 3 * d] if flat is not None else None
            self.free.append(_StepBuffer(self, block[lo:lo + 3 * d], views[per * i:per * (i + 1)], arrays))
        self.made += count


class _StepBuffer:
    """One step's ``w``, ``g`` and ``u`` (= w_{t+1} - w_t) in one allocation (see :class:`_StepBuffers`)."""

    __slots__ = ("owner", "w", "g", "u", "_wg", "_u", "arrays", "next")

    def __init__(self, owner: _StepBuffers, buf: Tensor, views: list[Tensor], flat: np.ndarray | None) -> None:
        d, n = owner.dim, len(owner.params)
        self.owner = owner
        self.w, self.g, self.u = buf.split(d)
        self._wg, self._u = views[:2 * n], views[2 * n:]
        # the numpy twins of w, g and u: what the writer thread gets for them
        self.arrays: dict[int, np.ndarray] = {}
        # w_{t+1} while u waits for it (u itself once read_next() has put it there)
        self.next: Tensor | None = None
        if flat is not None:
            self.arrays = {id(self.w): flat[:d], id(self.g): flat[d:2 * d], id(self.u): flat[2 * d:]}

    def read(self, with_grad: bool) -> None:
        """Copy in w_t and, if asked, g_t (a parameter without ``.grad`` has a zero gradient)."""
        params = self.owner.params
        with torch.no_grad():
            if not with_grad:
                torch._foreach_copy_(self._wg[:len(params)], params)
                return
            grads = [p.grad for p in params]
            if all(g is not None for g in grads):
                torch._foreach_copy_(self._wg, [*params, *grads])  # type: ignore[list-item]
                return
            n = len(params)
            present = [i for i, g in enumerate(grads) if g is not None]
            torch._foreach_copy_(self._wg[:n] + [self._wg[n + i] for i in present], [*params, *[grads[i] for i in present]])  # type: ignore[misc]
            for i, g in enumerate(grads):
                if g is None:
                    self._wg[n + i].zero_()

    def read_grad(self) -> None:
        """Copy in g_t alone (a closure computed it during the step)."""
        params = self.owner.params
        with torch.no_grad():
            for view, p in zip(self._wg[len(params):], params):
                view.copy_(p.grad) if p.grad is not None else view.zero_()

    def finish(self) -> None:
        """u = w_{t+1} - w_t, with w_{t+1} the parameters now."""
        self.read_next()
        self.settle()

    def read_next(self) -> None:
        """Read w_{t+1} (the parameters now) for :meth:`settle`."""
        with torch.no_grad():
            torch._foreach_copy_(self._u, self.owner.params)
        self.next = self.u

    def settle(self) -> None:
        """u = w_{t+1} - w_t from the w_{t+1} read for it (warm, with the step's measurement);
        through the numpy twins where there are some (a third of torch's time per call here)."""
        nxt, self.next = self.next, None
        if nxt is None:
            return
        if self.arrays and nxt.dtype == self.u.dtype and nxt.is_cpu:
            u = self.arrays[id(self.u)]
            np.subtract(u if nxt is self.u else nxt.numpy(), self.arrays[id(self.w)], out=u)
            return
        with torch.no_grad():
            torch.sub(nxt, self.w, out=self.u)

    def release(self) -> None:
        self.next = None
        self.owner.free.append(self)


def _union_coords(probes: Sequence[Probe]) -> dict[str, list[Any]]:
    """The labels of each extra dim over all probes, in first-seen order. A label two probes
    share must mean the same thing (for ``block``: the same parameters)."""
    union: dict[str, list[Any]] = {}
    blocks: dict[str, tuple[Tensor | None, str]] = {}
    for p in probes:
        for dim, labels in p.coords().items():
            seen = union.setdefault(dim, [])
            seen.extend(lab for lab in labels if lab not in seen)
            if all(isinstance(lab, (int, float, np.number)) and not isinstance(lab, bool) for lab in seen):
                seen.sort()  # numeric positions (alpha, radius) read in order whoever declared them
        for label, index in (getattr(p, "block_index", None) or {}).items():
            if label in blocks:
                other, owner = blocks[label]
                same = (index is None and other is None) or (
                    index is not None and other is not None and torch.equal(index, other))
                if not same:
                    raise ValueError(f"block {label!r} means different parameters in {owner} and {p.name}: "
                                     "give different blocks different labels")
            else:
                blocks[label] = (index, p.name)
    return union


def _check_trajectory_names(probes: Sequence[Probe]) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for p in probes:
        for name, dim in p.trajectory_vectors().items():
            if name in seen and seen[name][0] != dim:
                raise ValueError(f"{p.name} stores full trajectory vectors {name!r} but {seen[name][1]} stores them as "
                                 f"{seen[name][0]} vectors: give RestrictedSecant sketch=None, or drop {p.name}")
            seen.setdefault(name, (dim, p.name))


def _aligned(v: Var, own: dict[str, list[Any]], union: dict[str, list[Any]]) -> Var:
    """Place a probe's values along the run's labels of each shared dim (NaN where it has none)."""
    for axis, dim in enumerate(v.dims):
        labels = own.get(dim)
        if labels is None or labels == union.get(dim, labels):
            continue
        data = np.asarray(v.data)
        where = [union[dim].index(lab) for lab in labels]
        shape = list(data.shape)
        shape[axis] = len(union[dim])
        full = np.full(shape, _fill(data.dtype), dtype=data.dtype if data.dtype.kind in "fb" else np.int64)
        index = [slice(None)] * data.ndim
        index[axis] = where
        full[tuple(index)] = data
        v = Var(v.dims, full, v.attrs)
    return v


def _to_numpy(x: Any) -> Any:
    if isinstance(x, Tensor):
        # one call for the usual CPU tensor without grad (this runs for every stored vector)
        return x.numpy() if x.is_cpu and not x.requires_grad else x.detach().cpu().numpy()
    return x


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Recorder:
    """Attach probes to a training loop; the loop itself stays unchanged.

    ``landscape.attach(model, optimizer, loss_fn=..., probe_data=..., probes=[...], store=..., run=...)``;
    the options are those of :class:`Recorder` (documented there).
    """
    return Recorder(model, optimizer, **options)


# -- torch.distributed ------------------------------------------------------------------------


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _distributed_setting(distributed: bool | str) -> tuple[int, int, Any]:
    """(rank, world size, group) of the recording: (0, 1, None) unless distributed."""
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    if distributed is False:
        return 0, 1, None
    dist = _dist()
    active = dist.is_available() and dist.is_initialized()
    if distributed is True and not active:
        raise RuntimeError("distributed=True but no torch.distributed process group is initialised: call "
                           "torch.distributed.init_process_group(...) before landscape.attach")
    if not active or dist.get_world_size() < 2:
        return 0, 1, None
    return dist.get_rank(), dist.get_world_size(), None


def _broadcast(obj: Any, group: Any) -> Any:
    box = [obj]
    _dist().broadcast_object_list(box, group=group, group_src=0)
    return box[0]


def _shard(batch: Any, rank: int, world: int) -> Any:
    """This rank's contiguous slice of a probe batch (sizes differ by at most one example)."""
    from landscape.functional import Shard, _map_batched, check_batch

    batch = check_batch(batch)
    n = batch_size(batch)
    if n < world:
        raise ValueError(f"a probe batch of {n} examples cannot be split over {world} ranks: under torch.distributed "
                         f"each probe batch needs at least {world} examples (pass bigger probe batches)")
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    return Shard((_map_batched(t, lambda x: x[lo:hi]) for t in batch), n)


def _sending(source: Callable[..., Any], group: Any, single: bool = False) -> Callable[..., Any]:
    """``source`` on rank 0, each item also broadcast to the other ranks (see :func:`_receiving`).
    The end marker is sent only after a complete pass: a consumer that stops early stops early on
    every rank, in step, so nothing is left waiting."""
    if single:
        def one(*args: Any, **kwargs: Any) -> Any:
            return _broadcast(source(*args, **kwargs), group)
        return one

    def gen(*args: Any, **kwargs: Any) -> Any:
        for item in source(*args, **kwargs):
            _broadcast(item, group)
            yield item
        _broadcast(None, group)
    return gen


def _receiving(group: Any, single: bool = False) -> Callable[..., Any]:
    """On ranks > 0: what rank 0's :func:`_sending` broadcasts, in the same calls."""
    if single:
        return lambda *args, **kwargs: _broadcast(None, group)

    def gen(*args: Any, **kwargs: Any) -> Any:
        while True:
            item = _broadcast(None, group)
            if item is None:
                return
            yield item
    return gen


class _RankWriter:
    """The store's stand-in on ranks > 0: counts rows, writes nothing."""

    def __init__(self, step0: int | None, rows: int, group: Any) -> None:
        self.step0, self.rows, self.group = step0, int(rows), group
        self.errors: list[str] = []

    def append(self, step: int, values: Any, trajectory: Any = None, release: Callable[[], None] | None = None) -> None:
        if self.step0 is None:
            self.step0 = step
        self.rows += 1
        if release is not None:
            release()

    def write_dataset(self, ds: Any) -> None:
        pass

    def set_attrs(self, **attrs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def iter_trajectory(self, names: Sequence[str], max_bytes: int = 0, reuse: bool = False) -> Any:
        raise RuntimeError("only rank 0 holds the trajectory")


def _check_loggers(loggers: Any) -> list[Callable[[dict[str, float], int], Any]]:
    """Loggers as callables ``log(scalars, step)``, with an error that says what is accepted."""
    if loggers is None:
        return []
    if not isinstance(loggers, (list, tuple)):
        loggers = [loggers]
    if not loggers:
        return []
    from landscape.loggers import as_logger

    return [as_logger(lg) for lg in loggers]

