"""Peak memory of recording, against the number of parameters and the number of steps.

    python benchmarks/bench_memory.py            # d = 1e4, 1e5, 1e6; 50 and 200 steps (several minutes)
    python benchmarks/bench_memory.py --quick    # d = 1e4, 1e5; 20 and 80 steps (about 2 minutes)

Every configuration runs in a fresh Python process (``python bench_memory.py --worker JSON``), so
no allocation of one configuration is seen by another. The worker imports everything, builds the
model, the optimizer and the synthetic data, and reads its resident set size (baseline); then it
attaches the recorder, trains, closes the recorder (the end-of-run computations included) and
reads the peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss``). The figure is peak minus
baseline: what training plus recording added at its worst moment. Results go to
``benchmarks/results/memory.json``; a markdown table is printed. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "memory.json"
IN, OUT = 64, 10  # synthetic data: 64 features, 10 classes
BATCH = 32
SKETCH = 64  # k * d * 4 bytes of sketch matrix are cached (up to 256 MiB): 64 keeps d = 1e6 cached
# hidden width -> d = h^2 + 76 h + 10 (two hidden layers): about 1e4, 1e5, 1e6 parameters
WIDTHS = {"1e4": 70, "1e5": 275, "1e6": 962}
PROBES = {
    "plain": "no recorder: the training loop alone",
    "secant_full": "RestrictedSecant(every=1, samples=0): w_t, g_t and the update streamed as full vectors every step",
    "secant_sketch": f"RestrictedSecant(every=1, samples=0, sketch={SKETCH}): the same as {SKETCH}-dim Gaussian sketches",
    "spectrum_blocks": "HessianSpectrum(every=25, k=5, blocks='modules'): top 5 of each layer's Hessian block",
}


# -- the worker (runs in a fresh process) ------------------------------------------------------


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; the peak's unit is KiB there too)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _maxrss_bytes() -> int:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024  # bytes on macOS, KiB on Linux


def _mlp(hidden: int) -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, OUT))


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    import landscape
    from probes import HessianSpectrum, RestrictedSecant

    torch.set_num_threads(cfg.get("threads", 2))
    torch.manual_seed(0)
    if cfg["kind"] == "operator":
        return operator_worker(cfg)
    model = _mlp(cfg["hidden"])
    d = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    n = 2048
    X = torch.randn(n, IN, generator=gen)
    y = torch.randint(0, OUT, (n,), generator=gen)
    probe = cfg["probe"]
    probes = {
        "plain": None,
        "secant_full": lambda: [RestrictedSecant(every=1, samples=0)],
        "secant_sketch": lambda: [RestrictedSecant(every=1, samples=0, sketch=SKETCH)],
        "spectrum_blocks": lambda: [HessianSpectrum(every=25, k=5, blocks="modules")],
    }[probe]
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=cfg.get("store_dir")))
    import gc

    gc.collect()
    base_rss, base_peak = _rss_bytes(), _maxrss_bytes()
    t0 = time.perf_counter()
    rec = None
    if probes is not None:
        rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64,
                               probes=probes(), store=tmp / "run.zarr", run={"probe": probe})
    for step in range(cfg["steps"]):
        idx = torch.randint(0, n, (BATCH,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    out: dict[str, Any] = {"dim": d}
    out["peak_before_close_over_baseline"] = _maxrss_bytes() - base_rss  # training only; close() reads the trajectory
    if rec is not None:
        rec.close()
        out["probe_errors"] = {k: str(v)[:300] for k, v in dict(rec.probe_errors).items()}
        out["writer_errors"] = [str(e)[:300] for e in rec.writer.errors]
        out["rows"] = int(rec.writer.rows)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes()
    store = 0
    for root, _, names in os.walk(tmp):
        for name in names:
            store += os.lstat(os.path.join(root, name)).st_size
    shutil.rmtree(tmp, ignore_errors=True)
    out.update(baseline_rss=base_rss, baseline_peak=base_peak, peak=peak, peak_over_baseline=peak - base_rss,
               seconds=seconds, store_bytes=store, store_bytes_per_step=store / cfg["steps"], param_bytes=4 * d)
    return out


def operator_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build a HessianOperator on one big batch and apply it to a few vectors, whole or in chunks."""
    import gc

    import torch
    import torch.nn.functional as F

    from landscape.functional import FunctionalModel, HessianOperator

    model = _mlp(cfg["hidden"]).eval()
    fm = FunctionalModel(model, F.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(cfg["examples"], IN, generator=gen)
    y = torch.randint(0, OUT, (cfg["examples"],), generator=gen)
    w = fm.flat_params()
    V = torch.randn(fm.dim, 3, generator=gen)
    if cfg["chunk"] is not None:
        if not hasattr(fm, "chunk_size"):
            return {"available": False, "dim": fm.dim}
        fm.set_chunk_size(cfg["chunk"]) if hasattr(fm, "set_chunk_size") else setattr(fm, "chunk_size", cfg["chunk"])
    gc.collect()
    base_rss = _rss_bytes()
    t0 = time.perf_counter()
    op = HessianOperator(fm, w, (X, y))
    hv = torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)
    seconds = time.perf_counter() - t0
    peak = _maxrss_bytes()
    return {"available": True, "dim": fm.dim, "route": op.route, "baseline_rss": base_rss, "peak": peak,
            "peak_over_baseline": peak - base_rss, "seconds": seconds, "hv_checksum": float(hv.double().norm()), "vHv": [float(V[:, j] @ hv[:, j]) for j in range(V.shape[1])],
            "activation_bytes_per_layer": 4 * cfg["examples"] * cfg["hidden"]}


# -- the driver --------------------------------------------------------------------------------


def run_worker(cfg: dict[str, Any], log: Any) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(cfg)],
                          capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        log(f"    worker failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        return {"failed": True, "stderr": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fit(ds: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line y = a + b d (b: bytes per parameter) and its R^2."""
    import numpy as np

    d, y = np.asarray(ds, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    b, a = np.polyfit(d, y, 1)
    pred = a + b * d
    ss = float(((y - y.mean()) ** 2).sum())
    return {"bytes_per_param": float(b), "intercept_bytes": float(a),
            "r2": 1.0 - float(((y - pred) ** 2).sum()) / ss if ss > 0 else float("nan")}


def summarize(runs: dict[str, dict[str, dict[str, Any]]], sizes: list[str], steps: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lo, hi = steps
    for probe, by in runs.items():
        s: dict[str, Any] = {"steps_ratio": {}, "fit": {}, "d_ratio": {}}
        for size in sizes:
            a, b = by.get(f"{size}/{lo}"), by.get(f"{size}/{hi}")
            if a and b and not a.get("failed") and not b.get("failed"):
                s["steps_ratio"][size] = b["peak_over_baseline"] / max(1, a["peak_over_baseline"])
        for n in steps:
            pts = [(by[f"{size}/{n}"]["dim"], by[f"{size}/{n}"]["peak_over_baseline"]) for size in sizes
                   if f"{size}/{n}" in by and not by[f"{size}/{n}"].get("failed")]
            if len(pts) >= 2:
                s["fit"][str(n)] = _fit([p[0] for p in pts], [p[1] for p in pts])
                (d0, p0), (d1, p1) = pts[-2], pts[-1]
                s["d_ratio"][str(n)] = {"d": d1 / d0, "peak": p1 / max(1, p0), "between": f"{sizes[-2]} -> {sizes[-1]}"}
        out[probe] = s
    return out


def _mib(x: float) -> str:
    return f"{x / 2**20:.1f}"


def table(res: dict[str, Any]) -> str:
    sizes, (lo, hi) = res["sizes"], res["steps"]
    L = ["| probe | " + " | ".join(f"d={res['dims'][s]:,}: peak MiB {lo} / {hi} steps (training alone), ratio {hi}/{lo}" for s in sizes)
         + " | bytes per param (fit, R^2) | peak ratio across d |",
         "|---|" + "---|" * len(sizes) + "---|---|"]
    for probe, by in res["runs"].items():
        cells = []
        for s in sizes:
            a, b = by.get(f"{s}/{lo}", {}), by.get(f"{s}/{hi}", {})
            if a.get("failed") or b.get("failed") or not a or not b:
                cells.append("failed")
                continue
            cells.append(f"{_mib(a['peak_over_baseline'])} ({_mib(a['peak_before_close_over_baseline'])}) / "
                         f"{_mib(b['peak_over_baseline'])} ({_mib(b['peak_before_close_over_baseline'])}), "
                         f"{res['summary'][probe]['steps_ratio'].get(s, float('nan')):.2f}")
        fit = res["summary"][probe]["fit"].get(str(hi))
        dr = res["summary"][probe]["d_ratio"].get(str(hi))
        fit_s = f"{fit['bytes_per_param']:.1f} B ({fit['r2']:.3f})" if fit else ""
        dr_s = f"{dr['peak']:.1f}x for {dr['d']:.1f}x d ({dr['between']})" if dr else ""
        L.append(f"| {probe} | " + " | ".join(cells) + f" | {fit_s} | {dr_s} |")
    L.append("")
    L.append("| store bytes per step | " + " | ".join(f"d={res['dims'][s]:,}" for s in sizes) + " |")
    L.append("|---|" + "---|" * len(sizes))
    for probe, by in res["runs"].items():
        if probe == "plain":
            continue
        cells = []
        for s in sizes:
            r = by.get(f"{s}/{hi}", {})
            cells.append("failed" if r.get("failed") or not r else
                         f"{r['store_bytes_per_step'] / 1024:.1f} KiB = {r['store_bytes_per_step'] / r['param_bytes']:.3f} x 4d")
        L.append(f"| {probe} | " + " | ".join(cells) + " |")
    op = res["operator"]
    L.append("")
    if op.get("chunked", {}).get("available") is False:
        L.append("HessianOperator on one big batch vs chunks: **not available** (FunctionalModel has no chunk_size).")
    elif op:
        w, c = op["whole"], op["chunked"]
        if w.get("failed") or c.get("failed"):
            L.append("HessianOperator on one big batch vs chunks: a worker failed (see the JSON).")
        else:
            L.append(f"HessianOperator on one batch of {op['examples']:,} examples (d={w['dim']:,}), build + 3 matvecs: "
                     f"whole batch ({w['route']}) peak +{_mib(w['peak_over_baseline'])} MiB, {w['seconds']:.1f} s; "
                     f"chunk_size={op['chunk']} ({c['route']}) peak +{_mib(c['peak_over_baseline'])} MiB, {c['seconds']:.1f} s "
                     f"(ratio {w['peak_over_baseline'] / max(1, c['peak_over_baseline']):.1f}x; one activation of one layer: "
                     f"{_mib(w['activation_bytes_per_layer'])} MiB whole); same products: {op['same_products']}.")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="d = 1e4, 1e5 and 20 / 80 steps (under 2 minutes)")
    ap.add_argument("--jobs", type=int, default=2, help="configurations measured at once, one process each (default 2)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--store-dir", help="where the workers' stores go (default: the system temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    sizes = ["1e4", "1e5"] if args.quick else ["1e4", "1e5", "1e6"]
    steps = [20, 80] if args.quick else [50, 200]
    runs: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in PROBES}
    dims: dict[str, int] = {}
    load0 = os.getloadavg()[0]
    jobs = [(size, n, probe) for size in sizes for n in steps for probe in PROBES]

    def one(job: tuple[str, int, str]) -> dict[str, Any]:
        size, n, probe = job
        log(f"d~{size}, {n} steps, {probe}")
        return run_worker({"kind": "train", "hidden": WIDTHS[size], "steps": n, "probe": probe,
                           "store_dir": args.store_dir}, log)

    # Workers in parallel (--jobs): each measures its own process's peak, which the other
    # process does not change; only the wall times (not reported as results) are affected.
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (size, n, probe), r in zip(jobs, pool.map(one, jobs)):
            runs[probe][f"{size}/{n}"] = r
            if "dim" in r:
                dims[size] = r["dim"]
            if r.get("probe_errors") or r.get("writer_errors"):
                log(f"    errors in {probe}, d~{size}, {n} steps: {r.get('probe_errors')} {r.get('writer_errors')}")
    # (iv) one big probe batch, whole vs chunked
    examples, chunk = (4096, 512) if args.quick else (16384, 1024)
    hidden = WIDTHS["1e5"] if args.quick else WIDTHS["1e6"]
    op: dict[str, Any] = {"examples": examples, "chunk": chunk}
    for name, c in (("whole", None), ("chunked", chunk)):
        log(f"HessianOperator, {examples} examples, chunk_size={c}")
        op[name] = run_worker({"kind": "operator", "hidden": hidden, "examples": examples, "chunk": c}, log)
    if op["whole"].get("available") and op["chunked"].get("available"):
        a, b = op["whole"], op["chunked"]
        # float32 sums in another order: equal to rounding (v^T H v and |H V| of the same V)
        op["same_products"] = all(abs(x - y) <= 1e-3 * (abs(x) + 1e-12) for x, y in
                                  zip([a["hv_checksum"], *a["vHv"]], [b["hv_checksum"], *b["vHv"]]))
    res: dict[str, Any] = {
        "benchmark": "memory", "mode": "quick" if args.quick else "full",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()},
        "sizes": sizes, "steps": steps, "dims": dims, "batch": BATCH, "sketch": SKETCH,
        "probes": PROBES, "runs": runs, "summary": summarize(runs, sizes, steps), "operator": op,
        "loadavg_1min_before_after": [load0, os.getloadavg()[0]],
    }
    res["wall_seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"\n{res['mode']} run, {res['wall_seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
