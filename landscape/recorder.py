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

import contextlib
import datetime as _dt
import functools
import json
import math
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from landscape.functional import FunctionalModel, draw_batches, move_batch, probe_guard, trainable_parameters
from landscape.schema import Var, attrs_for
from landscape.store import RunWriter, _fill, open_run
# Module import, not names: probes.base imports landscape.functional, which runs this package's
# __init__ (and so this module) while probes.base is half-initialised when probes is imported first.
from probes import base as _probe_base

if TYPE_CHECKING:
    from probes.base import Context, Probe


# Built once: the writer reads a variable's attrs only when it creates the array.
_ATTRS = {name: attrs_for(name) for name in ("loss", "lr", "lr_group", "nonfinite", "probe_failed")}


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
            groups (32 steps, or this long after the first), which keeps the writer thread from
            waking at every step. ``0`` commits each step as soon as possible (what a
            ``kill -9`` can lose is then only the step being written).
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
        self.model, self.optimizer, self.probes = model, optimizer, probes
        named = trainable_parameters(model, optimizer)
        self.functional = FunctionalModel(model, loss_fn, named)
        needed = max([p.samples_needed for p in probes] + [0])
        self.probe_batches = (
            [move_batch(b, self.functional.device) for b in draw_batches(probe_data, needed, batch_size=probe_batch_size, seed=seed)]
            if needed
            else []
        )
        for p in probes:
            p.setup(self.functional, optimizer)
        self.weight_decay = self._weight_decay_vector()
        if store is None:
            store = Path(tempfile.mkdtemp(prefix="landscape-")) / "run.zarr"
        self.path = Path(store)
        if isinstance(commit_delay, bool) or not isinstance(commit_delay, (int, float)) or not 0 <= commit_delay <= 3600:
            raise ValueError(f"commit_delay must be a number of seconds in [0, 3600], got {commit_delay!r}")
        self.coords = _union_coords(probes)
        _check_trajectory_names(probes)
        self.writer = RunWriter(self.path, self._run_attrs(run or {}, loss_fn), overwrite=overwrite, resume=resume,
                                max_delay=float(commit_delay))
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
        self._pending: dict[str, Any] | None = None
        self._closed = False
        _TAP.acquire()
        self._tapped = True
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            model.register_forward_pre_hook(self._forward_pre),
            model.register_forward_hook(self._forward_post),
        ]

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
            "probe_batches": {"count": len(self.probe_batches), "batch_sizes": [int(b[0].shape[0]) for b in self.probe_batches]},
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
            with contextlib.suppress(ValueError):
                _TAP.sinks.remove(self._roots)

    def log(self, **scalars: float) -> None:
        """Record extra scalars (or the loss) for the current step: ``rec.log(loss=loss, acc=acc)``."""
        for k, v in scalars.items():
            self._logged[k] = float(v.detach()) if isinstance(v, Tensor) else float(v)

    def annotate(self, **attrs: Any) -> None:
        """Store run-level results in the dataset attrs (e.g. ``test_accuracy=0.97``)."""
        self.writer.set_attrs(**attrs)

    def _take_loss(self) -> tuple[float, bool]:
        """The step's loss and whether one was seen at all."""
        seen = True
        if "loss" in self._logged:
            value = self._logged.pop("loss")
        elif self._closure_loss is not None:
            value = self._closure_loss
        elif self._roots:
            scalars = [float(r) for r in self._roots if r.numel() == 1]
            value = math.fsum(scalars) if scalars else math.nan
        else:
            value, seen = math.nan, False
            if self.step <= 1:
                self._warn_once("noloss", "landscape saw no loss at step 0 (no .backward() after model(...), no closure): "
                                          "call rec.log(loss=loss) in the loop to record it")
        self._roots.clear()
        self._closure_loss = None
        return value, seen

    # -- the hooks ----------------------------------------------------------------------------
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> Any:
        if self._closed:
            return None
        try:
            self._stop_capture()
            closure = args[1] if len(args) > 1 else kwargs.get("closure")
            due = [p for p in self.probes if p.due(self.step)]
            self._pending = {
                "due": due,
                "params": self.functional.flat_params() if due else None,
                "grad": self.functional.flat_grad() if due and closure is None else None,
                "lrs": [float(g["lr"]) if not isinstance(g["lr"], Tensor) else float(g["lr"].item()) for g in optimizer.param_groups],
            }
            if closure is not None:
                return self._wrap_closure(args, kwargs, closure)
        except Exception as exc:
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
            self._record(step, pending)
        except Exception as exc:
            self._internal_error(exc)

    def _record(self, step: int, pending: dict[str, Any]) -> None:
        loss, seen = self._take_loss()
        flags = 0
        if seen and not math.isfinite(loss):
            flags |= 1
            self._warn_once("nonfinite-loss", f"non-finite training loss at step {step}: recorded as NaN (flag `nonfinite`)")
            loss = math.nan
        lrs = pending["lrs"]
        values: dict[str, Var] = {
            "loss": Var((), np.float64(loss), _ATTRS["loss"]),
            "lr": Var((), np.float64(lrs[0]), _ATTRS["lr"]),
        }
        if len(set(lrs)) > 1:
            values["lr_group"] = Var(("param_group",), np.asarray(lrs, np.float64), _ATTRS["lr_group"])
        for k, v in self._logged.items():
            values[k] = Var((), np.float64(v), {"long_name": k, "units": "1", "probe": "user"})
        self._logged.clear()
        trajectory: dict[str, Var] = {}
        failed = 0
        if pending["due"]:
            params = pending["params"]
            grad = pending["grad"] if pending["grad"] is not None else self.functional.flat_grad()
            # The norm doubles as the finiteness check (any NaN/Inf makes it non-finite).
            grad_norm = float(torch.linalg.vector_norm(grad, dtype=torch.float64))
            if not math.isfinite(grad_norm):
                flags |= 2
                self._warn_once("nonfinite-grad", f"non-finite gradient at step {step}: its geometry is recorded as NaN (flag `nonfinite`)")
            ctx = _probe_base.Context(step=step, functional=self.functional, model=self.model, optimizer=self.optimizer,
                          probe_batches=self.probe_batches, params=params, grad=grad,
                          update=self.functional.flat_params() - params, loss=loss, lr=lrs[0],
                          weight_decay=self.weight_decay, grad_norm=grad_norm)
            for probe in pending["due"]:
                out = self._run_probe(probe, probe.measure, ctx)
                if out is None:
                    failed += 1
                    continue
                values.update(out.values)
                trajectory.update(out.trajectory)
        values["nonfinite"] = Var((), np.int8(flags), _ATTRS["nonfinite"])
        values["probe_failed"] = Var((), np.int8(failed), _ATTRS["probe_failed"])
        self.writer.append(step, values, {k: Var(v.dims, _to_numpy(v.data), v.attrs) for k, v in trajectory.items()} or None)

    def _run_probe(self, probe: Probe, fn: Callable[[Context], Any], ctx: Context) -> Any:
        try:
            if probe.evaluates_model or fn == probe.finalize:
                with probe_guard(self.model, probe.bn_mode):
                    out = fn(ctx)
            else:
                out = fn(ctx)
            if isinstance(out, _probe_base.Measurement):
                own = probe.coords()
                out.values = {k: _aligned(Var(v.dims, _to_numpy(v.data), v.attrs), own, self.coords) for k, v in out.values.items()}
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
            self.writer.flush()
            final = self.functional.flat_params()
            steps = np.arange(self.writer.step0 or 0, (self.writer.step0 or 0) + self.writer.rows)
            for probe in self.probes:
                if type(probe).finalize is _probe_base.Probe.finalize:
                    continue
                ctx = _probe_base.Context(step=self.step, functional=self.functional, model=self.model, optimizer=self.optimizer,
                              probe_batches=self.probe_batches, final_params=final, weight_decay=self.weight_decay,
                              trajectory=self.writer.iter_trajectory, dataset=lambda: open_run(self.path), steps=steps)
                ds = self._run_probe(probe, probe.finalize, ctx)
                if ds is not None:
                    try:
                        # finalize results share the run's labels of each dim (NaN where absent)
                        shared = {d: self.coords[d] for d in ds.dims if d in self.coords}
                        if shared:
                            ds = ds.reindex(shared)
                        self.writer.write_dataset(ds)
                    except Exception as exc:
                        self._internal_error(exc)
            self.writer.set_attrs(probe_errors=self.probe_errors, steps_recorded=self.writer.rows)
        finally:
            self.writer.close()

    def dataset(self):  # type: ignore[no-untyped-def]
        """The run recorded so far, as an ``xarray.Dataset`` (see :func:`landscape.open_run`)."""
        if not self._closed:
            self.writer.flush()
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
        return x.detach().cpu().numpy()
    return x


def attach(model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> Recorder:
    """Attach probes to a training loop; the loop itself stays unchanged.

    ``landscape.attach(model, optimizer, loss_fn=..., probe_data=..., probes=[...], store=..., run=...)``;
    the options are those of :class:`Recorder` (documented there).
    """
    return Recorder(model, optimizer, **options)
