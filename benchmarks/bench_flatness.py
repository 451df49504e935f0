"""Flatness and valley benchmarks: what each probe of issue 4 costs per measurement, in gradients.

    python benchmarks/bench_flatness.py            # full run (about 5 minutes on 2 idle CPU cores)
    python benchmarks/bench_flatness.py --quick    # smoke check (about a minute; indicative only)

For each probe configuration and model, at a mildly trained point: one measurement
(``probe.measure`` inside the recorder's guard, on a fresh step context, so nothing is shared
with other probes) and one gradient of the same model on the same probe batch are timed side by
side, interleaved (A B, then B A), after a warm-up measurement that is not counted (it also gives
stateful probes, such as the trajectory direction or the previous checkpoint, their history).
The figure is the median over repeats of measurement time / gradient time: the probe's cost in
gradient-equivalents per measurement, with its spread [min-max]. End-of-run parts (PAC-Bayes,
the PCA surface) are timed the same way around ``finalize``. ``torch.set_num_threads(2)`` and
bench_spine's /proc/stat contention check throughout. Results go to
``benchmarks/results/flatness.json``; a markdown table is printed.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see bench_curvature.py

import argparse  # noqa: E402
import datetime as _dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_curvature import MODELS, trained  # noqa: E402
from bench_spine import Contention, Digits, fmt, git_state, spread  # noqa: E402

import landscape  # noqa: E402
from landscape.functional import FunctionalModel, probe_guard  # noqa: E402
from probes import (GradientNoise, GradientOverlap, Interpolation, LossProfile, RiverHill, Sharpness,  # noqa: E402
                    StepCurvature, TrajectoryPCA, ValleyWidth)
from probes.base import Context  # noqa: E402

RESULTS = HERE / "results" / "flatness.json"
THREADS = 2
BATCH = 256  # examples in the probe batch every probe measures on (samples=1)
GAP = 10     # steps between the warm-up measurement and the timed ones

# name -> (probe factory, what it measures)
PROBES: dict[str, tuple[Callable[[], Any], str]] = {
    "sharpness_average": (lambda: Sharpness(kinds=("average",)), "average-case, 16 antithetic pairs of Gaussian draws (32 forward passes)"),
    "sharpness_average_adaptive": (lambda: Sharpness(kinds=("average_adaptive",)), "average-case, c = abs(w)"),
    "sharpness_worst_l2_adaptive": (lambda: Sharpness(kinds=("worst_l2_adaptive",)), "worst-case l2, c = abs(w), Auto-PGD 20 steps"),
    "sharpness_worst_linf_adaptive": (lambda: Sharpness(kinds=("worst_linf_adaptive",)), "worst-case linf, c = abs(w), Auto-PGD 20 steps"),
    "sharpness_sam": (lambda: Sharpness(kinds=("sam",)), "one-step SAM, rho = 0.05"),
    "sharpness_asam": (lambda: Sharpness(kinds=("asam",)), "one-step ASAM, rho = 0.05"),
    "sharpness_default": (lambda: Sharpness(), "Sharpness() defaults"),
    "step_curvature": (lambda: StepCurvature(), "u^T H u + secant + lambda_max (own Lanczos)"),
    "step_curvature_no_anisotropy": (lambda: StepCurvature(anisotropy=False), "u^T H u + secant only"),
    "river_hill": (lambda: RiverHill(), "EMA iterate, 2 forward passes"),
    "valley_width": (lambda: ValleyWidth(), "trajectory + top eigenvector + 1 random, rtol 1e-2"),
    "gradient_overlap": (lambda: GradientOverlap(k=10), "top-10 eigenspace (own Lanczos, tol 1e-3)"),
    "interpolation": (lambda: Interpolation(), "11 points on the segment from the previous checkpoint"),
    "loss_profile": (lambda: LossProfile(), "3 directions x 21 points"),
    "trajectory_pca": (lambda: TrajectoryPCA(), "per step: the snapshot and L(w_t)"),
    "gradient_noise_per_sample": (lambda: GradientNoise(method="per_sample"), f"per-example gradients of {BATCH} examples (vmap)"),
    "gradient_noise_per_batch": (lambda: GradientNoise(method="per_batch", samples=4), f"4 batch gradients of {BATCH}"),
}
FINALIZE: dict[str, tuple[Callable[[], Any], str]] = {
    "pac_bayes": (lambda: Sharpness(kinds=("sam",), pac_bayes=True), "PAC-Bayes sigma, both perturbations (end of run)"),
    "trajectory_pca_surface": (lambda: TrajectoryPCA(grid=21), "PCA + 21 x 21 surface (end of run)"),
}


def perf() -> float:
    return time.perf_counter()


class Point:
    """A trained model, its probe batches and two consecutive step contexts' ingredients."""

    def __init__(self, cls: type[nn.Module], data: Digits, train_steps: int) -> None:
        self.model = trained(cls, data, train_steps)
        self.fm = FunctionalModel(self.model, F.cross_entropy)
        gen = torch.Generator().manual_seed(1)
        self.batches = []
        for _ in range(4):
            idx = torch.randperm(data.Xtr.shape[0], generator=gen)[:BATCH]
            self.batches.append((data.Xtr[idx], data.ytr[idx]))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        w0 = self.fm.flat_params()
        g = self.fm.grad(w0, self.batches[0])
        self.points = [w0 - 0.05 * GAP * g * k for k in range(3)]  # a short, plausible path

    def context(self, i: int, **extra: Any) -> Context:
        w = self.points[min(i, len(self.points) - 1)]
        nxt = self.points[min(i + 1, len(self.points) - 1)] if i + 1 < len(self.points) else w - 0.05 * self.fm.grad(w, self.batches[0])
        return Context(step=i * GAP, functional=self.fm, model=self.model, optimizer=self.opt,
                       probe_batches=self.batches, params=w, grad=self.fm.grad(w, self.batches[1]),
                       update=(nxt - w) / GAP, lr=0.05, **extra)

    def gradient_s(self) -> float:
        t0 = perf()
        self.fm.loss_and_grad(self.points[0], self.batches[0])
        return perf() - t0


def _measure_s(probe: Any, ctx: Context) -> float:
    with probe_guard(ctx.model, probe.bn_mode):
        t0 = perf()
        probe.measure(ctx)
        return perf() - t0


def bench_probe(point: Point, make: Callable[[], Any], repeats: int, guard: Contention, log: Callable[[str], None]) -> dict[str, Any]:
    probe = make()
    probe.setup(point.fm, point.opt)
    _measure_s(probe, point.context(0))  # warm-up and history (previous checkpoint, trajectory)
    ratios, ms, gms = [], [], []
    for r in range(repeats):
        def pair() -> tuple[float, float]:
            ctx = point.context(1)
            if r % 2:
                g = point.gradient_s()
                t = _measure_s(probe, ctx)
            else:
                t = _measure_s(probe, ctx)
                g = point.gradient_s()
            return t, g

        t, g = guard.measure(pair, log)
        ratios.append(t / g)
        ms.append(1e3 * t)
        gms.append(1e3 * g)
    return {"grad_equivalents": spread(ratios), "ms": spread(ms), "grad_ms": spread(gms)}


def bench_finalize(point: Point, make: Callable[[], Any], repeats: int, guard: Contention, log: Callable[[str], None]) -> dict[str, Any]:
    ratios, ms = [], []
    for r in range(repeats):
        probe = make()
        probe.setup(point.fm, point.opt)
        snapshots: list[tuple[int, Any]] = []
        for i in range(3):
            out = probe.measure(point.context(i))
            if out.trajectory:
                snapshots.append((i * GAP, out.trajectory["params"].data))

        def trajectory(names: Any) -> Any:
            if snapshots:
                yield (np.array([s for s, _ in snapshots]),
                       {"params": np.stack([np.asarray(v.detach().cpu() if hasattr(v, "detach") else v) for _, v in snapshots])})

        ctx = Context(step=3 * GAP, functional=point.fm, model=point.model, optimizer=point.opt,
                      probe_batches=point.batches, final_params=point.points[-1] - 0.01, trajectory=trajectory)

        def pair() -> tuple[float, float]:
            with probe_guard(point.model, probe.bn_mode):
                g = point.gradient_s() if r % 2 else 0.0
                t0 = perf()
                probe.finalize(ctx)
                t = perf() - t0
                g = g or point.gradient_s()
            return t, g

        t, g = guard.measure(pair, log)
        ratios.append(t / g)
        ms.append(1e3 * t)
    return {"grad_equivalents": spread(ratios), "ms": spread(ms)}


def table(res: dict[str, Any]) -> str:
    models = list(res["models"])
    L = ["| probe | what | " + " | ".join(f"{m} (gradients per measurement)" for m in models) + " |",
         "|---|---|" + "---|" * len(models)]
    for name, (_, what) in {**PROBES, **FINALIZE}.items():
        cells = []
        for m in models:
            r = res["models"][m].get(name)
            cells.append(fmt(r["grad_equivalents"], "", 1) if r else "n/a")
        L.append(f"| `{name}` | {what} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("One gradient = loss and gradient of the model on one probe batch of "
             f"{BATCH} examples: " + ", ".join(f"{m} {res['models'][m]['gradient_ms']:.1f} ms" for m in models) + ".")
    c = res.get("contention", {})
    if c:
        L.append(f"Contention check: {c.get('pairs_rejected', 0)} pairs measured again.")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats: a smoke check")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats per probe (default 5, quick 2)")
    ap.add_argument("--only", default="", help="comma-separated probe names to run (default all)")
    ap.add_argument("--max-foreign", type=float, default=0.05, help="contention threshold (1 disables)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    torch.set_num_threads(THREADS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    guard = Contention(args.max_foreign, attempts=2 if args.quick else 5, max_wait_s=5.0 if args.quick else 30.0)
    data = Digits()
    res: dict[str, Any] = {
        "benchmark": "flatness", "mode": "quick" if args.quick else "full", "repeats": repeats, "batch": BATCH,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "landscape": landscape.__version__, **git_state()},
        "models": {},
    }
    t_start = perf()
    for mname, cls in MODELS.items():
        log(f"{mname}")
        point = Point(cls, data, 100)
        point.gradient_s()
        out: dict[str, Any] = {"gradient_ms": 1e3 * statistics.median(point.gradient_s() for _ in range(5))}
        for name, (make, _) in PROBES.items():
            if only and name not in only:
                continue
            out[name] = bench_probe(point, make, repeats, guard, log)
            log(f"  {name}: {out[name]['grad_equivalents']['median']:.1f} gradients per measurement")
        for name, (make, _) in FINALIZE.items():
            if only and name not in only:
                continue
            out[name] = bench_finalize(point, make, repeats, guard, log)
            log(f"  {name}: {out[name]['grad_equivalents']['median']:.1f} gradients")
        res["models"][mname] = out
    res["contention"] = guard.summary()
    res["seconds"] = perf() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
