"""Sweeps: every (optimizer configuration x seed) training run as a job on dask.distributed.

    from landscape.sweeps import sweep, digits_train   # also landscape.sweep(...)
    res = sweep(digits_train, {"sgd": {"epochs": 2}, "adam": {"epochs": 2}}, seeds=3, out="runs/sweep")
    print(res)                  # finished / skipped / failed
    ds = res.open_runs()        # dims run, step, ...; coords optimizer, seed, epochs

Each job calls the user's ``train(name, config, seed, store_path)``, which trains one run with
probes attached and writes a closed store at ``store_path`` (``<out>/<name>-<seed>.zarr``) with
run metadata ``{"optimizer": name, "seed": seed, **config}``. Jobs run on a ``LocalCluster`` of
worker processes by default, or on an existing dask scheduler (``scheduler="tcp://host:8786"``)
to spread them over machines that share ``out``.

A job that raises is reported (name, seed, error, the end of its traceback) and the others go on.
A run counts as complete when its store's commit record says it was closed and the sweep has not
marked it failed (the recorder closes the store on the way out of an exception too, so a job
that raised leaves ``.landscape-sweep-failed.json`` in its store). Re-running a sweep skips the
complete runs and redoes the rest from scratch (the incomplete store is deleted first).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from landscape.store import COMMIT

FAILED = ".landscape-sweep-failed.json"  # a dot name, like the commit record: zarr does not list it
_NAME = re.compile(r"^[A-Za-z0-9_.+=,-]+$")
_TRACEBACK_LINES = 12

TrainFn = Callable[[str, dict, int, Path], Any]


@dataclass(frozen=True)
class SweepFailure:
    """A job that did not produce a complete store."""

    name: str
    seed: int
    path: Path
    error: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.name} seed {self.seed} ({self.path}): {self.error}"


@dataclass
class SweepResult:
    """What a sweep did. ``finished``: stores written by this call; ``skipped``: stores that were
    already complete; ``failed``: jobs that raised or left no closed store. Lists follow the grid
    order (configurations, then seeds)."""

    out: Path
    finished: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[SweepFailure] = field(default_factory=list)
    seconds: float = 0.0
    job_seconds: dict[Path, float] = field(default_factory=dict)  # wall time of each job that ran, on its worker

    @property
    def complete(self) -> list[Path]:
        """Every complete store of the grid (finished now or earlier), in grid order."""
        done = set(self.finished) | set(self.skipped)
        return [p for p in self._order if p in done]

    @property
    def ok(self) -> bool:
        return not self.failed

    _order: list[Path] = field(default_factory=list, repr=False)

    def open_runs(self) -> Any:
        """The complete runs (finished now and skipped as done before) as one lazy dataset: dims
        ``run``, ``step``, ...; ``optimizer``, ``seed`` and the configuration's scalars as coords."""
        from landscape.store import open_runs

        if not self.complete:
            raise ValueError(f"the sweep into {self.out} has no complete run to open "
                             f"({len(self.failed)} failed: {'; '.join(map(str, self.failed[:3]))})")
        return open_runs(self.complete)

    def summary(self) -> str:
        total = len(self.finished) + len(self.skipped) + len(self.failed)
        lines = [f"sweep into {self.out}: {total} runs, {len(self.finished)} finished, {len(self.skipped)} skipped "
                 f"(already complete), {len(self.failed)} failed, in {self.seconds:.1f} s"]
        for f in self.failed:
            lines.append(f"FAILED {f}")
            if f.traceback:
                lines.extend("    " + line for line in f.traceback.rstrip().splitlines())
        return "\n".join(lines)

    __str__ = summary


def store_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a run store that was closed (its commit record says so) and that a
    sweep did not mark as failed."""
    path = Path(path)
    if not (path / "zarr.json").is_file() or (path / FAILED).exists():
        return False
    try:
        return bool(json.loads((path / COMMIT).read_text()).get("closed", False))
    except (OSError, ValueError):
        return False


def _metadata_mismatch(path: Path, meta: dict[str, Any]) -> str:
    """Settings the store's run metadata records with another value than ``meta`` (keys the
    store does not record are not compared)."""
    from landscape.store import _jsonable

    try:
        recorded = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("run", {}) or {}
    except (OSError, ValueError):
        return ""
    want = _jsonable(meta)
    diffs = [f"{k}={recorded[k]!r} (sweep: {v!r})" for k, v in want.items() if k in recorded and recorded[k] != v]
    return ", ".join(diffs)


def run_path(out: str | os.PathLike[str], name: str, seed: int) -> Path:
    """Where a sweep puts the store of (``name``, ``seed``)."""
    return Path(out) / f"{name}-{seed}.zarr"


def _clear(path: Path) -> None:
    """Remove a store left by a killed or failed job; refuse anything that is not one."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and ((path / "zarr.json").exists() or (path / COMMIT).exists() or (path / FAILED).exists()
                          or not any(path.iterdir())):
        shutil.rmtree(path)
        return
    raise FileExistsError(f"{path} exists and is not a run store: move it away, the sweep writes this run there")


def _tail(tb: str, lines: int = _TRACEBACK_LINES) -> str:
    return "\n".join(tb.rstrip().splitlines()[-lines:])


def _run_job(train: TrainFn, name: str, config: dict, seed: int, path: str, threads: int) -> dict[str, Any]:
    """One job, on a worker: never raises, reports what happened."""
    import torch

    t0 = time.perf_counter()
    store = Path(path)
    report: dict[str, Any] = {"name": name, "seed": seed, "path": path, "error": None, "traceback": ""}
    try:
        torch.set_num_threads(threads)
        _clear(store)
        train(name, dict(config), seed, store)
        if not store_complete(store):
            state = "no store" if not store.exists() else "a store that was not closed (call rec.close() or use `with landscape.attach(...)`)"
            raise RuntimeError(f"train returned but left {state} at {store}")
    except BaseException as exc:  # noqa: BLE001 - a job reports everything, even SystemExit from user code
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = _tail(traceback.format_exc())
        try:
            if store.is_dir():  # the recorder closes its store on an exception: mark it as not done
                (store / FAILED).write_text(json.dumps({"error": report["error"], "traceback": report["traceback"]}))
        except OSError:
            pass
        if isinstance(exc, KeyboardInterrupt):
            raise
    report["seconds"] = time.perf_counter() - t0
    return report


def _check_sizes(workers: Any, threads_per_worker: Any) -> None:
    for arg, v in (("workers", workers), ("threads_per_worker", threads_per_worker)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {v!r}")


def _check_args(train: Any, configs: Any, seeds: Any, workers: Any, threads_per_worker: Any,
                scheduler: Any) -> tuple[dict[str, dict], list[int]]:
    if not callable(train):
        raise TypeError(f"train must be a function train(name, config, seed, store_path), got {type(train).__name__}")
    try:
        import cloudpickle

        cloudpickle.dumps(train)
    except Exception as exc:
        raise TypeError(f"train={train!r} cannot be sent to the workers ({type(exc).__name__}: {exc}): define it at "
                        "module level in an importable module") from None
    if not isinstance(configs, Mapping) or not configs:
        raise TypeError("configs must be a non-empty dict {name: config dict}, e.g. {'sgd': {'lr': 0.1}, 'adam': {}}")
    cfgs: dict[str, dict] = {}
    for name, cfg in configs.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"configuration name {name!r} must be a non-empty string of letters, digits and _.+=,- "
                             "(it names the store files)")
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, Mapping):
            raise TypeError(f"configs[{name!r}] must be a dict of settings, got {type(cfg).__name__}")
        bad = {"optimizer", "seed"} & set(cfg)
        if bad:
            raise ValueError(f"configs[{name!r}] has {sorted(bad)}: the sweep sets optimizer (the name) and seed itself")
        if any(not isinstance(k, str) for k in cfg):
            raise TypeError(f"configs[{name!r}] keys must be strings")
        cfgs[name] = dict(cfg)
    if isinstance(seeds, bool):
        raise TypeError("seeds must be a count (int) or a list of ints")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds={seeds}: give at least one seed (a count, or a list such as [0, 1, 2])")
        seed_list = list(range(seeds))
    elif isinstance(seeds, Iterable) and not isinstance(seeds, (str, bytes)):
        seed_list = list(seeds)
        if not seed_list or any(isinstance(s, bool) or not isinstance(s, int) for s in seed_list):
            raise TypeError(f"seeds must be a count or a non-empty list of ints, got {seeds!r}")
        if len(set(seed_list)) != len(seed_list):
            raise ValueError(f"seeds {seed_list} has repeats: each (configuration, seed) is one store")
        if any(s < 0 for s in seed_list):
            raise ValueError(f"seeds must be >= 0, got {seed_list}")
    else:
        raise TypeError(f"seeds must be a count (int) or a list of ints, got {type(seeds).__name__}")
    _check_sizes(workers, threads_per_worker)
    if scheduler is not None and not isinstance(scheduler, str):
        from distributed import Client

        if not isinstance(scheduler, Client):
            raise TypeError(f"scheduler must be an address such as 'tcp://host:8786' or a distributed.Client, "
                            f"got {type(scheduler).__name__}")
    return cfgs, seed_list


def sweep(train: TrainFn, configs: Mapping[str, Mapping[str, Any]], seeds: int | Iterable[int],
          out: str | os.PathLike[str], *, scheduler: str | Any = None, workers: int = 2, threads_per_worker: int = 1,
          resume: bool = True, progress: bool = True) -> SweepResult:
    """Run ``train(name, config, seed, store_path)`` for every configuration and seed on dask.

    Args:
        train: a module-level function (the workers import it) that trains one run with probes
            attached and writes a closed store at ``store_path`` with run metadata
            ``{"optimizer": name, "seed": seed, **config}``; see :func:`digits_train`.
        configs: ``{name: settings}``; the name labels the run (``optimizer`` coordinate).
        seeds: a count (``3`` means 0, 1, 2) or a list of seeds.
        out: folder of the stores, ``<out>/<name>-<seed>.zarr``.
        scheduler: address of a running dask scheduler (or a ``distributed.Client``) to run the
            jobs there; ``out`` must then be a folder every worker sees. ``None``: a
            ``LocalCluster`` of ``workers`` processes on this machine, closed at the end.
        workers, threads_per_worker: the local cluster's size (``workers`` is unused with a
            ``scheduler``); each job sets torch's intra-op threads to ``threads_per_worker``.
        resume: skip runs whose store is complete (a complete store whose run metadata records
            other settings than the job's is an error, raised before anything runs);
            ``False`` redoes every run.
        progress: a tqdm bar over finished jobs.

    Returns a :class:`SweepResult`; failed jobs are listed there, not raised. In a script, call
    it under ``if __name__ == "__main__":``: the worker processes are spawned and import the
    script's module.
    """
    cfgs, seed_list = _check_args(train, configs, seeds, workers, threads_per_worker, scheduler)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} is a file: give a folder for the run stores")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(name, seed, run_path(out, name, seed)) for name in cfgs for seed in seed_list]
    result = SweepResult(out=out, _order=[p for _, _, p in jobs])
    todo, stale = [], []
    for name, seed, path in jobs:
        if resume and store_complete(path):
            diff = _metadata_mismatch(path, {"optimizer": name, "seed": seed, **cfgs[name]})
            if diff:
                stale.append(f"{path.name}: {diff}")
            result.skipped.append(path)
        else:
            todo.append((name, seed, path))
    if stale:
        raise ValueError(f"{len(stale)} complete runs in {out} were recorded with other settings than this sweep's "
                         f"({'; '.join(stale[:3])}{'; ...' if len(stale) > 3 else ''}): write to another out folder, or "
                         "pass resume=False (--no-resume) to redo every run")
    if todo:
        reports = _submit_all(train, cfgs, todo, scheduler, workers, threads_per_worker, progress)
        by_path = {Path(r["path"]): r for r in reports}
        for name, seed, path in todo:
            r = by_path[path]
            if r.get("seconds") is not None:
                result.job_seconds[path] = float(r["seconds"])
            if r["error"] is None:
                result.finished.append(path)
            else:
                result.failed.append(SweepFailure(name, seed, path, r["error"], r.get("traceback", "")))
    result.seconds = time.perf_counter() - t0
    return result


def local_cluster(workers: int = 2, threads_per_worker: int = 1) -> Any:
    """A ``distributed.LocalCluster`` of ``workers`` processes for sweeps (what :func:`sweep` starts
    when given no scheduler); pass its ``scheduler_address`` to several sweeps to start it once.

    dask's workers get ``MALLOC_TRIM_THRESHOLD_=65536`` by default, which also fixes glibc's mmap
    threshold at 128 KiB: every larger tensor is then mapped and unmapped, with fresh zeroed
    pages, at each allocation, and the demo's runs took 2-2.5x as long (measured). This cluster's
    workers keep glibc's default (a value already in this process's environment is still
    inherited). No dashboard: a second cluster (or another user) would fight over port 8787."""
    import dask
    from distributed import LocalCluster

    _check_sizes(workers, threads_per_worker)
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):  # None: not set
        return LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                            dashboard_address=None, silence_logs=40)


def _submit_all(train: TrainFn, cfgs: dict[str, dict], todo: list[tuple[str, int, Path]], scheduler: Any,
                workers: int, threads: int, progress: bool) -> list[dict[str, Any]]:
    import uuid

    from distributed import Client, as_completed
    from tqdm.auto import tqdm

    cluster = None
    if scheduler is None:
        cluster = local_cluster(workers, threads)
        client = Client(cluster)
        own_client = True
    elif isinstance(scheduler, str):
        client = Client(scheduler)
        own_client = True
    else:
        client, own_client = scheduler, False
    token = uuid.uuid4().hex[:8]
    reports: list[dict[str, Any]] = []
    try:
        futures = {}
        for name, seed, path in todo:
            fut = client.submit(_run_job, train, name, cfgs[name], seed, str(path.resolve()), threads,
                                key=f"landscape-sweep-{name}-{seed}-{token}", pure=False, retries=0)
            futures[fut] = (name, seed, path)
        with tqdm(total=len(futures), desc="sweep", unit="run", disable=not progress) as bar:
            for fut in as_completed(futures):
                name, seed, path = futures[fut]
                try:
                    r = fut.result()
                    r["path"] = str(path)
                except Exception as exc:  # the worker died (KilledWorker) or the job could not be unpickled
                    r = {"name": name, "seed": seed, "path": str(path), "error": f"{type(exc).__name__}: {exc}",
                         "traceback": _tail("".join(traceback.format_exception(exc)))}
                reports.append(r)
                if r["error"] is not None and progress:
                    bar.write(f"landscape sweep: {name} seed {seed} failed: {r['error']}")
                bar.set_postfix_str(f"{name}-{seed}")
                bar.update(1)
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    return reports


# -- the demo's experiment as a sweep ---------------------------------------------------------


def digits_train(name: str, config: dict, seed: int, store_path: Path) -> Path:
    """The demo's run (``landscape demo``): DigitsCNN on the bundled digits with optimizer
    ``name`` (a key of ``landscape.demo.OPTIMIZERS``: sgd, adam, sam) and the demo's probes.
    ``config`` may set fields of :class:`landscape.demo.DemoConfig` (epochs, batch_size, every,
    samples, curvature_every, flatness_every)."""
    import dataclasses

    from landscape.data import load_digits, split
    from landscape.demo import OPTIMIZERS, DemoConfig, train_one

    if name not in OPTIMIZERS:
        raise ValueError(f"digits_train knows the optimizers {sorted(OPTIMIZERS)}, not {name!r}")
    fields = {f.name for f in dataclasses.fields(DemoConfig)} - {"out", "seeds", "optimizers"}
    unknown = set(config) - fields
    if unknown:
        raise ValueError(f"digits_train: unknown settings {sorted(unknown)}; it takes {sorted(fields)}")
    store_path = Path(store_path)
    cfg = DemoConfig(out=store_path.parent, seeds=(seed,), optimizers=(name,), **config)
    X, y = load_digits()
    return train_one(name, seed, cfg, split(X, y, 0.8, seed=0), store=store_path, run=dict(config))


def parse_optimizers(text: str) -> list[str]:
    """``"sgd,adam"`` -> ``["sgd", "adam"]``, checked against the demo's optimizers."""
    from landscape.demo import OPTIMIZERS

    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ValueError("--optimizers needs at least one name, e.g. sgd,adam")
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise ValueError(f"unknown optimizers {unknown}: choose from {', '.join(OPTIMIZERS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--optimizers {text!r} repeats a name")
    return names


__all__ = ["SweepFailure", "SweepResult", "digits_train", "local_cluster", "run_path", "store_complete", "sweep"]
