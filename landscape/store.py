"""Layer 5: one zarr store per run, appended step by step, readable after a crash.

Writing. Arrays are created by zarr (uncompressed, little-endian, C order) with room for more
rows than written; each row is written by a background thread as raw chunk files (temp file +
rename, so a chunk is either old or new, never torn), and a step becomes visible only when the
atomic commit record ``commit.json`` says so. A ``kill -9`` therefore leaves every committed
step readable; what was queued but not committed is lost (``RunWriter.flush`` waits for it).
At close the arrays are trimmed to the committed rows, so a closed run is a plain zarr store.

Reading. :func:`open_run` checks the schema version and returns the committed rows as an
``xarray.Dataset``; :func:`open_runs` concatenates runs lazily (dask) along ``run``.
"""
from __future__ import annotations

import contextlib
import glob as _glob
import json
import os
import queue
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import xarray as xr
import zarr

from landscape.schema import SCHEMA_VERSION, Var, compatible

COMMIT = ".landscape-commit.json"  # a dot name: zarr does not list it as a node
_COMMIT_BYTES = 256
_STEP_ATTRS = {"long_name": "optimizer step", "units": "1"}
TRAJECTORY = "trajectory"
_BIG_ROW = 4096  # rows with at least this many elements get a chunk (and a file) each
_CHUNK_BYTES = 64 * 1024  # target chunk size for small rows


class StoreError(Exception):
    """A store that cannot be created or read, with what to do about it."""


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """zarr notes our commit record as a non-zarr object when it lists a group: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        yield


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    """Attrs must be JSON: convert numpy scalars/arrays, tuples, paths; repr() the rest."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _storage_dtype(value: np.ndarray) -> np.dtype:
    if value.dtype == np.bool_:
        return np.dtype(bool)
    if np.issubdtype(value.dtype, np.integer):
        return np.dtype("<i8")
    if value.size >= _BIG_ROW:
        return np.dtype("<f4")  # trajectory vectors: float32 halves the bytes
    return np.dtype("<f8")


def _fill(dtype: np.dtype) -> Any:
    if dtype == np.bool_:
        return False
    if np.issubdtype(dtype, np.integer):
        return -1
    return np.nan


@dataclass
class _Column:
    """One array's row writer. Rows of small arrays are written in place (``pwrite``) into a
    chunk file created full of fill values: bytes of committed rows are never rewritten, so a
    kill cannot tear them. Big rows get a fresh chunk file each, invisible until committed."""

    array: zarr.Array
    dir: Path
    rest: tuple[int, ...]
    dtype: np.dtype
    chunk_rows: int
    fd: int = -1
    fd_chunk: int = -1

    def key(self, chunk: int) -> Path:
        return self.dir.joinpath("c", str(chunk), *(["0"] * len(self.rest)))

    def write(self, row: int, value: np.ndarray) -> None:
        data = np.ascontiguousarray(np.asarray(value, dtype=self.dtype).reshape(self.rest))
        chunk = row // self.chunk_rows
        path = self.key(chunk)
        if self.chunk_rows == 1:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.write(memoryview(data).cast("B"))
            return
        if self.fd_chunk != chunk:
            self.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                blank = np.full((self.chunk_rows, *self.rest), _fill(self.dtype), dtype=self.dtype)
                _atomic_write(path, memoryview(blank).cast("B"))
            self.fd, self.fd_chunk = os.open(path, os.O_WRONLY), chunk
        os.pwrite(self.fd, memoryview(data).cast("B"), (row % self.chunk_rows) * data.nbytes)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.fd_chunk = -1, -1


class _Table:
    """Rows appended along one dim (``step`` or ``record``) of a zarr group."""

    def __init__(self, group: zarr.Group, root: Path, row_dim: str, rows: int = 0, capacity: int = 1024) -> None:
        self.group, self.root, self.row_dim = group, root, row_dim
        self.rows = rows
        self.columns: dict[str, _Column] = {}
        self.capacity = capacity
        for name, arr in group.arrays():
            dims = tuple(arr.metadata.dimension_names or ())
            if dims and dims[0] == row_dim:
                self.columns[name] = _Column(arr, root / name, tuple(arr.shape[1:]), np.dtype(arr.dtype), arr.chunks[0])
                self.capacity = max(self.capacity, arr.shape[0])

    def ensure(self, name: str, dims: tuple[str, ...], value: np.ndarray, attrs: dict[str, Any]) -> _Column:
        col = self.columns.get(name)
        if col is not None:
            if tuple(value.shape) != col.rest:
                raise ValueError(f"{name}: row shape changed from {col.rest} to {value.shape}")
            return col
        if len(dims) != value.ndim:
            raise ValueError(f"{name}: dims {dims} do not match a value of shape {value.shape}")
        dtype = _storage_dtype(value)
        per_row = max(1, int(np.prod(value.shape)))
        chunk_rows = 1 if per_row >= _BIG_ROW else max(1, min(1024, _CHUNK_BYTES // (per_row * dtype.itemsize)))
        arr = self.group.create_array(
            name, shape=(self.capacity, *value.shape), chunks=(chunk_rows, *value.shape), dtype=dtype,
            fill_value=_fill(dtype), compressors=None, filters=None,
            dimension_names=(self.row_dim, *dims), attributes=_jsonable(attrs),
        )
        col = self.columns[name] = _Column(arr, self.root / name, tuple(value.shape), dtype, chunk_rows)
        return col

    def write_row(self, values: dict[str, Var]) -> None:
        row = self.rows
        if row >= self.capacity:
            self.capacity *= 2
            for col in self.columns.values():
                col.array.resize((self.capacity, *col.rest))
        for name, v in values.items():
            value = np.asarray(v.data)
            self.ensure(name, v.dims, value, v.attrs).write(row, value)
        self.rows = row + 1

    def trim(self) -> None:
        for col in self.columns.values():
            col.close()
            if col.array.shape[0] != self.rows:
                col.array.resize((self.rows, *col.rest))
        self.capacity = self.rows


@dataclass
class _Record:
    step: int
    values: dict[str, Var]
    trajectory: dict[str, Var] | None = None
    done: threading.Event | None = field(default=None)


class RunWriter:
    """Streams one run to ``path``: per-step rows, trajectory vectors and final results.

    ``append`` only enqueues (the training thread does no I/O); a bounded queue keeps memory
    O(d) even if the disk is slow. Write errors are kept, warned once, and never raised into
    training.
    """

    def __init__(self, path: str | os.PathLike[str], attrs: dict[str, Any], *, overwrite: bool = False,
                 resume: bool = False, queue_size: int = 8) -> None:
        self.path = Path(path)
        if overwrite and resume:
            raise ValueError("overwrite=True and resume=True contradict each other: pick one")
        exists = self.path.exists()
        if exists and not (overwrite or resume):
            raise FileExistsError(
                f"store {self.path} already exists: pass overwrite=True to replace it, resume=True to "
                "continue it, or choose another path"
            )
        if resume and not exists:
            raise FileNotFoundError(f"resume=True but there is no store at {self.path}")
        if exists and overwrite:
            if self.path.is_dir() and not (self.path / "zarr.json").exists() and any(self.path.iterdir()):
                raise StoreError(f"refusing to overwrite {self.path}: it is a non-empty folder that is not a zarr store")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.errors: list[str] = []
        self._warned = False
        if resume:
            self._check_readable()
            self.root = zarr.open_group(str(self.path), mode="r+")
            commit = _read_commit(self.path)
            self.step0 = int(commit["step0"])
            self.root.attrs.update(_jsonable({k: v for k, v in attrs.items() if k not in ("run",)}))
        else:
            self.root = zarr.open_group(str(self.path), mode="w", zarr_format=3)
            self.root.attrs.update(_jsonable({"landscape_schema": SCHEMA_VERSION, **attrs}))
            commit = {"rows": 0, "records": 0, "step0": None}
            self.step0 = None
        with _quiet_zarr():
            self.traj_group = self.root.require_group(TRAJECTORY)
            self.steps = _Table(self.root, self.path, "step", int(commit["rows"]))
            self.records = _Table(self.traj_group, self.path / TRAJECTORY, "record", int(commit["records"]))
        for table in (self.steps, self.records):  # the row coordinate exists even before the first row
            table.ensure("step", (), np.zeros((), np.int64), _STEP_ATTRS)
        if not resume:
            _atomic_write(self.path / COMMIT, b" " * _COMMIT_BYTES)
        self._commit_fd = os.open(self.path / COMMIT, os.O_WRONLY)
        if not resume:
            self._commit(closed=False)
        self._queue: queue.Queue[_Record | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name=f"landscape-writer:{self.path.name}", daemon=True)
        self._thread.start()
        self.closed = False

    def _check_readable(self) -> None:
        open_run(self.path)  # raises a StoreError that says what is wrong

    # -- the writer thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            rec = self._queue.get()
            if rec is None:
                self._queue.task_done()
                return
            try:
                self._write(rec)
            except Exception as exc:  # never raised into training
                self.errors.append(f"step {rec.step}: {type(exc).__name__}: {exc}")
            finally:
                if rec.done is not None:
                    rec.done.set()
                self._queue.task_done()

    def _write(self, rec: _Record) -> None:
        if self.step0 is None:
            self.step0 = rec.step
        if rec.step - self.step0 != self.steps.rows:
            raise StoreError(f"step {rec.step} out of order: the store expects step {self.step0 + self.steps.rows}")
        step = Var((), np.int64(rec.step), _STEP_ATTRS)
        self.steps.write_row({"step": step, **rec.values})
        if rec.trajectory:
            self.records.write_row({"step": step, **rec.trajectory})
        self._commit(closed=False)

    def _commit(self, closed: bool) -> None:
        # One fixed-width pwrite: a killed process leaves either the old record or the new one.
        text = json.dumps({"rows": self.steps.rows, "records": self.records.rows, "step0": self.step0, "closed": closed})
        os.pwrite(self._commit_fd, text.encode().ljust(_COMMIT_BYTES), 0)

    # -- the training thread ------------------------------------------------------------------
    def append(self, step: int, values: dict[str, Var], trajectory: dict[str, Var] | None = None) -> None:
        """Queue one step's row (and its trajectory vectors). Never raises a write error."""
        if self.closed:
            raise StoreError(f"store {self.path} is closed")
        self._warn_errors()
        self._queue.put(_Record(step, values, trajectory))

    def flush(self) -> None:
        """Wait until everything queued is committed."""
        self._queue.join()
        self._warn_errors()

    def _warn_errors(self) -> None:
        if self.errors and not self._warned:
            self._warned = True
            warnings.warn(f"landscape could not write to {self.path}: {self.errors[0]} (training goes on; "
                          f"see RunWriter.errors)", RuntimeWarning, stacklevel=3)

    @property
    def rows(self) -> int:
        return self.steps.rows

    def trajectory_rows(self) -> int:
        return self.records.rows

    # -- after training -------------------------------------------------------------------------
    def iter_trajectory(self, names: Sequence[str], max_bytes: int = 128 * 2**20) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield ``(steps, {name: rows})`` blocks of the trajectory, a few MB at a time."""
        self.flush()
        n = self.records.rows
        if n == 0:
            return
        cols = {name: self.records.columns[name].array for name in names if name in self.records.columns}
        per_row = sum(int(np.prod(a.shape[1:])) * 4 for a in cols.values()) or 1
        block = max(1, max_bytes // per_row)
        steps = self.records.columns["step"].array
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            yield np.asarray(steps[lo:hi]), {k: np.asarray(a[lo:hi]) for k, a in cols.items()}

    def write_dataset(self, ds: xr.Dataset) -> None:
        """Write finalize results: variables over a subset of steps are placed on their rows."""
        self.flush()
        steps = np.asarray(self.steps.columns["step"].array[: self.steps.rows]) if "step" in self.steps.columns else np.zeros(0, np.int64)
        with _quiet_zarr():
            for name, da in ds.variables.items():
                if name == "step":
                    continue
                data = np.asarray(da.values)
                dims = tuple(da.dims)
                if "step" in dims:
                    if dims[0] != "step":
                        da = da.transpose("step", ...)
                        dims, data = tuple(da.dims), np.asarray(da.values)
                    rows = np.searchsorted(steps, np.asarray(ds["step"].values))
                    if np.any(rows >= len(steps)) or np.any(steps[np.minimum(rows, len(steps) - 1)] != ds["step"].values):
                        raise StoreError(f"{name}: results for steps that were never recorded")
                    full = np.full((len(steps), *data.shape[1:]), _fill(np.dtype(data.dtype) if data.dtype != np.bool_ else np.dtype(bool)),
                                   dtype=data.dtype if data.dtype.kind in "fbi" else np.float64)
                    full[rows] = data
                    data = full
                if name in self.root:
                    del self.root[name]
                attrs = _jsonable(dict(da.attrs))
                if data.dtype.kind in "OU":  # labels: zarr's variable-length UTF-8 strings (a specified v3 type)
                    arr = self.root.create_array(name, shape=data.shape, dtype=str, dimension_names=dims, attributes=attrs)
                    arr[...] = data.astype(str)
                    continue
                self.root.create_array(name, data=data, dimension_names=dims, attributes=attrs,
                                       chunks=data.shape if data.ndim else None, compressors=None)

    def set_attrs(self, **attrs: Any) -> None:
        """Update dataset attrs (JSON-able)."""
        self.root.attrs.update(_jsonable(attrs))

    def close(self) -> None:
        """Commit everything, trim the arrays to the committed rows, stop the writer."""
        if self.closed:
            return
        self.flush()
        self._queue.put(None)
        self._thread.join()
        self.closed = True
        try:
            self.steps.trim()
            self.records.trim()
            self._commit(closed=True)
        except Exception as exc:
            self.errors.append(f"close: {type(exc).__name__}: {exc}")
        finally:
            os.close(self._commit_fd)
        self._warn_errors()


# -- reading ------------------------------------------------------------------------------------


def _read_commit(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / COMMIT).read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} has no {COMMIT}: it was not written by landscape.attach") from None
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}/{COMMIT} is corrupt ({exc})") from None


def _check_store(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise StoreError(f"no run store at {path}")
    if not (path / "zarr.json").exists():
        raise StoreError(f"{path} is not a zarr v3 store (no zarr.json): open_run reads stores written by landscape.attach")
    attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    version = attrs.get("landscape_schema")
    if version is None:
        raise StoreError(f"{path} is a zarr store but not a landscape run (no 'landscape_schema' attribute)")
    if not compatible(version):
        raise StoreError(
            f"{path} uses landscape schema {version}, this landscape reads {SCHEMA_VERSION.split('.')[0]}.x: "
            "open it with the landscape version that wrote it, or re-record the run"
        )
    return _read_commit(path)


def _open_group(path: Path, group: str | None, chunks: Any) -> xr.Dataset:
    with _quiet_zarr():
        return xr.open_zarr(str(path), group=group, consolidated=False, chunks=chunks, mask_and_scale=False,
                            decode_times=False, zarr_format=3)


def open_run(path: str | os.PathLike[str], *, chunks: Any = None) -> xr.Dataset:
    """The committed part of one run as an ``xarray.Dataset`` (lazy; ``chunks={}`` for dask).

    Works on a run that is still being written or was killed: only committed steps are shown.
    """
    path = Path(path)
    commit = _check_store(path)
    ds = _open_group(path, None, chunks)
    if "step" in ds.dims:
        ds = ds.isel(step=slice(0, int(commit["rows"])))
    ds.attrs["store_path"] = str(path)
    ds.attrs["closed"] = bool(commit.get("closed", False))
    return ds


def open_trajectory(path: str | os.PathLike[str], *, chunks: Any = None) -> xr.Dataset:
    """The recorded trajectory vectors (params, gradients, updates, probe-batch gradients)."""
    path = Path(path)
    commit = _check_store(path)
    ds = _open_group(path, TRAJECTORY, chunks)
    if "record" in ds.dims:
        ds = ds.isel(record=slice(0, int(commit["records"])))
    return ds


def _expand(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        found = sorted(_glob.glob(str(paths)))
        if not found:
            raise StoreError(f"no run store matches {paths!s}")
        return [Path(p) for p in found]
    out = [Path(p) for p in paths]
    if not out:
        raise StoreError("open_runs got an empty list of paths")
    return out


def open_runs(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> xr.Dataset:
    """Many runs as one lazy dataset with dims ``run``, ``step``, ...

    ``run`` is labelled by the store's name; ``optimizer``, ``seed`` and every other scalar of
    the ``run=`` metadata become coordinates along ``run``. Runs of different lengths are padded
    with NaN.
    """
    runs = []
    for p in _expand(paths):
        ds = open_run(p, chunks={})
        meta = ds.attrs.get("run", {}) or {}
        name = p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name
        ds = ds.expand_dims(run=[name])
        for key in ("optimizer", "seed"):
            ds = ds.assign_coords({key: ("run", [meta.get(key, np.nan if key == "seed" else "")])})
        for key, value in meta.items():
            if key not in ("optimizer", "seed") and isinstance(value, (int, float, str, bool)):
                ds = ds.assign_coords({key: ("run", [value])})
        ds.attrs = {"landscape_schema": ds.attrs["landscape_schema"]}
        runs.append(ds)
    out = xr.concat(runs, dim="run", join="outer", combine_attrs="drop_conflicts", coords="different",
                    compat="equals", data_vars="all", fill_value=np.nan)
    return out


def to_netcdf(ds_or_path: xr.Dataset | str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Export a run (or any dataset from :func:`open_run`/:func:`open_runs`) to one netCDF4 file.

    Nested attrs are stored as JSON strings, booleans as int8 (netCDF has no bool).
    """
    ds = open_run(ds_or_path) if not isinstance(ds_or_path, xr.Dataset) else ds_or_path
    ds = ds.load().copy()

    def flat(attrs: dict[str, Any]) -> dict[str, Any]:
        return {k: (json.dumps(_jsonable(v)) if isinstance(v, (dict, list, tuple)) or v is None or isinstance(v, bool) else v)
                for k, v in attrs.items()}

    for name in list(ds.variables):
        v = ds[name]
        if v.dtype == np.bool_:
            ds[name] = v.astype(np.int8)
        elif v.dtype == object:
            ds[name] = v.astype(str)
        ds[name].attrs = flat(dict(v.attrs))
        ds[name].encoding = {}
    ds.attrs = flat(dict(ds.attrs))
    out = Path(out)
    ds.to_netcdf(out, engine="h5netcdf")
    return out
