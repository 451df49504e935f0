"""Per-step scalars for the loggers researchers already use (TensorBoard, Weights & Biases,
MLflow, Lightning loggers), beside the store.

``landscape.attach(..., loggers=[...])`` sends each recorded step's scalars, flattened by
:func:`step_scalars`, to every logger; :func:`export_scalars` replays a stored run through the
same flattening after training. A logger is any ``f(scalars: dict[str, float], step: int)``
(``wandb.log``, ``mlflow.log_metrics``), an object with ``log_metrics(metrics, step)`` (a
Lightning logger), a ``torch.utils.tensorboard.SummaryWriter`` or :class:`TensorBoard`, or a
:class:`DictLogger` (collects into a dict).

Names: a scalar variable keeps its name (``loss``, ``lr``); one labelled along a dim of the run
(``block``, ``kind``, ``radius``, ``direction``, ``alpha``) becomes ``name/dim=label`` (several dims
joined by ``,``: ``sharpness/kind=sam,radius=0.05``); a per-probe-batch variable (dim ``sample``)
is summarised by its median over the batches, under its own name; other dims (``eig``, ``node``,
...) are indexed, ``eigenvalues/block=model,eig=0``, for variables of at most 16 entries (larger
ones, such as SLQ nodes, stay in the store only). NaN entries (no measurement) are left out: a
logger then shows a gap, not a spurious value. Flags (``nonfinite``, ``probe_failed``, converged
flags) are sent as floats.
"""
from __future__ import annotations

import inspect
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from landscape.schema import Var

__all__ = ["DictLogger", "TensorBoard", "as_logger", "export_scalars", "step_scalars"]

MAX_UNLABELED = 16  # entries of a variable with an unlabelled dim (eig, node, ...) sent to loggers
_TAG_UNSAFE = re.compile(r"[^\w.\-]")
_EXPORT_CHUNK = 256  # steps read from the store at a time by export_scalars


def _label(value: Any) -> str:
    """A coordinate label as text that is safe inside a TensorBoard tag."""
    if isinstance(value, (float, np.floating)):
        text = f"{float(value):g}"
    elif isinstance(value, (bytes, np.bytes_)):
        text = bytes(value).decode(errors="replace")
    else:
        text = str(value)
    return _TAG_UNSAFE.sub("_", text)


def _as_array(data: Any) -> np.ndarray:
    if hasattr(data, "detach"):  # a torch tensor
        data = data.detach().cpu().numpy()
    return np.asarray(data)


def step_scalars(values: Mapping[str, Var], coords: Mapping[str, Any]) -> dict[str, float]:
    """The scalars of one recorded step, as loggers take them: ``{tag: value}``.

    Args:
        values: the step's variables (:class:`landscape.schema.Var`, dims without ``step``).
        coords: labels of the run's labelled dims, ``{"block": ["model"], "radius": [0.05], ...}``.

    Returns the flattened scalars in a deterministic order (variables by name, then entries in
    C order). See the module docstring for the naming; NaN entries are left out.
    """
    out: dict[str, float] = {}
    for name in sorted(values):
        v = values[name]
        data = _as_array(v.data)
        dims = tuple(v.dims)
        if data.ndim != len(dims) or data.dtype.kind not in "biuf":
            continue  # text or malformed values are the store's business, not a logger's
        data = data.astype(np.float64)
        if "sample" in dims:
            axis = dims.index("sample")
            if data.shape[axis] == 0:
                continue
            with warnings.catch_warnings():  # all-NaN slices give NaN, which is dropped below
                warnings.simplefilter("ignore", RuntimeWarning)
                data = np.nanmedian(data, axis=axis)
            dims = dims[:axis] + dims[axis + 1:]
        labels: list[list[str] | None] = []
        for axis, dim in enumerate(dims):
            known = coords.get(dim)
            known = list(known) if known is not None else None
            labels.append([_label(x) for x in known] if known is not None and len(known) == data.shape[axis] else None)
        if any(lab is None for lab in labels) and data.size > MAX_UNLABELED:
            continue
        if not dims:
            x = float(data)
            if not math.isnan(x):
                out[name] = x
            continue
        for index in np.ndindex(*data.shape):
            x = float(data[index])
            if math.isnan(x):
                continue
            parts = [f"{dim}={lab[i] if lab is not None else i}" for dim, lab, i in zip(dims, labels, index)]
            out[f"{name}/{','.join(parts)}"] = x
    return out


class DictLogger(dict):
    """A logger that collects ``{step: {name: value}}`` in memory (it is that dict).

    ``landscape.attach(..., loggers=[log := DictLogger()])``, then ``log[10]["loss"]`` or
    ``steps, values = log.series("lambda_max/block=model")``.
    """

    __name__ = "DictLogger"

    def __call__(self, scalars: Mapping[str, float], step: int) -> None:
        self.setdefault(int(step), {}).update({str(k): float(v) for k, v in scalars.items()})

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of one scalar, over the steps where it was logged, in step order."""
        steps = [s for s in sorted(self) if name in self[s]]
        if not steps and self:
            known = ", ".join(self.names()[:12])
            raise KeyError(f"no scalar {name!r} was logged; logged names include: {known}")
        return np.asarray(steps, dtype=np.int64), np.asarray([self[s][name] for s in steps], dtype=np.float64)

    def names(self) -> list[str]:
        """Every scalar name logged at any step, sorted."""
        return sorted({k for row in self.values() for k in row})


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises this when the tensorboard package is missing
        raise ImportError("landscape.loggers.TensorBoard needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'landscape[tensorboard]')") from exc
    return SummaryWriter


class TensorBoard:
    """Writes each step's scalars to TensorBoard, under ``prefix`` (default ``landscape/``).

    Args:
        log_dir: a folder (a ``SummaryWriter`` is created there and closed by :meth:`close`), or
            an existing ``torch.utils.tensorboard.SummaryWriter`` (e.g. the one the training
            already logs to; left open for its owner).
        prefix: text put before every scalar name (the tag shown in TensorBoard).

    Values are written as TensorBoard's usual 32-bit scalars.
    """

    def __init__(self, log_dir: str | os.PathLike[str] | Any, prefix: str = "landscape/") -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string such as 'landscape/', got {type(prefix).__name__}")
        self.prefix = prefix
        if callable(getattr(log_dir, "add_scalar", None)):
            self.writer, self._owned = log_dir, False
        elif isinstance(log_dir, (str, os.PathLike)):
            self.writer, self._owned = _summary_writer_class()(log_dir=str(Path(log_dir))), True
        else:
            raise TypeError("TensorBoard(log_dir): pass a folder path or a torch.utils.tensorboard.SummaryWriter, "
                            f"got {type(log_dir).__name__}")
        self._closed = False

    @property
    def log_dir(self) -> str:
        """The folder the event files are written to."""
        get = getattr(self.writer, "get_logdir", None)
        return str(get()) if callable(get) else str(getattr(self.writer, "log_dir", ""))

    def __call__(self, scalars: Mapping[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(self.prefix + name, float(value), global_step=int(step))

    def flush(self) -> None:
        """Write buffered events to disk."""
        flush = getattr(self.writer, "flush", None)
        if callable(flush):
            flush()

    def close(self) -> None:
        """Flush; close the writer if this object created it."""
        if self._closed:
            return
        self.flush()
        if self._owned:
            self.writer.close()
        self._closed = True

    def __enter__(self) -> "TensorBoard":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoard({self.log_dir!r}, prefix={self.prefix!r})"


class _MetricsLogger:
    """An object with ``log_metrics(metrics, step)`` (a Lightning logger) as a logger callable."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.__name__ = f"{type(target).__name__}.log_metrics"

    def __call__(self, scalars: Mapping[str, float], step: int) -> None:
        self.target.log_metrics(dict(scalars), step)

    def flush(self) -> None:
        # Lightning loggers buffer (CSVLogger) until save(); the trainer saves too, later.
        save = getattr(self.target, "save", None)
        if callable(save):
            save()


_ACCEPTED = ("a callable f(scalars: dict[str, float], step: int) such as wandb.log or mlflow.log_metrics, "
             "an object with log_metrics(metrics, step) such as a Lightning logger, a "
             "torch.utils.tensorboard.SummaryWriter, landscape.loggers.TensorBoard(log_dir), or "
             "landscape.loggers.DictLogger()")


def as_logger(obj: Any) -> Callable[[dict[str, float], int], Any]:
    """``obj`` as a callable ``log(scalars, step)``, or a TypeError saying what is accepted."""
    if isinstance(obj, (TensorBoard, DictLogger)):
        return obj
    if isinstance(obj, Mapping):
        raise TypeError("a dict is not a logger: to collect the scalars into a dict pass "
                        "landscape.loggers.DictLogger() (it is a dict {step: {name: value}}); accepted loggers: " + _ACCEPTED)
    if obj is None or isinstance(obj, (str, bytes, os.PathLike)):
        hint = " (for TensorBoard pass landscape.loggers.TensorBoard(log_dir))" if isinstance(obj, (str, os.PathLike)) else ""
        raise TypeError(f"not a logger: {obj!r}{hint}; accepted: {_ACCEPTED}")
    if callable(getattr(obj, "add_scalar", None)):
        return TensorBoard(obj)
    if callable(getattr(obj, "log_metrics", None)):
        return _MetricsLogger(obj)
    if callable(obj):
        try:
            inspect.signature(obj).bind({}, 0)
        except TypeError as exc:
            raise TypeError(f"logger {obj!r} cannot be called as f(scalars, step): {exc}; accepted: {_ACCEPTED}") from None
        except ValueError:
            pass  # no signature to check (some builtins): trust it
        return obj
    hint = " (pass wandb.log, not the wandb module)" if callable(getattr(obj, "log", None)) else ""
    raise TypeError(f"not a logger: {type(obj).__name__}{hint}; accepted: {_ACCEPTED}")


def export_scalars(runs: Any, logger: Any, *, prefix: str | None = None) -> int:
    """Send a stored run's per-step scalars to a logger, step by step, after training.

    Args:
        runs: a run's store path, or its dataset (``landscape.open_run``; a dataset of several
            runs from ``open_runs`` must be narrowed to one, e.g. ``ds.isel(run=0)``).
        logger: anything :func:`as_logger` accepts.
        prefix: text put before every name (e.g. ``"sgd-0/"`` to export several runs into one
            logger).

    The scalars are those live logging sent (:func:`step_scalars` on the same variables and
    labels), plus the per-step values probes compute only at the end of the run (RSI/EB against
    the final iterate), which live logging cannot have. Returns the number of steps exported.
    """
    import xarray as xr

    from landscape.store import open_run

    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string or None, got {type(prefix).__name__}")
    log = as_logger(logger)
    if isinstance(runs, (str, os.PathLike)):
        ds = open_run(runs)
    elif isinstance(runs, xr.Dataset):
        ds = runs
    else:
        raise TypeError(f"export_scalars(runs, ...): pass a run's store path or its xarray Dataset (landscape.open_run), "
                        f"got {type(runs).__name__}")
    if "run" in ds.dims:
        if ds.sizes["run"] != 1:
            raise ValueError(f"the dataset holds {ds.sizes['run']} runs: export one at a time, e.g. "
                             "export_scalars(ds.isel(run=i), logger, prefix=f'{ds.run.values[i]}/')")
        ds = ds.isel(run=0)
    if "step" not in ds.dims:
        return 0
    names = [n for n in ds.data_vars if ds[n].dims[:1] == ("step",)]
    coords = {str(d): [x.item() if hasattr(x, "item") else x for x in ds[d].values]
              for d in ds.coords if ds[d].dims == (d,) and d not in ("step", "sample")}
    by_probe: dict[str, list[str]] = {}
    for n in names:
        by_probe.setdefault(str(ds[n].attrs.get("probe", "")), []).append(n)
    steps = ds["step"].values
    exported = 0
    for lo in range(0, len(steps), _EXPORT_CHUNK):
        block = {n: np.asarray(ds[n].isel(step=slice(lo, lo + _EXPORT_CHUNK)).values) for n in names}
        for row in range(min(_EXPORT_CHUNK, len(steps) - lo)):
            values = _row_values(ds, block, by_probe, row)
            scalars = step_scalars(values, coords)
            if not scalars:
                continue
            if prefix:
                scalars = {prefix + k: v for k, v in scalars.items()}
            log(scalars, int(steps[lo + row]))
            exported += 1
    flush = getattr(log, "flush", None)
    if callable(flush):
        flush()
    return exported


def _row_values(ds: Any, block: dict[str, np.ndarray], by_probe: dict[str, list[str]], row: int) -> dict[str, Var]:
    """One step's variables as live logging saw them. The store fills integer and boolean
    variables with -1/False at steps where their probe did not run: those are left out (a probe
    ran when any of its float variables has a value at that step; the recorder's always do)."""
    values: dict[str, Var] = {}
    for probe, members in by_probe.items():
        ran = probe == "recorder" or any(
            block[n].dtype.kind == "f" and not np.all(np.isnan(block[n][row])) for n in members)
        for n in members:
            data = block[n][row]
            if block[n].dtype.kind != "f" and not ran:
                continue
            values[n] = Var(tuple(ds[n].dims[1:]), data, dict(ds[n].attrs))
    return values
