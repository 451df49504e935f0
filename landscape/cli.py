"""Command line: ``landscape demo``, ``landscape sweep``, ``landscape info PATH``, ``landscape report RUNS... -o report.html``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def _info(path: Path) -> str:
    from landscape.store import open_run, open_trajectory

    ds = open_run(path)
    a = ds.attrs
    lines = [f"run store   {path}  ({'closed' if a.get('closed') else 'open or interrupted'})",
             f"schema      {a.get('landscape_schema')}   landscape {a.get('landscape_version')}   torch {a.get('torch_version')}",
             f"run         {a.get('run')}"]
    opt = a.get("optimizer", {})
    lines.append(f"optimizer   {opt.get('class')} {opt.get('defaults')}")
    model = a.get("model", {})
    lines.append(f"model       {model.get('class')}, {model.get('parameters')} trainable parameters")
    steps = ds["step"].values if "step" in ds else np.array([])
    lines.append(f"steps       {len(steps)}" + (f" ({steps[0]}..{steps[-1]})" if len(steps) else ""))
    for p in a.get("probes", []):
        lines.append(f"probe       {p}")
    traj = open_trajectory(path)
    if traj.sizes.get("record"):
        size = sum(v.size * v.dtype.itemsize for v in traj.data_vars.values())
        lines.append(f"trajectory  {traj.sizes['record']} records, {size / 2**20:.1f} MiB ({', '.join(traj.data_vars)})")
    if a.get("probe_errors"):
        lines.append(f"ERRORS      {a['probe_errors']}")
    lines.append("")
    lines.append("variables:")
    for name, v in sorted(ds.data_vars.items()):
        desc = f"  {name:18s} ({', '.join(v.dims)})  {v.attrs.get('long_name', '')}"
        if v.ndim <= 1 and v.dtype.kind == "f" and v.size:
            vals = np.asarray(v.values, dtype=float)
            finite = vals[np.isfinite(vals)]
            if "step" in v.dims:
                desc += f"   measured at {finite.size} steps" + (f", last {finite[-1]:.4g}" if finite.size else "")
            else:
                coord = v.dims[0] if v.dims else None
                labels = [str(x) for x in ds[coord].values] if coord and coord in ds.coords else []
                desc += "   " + ", ".join(f"{l}={x:.4g}" for l, x in zip(labels or range(len(vals)), np.atleast_1d(vals)))
        lines.append(desc)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``landscape`` command."""
    parser = argparse.ArgumentParser(prog="landscape", description="Loss-landscape geometry along training runs.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a CNN on the bundled digits with SGD, Adam and SAM (5 seeds each), recording RSI/EB, Hessian curvature, sharpness, valleys and slices; compare the optimizers over seeds; write <out>/report.html")
    d.add_argument("--out", type=Path, default=Path("runs/demo"), help="folder for the run stores (default runs/demo)")
    d.add_argument("--seeds", type=int, default=5, help="seeds per optimizer (default 5)")
    d.add_argument("--epochs", type=int, default=6, help="epochs per run (default 6)")
    d.add_argument("--workers", type=int, default=2, help="worker processes that train the runs side by side "
                   "(default 2, one torch thread each; 1: one after the other in this process)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    w = sub.add_parser("sweep", help="run the demo's experiment (optimizers x seeds on the digits) as parallel jobs on dask; "
                       "re-running skips the finished runs")
    w.add_argument("--optimizers", default="sgd,adam", help="comma-separated demo optimizers (default sgd,adam)")
    w.add_argument("--seeds", type=int, default=3, help="seeds per optimizer: 0..N-1 (default 3)")
    w.add_argument("--out", type=Path, default=Path("runs/sweep"), help="folder for the run stores (default runs/sweep)")
    w.add_argument("--epochs", type=int, default=12, help="epochs per run (default 12)")
    w.add_argument("--workers", type=int, default=2, help="worker processes of the local cluster (default 2)")
    w.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per job (default 1)")
    w.add_argument("--scheduler", default=None, help="address of a running dask scheduler, e.g. tcp://host:8786 "
                   "(default: a local cluster); the workers must see --out")
    w.add_argument("--no-resume", action="store_true", help="redo every run, even the complete ones")
    w.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="summarise a run store")
    i.add_argument("path", type=Path, nargs="?")
    i.add_argument("--schema", action="store_true", help="print the documented schema instead")
    r = sub.add_parser("report", help="write one self-contained HTML page (works offline) with the figures of runs")
    r.add_argument("runs", nargs="+", metavar="RUNS", help="run stores or globs, e.g. 'runs/demo/*.zarr'")
    r.add_argument("-o", "--out", type=Path, default=Path("report.html"), help="the HTML file to write (default report.html)")
    r.add_argument("--title", default=None, help="page title (default: the runs and their optimizers)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from landscape.demo import DemoConfig, run_demo

        if args.seeds < 1 or args.epochs < 1 or args.workers < 1:
            parser.error("--seeds, --epochs and --workers must be >= 1")
        run_demo(DemoConfig(out=args.out, seeds=tuple(range(args.seeds)), epochs=args.epochs), progress=not args.no_progress,
                 workers=args.workers)
        return 0
    if args.command == "sweep":
        from landscape.sweeps import digits_train, parse_optimizers, sweep

        try:
            names = parse_optimizers(args.optimizers)
        except ValueError as exc:
            parser.error(str(exc))
        for flag, value in (("--seeds", args.seeds), ("--epochs", args.epochs), ("--workers", args.workers),
                            ("--threads-per-worker", args.threads_per_worker)):
            if value < 1:
                parser.error(f"{flag} must be >= 1, got {value}")
        try:
            res = sweep(digits_train, {name: {"epochs": args.epochs} for name in names}, args.seeds, args.out,
                        scheduler=args.scheduler, workers=args.workers, threads_per_worker=args.threads_per_worker,
                        resume=not args.no_resume, progress=not args.no_progress)
        except (ValueError, OSError) as exc:
            print(f"landscape sweep: {exc}", file=sys.stderr)
            return 2
        print(res.summary())
        if res.complete:
            from landscape.demo import summary_table

            print()
            print(summary_table(res.complete))
            print(f"\nOpen them: landscape.open_runs('{args.out}/*.zarr'); a page: landscape report '{args.out}/*.zarr'")
        return 0 if res.ok else 1
    if args.command == "info":
        if args.schema:
            from landscape.schema import describe

            print(describe())
            return 0
        if args.path is None:
            parser.error("info needs a PATH (or --schema)")
        from landscape.store import StoreError

        try:
            print(_info(args.path))
        except StoreError as exc:
            print(f"landscape info: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "report":
        from landscape.report import write_report
        from landscape.store import StoreError

        try:
            print(write_report(args.runs, args.out, title=args.title))
        except StoreError as exc:
            print(f"landscape report: {exc}", file=sys.stderr)
            return 2
        return 0
    return 1  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
