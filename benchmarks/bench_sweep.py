"""Sweep benchmark: wall time of the same small sweep with 1 and 2 dask workers.

    python benchmarks/bench_sweep.py            # full run (about 4 minutes on 2 idle CPU cores)
    python benchmarks/bench_sweep.py --quick    # smoke check (about a minute; indicative only)

The sweep: 4 jobs (SGD and Adam x 2 seeds), each a DigitsCNN trained for ``--steps`` steps with
RestrictedSecant(every=10, samples=4) recording to its own store, one torch thread per job
(``threads_per_worker=1``). Two figures per worker count, each the median over interleaved
repeats (1 then 2 workers on even repeats, 2 then 1 on odd ones) with its spread [min-max]:

- end to end: ``landscape.sweep(...)`` with its default LocalCluster, from the call to the
  return: starting the worker processes (which import torch and landscape), the jobs, closing;
- warm cluster: the same sweep (``resume=False``) on an already started cluster whose workers
  have run the job once (``scheduler=`` its address): the jobs and dask's scheduling only.

The ratio 1 worker / 2 workers is the speed-up (2 at best on 2 cores). For reference, the 4 jobs
run one after the other in this process, without dask, with one torch thread ("serial"). Other
processes on the machine distort these wall times; the 1-minute load average before and after
is stored with the results (``benchmarks/results/sweep.json``); a markdown table is printed.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_spine import fmt, git_state, spread  # noqa: E402

import landscape  # noqa: E402
from landscape.data import load_digits, split  # noqa: E402
from landscape.models import DigitsCNN  # noqa: E402
from landscape.sweeps import local_cluster, sweep  # noqa: E402
from probes import RestrictedSecant  # noqa: E402

RESULTS = HERE / "results" / "sweep.json"
CONFIGS = {"sgd": {}, "adam": {}}
SEEDS = [0, 1]
WORKERS = (1, 2)


def bench_train(name: str, config: dict, seed: int, store_path: Path) -> None:
    """One job of the benchmark's sweep (the workers receive it by value: this file is __main__)."""
    (X, y), _ = split(*load_digits(), 0.8, seed=0)
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=2e-3))
    gen = torch.Generator().manual_seed(seed)
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64,
                          probes=[RestrictedSecant(every=10, samples=4)], store=store_path, overwrite=True,
                          run={"optimizer": name, "seed": seed, **config}):
        for _ in range(int(config["steps"])):
            idx = torch.randint(0, len(X), (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats: a smoke check")
    ap.add_argument("--steps", type=int, default=None, help="training steps per job (default 300, quick 60)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3, quick 1)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)
    configs = {name: {**cfg, "steps": steps} for name, cfg in CONFIGS.items()}
    jobs = len(configs) * len(SEEDS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    load0 = loadavg()
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "sweep", "mode": "quick" if args.quick else "full", "repeats": repeats, "steps_per_job": steps,
        "jobs": jobs, "threads_per_worker": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": os.cpu_count(), "landscape": landscape.__version__, **git_state()},
    }
    try:
        # serial reference: the same jobs in this process, one torch thread, no dask
        torch.set_num_threads(1)
        bench_train("sgd", {"steps": 5}, 0, work / "warmup.zarr")
        serial = []
        for r in range(repeats):
            t, _ = timed(lambda: [bench_train(n, c, s, work / f"serial-{n}-{s}.zarr") for n, c in configs.items() for s in SEEDS])
            serial.append(t)
        log(f"serial: {statistics.median(serial):.1f} s")

        end_to_end: dict[int, list[float]] = {w: [] for w in WORKERS}
        warm: dict[int, list[float]] = {w: [] for w in WORKERS}
        job_s: dict[int, list[float]] = {w: [] for w in WORKERS}
        clusters = {w: local_cluster(w) for w in WORKERS}  # the cluster sweep() starts by default
        try:
            for w, c in clusters.items():  # warm-up: the workers import torch and landscape, run a job
                sweep(bench_train, configs, SEEDS, work / f"warm-{w}", scheduler=c.scheduler_address, progress=False)
            for r in range(repeats):
                for w in (WORKERS if r % 2 == 0 else WORKERS[::-1]):
                    out = work / f"e2e-{w}-{r}"
                    t, sw = timed(lambda: sweep(bench_train, configs, SEEDS, out, workers=w, progress=False))
                    assert sw.ok and len(sw.finished) == jobs, sw.summary()
                    end_to_end[w].append(t)
                    t, sw = timed(lambda: sweep(bench_train, configs, SEEDS, work / f"warm-{w}", resume=False,
                                                scheduler=clusters[w].scheduler_address, progress=False))
                    assert sw.ok and len(sw.finished) == jobs, sw.summary()
                    warm[w].append(t)
                    job_s[w].extend(sw.job_seconds.values())
                    log(f"repeat {r}, {w} worker(s): end to end {end_to_end[w][-1]:.1f} s, warm cluster {warm[w][-1]:.1f} s")
        finally:
            for c in clusters.values():
                c.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    res["serial_s"] = spread(serial)
    res["workers"] = {str(w): {"end_to_end_s": spread(end_to_end[w]), "warm_cluster_s": spread(warm[w]),
                               "job_s": spread(job_s[w])} for w in WORKERS}
    res["speedup_2_over_1"] = {
        "end_to_end": spread([a / b for a, b in zip(end_to_end[1], end_to_end[2])]),
        "warm_cluster": spread([a / b for a, b in zip(warm[1], warm[2])]),
    }
    res["loadavg_1min"] = {"before": load0, "after": loadavg()}
    res["seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


def table(res: dict[str, Any]) -> str:
    L = [f"| sweep of {res['jobs']} jobs ({res['steps_per_job']} steps of DigitsCNN each, 1 torch thread per job) | "
         "wall time, s | 1 worker / 2 workers |", "|---|---|---|"]
    s = res["speedup_2_over_1"]
    for kind, key in (("end to end (LocalCluster start + jobs + close)", "end_to_end_s"), ("warm cluster (jobs only)", "warm_cluster_s")):
        for w in ("1", "2"):
            ratio = fmt(s["end_to_end" if key == "end_to_end_s" else "warm_cluster"], "x", 2) if w == "2" else ""
            L.append(f"| {kind}, {w} worker{'s' if w == '2' else ''} | {fmt(res['workers'][w][key], ' s', 1)} | {ratio} |")
    L.append(f"| serial in one process, no dask | {fmt(res['serial_s'], ' s', 1)} | |")
    L.append("")
    L.append(f"One job on a worker: {fmt(res['workers']['1']['job_s'], ' s', 2)} with 1 worker, "
             f"{fmt(res['workers']['2']['job_s'], ' s', 2)} with 2 (medians [min-max] over repeats; "
             f"load average {res['loadavg_1min']['before']:.1f} before, {res['loadavg_1min']['after']:.1f} after).")
    return "\n".join(L)


if __name__ == "__main__":
    raise SystemExit(main())
