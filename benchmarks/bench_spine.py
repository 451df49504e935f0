"""Spine benchmarks: what recording costs a training loop, and what an HVP costs against a gradient.

    python benchmarks/bench_spine.py            # full run (about 10 minutes on 2 idle CPU cores)
    python benchmarks/bench_spine.py --quick    # smoke check (< 60 s; numbers are indicative only)
    python benchmarks/bench_spine.py --profile  # also cProfile one recorded run per configuration
    python benchmarks/bench_spine.py --malloc tuned  # glibc keeps freed memory mapped (both sides)

Every figure is a ratio of two things measured side by side in this process, interleaved
(A B, then B A on the next repeat, ...), after a warm-up that is not counted, with
``torch.set_num_threads(2)``. The median ratio over repeats is reported with its spread
(min, quartiles, max). The training ratios are measured twice: whole runs (plain, then recorded)
and paired runs (a plain and a recorded model stepped alternately in one loop: the machine's
drift hits both alike). Results go to ``benchmarks/results/spine.json``; a markdown table is
printed. See benchmarks/README.md for what each ratio means.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import gc
import io
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import landscape
from landscape.data import load_digits, split
from landscape.functional import FunctionalModel, probe_guard
from landscape.models import DigitsCNN, DigitsMLP
from probes import RestrictedSecant

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "spine.json"
THREADS = 2

# name -> (probe factory, target ratio or None, description, store on tmpfs)
CONFIGS: dict[str, tuple[Callable[[], list], float | None, str, bool]] = {
    "a_every1_train": (lambda: [RestrictedSecant(every=1, samples=0)], 1.10,
                       "(a) RestrictedSecant(every=1, samples=0): training-gradient RSI/EB every step", False),
    "b_every50_K8": (lambda: [RestrictedSecant(every=50, samples=8)], 1.25,
                     "(b) RestrictedSecant(every=50, samples=8): K=8 probe batches every 50 steps", False),
    "base_every1000": (lambda: [RestrictedSecant(every=1000, samples=0)], None,
                       "(base) RestrictedSecant(every=1000, samples=0): hot path, no probe due after step 0", False),
    "a_every1_train_tmpfs": (lambda: [RestrictedSecant(every=1, samples=0)], None,
                             "(a) with the store on tmpfs (/dev/shm): the filesystem's share of (a)", True),
}
TMPFS = Path("/dev/shm")
HVP_TARGET_CNN = 2.5  # default route, DigitsCNN
# glibc's malloc returns freed memory at the top of its heap to the system and maps big blocks
# afresh, so a process whose allocations vary from step to step page-faults the same memory in
# again and again (about 5 us per 4 KiB page on this VM). "tuned" keeps up to 128 MiB of freed
# memory and serves blocks below 32 MiB (glibc's own ceiling for its adaptive threshold) from
# the heap, as PyTorch's CPU tuning guide does with jemalloc/tcmalloc. It is set for the whole
# process, so plain and recorded runs get the same allocator.
MALLOC_TUNED = {"MALLOC_TRIM_THRESHOLD_": str(128 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}


# -- measurement helpers ---------------------------------------------------------------------


def spread(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "min": float(a.min()), "q1": float(q1), "q3": float(q3), "max": float(a.max()),
            "n": int(a.size)}


def dir_bytes(path: Path) -> tuple[int, int, int]:
    """(apparent bytes, allocated bytes, file count) of everything under ``path``."""
    apparent = allocated = files = 0
    for root, _, names in os.walk(path):
        for n in names:
            st = os.lstat(os.path.join(root, n))
            apparent += st.st_size
            allocated += getattr(st, "st_blocks", 0) * 512
            files += 1
    return apparent, allocated, files


class Contention:
    """Detects CPU time used by other processes while a pair is measured (Linux ``/proc/stat``).

    On a small shared machine another busy process makes torch's OpenMP threads wait for cores
    and slows a run 2x-15x; interleaving cannot undo that. A pair measured while more than
    ``threshold`` of the machine's CPU time went to other processes (or to the hypervisor:
    ``steal``) is discarded and measured again, after waiting for a quiet moment.
    """

    def __init__(self, threshold: float, attempts: int = 5, max_wait_s: float = 30.0) -> None:
        self.threshold, self.attempts, self.max_wait_s = threshold, attempts, max_wait_s
        self.enabled = threshold < 1 and Path("/proc/stat").exists()
        self.tick = os.sysconf("SC_CLK_TCK") if self.enabled else 100
        self.ncpu = os.cpu_count() or 1
        self.rejected = 0
        self.waited_s = 0.0
        self.kept: list[float] = []

    def snap(self) -> tuple[float, float, float]:
        busy = 0.0
        if self.enabled:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / self.tick  # user nice system irq softirq steal
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()

    def foreign(self, s0: tuple[float, float, float], s1: tuple[float, float, float]) -> float:
        """Fraction of the machine's CPU capacity used by others between two snapshots."""
        if not self.enabled:
            return 0.0
        busy, own, wall = (b - a for a, b in zip(s0, s1))
        return max(0.0, (busy - own) / (max(wall, 1e-9) * self.ncpu))

    def wait_quiet(self) -> None:
        if not self.enabled:
            return
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < self.max_wait_s:
            s0 = self.snap()
            time.sleep(0.5)
            if self.foreign(s0, self.snap()) <= self.threshold:
                break
        self.waited_s += time.perf_counter() - t0

    def measure(self, fn: Callable[[], Any], log: Callable[[str], None] | None = None) -> Any:
        """``fn()`` (one interleaved pair), repeated while other processes disturbed it."""
        for attempt in range(self.attempts):
            s0 = self.snap()
            out = fn()
            f = self.foreign(s0, self.snap())
            if f <= self.threshold or attempt == self.attempts - 1:
                self.kept.append(f)
                return out
            self.rejected += 1
            if log is not None:
                log(f"    (other processes used {100 * f:.0f}% of the CPU during that measurement: doing it again)")
            self.wait_quiet()
        raise AssertionError("unreachable")

    def summary(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "threshold": self.threshold, "pairs_rejected": self.rejected,
                "pairs_kept": len(self.kept), "kept_pairs_over_threshold": int(sum(f > self.threshold for f in self.kept)),
                "foreign_cpu_fraction_kept_max": max(self.kept, default=0.0), "seconds_waited": self.waited_s}


class Digits:
    def __init__(self) -> None:
        X, y = load_digits()
        (self.Xtr, self.ytr), _ = split(X, y, 0.8, seed=0)


def setup_run(data: Digits, steps: int, seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The model, its optimizer and the run's batches, drawn up front (no DataLoader noise in the
    ratios), all from ``seed``."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    X, y = data.Xtr, data.ytr
    n, bs = X.shape[0], 64
    gen = torch.Generator().manual_seed(seed)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    while len(batches) < steps:
        perm = torch.randperm(n, generator=gen)
        batches += [(X[perm[i:i + bs]], y[perm[i:i + bs]]) for i in range(0, n - bs + 1, bs)]
    return model, opt, batches[:steps]


def train_run(data: Digits, steps: int, probes: list | None, *, seed: int = 0, store_dir: Path | None = None,
              profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """One training run of DigitsCNN, timed from before ``attach`` to after ``rec.close()``.

    Model construction and the per-epoch shuffles are the same on both sides and outside the
    timed region; the user's loop (zero_grad, forward, loss, backward, step) is inside it.
    The phases (attach, loop, close) are timed too, to separate fixed from per-step costs.
    """
    model, opt, batches = setup_run(data, steps, seed)
    X, y = data.Xtr, data.ytr
    tmp = Path(tempfile.mkdtemp(prefix="bench-spine-", dir=store_dir)) if probes is not None else None
    gc.collect()
    if profiler is not None:
        profiler.enable()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0 = time.process_time()
    t0 = time.perf_counter()
    rec = None
    if probes is not None:
        assert tmp is not None
        rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64,
                               probes=probes, store=tmp / "run.zarr", run={"optimizer": "sgd", "seed": seed})
    t1 = time.perf_counter()
    for xb, yb in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
    t2 = time.perf_counter()
    if rec is not None:
        rec.close()
    t3 = time.perf_counter()
    cpu = time.process_time() - c0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    if profiler is not None:
        profiler.disable()
    out: dict[str, Any] = {"seconds": t3 - t0, "attach_s": t1 - t0, "loop_s": t2 - t1, "close_s": t3 - t2,
                           "cpu_seconds": cpu, "steps": steps, "final_loss": float(loss.detach()),
                           "page_faults": faults}
    if rec is not None:
        assert tmp is not None
        apparent, allocated, files = dir_bytes(rec.path)
        out.update(store_bytes=apparent, store_bytes_allocated=allocated, store_files=files,
                   rows=int(rec.writer.rows), probe_rows=int(rec.writer.trajectory_rows()), dim=rec.functional.dim,
                   probe_errors=dict(rec.probe_errors), writer_errors=list(rec.writer.errors))
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _thread_cpu_s(thread: Any) -> float:
    """CPU seconds used so far by another thread of this process (Linux ``schedstat``; NaN elsewhere)."""
    try:
        with open(f"/proc/self/task/{thread.native_id}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, AttributeError):
        return float("nan")


def writer_interference(starts: np.ndarray, times: np.ndarray, busy: list[tuple[float, float]], window: int = 20,
                        shifts: tuple[float, ...] = (-0.15, -0.1, -0.05, 0.05, 0.1, 0.15)) -> np.ndarray:
    """Seconds that the writer thread's batches added to the steps of each side, one per column.

    ``starts`` and ``times`` (steps x sides) are when each step began and how long it took (same
    clock as ``busy``, the writer's (begin, end) per batch). A step that overlaps a batch counts
    its time minus the median of the steps of its side within ``window`` steps that overlap
    none. Slow steps overlap a batch more often just by lasting longer, so the same sum for the
    batches moved by each of ``shifts`` seconds (what timing alone explains) is subtracted.
    """
    starts, times = np.asarray(starts, np.float64), np.asarray(times, np.float64)
    if not busy:
        return np.zeros(times.shape[1])

    def overlapping(offset: float) -> np.ndarray:
        hit = np.zeros(times.shape, bool)
        for a, b in busy:
            hit |= (starts < b + offset) & (starts + times > a + offset)
        return hit

    def excess(hit: np.ndarray) -> np.ndarray:
        out = np.zeros(times.shape[1])
        n = times.shape[0]
        for side in range(times.shape[1]):
            for i in np.flatnonzero(hit[:, side]):
                lo, hi = max(0, i - window), min(n, i + window + 1)
                ref = times[lo:hi, side][~hit[lo:hi, side]]
                if ref.size >= 5:
                    out[side] += times[i, side] - np.median(ref)
        return out

    return excess(overlapping(0.0)) - np.mean([excess(overlapping(o)) for o in shifts], axis=0)


def paired_run(data: Digits, steps: int, probes: list, *, seed: int = 0, store_dir: Path | None = None) -> dict[str, Any]:
    """A plain and a recorded run of the same model on the same batches, stepped alternately in
    one loop (plain then recorded on even steps, recorded then plain on odd ones).

    Whole runs of this VM drift by up to 2x in speed within a process; stepping the two side by
    side makes the drift hit both alike every few milliseconds. The recorded side's time is its
    steps plus ``attach`` and ``close``. Three figures:

    - ``ratio``: leans low, because the store's writer thread works during whichever step is
      running, so part of what it costs lands on the plain side;
    - ``ratio_writer_charged``: adds all of the writer's CPU time to the recorded side;
    - ``ratio_writer_measured``: moves what the writer's batches measurably added to the plain
      side's steps (:func:`writer_interference`) to the recorded side. With torch on both cores
      no core is idle for the writer, and this came out close to the charged figure.
    """
    plain_model, plain_opt, batches = setup_run(data, steps, seed)
    rec_model, rec_opt, _ = setup_run(data, steps, seed)
    X, y = data.Xtr, data.ytr
    tmp = Path(tempfile.mkdtemp(prefix="bench-spine-", dir=store_dir))
    sides = [(plain_model, plain_opt), (rec_model, rec_opt)]
    torch.manual_seed(seed + 1)
    rng = [torch.get_rng_state(), torch.get_rng_state()]  # each side its own dropout draws
    starts, times = np.zeros((steps, 2)), np.zeros((steps, 2))
    losses: list[torch.Tensor] = [torch.zeros(()), torch.zeros(())]
    gc.collect()
    t0 = time.perf_counter()
    rec = landscape.attach(rec_model, rec_opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64,
                           probes=probes, store=tmp / "run.zarr", run={"optimizer": "sgd", "seed": seed})
    attach_s = time.perf_counter() - t0
    busy: list[tuple[float, float]] = []
    write_batch = rec.writer._write_batch

    def timed_write_batch(batch: list) -> None:  # runs on the writer thread; list.append is atomic
        t = time.perf_counter()
        try:
            write_batch(batch)
        finally:
            busy.append((t, time.perf_counter()))

    rec.writer._write_batch = timed_write_batch  # type: ignore[method-assign]
    for i, (xb, yb) in enumerate(batches):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            model, opt = sides[side]
            torch.set_rng_state(rng[side])
            t = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            starts[i, side], times[i, side] = t, time.perf_counter() - t
            rng[side] = torch.get_rng_state()
            losses[side] = loss
    writer_cpu = _thread_cpu_s(getattr(rec.writer, "_thread", None))
    t = time.perf_counter()
    rec.close()
    close_s = time.perf_counter() - t
    errors = (dict(rec.probe_errors), list(rec.writer.errors))
    shutil.rmtree(tmp, ignore_errors=True)
    plain_s, rec_s = times.sum(axis=0)
    total = rec_s + attach_s + close_s
    loop_end = float((starts + times).max())  # the batch that close() flushes overlaps no step
    on_plain, on_rec = writer_interference(starts, times, [b for b in busy if b[0] < loop_end])
    return {"ratio": total / plain_s, "loop_ratio": rec_s / plain_s,
            "ratio_writer_charged": (total + writer_cpu) / plain_s, "writer_cpu_ms": 1e3 * writer_cpu,
            "ratio_writer_measured": (total + on_plain) / (plain_s - on_plain),
            "writer_added_ms": 1e3 * (on_plain + on_rec), "writer_added_to_plain_ms": 1e3 * on_plain,
            "attach_plus_close_ms": 1e3 * (attach_s + close_s), "plain_ms_per_step": 1e3 * plain_s / steps,
            "same_final_loss": float(losses[0].detach()) == float(losses[1].detach()), "errors": errors}


def _store_dir(name: str, store_dir: Path | None, configs: dict[str, tuple] | None = None) -> Path | None:
    return TMPFS if (CONFIGS if configs is None else configs)[name][3] else store_dir


def bench_training(data: Digits, steps: int, repeats: int, log: Callable[[str], None], guard: Contention,
                   store_dir: Path | None = None, configs: dict[str, tuple] | None = None,
                   paired_repeats: int = 0) -> dict[str, Any]:
    """The with/without ratios of ``configs`` (default :data:`CONFIGS`; same layout: name -> (probe
    factory, target, description, store on tmpfs)): whole runs, then ``paired_repeats`` of
    :func:`paired_run` per configuration."""
    configs = CONFIGS if configs is None else configs
    names = [k for k, v in configs.items() if not v[3] or (TMPFS.is_dir() and os.access(TMPFS, os.W_OK))]
    # warm-up: one run of each kind, not counted (allocator, imports, zarr, first-call caches)
    train_run(data, min(steps, 60), None)
    for name in names:
        train_run(data, min(steps, 60), configs[name][0](), store_dir=_store_dir(name, store_dir, configs))
    keys = ("total", "loop", "cpu")
    ratios: dict[str, dict[str, list[float]]] = {k: {q: [] for q in keys} for k in names}
    fixed_ms: dict[str, list[float]] = {k: [] for k in names}
    faults: dict[str, list[float]] = {k: [] for k in names}
    plain_ms: list[float] = []
    plain_faults: list[float] = []
    storage: dict[str, dict[str, Any]] = {}
    load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            make = configs[name][0]
            sd = _store_dir(name, store_dir, configs)

            def pair() -> tuple[dict[str, Any], dict[str, Any]]:
                # A B on even repeats, B A on odd ones: drift cancels in the median
                if r % 2 == 0:
                    plain = train_run(data, steps, None)
                    return plain, train_run(data, steps, make(), store_dir=sd)
                rec = train_run(data, steps, make(), store_dir=sd)
                return train_run(data, steps, None), rec

            plain, rec = guard.measure(pair, log)
            if rec["probe_errors"] or rec["writer_errors"]:
                raise RuntimeError(f"{name}: the recorder reported errors: {rec['probe_errors']} {rec['writer_errors']}")
            if rec["final_loss"] != plain["final_loss"]:
                raise RuntimeError(f"{name}: recording changed the trajectory ({rec['final_loss']} vs {plain['final_loss']})")
            ratios[name]["total"].append(rec["seconds"] / plain["seconds"])
            ratios[name]["loop"].append(rec["loop_s"] / plain["loop_s"])
            ratios[name]["cpu"].append(rec["cpu_seconds"] / plain["cpu_seconds"])
            fixed_ms[name].append(1e3 * (rec["attach_s"] + rec["close_s"]))
            faults[name].append(rec["page_faults"] / steps)
            plain_ms.append(1e3 * plain["seconds"] / steps)
            plain_faults.append(plain["page_faults"] / steps)
            storage[name] = {k: rec[k] for k in ("store_bytes", "store_bytes_allocated", "store_files", "rows", "probe_rows", "dim")}
        log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v['total'][-1]:.2f}x" for k, v in ratios.items()))
    paired: dict[str, list[dict[str, Any]]] = {k: [] for k in names}
    for r in range(paired_repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            make, sd = configs[name][0], _store_dir(name, store_dir, configs)
            res = guard.measure(lambda: paired_run(data, steps, make(), store_dir=sd), log)
            if not res["same_final_loss"] or any(res["errors"]):
                raise RuntimeError(f"{name} (paired): the trajectories differ or the recorder reported errors: {res['errors']}")
            paired[name].append(res)
        log(f"  paired {r + 1}/{paired_repeats}: " + ", ".join(f"{k} {v[-1]['ratio']:.3f}x" for k, v in paired.items()))
    if load:
        load.append(os.getloadavg()[0])
    contention = guard.summary()
    out: dict[str, Any] = {"steps_per_run": steps, "repeats": repeats, "paired_repeats": paired_repeats,
                           "plain_ms_per_step": spread(plain_ms),
                           "plain_page_faults_per_step": spread(plain_faults),
                           "store_dir": str(store_dir or tempfile.gettempdir()), "loadavg_1min_before_after": load,
                           "contention": contention, "configs": {}}
    for name in names:
        _, target, desc, on_tmpfs = configs[name]
        s = storage[name]
        d, rows, prow = s["dim"], s["rows"], max(1, s["probe_rows"])
        out["configs"][name] = {
            "description": desc,
            "store_dir": str(TMPFS) if on_tmpfs else out["store_dir"],
            "ratio": spread(ratios[name]["total"]),
            "loop_ratio": spread(ratios[name]["loop"]),
            "cpu_ratio": spread(ratios[name]["cpu"]),
            "attach_plus_close_ms": spread(fixed_ms[name]),
            "page_faults_per_step": spread(faults[name]),
            "target": target,
            "met": None if target is None else bool(statistics.median(ratios[name]["total"]) <= target),
            "paired": {k: spread([p[k] for p in paired[name]]) for k in
                       ("ratio", "loop_ratio", "ratio_writer_charged", "writer_cpu_ms", "ratio_writer_measured",
                        "writer_added_ms", "writer_added_to_plain_ms", "attach_plus_close_ms", "plain_ms_per_step")} if paired[name] else None,
            "storage": {
                **s,
                "bytes_per_recorded_step": s["store_bytes"] / rows,
                "bytes_per_probe_step": s["store_bytes"] / prow,
                "bytes_per_recorded_step_over_4d": s["store_bytes"] / rows / (4 * d),
                "bytes_per_probe_step_over_4d": s["store_bytes"] / prow / (4 * d),
                "allocated_bytes_per_recorded_step": s["store_bytes_allocated"] / rows,
            },
        }
        out["configs"][name]["met_paired"] = target_met(out["configs"][name], "paired")
        out["configs"][name]["met_writer_measured"] = target_met(out["configs"][name], "measured")
    return out


# -- HVP / gradient ----------------------------------------------------------------------------


def _timeit(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_hvp(data: Digits, repeats: int, m: int, log: Callable[[str], None], guard: Contention) -> dict[str, Any]:
    batch = (data.Xtr[:256], data.ytr[:256])
    out: dict[str, Any] = {"batch": 256, "matvecs": m, "repeats": repeats, "models": {}}
    for model_name, cls in (("DigitsMLP", DigitsMLP), ("DigitsCNN", DigitsCNN)):
        torch.manual_seed(0)
        model = cls()
        fm = FunctionalModel(model, F.cross_entropy)
        gen = torch.Generator().manual_seed(1)
        V = torch.randn(fm.dim, m, generator=gen)
        vs = [V[:, j].contiguous() for j in range(m)]
        with probe_guard(model, "eval"):
            w = fm.flat_params()

            def grad() -> None:
                for _ in range(m):
                    fm.loss_and_grad(w, batch)

            def matvecs(route: str) -> Callable[[], None]:
                def run() -> None:
                    op = fm.hessian_operator(w, batch, route)  # type: ignore[arg-type]
                    for v in vs:
                        op.matvec(v)
                return run

            def matmat(route: str) -> Callable[[], None]:
                def run() -> None:
                    fm.hessian_operator(w, batch, route).matmat(V)  # type: ignore[arg-type]
                return run

            def single(route: str) -> Callable[[], None]:
                def run() -> None:  # FunctionalModel.hvp: a fresh operator for one product
                    for v in vs:
                        fm.hvp(w, batch, v, route)  # type: ignore[arg-type]
                return run

            def construct() -> None:
                for _ in range(m):
                    fm.hessian_operator(w, batch, "double_backward")

            cases: dict[str, Callable[[], None]] = {
                "double_backward_matvec": matvecs("double_backward"),
                "fwd_rev_matvec": matvecs("fwd_rev"),
                "double_backward_matmat": matmat("double_backward"),
                "fwd_rev_matmat": matmat("fwd_rev"),
                "double_backward_single": single("double_backward"),
                "fwd_rev_single": single("fwd_rev"),
                "double_backward_construct": construct,
            }
            # correctness guard: the routes agree (otherwise the timing compares different things)
            a = fm.hessian_operator(w, batch, "double_backward").matvec(vs[0])
            b = fm.hessian_operator(w, batch, "fwd_rev").matvec(vs[0])
            c = fm.hessian_operator(w, batch, "double_backward").matmat(V)[:, 0]
            err = float(max((a - b).abs().max(), (a - c).abs().max()) / a.abs().max().clamp_min(1e-30))
            for fn in [grad, *cases.values()]:  # warm-up
                fn()
            ratios: dict[str, list[float]] = {k: [] for k in cases}
            grad_ms: list[float] = []
            for r in range(repeats):
                order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]

                def one_repeat() -> list[tuple[str, float, float]]:
                    # one repeat of every case is the unit the contention check accepts or redoes
                    # (single pairs of the small MLP are too short for /proc/stat's 10 ms ticks)
                    rows = []
                    for name, fn in order:
                        if r % 2 == 0:  # gradient then HVP, and HVP then gradient on odd repeats
                            tg = _timeit(grad)
                            th = _timeit(fn)
                        else:
                            th = _timeit(fn)
                            tg = _timeit(grad)
                        rows.append((name, tg, th))
                    return rows

                for name, tg, th in guard.measure(one_repeat, log):
                    ratios[name].append(th / tg)  # both are totals over m products / m gradients
                    grad_ms.append(1e3 * tg / m)
        out["models"][model_name] = {
            "dim": fm.dim,
            "grad_ms": spread(grad_ms),
            "route_agreement_rel_err": err,
            "ratios": {k: spread(v) for k, v in ratios.items()},
        }
        log(f"  {model_name}: " + ", ".join(f"{k} {statistics.median(v):.2f}x" for k, v in ratios.items()))
    cnn_default = out["models"]["DigitsCNN"]["ratios"]["double_backward_matvec"]["median"]
    out["target_cnn_default"] = HVP_TARGET_CNN
    out["contention"] = guard.summary()
    out["met"] = bool(cnn_default <= HVP_TARGET_CNN)
    return out


# -- profiling -------------------------------------------------------------------------------


def profile_configs(data: Digits, steps: int, store_dir: Path | None = None, top: int = 25) -> dict[str, Any]:
    """cProfile one recorded run per configuration (and one plain run, for comparison).

    cProfile sees the training thread only; the store's writer thread is profiled separately
    by wrapping ``RunWriter._run`` here (the library is not modified).
    """
    from landscape import store as _store

    writer_profiles: list[cProfile.Profile] = []
    original = _store.RunWriter._run

    def profiled_run(self: Any) -> None:
        prof = cProfile.Profile()
        writer_profiles.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    def report(prof: cProfile.Profile) -> str:
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("cumulative").print_stats(top)
        buf.write("\n--- by own time ---\n")
        st.sort_stats("tottime").print_stats(top)
        return buf.getvalue()

    out: dict[str, Any] = {}
    _store.RunWriter._run = profiled_run  # type: ignore[method-assign]
    try:
        for name, make in [("plain", None), *((k, v[0]) for k, v in CONFIGS.items())]:
            sd = _store_dir(name, store_dir) if make else None
            train_run(data, min(steps, 60), make() if make else None, store_dir=sd)  # warm
            writer_profiles.clear()
            prof = cProfile.Profile()
            res = train_run(data, steps, make() if make else None, store_dir=sd, profiler=prof)
            out[name] = {"seconds": res["seconds"], "phases_s": {k: res[k] for k in ("attach_s", "loop_s", "close_s")},
                         "report": report(prof),
                         "writer_thread_report": report(writer_profiles[-1]) if writer_profiles else ""}
    finally:
        _store.RunWriter._run = original  # type: ignore[method-assign]
    return out


# -- report ----------------------------------------------------------------------------------


def fmt(s: dict[str, float], unit: str = "x", digits: int = 3) -> str:
    return f"{s['median']:.{digits}f}{unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def target_met(c: dict[str, Any], kind: str = "whole") -> bool | None:
    """Whether a config's median ratio is within its target: whole runs, ``"paired"``, or
    ``"measured"`` (paired, with what the writer measurably added to the plain side moved over)."""
    if c["target"] is None or (kind != "whole" and not c.get("paired")):
        return None
    s = c["ratio"] if kind == "whole" else c["paired"]["ratio" if kind == "paired" else "ratio_writer_measured"]
    return bool(s["median"] <= c["target"])


def table(res: dict[str, Any]) -> str:
    tr, hv = res["training"], res["hvp"]
    lines = ["| measurement | median [min-max] | target | met |", "|---|---|---|---|"]
    lines.append(f"| plain training, ms/step (DigitsCNN, batch 64, {tr['steps_per_run']} steps/run; malloc "
                 f"{res['environment'].get('malloc', 'default')}) | {fmt(tr['plain_ms_per_step'], ' ms', 2)} | | |")
    lines.append(f"| &nbsp;&nbsp; page faults per step, plain | {fmt(tr['plain_page_faults_per_step'], '', 1)} | | |")
    for name, c in tr["configs"].items():
        tgt = "" if c["target"] is None else f"<= {c['target']:.2f}x"
        met = "" if c["met"] is None else ("yes" if c["met"] else "**no**")
        label = c["description"].split(":")[0]
        lines.append(f"| with / without recorder, {label} | {fmt(c['ratio'])} | {tgt} | {met} |")
        lines.append(f"| &nbsp;&nbsp; loop only (attach, close excluded), {label} | {fmt(c['loop_ratio'])} | | |")
        lines.append(f"| &nbsp;&nbsp; attach + close, ms, {label} | {fmt(c['attach_plus_close_ms'], ' ms', 0)} | | |")
        lines.append(f"| &nbsp;&nbsp; page faults per step, {label} | {fmt(c['page_faults_per_step'], '', 1)} | | |")
        pc = c.get("paired")
        if pc:
            lines.append(f"| &nbsp;&nbsp; paired per step ({pc['ratio']['n']} runs), {label} | {fmt(pc['ratio'])} | {tgt} | "
                         f"{'' if target_met(c, 'paired') is None else ('yes' if target_met(c, 'paired') else '**no**')} |")
            lines.append(f"| &nbsp;&nbsp; paired, loop only / writer thread charged in full, {label} | "
                         f"{fmt(pc['loop_ratio'])} / {fmt(pc['ratio_writer_charged'])} (writer CPU "
                         f"{pc['writer_cpu_ms']['median']:.0f} ms per run) | | |")
            met_m = target_met(c, "measured")
            lines.append(f"| &nbsp;&nbsp; paired, the writer's measured effect moved to the recorded side, {label} | "
                         f"{fmt(pc['ratio_writer_measured'])} (writer added {pc['writer_added_ms']['median']:.0f} ms "
                         f"to the steps, {pc['writer_added_to_plain_ms']['median']:.0f} of it to plain ones) | {tgt} | "
                         f"{'' if met_m is None else ('yes' if met_m else '**no**')} |")
    for name, c in tr["configs"].items():
        if name.endswith("_tmpfs"):
            continue
        s = c["storage"]
        label = c["description"].split(":")[0]
        lines.append(f"| bytes per recorded step, {label} ({s['rows']} rows, {s['probe_rows']} probe steps, d={s['dim']}, "
                     f"4d={4 * s['dim']} B) | {s['bytes_per_recorded_step']:.0f} B = {s['bytes_per_recorded_step_over_4d']:.2f} x 4d; "
                     f"per probe step {s['bytes_per_probe_step']:.0f} B = {s['bytes_per_probe_step_over_4d']:.2f} x 4d; "
                     f"allocated {s['allocated_bytes_per_recorded_step']:.0f} B/step | | |")
    for model, mres in hv["models"].items():
        lines.append(f"| gradient, ms ({model}, batch {hv['batch']}, d={mres['dim']}) | {fmt(mres['grad_ms'], ' ms', 2)} | | |")
        for k, s in mres["ratios"].items():
            tgt = met = ""
            if model == "DigitsCNN" and k == "double_backward_matvec":
                tgt, met = f"<= {hv['target_cnn_default']:.1f}x", ("yes" if hv["met"] else "**no**")
            if k == "double_backward_construct":
                label = "HVP operator construction (double backward) / gradient"
            else:
                route, kind = k.rsplit("_", 1)
                how = {"matvec": f"{hv['matvecs']} matvecs of one operator, incl. construction, per product",
                       "matmat": f"matmat of {hv['matvecs']} columns, incl. construction, per product",
                       "single": "one fm.hvp() (construction + 1 product)"}[kind]
                label = f"HVP / gradient, {route}{' (default)' if route == 'double_backward' else ''}, {how}"
            lines.append(f"| {label} ({model}) | {fmt(s, 'x', 2)} | {tgt} | {met} |")
    notes = []
    for part, c in (("training (unit: one with/without pair)", tr["contention"]), ("HVP (unit: one repeat of all cases)", hv["contention"])):
        if c["enabled"]:
            notes.append(f"{part}: {c['pairs_kept']} kept, {c['pairs_rejected']} redone because other processes used "
                         f"> {100 * c['threshold']:.0f}% of the CPU, {c['kept_pairs_over_threshold']} kept anyway after "
                         f"repeated tries (worst kept: {100 * c['foreign_cpu_fraction_kept_max']:.1f}%)")
    if notes:
        lines.append("")
        lines.append("Contention check: " + "; ".join(notes) + ".")
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE.parent, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "landscape", "probes"], cwd=HERE.parent,
                                    capture_output=True, text=True).stdout.strip())
        return {"commit": head, "dirty": dirty}
    except Exception:
        return {"commit": None, "dirty": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few repeats and steps: a smoke check in < 60 s")
    ap.add_argument("--profile", action="store_true", help="also cProfile one recorded run per configuration")
    ap.add_argument("--steps", type=int, help="training steps per timed run (default 400; quick 120)")
    ap.add_argument("--repeats", type=int, help="interleaved repeats of the training ratios (default 15; quick 2)")
    ap.add_argument("--paired-repeats", type=int,
                    help="paired runs (plain and recorded stepped alternately) per training config (default 7; quick 1)")
    ap.add_argument("--hvp-repeats", type=int, help="interleaved repeats of the HVP ratios (default 15; quick 2)")
    ap.add_argument("--store-dir", type=Path, help="where the recorded runs' stores go (default: the system temp dir)")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="discard and redo a pair when other processes used more than this fraction of the machine's "
                         "CPU during it (default 0.05; 1 disables the check)")
    ap.add_argument("--malloc", choices=("default", "tuned"), default="default",
                    help="glibc malloc policy for the whole process (both sides): 'tuned' sets "
                         + " ".join(f"{k}={v}" for k, v in MALLOC_TUNED.items()) + " (default: the system's)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    if args.malloc == "tuned" and any(os.environ.get(k) != v for k, v in MALLOC_TUNED.items()):
        # glibc reads these once, at start-up: run this script again with them set
        again = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, again, {**os.environ, **MALLOC_TUNED})
    steps = args.steps or (120 if args.quick else 400)
    repeats = args.repeats or (2 if args.quick else 15)
    hvp_repeats = args.hvp_repeats or (2 if args.quick else 15)
    paired_repeats = args.paired_repeats if args.paired_repeats is not None else (1 if args.quick else 7)

    torch.set_num_threads(THREADS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    data = Digits()
    log(f"training overhead: {repeats} repeats x {len(CONFIGS)} configs x 2 runs of {steps} steps, "
        f"then {paired_repeats} paired runs per config")
    def guard() -> Contention:
        return Contention(args.max_foreign, attempts=2 if args.quick else 5, max_wait_s=5.0 if args.quick else 30.0)

    training = bench_training(data, steps, repeats, log, guard(), args.store_dir, paired_repeats=paired_repeats)
    log(f"HVP / gradient: {hvp_repeats} repeats")
    hvp = bench_hvp(data, hvp_repeats, 20, log, guard())
    res: dict[str, Any] = {
        "benchmark": "spine",
        "mode": "quick" if args.quick else "full",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "landscape": landscape.__version__, **git_state(),
                        "malloc": args.malloc, "malloc_env": {k: os.environ.get(k) for k in MALLOC_TUNED}},
        "training": training,
        "hvp": hvp,
    }
    if args.profile:
        log("profiling one run per configuration")
        res["profile"] = profile_configs(data, steps, args.store_dir)
    res["wall_seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(table(res))
    if args.profile:
        for name, p in res["profile"].items():
            print(f"\n## cProfile: {name} ({p['seconds']:.2f} s; phases {p['phases_s']})\n```\n{p['report']}```")
            if p["writer_thread_report"]:
                print(f"\n### store writer thread\n```\n{p['writer_thread_report']}```")
    print(f"\n{res['mode']} run, {res['wall_seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
