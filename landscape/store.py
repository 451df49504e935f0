"""Layer 5: one zarr store per run, appended step by step, readable after a crash.

Writing. Arrays are plain zarr v3 arrays (uncompressed, little-endian, C order) with room for
more rows than written; a background thread writes each row in place into preallocated
multi-row chunk files (bytes of committed rows are never rewritten), and a step becomes visible
only when the atomic commit record ``.landscape-commit.json`` says so. A ``kill -9`` therefore leaves every committed
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
import shutil
import struct
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import xarray as xr

from landscape.schema import READABLE_MAJORS, SCHEMA_VERSION, UPDATE_FROM_PARAMS, Unwritten, Var, compatible

COMMIT = ".landscape-commit.json"  # a dot name: zarr does not list it as a node
_COMMIT_BYTES = 256
_STEP_ATTRS = {"long_name": "optimizer step", "units": "1"}
TRAJECTORY = "trajectory"
_BIG_ROW = 4096  # rows with at least this many elements are trajectory-sized vectors
_SMALL_CHUNK_BYTES = 64 * 1024  # chunk size for per-step scalars and small vectors
_BIG_CHUNK_BYTES = 4 * 1024 * 1024  # chunk size for trajectory vectors (at least one row)
_MAX_CHUNK_ROWS = 1024
_INITIAL_CAPACITY = 1024
_ZARR_DTYPE = {"<f4": "float32", "<f8": "float64", "<i8": "int64", "|i1": "int8", "|b1": "bool"}


class StoreError(Exception):
    """A store that cannot be created or read, with what to do about it."""


@contextlib.contextmanager
def _quiet_zarr() -> Iterator[None]:
    """zarr notes our commit record as a non-zarr object when it lists a group: expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        yield


def _write_file(path: str | Path, data: bytes | memoryview) -> None:
    """Create (or truncate) ``path`` and write ``data``: os calls, no Python file object."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{threading.get_ident()}.tmp")
    _write_file(tmp, data)
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    """Attrs must be JSON: convert numpy scalars/arrays, tuples, paths; repr() the rest."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
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
    if value.dtype == np.int8:
        return np.dtype("i1")  # flags
    if np.issubdtype(value.dtype, np.integer):
        return np.dtype("<i8")
    if value.size >= _BIG_ROW or value.dtype == np.float32 and value.ndim > 0:
        return np.dtype("<f4")  # trajectory vectors: float32 halves the bytes
    return np.dtype("<f8")


def _result_dtype(data: np.ndarray) -> np.dtype:
    """Finalize results keep their precision (float32 stays float32, the rest float64)."""
    if data.dtype.kind in "OU":
        return np.dtype(object)  # labels: zarr's variable-length UTF-8 strings
    if data.dtype == np.bool_ or data.dtype == np.int8:
        return np.dtype(data.dtype.str)
    if data.dtype.kind in "iu":
        return np.dtype("<i8")
    return np.dtype("<f4") if data.dtype.kind == "f" and data.dtype.itemsize <= 4 else np.dtype("<f8")


def _vlen_utf8(data: np.ndarray) -> bytes:
    """Zarr's ``vlen-utf8`` codec: element count, then (length, UTF-8 bytes) per element, C order."""
    items = [str(x).encode() for x in data.ravel()]
    return b"".join([struct.pack("<I", len(items)), *(struct.pack("<I", len(b)) + b for b in items)])


def _fill(dtype: np.dtype) -> Any:
    if dtype == np.bool_:
        return False
    if np.issubdtype(dtype, np.integer):
        return -1
    return np.nan


def _json(meta: dict[str, Any]) -> bytes:
    # no indent: json's C encoder runs only without one (4x faster on our metadata)
    return json.dumps(meta).encode()


def _write_group_meta(path: Path, attrs: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    meta = {"attributes": attrs, "zarr_format": 3, "node_type": "group"}
    _atomic_write(path / "zarr.json", _json(meta))


def _write_array_meta(path: Path, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: np.dtype,
                      dims: tuple[str, ...], attrs: dict[str, Any], mkdir: bool = True) -> None:
    """Zarr v3 metadata of an uncompressed C-order array: the store stays a plain zarr store that
    zarr/xarray read, while rows are written as raw chunk bytes without zarr's machinery (which
    costs milliseconds per call: too much for a per-step writer). ``mkdir=False``: the folder
    exists."""
    strings = dtype.kind in "OU"
    fill = "" if strings else _fill(dtype)
    if strings:
        codecs: list[dict[str, Any]] = [{"name": "vlen-utf8", "configuration": {}}]
    else:
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}} if dtype.itemsize > 1 else {"name": "bytes"}]
    meta: dict[str, Any] = {
        "shape": list(shape),
        "data_type": "string" if strings else _ZARR_DTYPE[dtype.str],
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks)}},
        # "." keys (c.12.0): one file per chunk and no directory per chunk to create
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": "NaN" if isinstance(fill, float) else fill,
        "codecs": codecs,
        "attributes": _jsonable(attrs),
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }
    if dims:
        meta["dimension_names"] = list(dims)
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    _atomic_write(path / "zarr.json", _json(meta))


def _chunk_rows(rest: tuple[int, ...], dtype: np.dtype) -> int:
    row_bytes = max(1, int(np.prod(rest))) * dtype.itemsize
    target = _BIG_CHUNK_BYTES if int(np.prod(rest)) >= _BIG_ROW else _SMALL_CHUNK_BYTES
    return max(1, min(_MAX_CHUNK_ROWS, target // row_bytes))


class _Column:
    """Rows of one array, written in place (``pwrite``) into preallocated multi-row chunk files.

    Chunk files always have their full size, so zarr can read them at any moment; bytes of
    committed rows are never rewritten, so a kill cannot tear them. Chunks of small rows are
    created full of the fill value (rows where the variable is absent read as NaN / -1); chunks
    of trajectory vectors are created sparse (``ftruncate``) and absent rows are filled
    explicitly, which avoids writing every vector twice.
    """

    def __init__(self, dir: Path, rest: tuple[int, ...], dtype: np.dtype, chunk_rows: int,
                 dims: tuple[str, ...], attrs: dict[str, Any]) -> None:
        self.dir, self.rest, self.dtype, self.chunk_rows = dir, rest, dtype, chunk_rows
        self.dims, self.attrs = dims, attrs  # dims after the row dim
        self.capacity = 0  # rows the metadata declares
        self.row_bytes = max(1, int(np.prod(rest))) * dtype.itemsize
        self.big = int(np.prod(rest)) >= _BIG_ROW
        self.fill_row = np.full(rest, _fill(dtype), dtype=dtype).tobytes()
        self.fd, self.fd_chunk = -1, -1
        self._key_prefix, self._key_suffix = os.path.join(dir, "c."), ".0" * len(rest)

    @classmethod
    def load(cls, dir: Path) -> "_Column | None":
        try:
            meta = json.loads((dir / "zarr.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("node_type") != "array" or meta.get("data_type") not in _ZARR_DTYPE.values():
            return None
        dtype = np.dtype({v: k for k, v in _ZARR_DTYPE.items()}[meta["data_type"]])
        col = cls(dir, tuple(meta["shape"][1:]), dtype, meta["chunk_grid"]["configuration"]["chunk_shape"][0],
                  tuple(meta.get("dimension_names") or ()), meta.get("attributes", {}))
        col.capacity = int(meta["shape"][0]) if meta["shape"] else 0
        return col

    def key(self, chunk: int) -> str:
        # a string: pathlib's joins cost more than the reads they name
        return f"{self._key_prefix}{chunk}{self._key_suffix}"

    def _open(self, chunk: int) -> None:
        self.close()
        path = self.key(chunk)
        if not os.path.exists(path):
            if self.big:  # sparse: its blocks are allocated as rows are written
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                try:
                    os.ftruncate(fd, self.chunk_rows * self.row_bytes)
                finally:
                    os.close(fd)
            else:
                _atomic_write(path, self.fill_row * self.chunk_rows)
        self.fd, self.fd_chunk = os.open(path, os.O_WRONLY), chunk

    def _offset(self, row: int) -> int:
        """Open the chunk holding ``row`` (if not open yet) and return the row's byte offset."""
        chunk, r0 = divmod(row, self.chunk_rows)
        if self.fd_chunk != chunk:
            self._open(chunk)
        return r0 * self.row_bytes

    def write(self, row: int, data: bytes | memoryview) -> None:
        """Write one or more consecutive rows (within one chunk) starting at ``row``."""
        offset = self._offset(row)  # before reading self.fd: it may open the chunk
        os.pwrite(self.fd, data, offset)

    def write_run(self, row: int, values: list[Any]) -> None:
        """Consecutive rows (within one chunk) from ``row`` on: small rows are packed into one
        buffer, vectors are handed to one ``pwritev`` as they are (no extra copy)."""
        if self.big:
            bufs = []
            for value in values:
                data = np.ascontiguousarray(value, dtype=self.dtype)
                if data.shape != self.rest:
                    raise ValueError(f"{self.dir.name}: row shape changed from {self.rest} to {data.shape}")
                bufs.append(memoryview(data).cast("B"))
            offset = self._offset(row)
            os.pwritev(self.fd, bufs, offset)
            return
        data = np.asarray(values, dtype=self.dtype) if not self.rest else np.stack([np.asarray(v, dtype=self.dtype) for v in values])
        if data.shape[1:] != self.rest:
            raise ValueError(f"{self.dir.name}: row shape changed from {self.rest} to {data.shape[1:]}")
        self.write(row, memoryview(np.ascontiguousarray(data)).cast("B"))

    def read(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [lo, hi) straight from the chunk files (into ``out``, C-contiguous, if given)."""
        if out is None:
            out = np.empty((hi - lo, *self.rest), dtype=self.dtype)
        elif not out.flags.c_contiguous or out.dtype != self.dtype:  # reshape would read into a copy
            raise ValueError(f"{self.dir.name}: read into a C-contiguous {self.dtype} array, got {out.dtype} {out.strides}")
        flat = memoryview(out.reshape(-1).view(np.uint8))
        row = lo
        while row < hi:
            chunk, r0 = divmod(row, self.chunk_rows)
            n = min(hi - row, self.chunk_rows - r0)
            at = (row - lo) * self.row_bytes
            fd = os.open(self.key(chunk), os.O_RDONLY)
            try:  # one copy: file cache -> out
                got = os.preadv(fd, [flat[at:at + n * self.row_bytes]], r0 * self.row_bytes)
            finally:
                os.close(fd)
            if got != n * self.row_bytes:
                raise StoreError(f"{self.key(chunk)}: short read ({got} of {n * self.row_bytes} bytes)")
            row += n
        return out

    def truncate_to(self, rows: int) -> None:
        """Forget rows >= ``rows``: fill them in the last chunk, delete later chunks."""
        self.close()
        last = (rows - 1) // self.chunk_rows if rows else -1
        for entry in self.dir.glob("c.*"):
            index = entry.name.split(".")[1]
            if index.isdigit() and int(index) > last:
                entry.unlink()
        # Small rows may be absent from later steps and must read as fill; vector rows are
        # always written (data or fill) before a commit, so their tails can stay sparse.
        if not self.big and rows and rows % self.chunk_rows and os.path.exists(self.key(last)):
            r0 = rows % self.chunk_rows
            fd = os.open(self.key(last), os.O_WRONLY)
            try:
                os.pwrite(fd, self.fill_row * (self.chunk_rows - r0), r0 * self.row_bytes)
            finally:
                os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.fd_chunk = -1, -1


class _Table:
    """Rows appended along one dim (``step`` or ``record``) of a zarr group."""

    def __init__(self, root: Path, row_dim: str, rows: int = 0) -> None:
        self.root, self.row_dim, self.rows = root, row_dim, rows
        self.columns: dict[str, _Column] = {}
        self.capacity = max(_INITIAL_CAPACITY, rows)
        self.torn = False  # a failed write_rows may have left bytes past self.rows
        for sub in sorted(root.iterdir()) if root.exists() else []:
            col = _Column.load(sub) if sub.is_dir() else None
            if col is not None and col.dims and col.dims[0] == row_dim:
                col.dims = col.dims[1:]
                col.truncate_to(rows)  # rows written but never committed before a kill
                self.columns[sub.name] = col
                self.capacity = max(self.capacity, col.capacity)
        for col in self.columns.values():
            if col.chunk_rows < _chunk_rows(col.rest, col.dtype):
                self._rechunk(col)

    def ensure(self, name: str, dims: tuple[str, ...], value: np.ndarray, attrs: dict[str, Any]) -> _Column:
        col = self.columns.get(name)
        if col is not None:
            return col
        if len(dims) != value.ndim:
            raise ValueError(f"{name}: dims {dims} do not match a value of shape {value.shape}")
        dtype = _storage_dtype(value)
        rest = tuple(int(n) for n in value.shape)
        col = _Column(self.root / name, rest, dtype, _chunk_rows(rest, dtype), dims, attrs)
        self._write_meta(col, self.capacity)
        if col.big:
            for r in range(self.rows):  # a vector that appears late: earlier rows read as NaN
                col.write(r, col.fill_row)
        self.columns[name] = col
        return col

    def _write_meta(self, col: _Column, rows: int) -> None:
        _write_array_meta(col.dir, (rows, *col.rest), (col.chunk_rows, *col.rest), col.dtype,
                          (self.row_dim, *col.dims), col.attrs, mkdir=not col.capacity)  # a new column: its folder
        col.capacity = rows

    def write_rows(self, rows: list[dict[str, Var]]) -> None:
        """Append rows; a variable's consecutive rows in one chunk go out in one ``pwritev``."""
        if not rows:
            return
        start = self.rows
        self.torn = True
        if start + len(rows) > self.capacity:
            self.capacity = max(2 * self.capacity, start + len(rows))
            for col in self.columns.values():
                self._write_meta(col, self.capacity)
        names = dict.fromkeys(name for values in rows for name in values)
        for name in names:
            col = None
            run: list[Any] = []
            run_start = -1
            for i, values in enumerate(rows):
                v = values.get(name)
                if v is None:
                    continue
                row = start + i
                if col is None:
                    value = (np.empty(v.data.shape, v.data.dtype) if isinstance(v.data, Unwritten)
                             else v.data if isinstance(v.data, np.ndarray) else np.asarray(v.data))
                    col = self.ensure(name, v.dims, value, v.attrs)
                if isinstance(v.data, Unwritten):  # readers derive it: no bytes, no fill
                    continue
                if run and (row != run_start + len(run) or row // col.chunk_rows != run_start // col.chunk_rows):
                    col.write_run(run_start, run)
                    run = []
                if not run:
                    run_start = row
                run.append(v.data)
            if col is not None and run:
                col.write_run(run_start, run)
        for name, col in self.columns.items():  # vectors are written explicitly where absent
            if col.big:
                for i, values in enumerate(rows):
                    if name not in values:
                        col.write(start + i, col.fill_row)
        self.rows = start + len(rows)
        self.torn = False

    def read(self, name: str, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        return self.columns[name].read(lo, hi, out)

    def trim(self) -> None:
        """Shape the arrays to the committed rows. An array that fits in its first chunk gets a
        chunk of exactly its rows (the file's prefix is that chunk), so short runs and rare
        probes do not leave preallocated megabytes behind."""
        for col in self.columns.values():
            if self.torn:
                col.truncate_to(self.rows)
            else:  # nothing lies past self.rows: no chunk listing, no tail to fill
                col.close()
            if 0 < self.rows < col.chunk_rows:
                os.truncate(col.key(0), self.rows * col.row_bytes)
                col.chunk_rows = self.rows
                self._write_meta(col, self.rows)
            elif col.capacity != self.rows:
                self._write_meta(col, self.rows)
        self.capacity = self.rows

    def _rechunk(self, col: _Column) -> None:
        """Back to the natural chunking after a resume of a trimmed single-chunk array."""
        data = col.read(0, self.rows)
        col.truncate_to(0)
        col.chunk_rows = _chunk_rows(col.rest, col.dtype)
        self._write_meta(col, self.capacity)
        for lo in range(0, self.rows, col.chunk_rows):
            col.write_run(lo, list(data[lo:min(self.rows, lo + col.chunk_rows)]))

    def close(self) -> None:
        for col in self.columns.values():
            col.close()


@dataclass
class _Record:
    step: int
    values: dict[str, Var]
    trajectory: dict[str, Var] | None = None
    release: Callable[[], None] | None = None  # the arrays' owner may reuse them once written


class RunWriter:
    """Streams one run to ``path``: per-step rows, trajectory vectors and final results.

    ``append`` only enqueues (no I/O on the training thread). A background thread writes the
    queued steps in groups with one commit each (group commit): when ``batch_rows`` steps wait,
    when the queued vectors reach half of ``max_pending_bytes``, or ``max_delay`` seconds after
    the first queued step. So a step is committed within about ``max_delay`` of its
    ``optimizer.step()`` (what a ``kill -9`` can lose), and the writer wakes a few times a
    second instead of at every step. At most ``max_pending`` steps or ``max_pending_bytes`` of
    vectors wait besides the group being written (then ``append`` blocks), which keeps memory
    bounded when the disk is slow or the machine busy.
    ``max_delay=0`` commits every step as soon as the writer gets to it (a wake-up per step).
    Write errors are kept, warned once, and never raised into training.

    ``inline=True`` is for a caller with no core to spare for the writer thread (CPU training
    whose torch threads use every core): the caller writes the queued steps itself, between two
    of its steps, with :meth:`write_pending` (and ``append`` writes a full queue rather than wait).
    The thread then only commits what the caller left queued for ``2 * max_delay`` (a caller
    that stopped stepping), and takes over again when the caller sets ``inline`` back to False.
    """

    def __init__(self, path: str | os.PathLike[str], attrs: dict[str, Any], *, overwrite: bool = False,
                 resume: bool = False, batch_rows: int = 32, max_delay: float = 0.25, max_pending: int = 128,
                 max_pending_bytes: int = 8 * 2**20, inline: bool = False) -> None:
        self.path = Path(path)
        self.inline = inline
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
            commit = _read_commit(self.path)
            self.step0 = commit["step0"]
            self.attrs = json.loads((self.path / "zarr.json").read_text()).get("attributes", {})
            self.attrs.update(_jsonable({k: v for k, v in attrs.items() if k not in ("run",)}))
        else:
            commit = {"rows": 0, "records": 0, "step0": None}
            self.step0 = None
            self.attrs = _jsonable({"landscape_schema": SCHEMA_VERSION, **attrs})
        _write_group_meta(self.path, self.attrs)
        if not (self.path / TRAJECTORY / "zarr.json").exists():
            _write_group_meta(self.path / TRAJECTORY, {})
        self.steps = _Table(self.path, "step", int(commit["rows"]))
        self.records = _Table(self.path / TRAJECTORY, "record", int(commit["records"]))
        for table in (self.steps, self.records):  # the row coordinate exists even before the first row
            table.ensure("step", (), np.zeros((), np.int64), _STEP_ATTRS)
        if resume:
            self._forget_dangling_update()
        if not resume:
            _atomic_write(self.path / COMMIT, b" " * _COMMIT_BYTES)
        self._commit_fd = os.open(self.path / COMMIT, os.O_WRONLY)
        if not resume:
            self._commit(closed=False)
        self._cv = threading.Condition()
        self._pending: list[_Record] = []
        self._busy = False  # a thread holds a batch it took from _pending
        self._awaits_caller = False  # the writer thread waits for an inline write to end
        self._stop = False
        self._flushing = 0
        self._pending_bytes = 0
        self._first_pending = 0.0
        if max_delay < 0 or batch_rows < 1:
            raise ValueError(f"need max_delay >= 0 and batch_rows >= 1, got {max_delay} and {batch_rows}")
        self.max_pending, self.batch_rows, self.max_delay = max_pending, batch_rows, float(max_delay)
        self.max_pending_bytes = max_pending_bytes
        self._thread = threading.Thread(target=self._run, name=f"landscape-writer:{self.path.name}", daemon=True)
        self._thread.start()
        self.closed = False

    def _check_readable(self) -> None:
        open_run(self.path)  # raises a StoreError that says what is wrong

    # -- the writer thread --------------------------------------------------------------------
    def _group_due(self, rows: int, wait: float) -> bool:
        """Whether the queue makes a group: ``rows`` steps, half the byte budget, or its oldest
        step ``wait`` seconds old."""
        return (len(self._pending) >= rows or self._pending_bytes >= self.max_pending_bytes // 2
                or time.monotonic() - self._first_pending >= wait)

    def _thread_wait(self) -> float:
        """How long a step may wait for this thread (an inline caller gets the first
        ``max_delay``, this thread the second)."""
        return 2 * self.max_delay if self.inline else self.max_delay

    def _due(self) -> bool:
        if self._busy:  # the inline caller is writing a group; it notifies when done
            return False
        if self._stop:
            return True
        if not self._pending:
            return False
        return self._flushing > 0 or self._group_due(self.max_pending if self.inline else self.batch_rows, self._thread_wait())

    def _run(self) -> None:
        # Lowest priority for this thread once it has written its first group: it then runs when
        # a core is free instead of preempting torch's threads mid-step (A/B on 2 cores: about 6 %
        # of a digits-CNN step with every-step vectors); if training saturates the machine the
        # queue fills and append() waits, which hands the writer its turn. The first group, which
        # creates the arrays (a few dozen files), goes at normal priority: at nice 19 each of its
        # syscalls waited for a free core, and it took 0.3-0.5 s instead of 8 ms while the
        # queue, and the step buffers the recorder lends to it, piled up.
        lowered = not sys.platform.startswith("linux")
        while True:
            with self._cv:
                # Appends do not wake this thread (except for a full group): on a 2-core machine a
                # wake-up preempts one of torch's threads mid-step, which measured several percent
                # of a small model's training time when it happened once per step or two.
                while not self._due():
                    if self._busy:  # the inline caller writes: it wakes this thread when done
                        self._awaits_caller = True
                        self._cv.wait()
                        self._awaits_caller = False
                    elif not self._pending:
                        # idle: a periodic look (the first append does not notify) or, with
                        # max_delay 0, sleep until an append notifies
                        self._cv.wait(self.max_delay if self.max_delay > 0 else None)
                    else:
                        self._cv.wait(max(0.0, self._first_pending + self._thread_wait() - time.monotonic()))
                batch = self._take()
                if not batch and self._stop:
                    return
                self._cv.notify_all()  # appenders blocked on a full queue
            self._write_taken(batch, wake=True)
            if not lowered and batch:
                lowered = True
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)

    def _take(self) -> list[_Record]:
        """The queued steps, for the caller to write (under ``_cv``, not ``_busy``)."""
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        self._busy = bool(batch)
        return batch

    def _write_taken(self, batch: list[_Record], wake: bool) -> None:
        try:
            self._write_batch(batch)
        finally:
            for rec in batch:  # written (or given up on): the arrays are not read again
                if rec.release is not None:
                    rec.release()
            with self._cv:
                self._busy = False
                # An inline write wakes only who waits for it. Waking the idle writer thread
                # after every group (it then wants the GIL the training thread holds) cost
                # (a) of benchmarks/bench_spine.py about 1 % on 2 cores: 1.092x against 1.083x.
                if wake or self._flushing or self._awaits_caller:
                    self._cv.notify_all()

    def write_pending(self, due_only: bool = False) -> float:
        """Write the queued steps now, on the calling thread (``inline`` mode; any thread may
        call it). Nothing happens while the writer thread writes a group (it takes the rest
        after), or with ``due_only`` while the queue is short of a group and younger than
        ``max_delay``. Returns the seconds the write waited for the disk (its wall time beyond
        this thread's CPU time), which tells a caller whether writing inline stalls it."""
        with self._cv:
            if self._busy or not self._pending or (due_only and not self._group_due(self.batch_rows, self.max_delay)):
                return 0.0
            batch = self._take()
        cpu, wall = time.thread_time(), time.perf_counter()
        self._write_taken(batch, wake=False)
        return max(0.0, (time.perf_counter() - wall) - (time.thread_time() - cpu))

    def _write_batch(self, batch: list[_Record]) -> None:
        good: list[_Record] = []
        for rec in batch:
            if self.step0 is None:
                self.step0 = rec.step
            expected = self.step0 + self.steps.rows + len(good)
            if rec.step != expected:
                self.errors.append(f"step {rec.step}: out of order, the store expects step {expected}")
                continue
            good.append(rec)
        try:
            steps = [{"step": Var((), np.int64(r.step), _STEP_ATTRS), **r.values} for r in good]
            self.steps.write_rows(steps)
            self.records.write_rows([{"step": row["step"], **r.trajectory} for row, r in zip(steps, good) if r.trajectory])
            if good:
                self._commit(closed=False)
        except Exception as exc:  # never raised into training
            first = good[0].step if good else "?"
            self.errors.append(f"steps {first}-{good[-1].step if good else '?'}: {type(exc).__name__}: {exc}")

    def _commit(self, closed: bool) -> None:
        # One fixed-width pwrite: a killed process leaves either the old record or the new one.
        text = json.dumps({"rows": self.steps.rows, "records": self.records.rows, "step0": self.step0, "closed": closed})
        os.pwrite(self._commit_fd, text.encode().ljust(_COMMIT_BYTES), 0)

    # -- the training thread ------------------------------------------------------------------
    def append(self, step: int, values: dict[str, Var], trajectory: dict[str, Var] | None = None,
               release: Callable[[], None] | None = None) -> None:
        """Queue one step's row (and its trajectory vectors). Never raises a write error.

        ``release`` is called (by whichever thread wrote the step) once it is written: the
        caller may then reuse the memory of the arrays it handed over."""
        if self.closed:
            raise StoreError(f"store {self.path} is closed")
        self._warn_errors()
        size = sum(v.data.nbytes for v in trajectory.values() if isinstance(v.data, np.ndarray)) if trajectory else 0
        if self.inline and self._pending and (len(self._pending) >= self.max_pending
                                              or self._pending_bytes + size > self.max_pending_bytes):
            self.write_pending()  # a full queue: write it here rather than wait for the thread
        with self._cv:
            # bounded memory when the disk is slow or the vectors are big
            while self._pending and (len(self._pending) >= self.max_pending
                                     or self._pending_bytes + size > self.max_pending_bytes):
                self._cv.notify_all()
                self._cv.wait()
            if not self._pending:
                self._first_pending = time.monotonic()
            self._pending.append(_Record(step, values, trajectory, release))
            self._pending_bytes += size
            if not self.inline and (len(self._pending) == self.batch_rows or self.max_delay <= 0
                                    or self._pending_bytes >= self.max_pending_bytes // 2):
                self._cv.notify_all()

    def flush(self) -> None:
        """Wait until everything queued is committed (written on this thread if the writer
        thread is not writing: the caller waits anyway)."""
        self.write_pending()
        with self._cv:
            self._flushing += 1
            self._cv.notify_all()
            while self._pending or self._busy:
                self._cv.wait()
            self._flushing -= 1
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
    def iter_trajectory(self, names: Sequence[str], max_bytes: int = 8 * 2**20,
                        reuse: bool = False) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Yield ``(steps, {name: rows})`` blocks of the trajectory, ``max_bytes`` at a time.

        ``reuse``: every block is read into the same arrays, which the next block overwrites (no
        allocation per block: fresh big arrays cost a page fault per 4 KiB on first touch)."""
        self.flush()
        n = self.records.rows
        if n == 0:
            return
        table = self.records
        cols = [name for name in names if name in table.columns]
        derive = "update" in cols and UPDATE_FROM_PARAMS in table.columns and "params" in table.columns
        per_row = sum(table.columns[c].row_bytes for c in {*cols, *(["params"] if derive else [])}) or 1
        block = max(1, min(n, max_bytes // per_row))
        # with derived updates: params and steps of one more row (the next block's first)
        extra = {c: int(derive and c in ("step", "params")) for c in ("step", *cols, *(["params"] if derive else []))}
        bufs = {c: np.empty((block + k, *table.columns[c].rest), table.columns[c].dtype) for c, k in extra.items()} if reuse else {}
        all_flags = table.read(UPDATE_FROM_PARAMS, 0, n) if derive else None
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            flags = all_flags[lo:hi] if all_flags is not None else None
            read = {}
            for c, k in extra.items():
                out = bufs[c][:min(n, hi + k) - lo] if reuse else None
                if flags is not None and c == "update":  # only the stored rows: the others are holes
                    out = out if out is not None else np.empty((hi - lo, *table.columns[c].rest), table.columns[c].dtype)
                    for i, j in _runs(flags != 1):
                        table.read(c, lo + i, lo + j, out[i:j])
                    read[c] = out
                else:
                    read[c] = table.read(c, lo, min(n, hi + k), out)
            if flags is not None:
                _derive_updates(read["update"], read["params"], read["step"], flags)
            yield read["step"][:hi - lo], {c: read[c][:hi - lo] for c in cols}

    def _forget_dangling_update(self) -> None:
        """A resumed store whose last record takes its update from a next record that was never
        committed (a kill): that update is unknown (NaN), and the next record written now is
        another step's."""
        n, flags = self.records.rows, self.records.columns.get(UPDATE_FROM_PARAMS)
        if n and flags is not None and self.records.read(UPDATE_FROM_PARAMS, n - 1, n)[0] == 1:
            update = self.records.columns.get("update")
            if update is not None:
                update.write(n - 1, update.fill_row)
            flags.write(n - 1, np.int8(0).tobytes())
            flags.close()

    def write_dataset(self, ds: xr.Dataset) -> None:
        """Write finalize results: variables over a subset of steps are placed on their rows."""
        self.flush()
        steps = self.steps.read("step", 0, self.steps.rows)
        rows = None
        if "step" in ds.dims:
            own = np.asarray(ds["step"].values)
            rows = np.searchsorted(steps, own)
            if np.any(rows >= len(steps)) or np.any(steps[np.minimum(rows, len(steps) - 1)] != own):
                raise StoreError(f"results for steps that were never recorded: {sorted(set(own.tolist()) - set(steps.tolist()))[:5]}")
        for name, da in ds.variables.items():
            if name == "step":
                continue
            dims = tuple(da.dims)
            if "step" in dims and dims[0] != "step":
                da = da.transpose("step", ...)
                dims = tuple(da.dims)
            data = np.asarray(da.values)
            dtype = _result_dtype(data)
            if rows is not None and "step" in dims:
                full = np.full((len(steps), *data.shape[1:]), _fill(dtype), dtype=dtype)
                full[rows] = data
                data = full
            # np.asarray(order="C"), not ascontiguousarray, which turns a 0-d result into shape (1,)
            data = np.asarray(data, dtype=dtype, order="C") if dtype.kind not in "OU" else data
            target = self.path / str(name)
            try:
                os.mkdir(target)
            except FileExistsError:  # an earlier close's results (a resumed run)
                shutil.rmtree(target)
                os.mkdir(target)
            # The chunk, then the metadata (atomically): a folder without zarr.json is no array
            # to readers, so a kill in between leaves no array with a torn chunk.
            if data.size:
                key = target / ".".join(["c", *(["0"] * data.ndim)])
                _write_file(key, _vlen_utf8(data) if dtype.kind in "OU" else data.tobytes() if not data.ndim else data)
            chunks = tuple(max(1, n) for n in data.shape)
            _write_array_meta(target, data.shape, chunks, dtype, dims, dict(da.attrs), mkdir=False)

    def set_attrs(self, **attrs: Any) -> None:
        """Update dataset attrs (JSON-able)."""
        self.attrs.update(_jsonable(attrs))
        _write_group_meta(self.path, self.attrs)

    def close(self) -> None:
        """Commit everything, trim the arrays to the committed rows, stop the writer."""
        if self.closed:
            return
        self.flush()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
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
    """The commit record of a readable run store (else a StoreError that says why)."""
    _check_attrs(path)
    return _read_commit(path)


def _check_attrs(path: Path) -> dict[str, Any]:
    """The group attrs of a run store whose schema this version reads."""
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
            f"{path} uses landscape schema {version}, this landscape reads {' and '.join(f'{m}.x' for m in READABLE_MAJORS)}: "
            "open it with the landscape version that wrote it, or re-record the run"
        )
    return attrs


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


def run_attrs(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The attrs ``open_run(path)`` gives (run metadata, probe settings, annotations, ``closed``)
    without opening the arrays: for tables over many runs."""
    path = Path(path)
    attrs = _check_attrs(path)
    return {**attrs, "store_path": str(path), "closed": bool(_read_commit(path).get("closed", False))}


def _derive_updates(update: np.ndarray, params: np.ndarray, steps: np.ndarray, flags: np.ndarray) -> None:
    """Fill the rows of ``update`` flagged ``update_from_params`` with the next row's params minus
    their own (NaN where the next row is missing or another step's). ``params`` and ``steps``
    may hold one row more than ``update`` (the first of the next block)."""
    m = len(flags)
    ok = np.zeros(m, dtype=bool)
    k = min(m, len(steps) - 1)
    ok[:k] = steps[1:k + 1] == steps[:k] + 1
    derived = flags == 1
    for i, j in _runs(derived & ok):  # one subtraction per run of rows
        np.subtract(params[i + 1:j + 1], params[i:j], out=update[i:j])
    update[derived & ~ok] = np.nan


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges where ``mask`` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def open_trajectory(path: str | os.PathLike[str], *, chunks: Any = None) -> xr.Dataset:
    """The recorded trajectory vectors (params, gradients, updates, probe-batch gradients).

    ``update`` rows stored as ``params`` differences are derived here (lazily, with dask, in the
    store's chunks when ``chunks`` is None)."""
    path = Path(path)
    commit = _check_store(path)
    ds = _open_group(path, TRAJECTORY, chunks)
    if "record" in ds.dims:
        ds = ds.isel(record=slice(0, int(commit["records"])))
    if UPDATE_FROM_PARAMS in ds and {"update", "params"} <= set(ds.data_vars) and ds["update"].dims == ds["params"].dims:
        flags = ds[UPDATE_FROM_PARAMS]
        parts = ds[["params", "update", "step"]]
        if chunks is None:  # lazily: never the whole trajectory in memory
            parts = parts.chunk({"record": ds["params"].encoding.get("chunks", (ds.sizes["record"],))[0] or 1})
        nxt = parts["params"].shift(record=-1)
        follows = parts["step"].shift(record=-1) == parts["step"] + 1
        derived = xr.where(follows, nxt - parts["params"], np.float32(np.nan)).astype(np.float32)
        update = xr.where(flags == 1, derived, parts["update"]).astype(np.float32)
        update.attrs = ds["update"].attrs
        ds = ds.drop_vars(UPDATE_FROM_PARAMS).assign(update=update.transpose(*ds["update"].dims))
    return ds


def expand_runs(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run store paths from a path, a glob, or a list of paths and globs: in order, without
    repeats; a path that does not exist or a glob that matches nothing is an error."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    out: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if Path(text).exists():
            found = [text]
        elif _glob.has_magic(text):
            found = sorted(_glob.glob(text))
            if not found:
                raise StoreError(f"no run store matches {text!r}")
        else:
            raise StoreError(f"{text!r} does not exist: pass run stores (e.g. runs/demo/sgd-0.zarr) or a glob "
                             "(e.g. 'runs/demo/*.zarr')")
        out.extend(Path(p) for p in found if Path(p) not in out)
    if not out:
        raise StoreError("no run stores given: pass store paths or a glob")
    return out


def open_runs(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, load: bool = False) -> xr.Dataset:
    """Many runs as one lazy dataset with dims ``run``, ``step``, ...

    ``run`` is labelled by the store's name; ``optimizer``, ``seed`` and every other scalar of
    the ``run=`` metadata become coordinates along ``run``. Runs of different lengths are padded
    with NaN. ``load=True`` reads each run into memory first and combines them with numpy: the
    same dataset as ``open_runs(paths).load()``, several times faster for runs with many small
    variables (no dask graph of a task per variable and run).
    """
    if not isinstance(load, bool):
        raise TypeError(f"load must be True or False, got {load!r}")
    return stack_runs([open_run(p).load() if load else open_run(p, chunks={}) for p in expand_runs(paths)])


def stack_runs(runs: Sequence[xr.Dataset]) -> xr.Dataset:
    """Datasets from :func:`open_run` as one dataset along ``run``: what :func:`open_runs` gives
    for their stores (loaded ones stay in memory: open them once for per-run and stacked use)."""
    parts = []
    for ds in runs:
        if not isinstance(ds, xr.Dataset) or "store_path" not in ds.attrs or "run" in ds.dims:
            raise TypeError("stack_runs takes datasets from landscape.open_run (one run each, with attrs['store_path']); "
                            "for store paths use landscape.open_runs")
        meta = ds.attrs.get("run", {}) or {}
        p = Path(ds.attrs["store_path"])
        name = p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name
        ds = ds.expand_dims(run=[name])
        for key in ("optimizer", "seed"):
            ds = ds.assign_coords({key: ("run", [meta.get(key, np.nan if key == "seed" else "")])})
        for key, value in meta.items():
            if key not in ("optimizer", "seed") and isinstance(value, (int, float, str, bool)):
                ds = ds.assign_coords({key: ("run", [value])})
        ds.attrs = {"landscape_schema": ds.attrs["landscape_schema"]}
        parts.append(ds)
    if not parts:
        raise StoreError("no runs to stack")
    from dask.array.core import PerformanceWarning

    with warnings.catch_warnings():
        # xarray compares the runs' coordinates lazily; dask then warns about rechunking
        # arrays that hold a few numbers (seen with 15 runs): nothing to act on
        warnings.simplefilter("ignore", PerformanceWarning)
        out = xr.concat(parts, dim="run", join="outer", combine_attrs="drop_conflicts", coords="different",
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
