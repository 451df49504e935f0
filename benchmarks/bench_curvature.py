"""Curvature benchmarks: what a Hessian-vector product costs, how fast and how accurately the
top of the spectrum and the trace come out, and what the curvature probes cost a training run.

    python benchmarks/bench_curvature.py            # full run (under 10 minutes on 2 idle CPU cores)
    python benchmarks/bench_curvature.py --quick    # smoke check (under 2 minutes; numbers are indicative only)
    python benchmarks/bench_curvature.py --profile  # also cProfile the HessianSpectrum measurement

Every timing is a ratio of two things measured side by side in this process, interleaved (A B,
then B A on the next repeat), after a warm-up that is not counted, with ``torch.set_num_threads(2)``
and bench_spine's /proc/stat contention check. Accuracy figures are against a float64 ground
truth. Results go to ``benchmarks/results/curvature.json``; a markdown table is printed. See
benchmarks/README.md for what each figure means.
"""
from __future__ import annotations

import os

# One BLAS thread for numpy/scipy (set before numpy loads; an OPENBLAS_NUM_THREADS already in the
# environment wins). The small dense algebra of ARPACK (eigsh) and of Lanczos' projected matrix gains
# nothing from threads, and OpenBLAS's spinning threads fight torch's two OpenMP threads for the two
# cores: with OpenBLAS's default, eigsh on the MLP measured 100-120 ms instead of 44 ms.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib
import copy
import cProfile
import datetime as _dt
import importlib
import io
import json
import math
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse.linalg as sla
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_spine import Contention, Digits, bench_training, fmt, git_state, spread, train_run  # noqa: E402

import landscape  # noqa: E402
from landscape import linalg  # noqa: E402
from landscape.functional import FunctionalModel, HessianOperator, draw_batches, probe_guard  # noqa: E402
from landscape.models import DigitsCNN, DigitsMLP  # noqa: E402
from probes import HessianSpectrum, HessianTrace, RestrictedSecant  # noqa: E402

RESULTS = HERE / "results" / "curvature.json"
THREADS = 2
MODELS: dict[str, type[nn.Module]] = {"DigitsMLP": DigitsMLP, "DigitsCNN": DigitsCNN}
K = 5                       # eigenvalues wanted everywhere
HVP_TARGETS = {"DigitsMLP": 1.6, "DigitsCNN": 2.5}
EIG_ACCURACY = 1e-6         # relative error wanted on each of the top 5
EIG_TARGET = 0.5            # ours / eigsh wall time
WARM_TARGET = 1 / 3         # warm / cold matvecs
TRAIN_TARGET = 1.5          # with all three probes / plain
OUR_TOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)
EIGSH_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 0.0)
EVERY = 16

# name -> (probe factory, target, description, store on tmpfs): bench_spine's CONFIGS layout
TRAIN_CONFIGS: dict[str, tuple[Callable[[], list], float | None, str, bool]] = {
    "all_three": (lambda: [RestrictedSecant(every=EVERY, samples=8), HessianSpectrum(every=EVERY, k=K),
                           HessianTrace(every=EVERY)], TRAIN_TARGET,
                  "RestrictedSecant(every=16, samples=8) + HessianSpectrum(every=16, k=5) + HessianTrace(every=16)", False),
    "secant": (lambda: [RestrictedSecant(every=EVERY, samples=8)], None, "RestrictedSecant(every=16, samples=8) alone", False),
    "spectrum": (lambda: [HessianSpectrum(every=EVERY, k=K)], None, "HessianSpectrum(every=16, k=5) alone", False),
    "trace": (lambda: [HessianTrace(every=EVERY)], None, "HessianTrace(every=16) alone", False),
}


def perf() -> float:
    return time.perf_counter()


def rel_err(est: Any, truth: Any) -> np.ndarray:
    e = np.asarray(est, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    return np.abs(e - t) / np.abs(t)


def trained(cls: type[nn.Module], data: Digits, steps: int, seed: int = 0) -> nn.Module:
    """``cls()`` after ``steps`` SGD(lr=0.05, momentum=0.9) steps on batches of 64 (a mildly trained point)."""
    torch.manual_seed(seed)
    model = cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    n = data.Xtr.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(data.Xtr[idx]), data.ytr[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def float64_operator(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[FunctionalModel, HessianOperator]:
    """The Hessian of a float64 copy of ``model`` (eval mode) at its current point: the exact Hessian of
    the float32 model at the same (exactly representable) parameters, up to float64 rounding."""
    m64 = copy.deepcopy(model).double().eval()
    fm64 = FunctionalModel(m64, F.cross_entropy)
    return fm64, fm64.hessian_operator(fm64.flat_params(), (batch[0].double(), batch[1]))


def dense_hessian(op: HessianOperator, dim: int, chunk: int = 128) -> torch.Tensor:
    """The operator's matrix from matmat of the identity (column blocks), symmetrised, float64."""
    I = torch.eye(dim, dtype=op.dtype)
    H = torch.cat([op.matmat(I[:, j:j + chunk]).double() for j in range(0, dim, chunk)], dim=1)
    return 0.5 * (H + H.T)


# -- 1. HVP / gradient -----------------------------------------------------------------------------


def _hvp_fn(fm: FunctionalModel, batch: Any) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def hvp(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(torch.func.grad(lambda x: fm.loss(x, batch)), (w,), (v,))[1]
    return hvp


def try_compile(fm: FunctionalModel, w: torch.Tensor, batch: Any, v: torch.Tensor, ref: torch.Tensor,
                log: Callable[[str], None]) -> tuple[Callable | None, dict[str, Any]]:
    """torch.compile of the forward-over-reverse HVP function; its compile time and correctness."""
    info: dict[str, Any] = {"compiled": False, "inductor_cache": "fresh (cold compile)"}
    cache = tempfile.mkdtemp(prefix="bench-inductor-")
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compile, as on first use (a warm cache cuts it ~4x)
    try:
        import torch._dynamo as dynamo
        dynamo.reset()
        c = torch.compile(_hvp_fn(fm, batch))
        t0 = perf()
        out = c(w, v)
        info["compile_s"] = perf() - t0
        t0 = perf()
        c(w, 0.5 * v)  # a new vector: must not recompile
        info["second_call_s"] = perf() - t0
        info["rel_err_vs_double_backward"] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        try:
            ex = dynamo.explain(_hvp_fn(fm, batch))(w, v)
            info["graphs"], info["graph_breaks"] = int(ex.graph_count), int(ex.graph_break_count)
        except Exception as exc:  # explain is a diagnostic only
            info["explain_error"] = f"{type(exc).__name__}: {exc}"[:300]
        info["compiled"] = info["rel_err_vs_double_backward"] < 1e-3
        if not info["compiled"]:
            info["error"] = "compiled HVP disagrees with the double-backward HVP"
            return None, info
        return c, info
    except Exception as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        log(f"    torch.compile failed: {info['error'][:200]}")
        return None, info
    finally:
        if before is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = before
        shutil.rmtree(cache, ignore_errors=True)


def hvp_case(fm: FunctionalModel, batch: Any, *, repeats: int, budget_s: float, block: int, compile_: bool,
             guard: Contention, log: Callable[[str], None]) -> dict[str, Any]:
    """All HVP/gradient ratios on one model and batch (model already in probe mode)."""
    w = fm.flat_params()
    # m: the products of one cold Lanczos run for the top 5 at 1e-6 (single matvecs)
    lz = linalg.lanczos(fm.hessian_operator(w, batch), K, tol=EIG_ACCURACY)
    m = int(lz.matvecs)
    t0 = perf()
    for _ in range(3):
        fm.loss_and_grad(w, batch)
    t_grad = (perf() - t0) / 3
    # products timed per case: all m, unless that takes more than ~budget seconds (an HVP ~ 3 gradients);
    # then n of them, and the product time is scaled to m
    n_single = min(m, max(8, int(budget_s / (3 * t_grad))))
    n_blocks = math.ceil(n_single / block)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(n_blocks * block, fm.dim, generator=gen).T.contiguous()
    vs = [V[:, j].contiguous() for j in range(n_single)]
    blocks = [V[:, j * block:(j + 1) * block] for j in range(n_blocks)]

    ref = fm.hessian_operator(w, batch, "double_backward").matvec(vs[0])
    agree = {"fwd_rev": fm.hessian_operator(w, batch, "fwd_rev").matvec(vs[0])}
    saved = fm.batched
    fm.batched = True
    for route in ("double_backward", "fwd_rev"):
        agree[f"{route}_batched"] = fm.hessian_operator(w, batch, route).matmat(blocks[0])[:, 0]
    fm.batched = saved
    # what route="auto" + batched="auto" (the library's defaults) pick for a block of this width
    auto: dict[str, bool] = {}
    for route in ("double_backward", "fwd_rev"):
        fm._batching.clear()
        fm.hessian_operator(w, batch, route).matmat(blocks[0])
        auto[route] = bool(next(iter(fm._batching.values())))
    fm._batching.clear()

    def single(route: str) -> Callable[[], tuple[float, float, int]]:
        def run() -> tuple[float, float, int]:
            t0 = perf()
            op = fm.hessian_operator(w, batch, route)  # type: ignore[arg-type]
            t1 = perf()
            for v in vs:
                op.matvec(v)
            return t1 - t0, perf() - t1, len(vs)
        return run

    def batched(route: str) -> Callable[[], tuple[float, float, int]]:
        def run() -> tuple[float, float, int]:
            prev = fm.batched
            fm.batched = True  # always vmap (what a warm-started Lanczos step does when batching wins)
            try:
                t0 = perf()
                op = fm.hessian_operator(w, batch, route)  # type: ignore[arg-type]
                t1 = perf()
                for B in blocks:
                    op.matmat(B)
                return t1 - t0, perf() - t1, n_blocks * block
            finally:
                fm.batched = prev
        return run

    cases: dict[str, Callable[[], tuple[float, float, int]]] = {
        "double_backward_single": single("double_backward"),
        "double_backward_batched": batched("double_backward"),
        "fwd_rev_single": single("fwd_rev"),
        "fwd_rev_batched": batched("fwd_rev"),
    }
    compile_info: dict[str, Any] | None = None
    if compile_:
        chvp, compile_info = try_compile(fm, w, batch, vs[0], ref, log)
        if chvp is not None:
            def compiled() -> tuple[float, float, int]:
                t0 = perf()
                for v in vs:
                    chvp(w, v)
                return 0.0, perf() - t0, len(vs)
            cases["fwd_rev_compiled_single"] = compiled
            agree["fwd_rev_compiled"] = chvp(w, vs[0])
    agreement = {k: float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) for k, a in agree.items()}

    def grad() -> float:
        t0 = perf()
        for _ in range(n_single):
            fm.loss_and_grad(w, batch)
        return (perf() - t0) / n_single

    for fn in [grad, *cases.values()]:  # warm-up (vmap set-up, allocator)
        fn()
    amort: dict[str, list[float]] = {k: [] for k in cases}
    per_product: dict[str, list[float]] = {k: [] for k in cases}
    build: dict[str, list[float]] = {k: [] for k in cases}
    grad_ms: list[float] = []
    for r in range(repeats):
        order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]

        def one_repeat() -> list[tuple[str, float, tuple[float, float, int]]]:
            rows = []
            for name, fn in order:
                if r % 2 == 0:
                    tg = grad()
                    th = fn()
                else:
                    th = fn()
                    tg = grad()
                rows.append((name, tg, th))
            return rows

        for name, tg, (tb, tp, n) in guard.measure(one_repeat, log):
            # (build + m products) / (m gradients); products timed on n of them when capped
            amort[name].append((tb + tp * m / n) / (m * tg))
            per_product[name].append(tp / n / tg)
            build[name].append(tb / tg)
            grad_ms.append(1e3 * tg)
    return {
        "examples": int(batch[0].shape[0]), "lanczos_matvecs": m, "lanczos_iterations": int(lz.iterations),
        "products_timed_single": n_single, "products_timed_batched": n_blocks * block, "block": block,
        "grad_ms": spread(grad_ms), "auto_picks_batched": auto, "rel_err_vs_double_backward": agreement,
        "ratios": {k: {"amortised": spread(amort[k]), "per_product": spread(per_product[k]),
                       "build_over_grad": spread(build[k])} for k in cases},
        "compile": compile_info,
    }


def bench_hvp(data: Digits, cfg: argparse.Namespace, guard: Contention, log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {"k": K, "lanczos_tol": EIG_ACCURACY, "repeats": cfg.hvp_repeats, "models": {}}
    for model_name, cls in MODELS.items():
        torch.manual_seed(0)
        model = cls()
        fm = FunctionalModel(model, F.cross_entropy)
        res: dict[str, Any] = {"dim": fm.dim, "target": HVP_TARGETS[model_name], "batches": {}}
        for n in cfg.hvp_sizes:
            n = min(n, data.Xtr.shape[0])
            batch = (data.Xtr[:n], data.ytr[:n])
            compile_ = cfg.compile and (n == 256 or cfg.compile_all) and model_name in cfg.compile_models
            log(f"  {model_name}, {n} examples{' (+ torch.compile)' if compile_ else ''}")
            with probe_guard(model, "eval"):
                c = hvp_case(fm, batch, repeats=cfg.hvp_repeats, budget_s=cfg.hvp_budget_s, block=K + 1, compile_=compile_,
                             guard=guard, log=log)
            res["batches"][str(n)] = c
            log("    " + ", ".join(f"{k} {v['amortised']['median']:.2f}x" for k, v in c["ratios"].items()))
        best = {n: min(v["amortised"]["median"] for k, v in c["ratios"].items() if "compiled" not in k)
                for n, c in res["batches"].items()}
        default = {n: c["ratios"]["double_backward_single"]["amortised"]["median"] for n, c in res["batches"].items()}
        res["met_default_route"] = {n: bool(x <= res["target"]) for n, x in default.items()}
        res["met_best_library_case"] = {n: bool(x <= res["target"]) for n, x in best.items()}
        out["models"][model_name] = res
    out["contention"] = guard.summary()
    return out


# -- 2. top-5 eigenvalues: ours vs eigsh vs PyHessian -------------------------------------------------


@contextlib.contextmanager
def counting_pyhessian_hvps() -> Iterator[list[int]]:
    """Count PyHessian's Hessian-vector products (its module-level helper, wrapped while inside)."""
    mod = importlib.import_module("pyhessian.hessian")
    original = mod.hessian_vector_product
    count = [0]

    def wrapped(*a: Any, **kw: Any) -> Any:
        count[0] += 1
        return original(*a, **kw)

    mod.hessian_vector_product = wrapped
    try:
        yield count
    finally:
        mod.hessian_vector_product = original


def pyhessian_run(model: nn.Module, batch: Any, seed: int) -> dict[str, Any]:
    from pyhessian import hessian
    m = copy.deepcopy(model)  # PyHessian writes .grad (with a graph) into the model it is given
    torch.manual_seed(seed)   # it draws its start vectors from the global RNG
    t0 = perf()
    H = hessian(m, nn.CrossEntropyLoss(), data=batch, cuda=False)
    t1 = perf()
    vals, _ = H.eigenvalues(top_n=K)  # defaults: maxIter=100, tol=1e-3
    t2 = perf()
    return {"values": [float(x) for x in vals], "build_s": t1 - t0, "eig_s": t2 - t1, "total_s": t2 - t0}


def eigsh_run(op: Any, tol: float, v0: np.ndarray) -> tuple[np.ndarray, int]:
    lo = linalg.to_scipy(op)
    vals, _ = sla.eigsh(lo, k=K, which="LA", tol=tol, v0=v0)
    return np.sort(vals)[::-1].copy(), int(lo.operator.matvecs)


def bench_eigen(data: Digits, cfg: argparse.Namespace, guard: Contention, log: Callable[[str], None],
                keep: dict[str, Any]) -> dict[str, Any]:
    try:
        import pyhessian  # noqa: F401
        have_pyhessian = True
    except ImportError:
        have_pyhessian = False
        log("  (pyhessian not installed: `pip install --no-deps pyhessian==0.1` to include it)")
    out: dict[str, Any] = {"batch": 256, "train_steps": cfg.eig_train_steps, "accuracy_wanted": EIG_ACCURACY,
                           "target": EIG_TARGET, "repeats": cfg.eig_repeats, "pyhessian": have_pyhessian, "models": {}}
    for model_name, cls in MODELS.items():
        if model_name not in cfg.eig_models:
            continue
        model = trained(cls, data, cfg.eig_train_steps)
        batch = (data.Xtr[:256], data.ytr[:256])
        fm = FunctionalModel(model, F.cross_entropy)
        res: dict[str, Any] = {"dim": fm.dim}
        with probe_guard(model, "eval"):
            w = fm.flat_params()
            # ground truth: the float64 Hessian at the same point (dense when cheap, else a tight eigsh
            # cross-checked by a tight Lanczos, both on the float64 operator)
            t0 = perf()
            fm64, op64 = float64_operator(model, batch)
            dense = model_name == "DigitsMLP" or cfg.dense_cnn
            if dense:
                H = dense_hessian(op64, fm.dim)
                ev = torch.linalg.eigvalsh(H).flip(0).numpy()
                truth = ev[:2 * K]
                keep[model_name] = H
                res["truth"] = {"method": "dense float64 Hessian (matmat of the identity), eigvalsh"}
            else:
                v0 = np.random.default_rng(0).standard_normal(fm.dim)
                vals, _ = sla.eigsh(linalg.to_scipy(op64), k=K + 1, which="LA", tol=1e-12, v0=v0)
                truth = np.sort(vals)[::-1]
                check = linalg.lanczos(op64, K + 1, tol=1e-12).eigenvalues.numpy()
                res["truth"] = {"method": "eigsh(float64 operator, k=6, tol=1e-12), checked by lanczos(k=6, tol=1e-12)",
                                "cross_check_max_rel_diff": float(rel_err(check, truth).max())}
            res["truth"].update(seconds=perf() - t0, eigenvalues=[float(x) for x in truth[:K]],
                                next=[float(x) for x in truth[K:2 * K]])
            top = truth[:K]
            op = fm.hessian_operator(w, batch)
            v0 = np.random.default_rng(0).standard_normal(fm.dim)
            floor, _ = eigsh_run(op, 1e-10, v0)
            res["float32_operator_floor"] = float(rel_err(floor, top).max())  # best the float32 HVP can do

            # tune: the loosest tolerance that reaches 1e-6 on all five
            def scan(run: Callable[[float], tuple[np.ndarray, int]], tols: tuple[float, ...]) -> tuple[float | None, list]:
                rows = []
                for tol in tols:
                    vals, mv = run(tol)
                    e = rel_err(vals, top)
                    rows.append({"tol": tol, "matvecs": mv, "max_rel_err": float(e.max()), "rel_err": [float(x) for x in e]})
                    if e.max() <= EIG_ACCURACY:
                        return tol, rows
                return None, rows

            def ours(tol: float) -> tuple[np.ndarray, int]:
                r = linalg.lanczos(fm.hessian_operator(w, batch), K, tol=tol)
                return r.eigenvalues.numpy(), int(r.matvecs)

            tol_ours, scan_ours = scan(ours, OUR_TOLS)
            tol_eigsh, scan_eigsh = scan(lambda t: eigsh_run(fm.hessian_operator(w, batch), t, v0), EIGSH_TOLS)
            res["ours"] = {"tol": tol_ours, "scan": scan_ours}
            res["eigsh"] = {"tol": tol_eigsh, "ncv": "default (min(n, max(2k + 1, 20)) = 20)", "scan": scan_eigsh}
            log(f"  {model_name}: ours tol {tol_ours} ({scan_ours[-1]['matvecs']} matvecs), eigsh tol {tol_eigsh} "
                f"({scan_eigsh[-1]['matvecs']} matvecs)")
            if have_pyhessian:
                with counting_pyhessian_hvps() as count:
                    pyhessian_run(model, batch, 0)
                res["pyhessian"] = {"hvps": count[0]}
            t_ours = tol_ours if tol_ours is not None else OUR_TOLS[-1]
            t_eigsh = tol_eigsh if tol_eigsh is not None else EIGSH_TOLS[-1]

            inner = [1]  # solves per timed unit: a fast solve (the MLP's ~30 ms) is repeated to ~0.3 s

            def timed_ours() -> dict[str, Any]:
                ops = [fm.hessian_operator(w, batch) for _ in range(inner[0])]  # built outside the timed region
                t0 = perf()
                for op_ in ops:
                    r = linalg.lanczos(op_, K, tol=t_ours)
                return {"s": (perf() - t0) / inner[0], "err": rel_err(r.eigenvalues.numpy(), top), "matvecs": r.matvecs}

            def timed_eigsh() -> dict[str, Any]:
                ops = [fm.hessian_operator(w, batch) for _ in range(inner[0])]
                t0 = perf()
                for op_ in ops:
                    vals, mv = eigsh_run(op_, t_eigsh, v0)
                return {"s": (perf() - t0) / inner[0], "err": rel_err(vals, top), "matvecs": mv}

            def timed_grad() -> dict[str, Any]:
                t0 = perf()
                for _ in range(10):
                    fm.loss_and_grad(w, batch)
                return {"s": (perf() - t0) / 10}

            runs: dict[str, Callable[[int], dict[str, Any]]] = {"ours": lambda r: timed_ours(),
                                                                 "eigsh": lambda r: timed_eigsh(),
                                                                 "grad": lambda r: timed_grad()}
            if have_pyhessian:
                runs["pyhessian"] = lambda r: pyhessian_run(model, batch, r)
            for fn in runs.values():  # warm-up
                fn(0)
            inner[0] = max(1, min(20, round(0.3 / runs["eigsh"](0)["s"])))
            res["solves_per_timed_unit"] = inner[0]
            got: dict[str, list[dict[str, Any]]] = {k: [] for k in runs}
            for r in range(cfg.eig_repeats):
                order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]
                rows = guard.measure(lambda: [(k, fn(r)) for k, fn in order], log)
                for k, v in rows:
                    got[k].append(v)
            g = [x["s"] for x in got["grad"]]
            ratio = [a["s"] / b["s"] for a, b in zip(got["ours"], got["eigsh"])]
            res["ratio_ours_over_eigsh"] = spread(ratio)
            res["met"] = bool(statistics.median(ratio) <= EIG_TARGET) and tol_ours is not None
            res["grad_ms"] = spread([1e3 * x for x in g])
            for k in ("ours", "eigsh"):
                res[k].update(seconds=spread([x["s"] for x in got[k]]), matvecs=got[k][0]["matvecs"],
                              max_rel_err=float(max(x["err"].max() for x in got[k])),
                              rel_err=[float(x) for x in got[k][0]["err"]],
                              grad_equivalents=spread([x["s"] / gg for x, gg in zip(got[k], g)]))
            if have_pyhessian:
                vals = np.array([x["values"] for x in got["pyhessian"]])
                errs = rel_err(vals, top[None, :])
                full = np.concatenate([top, truth[K:]])
                nearest = np.abs(vals[:, :, None] - full[None, None, :]).argmin(axis=2)
                res["pyhessian"].update(
                    seconds=spread([x["total_s"] for x in got["pyhessian"]]),
                    eigenvalues_seconds=spread([x["eig_s"] for x in got["pyhessian"]]),
                    ratio_over_ours=spread([p["total_s"] / o["s"] for p, o in zip(got["pyhessian"], got["ours"])]),
                    rel_err_median=[float(x) for x in np.median(errs, axis=0)],
                    rel_err_max=[float(x) for x in errs.max(axis=0)],
                    values_first_run=[float(x) for x in vals[0]],
                    descending_runs=int(sum(bool(np.all(np.diff(v) <= 0)) for v in vals)),
                    order_right_runs=int(sum(bool(np.array_equal(n_, np.arange(K))) for n_ in nearest)),
                    runs=len(vals), settings="hessian(model.eval(), CrossEntropyLoss(), data=(x, y), cuda=False)"
                                             ".eigenvalues(top_n=5) (maxIter=100, tol=1e-3)")
            # eigsh with a smaller Krylov space (ncv): a diagnostic, not the target
            best = None
            for ncv in range(2 * K + 1, 20):
                lo = linalg.to_scipy(fm.hessian_operator(w, batch))
                try:
                    vals = np.sort(sla.eigsh(lo, k=K, which="LA", tol=t_eigsh, v0=v0, ncv=ncv)[0])[::-1]
                except Exception:
                    continue
                if rel_err(vals, top).max() <= EIG_ACCURACY and (best is None or lo.operator.matvecs < best["matvecs"]):
                    best = {"ncv": ncv, "matvecs": int(lo.operator.matvecs), "max_rel_err": float(rel_err(vals, top).max())}
            res["eigsh_best_ncv"] = best
        out["models"][model_name] = res
        log(f"  {model_name}: ours/eigsh {res['ratio_ours_over_eigsh']['median']:.2f}x")
    out["contention"] = guard.summary()
    return out


# -- 3. warm-started tracking along training -------------------------------------------------------


WARM_VARIANTS: dict[str, str] = {
    "warm": "block: warm_start = the previous 5 Ritz vectors (+ extra_random=1: block Lanczos, blocks of 6); "
            "HessianSpectrum(warm_start='block')",
    "warm_sum": "single vector: warm_start = sum of the previous 5 Ritz vectors / sqrt(5) + 0.1 x a random unit vector, "
                "extra_random=0; HessianSpectrum's default (warm_start=True)",
    "warm_same_point": "diagnostic, best case: block warm start from this step's own cold-start Ritz vectors "
                       "(the Hessian has not moved)",
}


def _warm(variant: str, op: Any, tol: float, prev: torch.Tensor, gen: torch.Generator) -> linalg.LanczosResult:
    if variant == "warm_sum":  # as probes.curvature._Tracker does it for warm_start=True
        noise = torch.randn(prev.shape[0], generator=gen, dtype=torch.float64).to(prev)
        start = prev.sum(dim=1) / math.sqrt(prev.shape[1]) + 0.1 * noise / noise.norm()
        return linalg.lanczos(op, K, tol=tol, warm_start=start, extra_random=0, generator=gen)
    return linalg.lanczos(op, K, tol=tol, warm_start=prev, generator=gen)


def _track_summary(rs: list[dict[str, Any]], tol: float) -> dict[str, Any]:
    later = rs[1:]  # the first tracked step has nothing to warm-start from
    cold = [r["cold_matvecs"] for r in later]
    out: dict[str, Any] = {"tol": tol, "tracked_steps": len(rs), "warm_started_steps": len(later),
                           "cold_matvecs": spread(cold) if cold else None,
                           "cold_max_rel_err": max((r["cold_err"] for r in later), default=None),
                           "cold_all_converged": all(r["cold_converged"] for r in later),
                           "float32_floor_max": max((r["float32_floor"] for r in rs), default=None), "rows": rs}
    for variant in WARM_VARIANTS:
        warm = [r[f"{variant}_matvecs"] for r in later]
        ratio = sum(warm) / max(1, sum(cold)) if later else None
        out[variant] = {
            "matvecs": spread(warm) if warm else None, "over_cold": ratio,
            "over_cold_per_step": spread([a / b for a, b in zip(warm, cold)]) if warm else None,
            "max_rel_err": max((r[f"{variant}_err"] for r in later), default=None),
            "all_converged": all(r[f"{variant}_converged"] for r in later),
            "met": None if ratio is None else bool(ratio <= WARM_TARGET)}
    out["met"] = {v: out[v]["met"] for v in ("warm", "warm_sum")}
    return out


def bench_tracking(data: Digits, cfg: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Every 16 steps (and, as a diagnostic, at each of a few consecutive steps after that): the top 5 of
    the same float32 operator by a cold start and by warm starts, against the float64 Hessian's."""
    torch.manual_seed(0)
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = data.Xtr, data.ytr
    probe = draw_batches((X, y), 1, batch_size=64, seed=0)[0]  # the recorder's first probe batch
    gen = torch.Generator().manual_seed(0)
    n = X.shape[0]
    steps, consecutive = cfg.track_steps, cfg.track_consecutive
    phases = {"every16": cfg.track_tols, "consecutive": cfg.track_tols[:1]}
    rows: dict[str, dict[float, list[dict[str, Any]]]] = {ph: {t: [] for t in tols} for ph, tols in phases.items()}
    prev: dict[tuple[str, float, str], torch.Tensor] = {}
    step = 0
    while step < steps + consecutive:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - 63, 64):
            if step >= steps + consecutive:
                break
            phase = "every16" if step < steps else "consecutive"
            if phase == "consecutive" or step % EVERY == 0:
                with probe_guard(model, "eval"):
                    w = fm.flat_params()
                    op = fm.hessian_operator(w, probe)
                    v0 = np.random.default_rng(step).standard_normal(fm.dim)
                    # the reference: the float64 Hessian at the same point (a float32 operator's own eigenvalues
                    # are only good to its rounding noise, ~1e-6..1e-5 relative on the smaller ones here)
                    ref, ref_mv = eigsh_run(float64_operator(model, probe)[1], 1e-10, v0)
                    floor, _ = eigsh_run(op, 1e-10, v0)
                    for tol in phases[phase]:
                        cold = linalg.lanczos(op, K, tol=tol, generator=torch.Generator().manual_seed(step))
                        row: dict[str, Any] = {
                            "step": step, "lambda": [float(x) for x in ref], "reference_matvecs": ref_mv,
                            "float32_floor": float(rel_err(floor, ref).max()),
                            "cold_matvecs": int(cold.matvecs), "cold_err": float(rel_err(cold.eigenvalues, ref).max()),
                            "cold_converged": bool(cold.converged.all())}
                        for variant in WARM_VARIANTS:
                            key = (phase, tol, variant)
                            start = cold.eigenvectors if variant == "warm_same_point" else prev.get(key)
                            res = cold
                            if start is not None and rows[phase][tol]:
                                res = _warm(variant, op, tol, start, torch.Generator().manual_seed(step))
                                row.update({f"{variant}_matvecs": int(res.matvecs),
                                            f"{variant}_err": float(rel_err(res.eigenvalues, ref).max()),
                                            f"{variant}_converged": bool(res.converged.all())})
                            prev[key] = res.eigenvectors.detach().clone()  # HessianSpectrum's chain
                        rows[phase][tol].append(row)
            xb, yb = X[perm[i:i + 64]], y[perm[i:i + 64]]
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
    out: dict[str, Any] = {"model": "DigitsCNN", "optimizer": "SGD(lr=0.05, momentum=0.9), batch 64", "steps": steps,
                           "every": EVERY, "consecutive_steps": consecutive, "probe_batch": 64, "k": K,
                           "target": WARM_TARGET,
                           "reference": "eigsh(k=5, which='LA', tol=1e-10) on the float64 Hessian at the same point; "
                                        "float32_floor: the same solve on the float32 operator, against it",
                           "variants": WARM_VARIANTS, "tols": {}, "consecutive": {}}
    for phase, key in (("every16", "tols"), ("consecutive", "consecutive")):
        for tol, rs in rows[phase].items():
            if not rs:
                continue
            summ = out[key][str(tol)] = _track_summary(rs, tol)
            log(f"  {phase}, tol {tol}: cold {sum(r['cold_matvecs'] for r in rs[1:])} matvecs; " + ", ".join(
                f"{v} {summ[v]['over_cold']:.2f}x" for v in WARM_VARIANTS if summ[v]["over_cold"] is not None))
    return out


# -- 4. Hutch++ vs Hutchinson ------------------------------------------------------------------------


def bench_trace(H: torch.Tensor, seeds: int, budgets: tuple[int, ...]) -> dict[str, Any]:
    # the dense matrix of the HVP operator (in float32, as the HVPs are): the same estimators, cheaper products
    A = linalg.as_operator(H.float())
    true = float(torch.trace(H))
    out: dict[str, Any] = {"model": "DigitsMLP", "true_trace": true, "seeds": seeds, "budgets": {}}
    for m in budgets:
        row: dict[str, Any] = {}
        for name, fn in (("hutchinson", linalg.hutchinson), ("hutchpp", linalg.hutchpp)):
            est = [fn(A, m, generator=torch.Generator().manual_seed(s)) for s in range(seeds)]
            t = np.array([e.trace for e in est])
            se = np.array([e.stderr for e in est])
            row[name] = {"rms_rel_err": float(np.sqrt(np.mean((t - true) ** 2)) / abs(true)),
                         "bias_rel": float((t.mean() - true) / abs(true)),
                         "mean_stderr_rel": float(np.nanmean(se) / abs(true)),
                         "within_2_stderr": float(np.mean(np.abs(t - true) <= 2 * se)),
                         "matvecs": int(est[0].matvecs)}
        row["hutchinson_over_hutchpp"] = row["hutchinson"]["rms_rel_err"] / row["hutchpp"]["rms_rel_err"]
        out["budgets"][str(m)] = row
    return out


# -- 5. training overhead and per-measurement costs ------------------------------------------------


@contextlib.contextmanager
def hessian_timers() -> Iterator[dict[str, float]]:
    """Time spent building HessianOperators and in their products (patched here, not in the library)."""
    acc = {"build_s": 0.0, "products_s": 0.0, "products": 0}
    depth = [0]
    orig_init, orig_mv, orig_mm = HessianOperator.__init__, HessianOperator.matvec, HessianOperator.matmat

    def init(self: Any, *a: Any, **kw: Any) -> None:
        t0 = perf()
        orig_init(self, *a, **kw)
        acc["build_s"] += perf() - t0

    def timed(fn: Callable, cols: Callable[[Any], int]) -> Callable:
        def run(self: Any, x: Any) -> Any:
            depth[0] += 1
            t0 = perf()
            try:
                return fn(self, x)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # matmat may call matvec: count the outermost call only
                    acc["products_s"] += perf() - t0
                    acc["products"] += cols(x)
        return run

    HessianOperator.__init__ = init  # type: ignore[method-assign]
    HessianOperator.matvec = timed(orig_mv, lambda x: 1)  # type: ignore[method-assign]
    HessianOperator.matmat = timed(orig_mm, lambda x: int(x.shape[1]))  # type: ignore[method-assign]
    HessianOperator.__call__ = HessianOperator.matvec  # type: ignore[method-assign]
    try:
        yield acc
    finally:
        HessianOperator.__init__, HessianOperator.matvec, HessianOperator.matmat = orig_init, orig_mv, orig_mm  # type: ignore[method-assign]
        HessianOperator.__call__ = orig_mv  # type: ignore[method-assign]


def probe_costs(data: Digits, steps: int, guard: Contention, log: Callable[[str], None],
                profile: bool = False) -> dict[str, Any]:
    """Per-measurement cost of each probe alone, in gradients on one probe batch (64 examples).

    Each probe's ``measure`` is wrapped (inside the recorder's guard): the measurement is timed, then
    ``grads`` gradients at the same point on the first probe batch. A HessianOperator timer splits
    the measurement into building the operator, products, and the rest (Lanczos/Hutch++ algebra,
    the probe's own work)."""
    grads = 5
    out: dict[str, Any] = {}
    profiles: dict[str, str] = {}
    runs = [("secant", False), ("spectrum", False), ("trace", False)] + ([("spectrum", True)] if profile else [])
    for name, profiled in runs:
        make = TRAIN_CONFIGS[name][0]

        def one_run() -> list[dict[str, Any]]:
            probes = make()
            recs: list[dict[str, Any]] = []
            # profiled: one extra run whose figures are not used (cProfile slows the Python parts)
            prof = cProfile.Profile() if profiled else None
            with hessian_timers() as acc:
                for p in probes:
                    orig = p.measure

                    def measure(ctx: Any, orig: Callable = orig) -> Any:
                        b0, p0, n0 = acc["build_s"], acc["products_s"], acc["products"]
                        if prof is not None:
                            prof.enable()
                        t0 = perf()
                        res = orig(ctx)
                        t = perf() - t0
                        if prof is not None:
                            prof.disable()
                        g0 = perf()
                        for _ in range(grads):
                            ctx.functional.loss_and_grad(ctx.params, ctx.probe_batches[0])
                        tg = (perf() - g0) / grads
                        mv = res.values.get("spectrum_matvecs")
                        recs.append({"step": ctx.step, "s": t, "grad_s": tg, "build_s": acc["build_s"] - b0,
                                     "products_s": acc["products_s"] - p0, "products": acc["products"] - n0,
                                     "matvecs": None if mv is None else int(np.asarray(mv.data).sum())})
                        return res

                    p.measure = measure  # type: ignore[method-assign]
                r = train_run(data, steps, probes)
            if r["probe_errors"]:
                raise RuntimeError(f"{name}: probe errors {r['probe_errors']}")
            if prof is not None:
                buf = io.StringIO()
                st = pstats.Stats(prof, stream=buf)
                st.sort_stats("cumulative").print_stats(30)
                buf.write("\n--- by own time ---\n")
                st.sort_stats("tottime").print_stats(25)
                profiles[name] = buf.getvalue()
            return recs

        if profiled:
            one_run()
            continue
        train_run(data, min(steps, 40), make())  # warm-up
        recs = guard.measure(one_run, log)
        later = recs[1:] if len(recs) > 1 else recs  # the first measurement is a cold start
        ge = [x["s"] / x["grad_s"] for x in later]
        out[name] = {
            "measurements": len(recs),
            "grad_equivalents": spread(ge),
            "first_measurement_grad_equivalents": recs[0]["s"] / recs[0]["grad_s"],
            "ms": spread([1e3 * x["s"] for x in later]),
            "grad_ms": spread([1e3 * x["grad_s"] for x in later]),
            "products": spread([x["products"] for x in later]),
            "share_build": sum(x["build_s"] for x in later) / sum(x["s"] for x in later),
            "share_products": sum(x["products_s"] for x in later) / sum(x["s"] for x in later),
            "product_grad_equivalents": spread([x["products_s"] / max(1, x["products"]) / x["grad_s"] for x in later
                                                if x["products"]]) if any(x["products"] for x in later) else None,
            "matvecs": None if later[0]["matvecs"] is None else spread([x["matvecs"] for x in later]),
            "first_measurement_matvecs": recs[0]["matvecs"],
        }
        log(f"  {name}: {statistics.median(ge):.1f} gradient-equivalents per measurement")
    if profiles:
        out["profile"] = profiles
    return out


def bench_train(data: Digits, cfg: argparse.Namespace, guard: Contention, log: Callable[[str], None]) -> dict[str, Any]:
    log(f"  with/without: {cfg.train_repeats} repeats x {len(TRAIN_CONFIGS)} configs x 2 runs of {cfg.train_steps} steps")
    res = bench_training(data, cfg.train_steps, cfg.train_repeats, log, guard, None, TRAIN_CONFIGS)
    for c in res["configs"].values():
        # the overhead per step scales like 1/every: the cadence at which this set of probes would cost 1.5x
        c["every_for_1.5x_estimate"] = EVERY * max(0.0, c["ratio"]["median"] - 1) / (TRAIN_TARGET - 1)
    log("  per-measurement costs")
    res["per_measurement"] = probe_costs(data, cfg.train_steps, guard, log, cfg.profile)
    return res


# -- report ----------------------------------------------------------------------------------------


def _yes(x: Any) -> str:
    return "" if x is None else ("yes" if x else "**no**")


def _sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def table(res: dict[str, Any]) -> str:
    L = ["| measurement | median [min-max] | target | met |", "|---|---|---|---|"]
    hv = res.get("hvp")
    if hv:
        labels = {"double_backward_single": "double_backward (default), one matvec at a time",
                  "double_backward_batched": "double_backward, matmat of 6 (vmap)",
                  "fwd_rev_single": "fwd_rev, one at a time", "fwd_rev_batched": "fwd_rev, matmat of 6 (vmap)",
                  "fwd_rev_compiled_single": "fwd_rev under torch.compile, one at a time"}
        for model, mres in hv["models"].items():
            for n, c in mres["batches"].items():
                L.append(f"| **1. HVP / gradient, {model} (d={mres['dim']}), {n} examples**: gradient "
                         f"{fmt(c['grad_ms'], ' ms', 2)}; m = {c['lanczos_matvecs']} products (one cold Lanczos run, top 5 "
                         f"at 1e-6); auto batching picks vmap: db {c['auto_picks_batched']['double_backward']}, "
                         f"fwd_rev {c['auto_picks_batched']['fwd_rev']} | | | |")
                for k, s in c["ratios"].items():
                    tgt = met = ""
                    if k == "double_backward_single":
                        tgt, met = f"<= {mres['target']}x", _yes(mres["met_default_route"][n])
                    L.append(f"| &nbsp;&nbsp; (build + m products) / (m gradients), {labels[k]} | {fmt(s['amortised'], 'x', 2)} "
                             f"(per product {s['per_product']['median']:.2f}x, build {s['build_over_grad']['median']:.2f}x) | {tgt} | {met} |")
                ci = c.get("compile")
                if ci is not None:
                    if ci.get("compiled"):
                        L.append(f"| &nbsp;&nbsp; torch.compile (fwd_rev HVP): compiles, {ci['compile_s']:.1f} s to compile, "
                                 f"{ci.get('graph_breaks', '?')} graph breaks, agrees to {ci['rel_err_vs_double_backward']:.1e} | | | |")
                    else:
                        L.append(f"| &nbsp;&nbsp; torch.compile (fwd_rev HVP): **failed**: {ci.get('error', '')[:150]} | | | |")
    eg = res.get("eigen")
    if eg:
        for model, m in eg["models"].items():
            t = m["truth"]
            L.append(f"| **2. top-5 eigenvalues to 1e-6, {model}** (d={m['dim']}, {eg['train_steps']} SGD steps, 256 examples, "
                     f"eval mode); truth: {t['method']}; lambda_1..5 = {', '.join(f'{x:.4g}' for x in t['eigenvalues'])}; "
                     f"float32-operator floor {_sci(m['float32_operator_floor'])} | | | |")
            o, e = m["ours"], m["eigsh"]
            L.append(f"| &nbsp;&nbsp; wall time, lanczos(tol={o['tol']}) / eigsh(tol={e['tol']}, which='LA') | "
                     f"{fmt(m['ratio_ours_over_eigsh'], 'x', 2)} | <= {eg['target']}x | {_yes(m['met'])} |")
            L.append(f"| &nbsp;&nbsp; ours: {o['matvecs']} matvecs, {fmt(o['seconds'], ' s', 3)}, max rel err {_sci(o['max_rel_err'])} | | | |")
            L.append(f"| &nbsp;&nbsp; eigsh: {e['matvecs']} matvecs, {fmt(e['seconds'], ' s', 3)}, max rel err {_sci(e['max_rel_err'])}"
                     + (f"; with ncv={m['eigsh_best_ncv']['ncv']}: {m['eigsh_best_ncv']['matvecs']} matvecs" if m.get("eigsh_best_ncv") else "")
                     + " | | | |")
            p = m.get("pyhessian")
            if p and "seconds" in p:
                L.append(f"| &nbsp;&nbsp; PyHessian power iteration (defaults): {p['hvps']} HVPs, {fmt(p['seconds'], ' s', 3)} "
                         f"({p['ratio_over_ours']['median']:.1f}x ours); rel err per eigenvalue (median over runs) "
                         f"{', '.join(_sci(x) for x in p['rel_err_median'])}; order right in {p['order_right_runs']}/{p['runs']} "
                         f"runs, descending in {p['descending_runs']}/{p['runs']} | | | |")
    tr = res.get("tracking")
    if tr:
        labels = {"warm": "block warm start from the previous Ritz vectors (HessianSpectrum warm_start='block')",
                  "warm_sum": "single-vector warm start from their sum (HessianSpectrum default, warm_start=True)",
                  "warm_same_point": "diagnostic: block warm start from this step's own Ritz vectors (Hessian unchanged)"}
        for phase, key in (("every 16 steps", "tols"), ("at each of the next steps (diagnostic)", "consecutive")):
            for tol, r in tr.get(key, {}).items():
                if not r["warm_started_steps"]:
                    continue
                main = key == "tols"
                L.append(f"| **3. tracking{'' if main else ' (diagnostic)'}**, {phase} (DigitsCNN, SGD lr 0.05 mom 0.9, "
                         f"{tr['steps'] if main else tr['consecutive_steps']} steps, probe batch 64, tol {tol}, "
                         f"{r['warm_started_steps']} warm-started steps): cold start {fmt(r['cold_matvecs'], '', 0)} matvecs, "
                         f"max rel err {_sci(r['cold_max_rel_err'])} (float32-operator floor up to {_sci(r['float32_floor_max'])}) | | | |")
                for variant, label in labels.items():
                    v = r[variant]
                    tgt, met = ("<= 0.33x", _yes(v["met"])) if variant != "warm_same_point" and main else ("", "")
                    L.append(f"| &nbsp;&nbsp; warm / cold matvecs, {label}: {fmt(v['matvecs'], '', 0)} matvecs, max rel err "
                             f"{_sci(v['max_rel_err'])} | {v['over_cold']:.2f}x (totals; per step "
                             f"{fmt(v['over_cold_per_step'], 'x', 2)}) | {tgt} | {met} |")
    hp = res.get("trace")
    if hp:
        for m, r in hp["budgets"].items():
            L.append(f"| **4. trace, RMS relative error over {hp['seeds']} seeds, {m} matvecs** (DigitsMLP, true "
                     f"{hp['true_trace']:.4g}): Hutchinson {r['hutchinson']['rms_rel_err']:.2e}, Hutch++ "
                     f"{r['hutchpp']['rms_rel_err']:.2e} | Hutchinson / Hutch++ = {r['hutchinson_over_hutchpp']:.1f}x | | |")
    tn = res.get("training")
    if tn:
        L.append(f"| **5. training overhead** (DigitsCNN, batch 64, {tn['steps_per_run']} steps/run, probe batch 64): plain "
                 f"{fmt(tn['plain_ms_per_step'], ' ms/step', 2)} | | | |")
        for name, c in tn["configs"].items():
            tgt = "" if c["target"] is None else f"<= {c['target']}x"
            est = f" (every ~{c['every_for_1.5x_estimate']:.0f} steps would give 1.5x)" if c["target"] is not None else ""
            L.append(f"| &nbsp;&nbsp; with / without, {c['description']}{est} | {fmt(c['ratio'], 'x', 2)} (loop only "
                     f"{c['loop_ratio']['median']:.2f}x) | {tgt} | {_yes(c['met'])} |")
        for name, c in tn.get("per_measurement", {}).items():
            if name == "profile":
                continue
            extra = ""
            if c["matvecs"]:
                extra = f", {c['matvecs']['median']:.0f} matvecs (first, cold: {c['first_measurement_matvecs']})"
            if c["products"]["median"]:
                extra += (f"; products {100 * c['share_products']:.0f}% of it, build {100 * c['share_build']:.0f}%, "
                          f"one product {c['product_grad_equivalents']['median']:.2f} gradients")
            L.append(f"| &nbsp;&nbsp; one measurement of {name} / one gradient on a probe batch{extra} | "
                     f"{fmt(c['grad_equivalents'], '', 1)} | | |")
        L.append(f"| &nbsp;&nbsp; final loss bitwise equal with and without probes | yes (checked on every pair) | | |")
    notes = []
    for part in ("hvp", "eigen", "training"):
        c = (res.get(part) or {}).get("contention")
        if c and c["enabled"]:
            notes.append(f"{part}: {c['pairs_kept']} kept, {c['pairs_rejected']} redone, {c['kept_pairs_over_threshold']} kept "
                         f"over the threshold after repeated tries (worst kept {100 * c['foreign_cpu_fraction_kept_max']:.1f}%)")
    if notes:
        L += ["", "Contention check (other processes > "
              f"{100 * res['max_foreign']:.0f}% of the CPU): " + "; ".join(notes) + "."]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, steps and cases: a smoke check in < 2 min")
    ap.add_argument("--profile", action="store_true", help="also cProfile the HessianSpectrum measurements (printed)")
    ap.add_argument("--sections", default="1,2,3,4,5", help="which parts to run (default all: 1,2,3,4,5)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile trial")
    ap.add_argument("--dense-cnn", action="store_true", help="ground truth for the CNN from its dense float64 Hessian "
                                                             "(minutes) instead of a tight float64 eigsh")
    ap.add_argument("--max-foreign", type=float, default=0.05,
                    help="redo a unit when other processes used more than this fraction of the machine's CPU during "
                         "it (default 0.05; 1 disables the check)")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS.relative_to(HERE.parent)})")
    args = ap.parse_args(argv)
    q = args.quick
    sections = {int(s) for s in args.sections.split(",") if s.strip()}
    cfg = argparse.Namespace(
        quick=q, profile=args.profile, compile=args.compile, dense_cnn=args.dense_cnn,
        hvp_sizes=(256,) if q else (256, 1438), hvp_repeats=2 if q else 5,
        hvp_budget_s=1.0 if q else 2.5, compile_all=False,
        compile_models=() if q else ("DigitsMLP", "DigitsCNN"),
        eig_train_steps=100, eig_repeats=2 if q else 5, eig_models=tuple(MODELS),
        track_steps=64 if q else 320, track_tols=(1e-5,) if q else (1e-5, 1e-6), track_consecutive=3 if q else 8,
        trace_seeds=10 if q else 30, trace_budgets=(30, 99, 300),
        train_steps=96 if q else 256, train_repeats=1 if q else 3,
    )
    torch.set_num_threads(THREADS)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def guard() -> Contention:
        return Contention(args.max_foreign, attempts=2 if q else 5, max_wait_s=5.0 if q else 30.0)

    t_start = perf()
    data = Digits()
    res: dict[str, Any] = {
        "benchmark": "curvature", "mode": "quick" if q else "full",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": {"openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS"), "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                        "torch_threads": torch.get_num_threads(), "landscape": landscape.__version__, **git_state()},
        "max_foreign": args.max_foreign, "seconds_per_section": {},
    }
    keep: dict[str, Any] = {}
    if 1 in sections:
        log("1. HVP / gradient")
        t0 = perf()
        res["hvp"] = bench_hvp(data, cfg, guard(), log)
        res["seconds_per_section"]["hvp"] = perf() - t0
    if 2 in sections:
        log("2. top-5 eigenvalues: ours vs eigsh vs PyHessian")
        t0 = perf()
        res["eigen"] = bench_eigen(data, cfg, guard(), log, keep)
        res["seconds_per_section"]["eigen"] = perf() - t0
    if 3 in sections:
        log("3. warm-started tracking")
        t0 = perf()
        res["tracking"] = bench_tracking(data, cfg, log)
        res["seconds_per_section"]["tracking"] = perf() - t0
    if 4 in sections:
        log("4. Hutch++ vs Hutchinson")
        t0 = perf()
        if "DigitsMLP" not in keep:  # section 2 not run: the same point and dense Hessian
            model = trained(DigitsMLP, data, cfg.eig_train_steps)
            keep["DigitsMLP"] = dense_hessian(float64_operator(model, (data.Xtr[:256], data.ytr[:256]))[1],
                                              FunctionalModel(model, F.cross_entropy).dim)
        res["trace"] = bench_trace(keep["DigitsMLP"], cfg.trace_seeds, cfg.trace_budgets)
        res["seconds_per_section"]["trace"] = perf() - t0
    if 5 in sections:
        log("5. training overhead")
        t0 = perf()
        res["training"] = bench_train(data, cfg, guard(), log)
        res["seconds_per_section"]["training"] = perf() - t0
    res["wall_seconds"] = perf() - t_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=float))
    print(table(res))
    prof = (res.get("training") or {}).get("per_measurement", {}).get("profile", {})
    for name, text in prof.items():
        print(f"\n## cProfile: {name} measurements (inside measure)\n```\n{text}```")
    print(f"\n{res['mode']} run, {res['wall_seconds']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
