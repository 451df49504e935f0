"""torch.compile for Hessian-vector products: compiled against eager, per product, in gradients.

    python benchmarks/bench_compile.py            # full run (about 10 minutes on 2 idle CPU cores)
    python benchmarks/bench_compile.py --quick    # smoke check (a few minutes; numbers indicative only)

On the digits MLP (64 examples and the whole training split) and the digits CNN (the same), side
by side in this process and interleaved (A B, then B A on the next repeat) after an uncounted
warm-up, with ``torch.set_num_threads(2)`` and bench_spine's /proc/stat contention check: the
cost of 10 Hessian-vector products, one vector at a time and as one block of 10, by eager double
backward (building the operator included), eager forward-over-reverse and
:class:`landscape.compiled.CompiledHVP`, each over the cost of 10 gradients. The compile time
(first call of each graph, a fresh inductor cache) is reported separately, with the number of
products after which compiling has paid for itself. Results go to
``benchmarks/results/compile.json``; a markdown table is printed. See benchmarks/README.md.
"""
from __future__ import annotations

import os
import tempfile

# A fresh inductor cache for this process: compile times are those of a first use (set before
# torch._inductor reads it).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench-compile-inductor-"))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime as _dt
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_spine import Contention, Digits, fmt, git_state, spread  # noqa: E402

import landscape  # noqa: E402
from landscape.compiled import CompiledHVP, compile_available  # noqa: E402
from landscape.functional import FunctionalModel, HessianOperator, probe_guard  # noqa: E402
from landscape.models import DigitsCNN, DigitsMLP  # noqa: E402

RESULTS = HERE / "results" / "compile.json"
THREADS = 2
BLOCK = 10  # products per timed unit, and the width of the block
MODELS: dict[str, Callable[[], nn.Module]] = {"DigitsMLP": DigitsMLP, "DigitsCNN": DigitsCNN}
CASES = {
    "double_backward_single": "eager double backward: build the operator + 10 matvecs",
    "double_backward_block": "eager double backward: build + one matmat of 10 columns (vmap)",
    "fwd_rev_single": "eager forward-over-reverse: 10 matvecs",
    "fwd_rev_block": "eager forward-over-reverse: one matmat of 10 columns (vmap)",
    "compiled_single": "CompiledHVP: 10 calls with one vector",
    "compiled_block": "CompiledHVP: one call with 10 columns",
}


def perf() -> float:
    return time.perf_counter()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def bench_one(fm: FunctionalModel, batch: Any, repeats: int, guard: Contention, log: Callable[[str], None]) -> dict[str, Any]:
    """All cases on one model and batch (the model already in probe mode)."""
    w = fm.flat_params()
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(BLOCK, fm.dim, generator=gen).T.contiguous()
    vs = [V[:, j].contiguous() for j in range(BLOCK)]
    ref = torch.stack([HessianOperator(fm, w, batch, "double_backward").matvec(v) for v in vs], dim=1)

    chvp = CompiledHVP(fm, batch)
    compile_info: dict[str, Any] = {}
    t0 = perf()
    try:
        out1 = chvp(w, vs[0])
        compile_info["vector_first_call_s"] = perf() - t0
        t0 = perf()
        outB = chvp(w, V)
        compile_info["block_first_call_s"] = perf() - t0
        compile_info.update(ok=True, graphs=chvp.compiles, compile_seconds=dict(chvp.compile_seconds),
                            rel_err_vs_double_backward={"single": rel(out1, ref[:, 0]), "block": rel(outB, ref)})
        # a new point and new vectors: must reuse the graphs
        before = chvp.compiles
        chvp(w * 1.01, vs[1])
        chvp(w * 1.01, 2 * V)
        compile_info["recompiled_for_new_point"] = chvp.compiles - before
    except Exception as exc:  # CompileUnavailable: report, time the eager cases only
        compile_info.update(ok=False, reason=chvp.reason or f"{type(exc).__name__}: {exc}")
        log(f"    compile failed: {compile_info['reason'][:200]}")

    def grad() -> float:
        t0 = perf()
        for _ in range(BLOCK):
            fm.loss_and_grad(w, batch)
        return perf() - t0

    def eager(route: str, block: bool) -> Callable[[], float]:
        def run() -> float:
            prev = fm.batched
            fm.batched = True  # a block always through vmap (what batched="auto" picks where it is faster)
            try:
                t0 = perf()
                op = HessianOperator(fm, w, batch, route)  # type: ignore[arg-type]
                if block:
                    op.matmat(V)
                else:
                    for v in vs:
                        op.matvec(v)
                return perf() - t0
            finally:
                fm.batched = prev
        return run

    def compiled(block: bool) -> Callable[[], float]:
        def run() -> float:
            t0 = perf()
            if block:
                chvp(w, V)
            else:
                for v in vs:
                    chvp(w, v)
            return perf() - t0
        return run

    def build() -> float:
        t0 = perf()
        HessianOperator(fm, w, batch, "double_backward")
        return perf() - t0

    cases: dict[str, Callable[[], float]] = {
        "double_backward_single": eager("double_backward", False),
        "double_backward_block": eager("double_backward", True),
        "fwd_rev_single": eager("fwd_rev", False),
        "fwd_rev_block": eager("fwd_rev", True),
    }
    if compile_info.get("ok"):
        cases["compiled_single"] = compiled(False)
        cases["compiled_block"] = compiled(True)
    for fn in [grad, build, *cases.values()]:  # warm-up: vmap set-up, allocator
        fn()
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    build_ratio: list[float] = []
    grad_ms: list[float] = []
    for r in range(repeats):
        order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]

        def one_repeat() -> list[tuple[str, float, float]]:
            rows = []
            for name, fn in order:
                if r % 2 == 0:
                    tg, th = grad(), fn()
                else:
                    th = fn()
                    tg = grad()
                rows.append((name, tg, th))
            tb = build()
            rows.append(("build", grad(), tb))
            return rows

        for name, tg, th in guard.measure(one_repeat, log):
            if name == "build":
                build_ratio.append(th / (tg / BLOCK))
                continue
            ratios[name].append(th / tg)  # 10 products / 10 gradients
            grad_ms.append(1e3 * tg / BLOCK)
    res: dict[str, Any] = {
        "examples": int(batch[0].shape[0]), "dim": fm.dim, "grad_ms": spread(grad_ms),
        "ratios": {k: spread(v) for k, v in ratios.items()},
        "double_backward_build_over_grad": spread(build_ratio),
        "compile": compile_info,
    }
    res.update(break_even(res))
    return res


def break_even(r: dict[str, Any]) -> dict[str, Any]:
    """Products after which compiling has paid for itself: the compile time of a graph over the
    time it saves per product against the fastest eager case (either shape: what
    ``HessianOperator(batched="auto")`` would pick); None when it saves nothing."""
    c = r["compile"]
    if not c.get("ok"):
        return {}
    gms = r["grad_ms"]["median"] / 1e3
    eager_best = min(v["median"] for k, v in r["ratios"].items() if not k.startswith("compiled"))
    out: dict[str, Any] = {"fastest_eager_case": min((v["median"], k) for k, v in r["ratios"].items()
                                                     if not k.startswith("compiled"))[1]}
    for kind, prefix in (("single", "vector("), ("block", "block(")):
        saved = (eager_best - r["ratios"][f"compiled_{kind}"]["median"]) * gms  # seconds per product
        c_s = sum(s for g, s in c["compile_seconds"].items() if g.startswith(prefix))
        out[f"break_even_products_{kind}"] = (c_s / saved) if saved > 0 else None
    return out


def table(res: dict[str, Any]) -> str:
    lines = ["| model, examples (d) | gradient ms | " + " | ".join(CASES) + " | compile s (vector / block) | break-even products vs fastest eager (single / block) |",
             "|---|---|" + "---|" * len(CASES) + "---|---|"]
    for key, r in res["results"].items():
        r = {**r, **break_even(r)}
        cells = [fmt(r["ratios"][k], "x", 2) if k in r["ratios"] else "n/a" for k in CASES]
        c = r["compile"]
        if c.get("ok"):
            cs = f"{c['vector_first_call_s']:.1f} / {c['block_first_call_s']:.1f}"
            be = " / ".join("never" if r.get(f"break_even_products_{k}") is None else f"{r[f'break_even_products_{k}']:.0f}"
                            for k in ("single", "block"))
        else:
            cs, be = f"failed: {c.get('reason', '')[:80]}", ""
        lines.append(f"| {key} (d={r['dim']}) | {fmt(r['grad_ms'], '', 2)} | " + " | ".join(cells) + f" | {cs} | {be} |")
    lines.append("")
    lines.append("Each ratio: 10 Hessian-vector products / 10 gradients (median [min-max] over interleaved repeats); "
                 "the double-backward cases include building the operator (`double_backward_build_over_grad` in the "
                 "JSON: about one gradient).")
    c = res["contention"]
    if c["enabled"]:
        lines.append(f"Contention check: {c['pairs_kept']} repeats kept, {c['pairs_rejected']} redone because other "
                     f"processes used > {100 * c['threshold']:.0f}% of the CPU, {c['kept_pairs_over_threshold']} kept "
                     f"anyway (worst kept: {100 * c['foreign_cpu_fraction_kept_max']:.1f}%). Load average (1 min) "
                     f"before / after: {res['loadavg_1min_before_after'][0]:.2f} / {res['loadavg_1min_before_after'][1]:.2f}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="64 examples only, 2 repeats")
    ap.add_argument("--repeats", type=int, help="interleaved repeats (default 5; quick 2)")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="redo a repeat when other processes used more than this fraction of the CPU (1 disables)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(THREADS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = perf()
    available, why = compile_available()
    log(f"torch.compile available: {available} {why}")
    data = Digits()
    guard = Contention(args.max_foreign, attempts=2 if args.quick else 4, max_wait_s=5.0 if args.quick else 20.0)
    load0 = os.getloadavg()[0]
    sizes = (64,) if args.quick else (64, int(data.Xtr.shape[0]))
    results: dict[str, Any] = {}
    for name, cls in MODELS.items():
        for n in sizes:
            log(f"{name}, {n} examples")
            torch.manual_seed(0)
            model = cls()
            fm = FunctionalModel(model, F.cross_entropy)
            with probe_guard(model, "eval"):
                results[f"{name}, {n}"] = bench_one(fm, (data.Xtr[:n], data.ytr[:n]), repeats, guard, log)
    res: dict[str, Any] = {
        "benchmark": "compile",
        "mode": "quick" if args.quick else "full",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "landscape": landscape.__version__, "compile_available": [available, why],
                        "inductor_cache": "fresh (cold compiles)", **git_state()},
        "block": BLOCK, "repeats": repeats, "results": results, "contention": guard.summary(),
        "loadavg_1min_before_after": [load0, os.getloadavg()[0]],
    }
    res["wall_seconds"] = perf() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(table(res))
    print(f"\n{res['mode']} run, {res['wall_seconds']:.0f} s; results in {args.out}")
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if Path(cache).name.startswith("bench-compile-inductor-"):
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
