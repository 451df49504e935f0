"""Hierarchical bootstrap benchmark: the numba kernel against the numpy implementation.

    python benchmarks/bench_compare.py            # full run: 10 seeds x 200 steps, 10,000 resamples
    python benchmarks/bench_compare.py --quick    # smoke check (seconds; indicative only)

``landscape.compare.hierarchical_bootstrap`` resamples seeds, then steps within each chosen
seed. Both backends consume the same ``numpy.random.default_rng(seed)`` stream and produce the
same resamples (checked here: the script stops if the distributions differ), so the comparison
is of the same work. Each repeat times one call of each backend, interleaved (numba then numpy on
even repeats, the reverse on odd ones), after a warm-up call of each that is not counted; the
figure is the median over repeats of numpy time / numba time with its spread [min-max]. The
numba compile time is measured separately, on a fresh dispatcher of the same kernel (no on-disk
cache), as the first call's time minus a warm call's. bench_spine's /proc/stat contention check
applies throughout. Results go to ``benchmarks/results/compare.json``; a markdown table is printed.
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numba
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_spine import Contention, fmt, git_state, spread  # noqa: E402

import landscape  # noqa: E402
from landscape import compare as cmp  # noqa: E402

RESULTS = HERE / "results" / "compare.json"


def data(seeds: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic (seed, step) window: a seed effect plus noise within the seed."""
    rng = np.random.default_rng(0)
    values = (rng.normal(size=(seeds, 1)) + 0.3 * rng.normal(size=(seeds, steps))).ravel()
    return values, np.repeat(np.arange(seeds), steps)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compile_time(values: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """First call of a fresh (uncached) dispatcher minus a warm call, on a tiny input (one
    compilation serves both statistics: the choice is a runtime flag)."""
    fresh = numba.njit(cmp._hboot_numba.py_func)
    v, offsets = cmp._csr(values[:20], groups[:20])
    first, _ = timed(lambda: fresh(v, offsets, np.random.default_rng(0), 10, False))
    warm, _ = timed(lambda: fresh(v, offsets, np.random.default_rng(0), 10, True))
    return {"compile_s": first - warm}


def bench(stat: str, values: np.ndarray, groups: np.ndarray, n_boot: int, repeats: int, guard: Contention,
          log: Callable[[str], None]) -> dict[str, Any]:
    def call(backend: str) -> Any:
        return cmp.hierarchical_bootstrap(values, groups, statistic=stat, n_boot=n_boot, seed=1, backend=backend)

    a, b = call("numba"), call("numpy")  # warm-up, and the check that the two do the same work
    if not np.allclose(a.distribution, b.distribution, rtol=0, atol=1e-9):
        raise SystemExit(f"numba and numpy bootstrap distributions differ ({stat}): max |diff| "
                         f"{np.abs(a.distribution - b.distribution).max():.3g}")
    ratios, nb_ms, np_ms = [], [], []
    for r in range(repeats):
        def pair() -> tuple[float, float]:
            if r % 2:
                t_np, _ = timed(lambda: call("numpy"))
                t_nb, _ = timed(lambda: call("numba"))
            else:
                t_nb, _ = timed(lambda: call("numba"))
                t_np, _ = timed(lambda: call("numpy"))
            return t_nb, t_np

        t_nb, t_np = guard.measure(pair, log)
        ratios.append(t_np / t_nb)
        nb_ms.append(1e3 * t_nb)
        np_ms.append(1e3 * t_np)
        log(f"  {stat} repeat {r}: numba {1e3 * t_nb:.1f} ms, numpy {1e3 * t_np:.1f} ms")
    return {"numpy_over_numba": spread(ratios), "numba_ms": spread(nb_ms), "numpy_ms": spread(np_ms),
            "ci": [a.low, a.high]}


def table(res: dict[str, Any]) -> str:
    s = res["size"]
    L = ["| statistic | numba, ms | numpy, ms | numpy / numba |", "|---|---|---|---|"]
    for stat, r in res["results"].items():
        L.append(f"| {stat} | {fmt(r['numba_ms'], '', 1)} | {fmt(r['numpy_ms'], '', 1)} | {fmt(r['numpy_over_numba'], 'x', 1)} |")
    L.append("")
    L.append(f"Hierarchical bootstrap of {s['seeds']} seeds x {s['steps']} steps, {s['n_boot']} resamples, "
             f"{res['repeats']} interleaved repeats (median [min-max]). Numba compile time (fresh dispatcher, "
             f"not cached; paid once per installation, later processes load the cached kernel): "
             f"{res['compile']['compile_s']:.2f} s.")
    c = res.get("contention", {})
    if c.get("enabled"):
        L.append(f"Contention check: {c.get('pairs_rejected', 0)} pairs measured again.")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller and fewer: a smoke check")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200, help="steps per seed in the window (default 200)")
    ap.add_argument("--n-boot", type=int, default=None, help="resamples (default 10000, quick 1000)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7, quick 2)")
    ap.add_argument("--max-foreign", type=float, default=0.05, help="contention threshold (1 disables)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    n_boot = args.n_boot or (1000 if args.quick else 10_000)
    repeats = args.repeats or (2 if args.quick else 7)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    guard = Contention(args.max_foreign, attempts=2 if args.quick else 5, max_wait_s=5.0 if args.quick else 30.0)
    values, groups = data(args.seeds, args.steps)
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "benchmark": "compare", "mode": "quick" if args.quick else "full", "repeats": repeats,
        "size": {"seeds": args.seeds, "steps": args.steps, "n_boot": n_boot},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"numba": numba.__version__, "numpy": np.__version__, "python": platform.python_version(),
                        "platform": platform.platform(), "cpu_count": os.cpu_count(),
                        "landscape": landscape.__version__, **git_state()},
        "compile": compile_time(values, groups),
        "results": {},
    }
    for stat in ("mean", "median"):
        log(stat)
        res["results"][stat] = bench(stat, values, groups, n_boot, repeats, guard, log)
    res["contention"] = guard.summary()
    res["seconds"] = time.perf_counter() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
