"""``landscape demo``: SGD+momentum, Adam and SAM on the bundled digits, 5 seeds each, with RSI/EB,
the Hessian's curvature (top-5 spectrum, trace, preconditioned sharpness and the edge of
stability), sharpness (raw and scale-aware), the valley (floor curvature, widths, linear
interpolation) and slices recorded; then the per-optimizer tables, the comparison over seeds
with effect sizes and p-values, and the HTML report."""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr
from tqdm.auto import tqdm

import landscape
from landscape.data import load_digits, split
from landscape.models import DigitsCNN
from landscape.optim import SAM
from landscape.store import stack_runs
from probes import (HessianSpectrum, HessianTrace, Interpolation, LossProfile, PreconditionedSharpness, RestrictedSecant,
                    Sharpness, SpectralDensity, StepCurvature, TrajectoryPCA, ValleyWidth)

OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=2e-3),
    "sam": lambda params: SAM(params, torch.optim.SGD, rho=0.05, lr=0.05, momentum=0.9, weight_decay=5e-4),
}


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # 5 per arm: the fewest for Holm-corrected p < 0.05 over 3 pairs
    optimizers: tuple[str, ...] = ("sgd", "adam", "sam")
    epochs: int = 6
    batch_size: int = 64
    every: int = 5
    samples: int = 8
    curvature_every: int = 20
    flatness_every: int = 45


def demo_probes(cfg: DemoConfig, name: str = "sgd") -> list:
    """RSI/EB on 8 probe batches; curvature, sharpness and valleys on the first probe batch (BN in
    eval mode). StepCurvature runs after HessianSpectrum at the same steps, so it reuses its
    lambda_max. PreconditionedSharpness is left out for SAM, whose edge-of-stability threshold is
    not the one of its base optimizer."""
    return [RestrictedSecant(every=cfg.every, samples=cfg.samples),
            HessianSpectrum(every=cfg.curvature_every, k=5),
            HessianTrace(every=cfg.curvature_every, matvecs=30),
            *([] if name == "sam" else [PreconditionedSharpness(every=cfg.curvature_every)]),
            StepCurvature(every=cfg.curvature_every),
            Sharpness(every=cfg.flatness_every, radius=0.05),
            ValleyWidth(every=cfg.flatness_every, tau=0.1),
            Interpolation(every=cfg.flatness_every),
            SpectralDensity(every=cfg.flatness_every, steps=40),
            LossProfile(every=cfg.flatness_every),
            TrajectoryPCA(every=cfg.every, grid=21)]


def train_one(name: str, seed: int, cfg: DemoConfig, data: tuple, bar: Any = None, *, store: Path | None = None,
              run: dict[str, Any] | None = None) -> Path:
    """Train one (optimizer, seed) run with the demo's probes attached; return its store path
    (default ``<cfg.out>/<name>-<seed>.zarr``; ``run``: extra run metadata beside optimizer and seed)."""
    (Xtr, ytr), _ = data
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = OPTIMIZERS[name](model.parameters())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xtr, ytr), batch_size=cfg.batch_size,
                                         shuffle=True, generator=torch.Generator().manual_seed(seed))
    path = Path(store) if store is not None else cfg.out / f"{name}-{seed}.zarr"
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(Xtr, ytr), probe_batch_size=cfg.batch_size,
                          probes=demo_probes(cfg, name), store=path, overwrite=True,
                          run={**(run or {}), "optimizer": name, "seed": seed}) as rec:
        for _ in range(cfg.epochs):
            model.train()
            for xb, yb in loader:
                def closure(xb: torch.Tensor = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                    opt.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss

                opt.step(closure)  # SAM evaluates it twice; SGD and Adam once, as a plain step
                if bar is not None:
                    bar.update(1)
        rec.annotate(**_evaluate(model, data))
    return path


@torch.no_grad()
def _evaluate(model: torch.nn.Module, data: tuple) -> dict[str, float]:
    (Xtr, ytr), (Xte, yte) = data
    model.eval()
    return {"final_train_loss": float(F.cross_entropy(model(Xtr), ytr)),
            "test_accuracy": float((model(Xte).argmax(1) == yte).double().mean())}


def _fmt(values: list[float], digits: int = 3) -> str:
    v = np.asarray([x for x in values if np.isfinite(x)])
    if v.size == 0:
        return "n/a"
    if v.size == 1:
        return f"{v[0]:.{digits}g}"
    sd = v.std(ddof=1)
    if sd <= 1e-9 * max(abs(v.mean()), 1e-300):  # identical across seeds up to rounding
        sd = 0.0
    return f"{v.mean():.{digits}g} ± {sd:.1g}"


RunsArg = Sequence[Union[Path, xr.Dataset]]


def _each(runs: RunsArg) -> Iterator[xr.Dataset]:
    """Each run as a dataset: a store path is opened, a dataset (from ``open_run``) passed through."""
    for item in runs:
        yield item if isinstance(item, xr.Dataset) else landscape.open_run(item)


def summary_table(runs: RunsArg) -> str:
    """Per-optimizer table over seeds (mean ± sd): final loss and accuracy, median gamma against its
    null band, mu_hat and L_hat (quantile estimates), implied step and contraction rate. ``runs``:
    store paths or datasets from ``open_run`` (here and in the other tables)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for ds in _each(runs):
        name = ds.attrs["run"]["optimizer"]
        r = rows.setdefault(name, {k: [] for k in ("loss", "acc", "gamma", "null", "mu", "L", "step", "rate", "guar")})
        r["loss"].append(ds.attrs.get("final_train_loss", math.nan))
        r["acc"].append(ds.attrs.get("test_accuracy", math.nan))
        g = np.asarray(ds["gamma"].values, dtype=float)
        r["gamma"].append(float(np.nanmedian(g)))
        r["null"].append(float(ds["gamma_null"].sel(null="upper")))
        q = {"bound": "quantile"}
        r["mu"].append(float(ds["mu_hat"].sel(q)))
        r["L"].append(float(ds["L_hat"].sel(q)))
        r["step"].append(float(ds["implied_step"].sel(q)))
        r["rate"].append(float(ds["contraction"].sel(q)))
        r["guar"].append(float(bool(ds["has_guarantee"].sel(q))))
    header = ["optimizer", "runs", "train loss", "test acc", "median gamma", "gamma null (97.5%)", "mu_hat (q05)",
              "L_hat (q95)", "implied step mu/L^2", "rate 1-mu^2/L^2"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for name, r in rows.items():
        lines.append(" | ".join([name, str(len(r["loss"])), _fmt(r["loss"]), _fmt(r["acc"]), _fmt(r["gamma"]),
                                 _fmt(r["null"], 2), _fmt(r["mu"]), _fmt(r["L"]), _fmt(r["step"]), _fmt(r["rate"], 6)]))
        if not all(r["guar"]):
            lines[-1] += "  (mu_hat <= 0 in some runs: no guarantee there)"
    return "\n".join(lines)


def _last(da: Any) -> float:
    v = np.asarray(da.values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v[-1]) if v.size else math.nan


def curvature_table(runs: RunsArg) -> str:
    """Per-optimizer curvature over seeds (mean ± sd): lambda_max and the trace at the end, the
    median stability ratio over the second half of training (the first steps of Adam, with
    v_hat ~ g^2, are a transient), and the Hessian-vector products per spectrum measurement."""
    rows: dict[str, dict[str, list[float]]] = {}
    for ds in _each(runs):
        if "lambda_max" not in ds:
            continue
        r = rows.setdefault(ds.attrs["run"]["optimizer"], {k: [] for k in ("lmax", "lmax_peak", "trace", "se", "ratio", "mv")})
        m = {"block": "model"}
        r["lmax"].append(_last(ds["lambda_max"].sel(m)))
        r["lmax_peak"].append(float(ds["lambda_max"].sel(m).max()))
        r["trace"].append(_last(ds["trace"].sel(m)))
        r["se"].append(_last(ds["trace_stderr"].sel(m)))
        # after the start-up transient; SAM runs have no edge-of-stability threshold (n/a)
        r["ratio"].append(_median_late(ds["stability_ratio"].sel(m)) if "stability_ratio" in ds else math.nan)
        mv = np.asarray(ds["spectrum_matvecs"].sel(m).values, dtype=float)
        r["mv"].append(float(np.mean(mv[mv > 0])) if (mv > 0).any() else math.nan)
    header = ["optimizer", "final lambda_max", "peak lambda_max", "final trace", "trace stderr",
              "stability ratio (median, 2nd half)", "HVPs per top-5 solve"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for name, r in rows.items():
        lines.append(" | ".join([name, _fmt(r["lmax"]), _fmt(r["lmax_peak"]), _fmt(r["trace"]), _fmt(r["se"], 2),
                                 _fmt(r["ratio"]), _fmt(r["mv"])]))
    return "\n".join(lines)


def _median_late(da: Any) -> float:
    """Median over the second half of training (after the start-up transient)."""
    late = da.where(da["step"] >= da["step"].max() // 2)
    return float(late.median())


def flatness_table(runs: RunsArg) -> str:
    """Per-optimizer flatness over seeds (mean ± sd) at the last measurement: sharpness in raw and
    scale-aware forms, valley widths along the river (trajectory) and the wall (top
    eigenvector) with their ratio, the floor curvature along the step and the anisotropy
    lambda_max / floor (medians over the second half), and the barrier on the straight line from
    the first checkpoint to the final iterate."""
    rows: dict[str, dict[str, list[float]]] = {}
    for ds in _each(runs):
        if "sharpness" not in ds:
            continue
        r = rows.setdefault(ds.attrs["run"]["optimizer"], {k: [] for k in ("avg", "avg_a", "worst_a", "sam", "asam", "w_r", "w_w",
                                                                           "aniso", "floor", "ratio", "mli")})
        sh = ds["sharpness"].sel(radius=0.05)
        for key, kind in (("avg", "average"), ("avg_a", "average_adaptive"), ("worst_a", "worst_l2_adaptive"),
                          ("sam", "sam"), ("asam", "asam")):
            r[key].append(_last(sh.sel(kind=kind)))
        r["w_r"].append(_last(ds["valley_width"].sel(direction="trajectory")))
        r["w_w"].append(_last(ds["valley_width"].sel(direction="eigenvector")))
        r["aniso"].append(_last(ds["valley_width_anisotropy"]))
        r["floor"].append(_median_late(ds["floor_curvature"]))
        r["ratio"].append(_median_late(ds["valley_anisotropy"]))
        r["mli"].append(float(ds["mli_barrier"]))
    header = ["optimizer", "average (raw)", "average (adaptive)", "worst l2 (adaptive)", "SAM", "ASAM",
              "width: river", "width: wall", "W(river)/W(wall)", "floor curvature u'Hu", "lambda_max / floor",
              "barrier first -> final"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for name, r in rows.items():
        lines.append(" | ".join([name] + [_fmt(r[k]) for k in ("avg", "avg_a", "worst_a", "sam", "asam", "w_r", "w_w",
                                                              "aniso", "floor", "ratio", "mli")]))
    return "\n".join(lines)


# per-run outcomes compared over seeds: (label, variable, selection, statistic)
OUTCOMES: tuple[tuple[str, str, dict[str, Any], str], ...] = (
    ("test accuracy", "test_accuracy", {}, "last"),
    ("final lambda_max", "lambda_max", {"block": "model"}, "last"),
    ("final sharpness (average, adaptive)", "sharpness", {"kind": "average_adaptive", "radius": 0.05}, "last"),
    ("final sharpness (ASAM)", "sharpness", {"kind": "asam", "radius": 0.05}, "last"),
    ("final valley width (wall)", "valley_width", {"direction": "eigenvector"}, "last"),
    ("training loss (mean, last 10%)", "loss", {}, "mean_tail"),
)


def comparison_table(runs: RunsArg) -> str:
    """Per outcome: mean ± sd per optimizer over seeds and, per pair, A12 = P(row arm > column
    arm) with the Holm-corrected two-sided Mann-Whitney p (landscape.compare). ``runs``: store
    paths or datasets from ``open_run``."""
    import warnings

    from landscape.compare import compare

    each = [ds.load() for ds in _each(runs)]
    stacked = stack_runs(each)
    stacked["test_accuracy"] = ("run", np.array([ds.attrs.get("test_accuracy", np.nan) for ds in each], dtype=float),
                                {"long_name": "test accuracy", "units": "1"})
    arms = list(dict.fromkeys(str(o) for o in stacked["optimizer"].values))
    pairs = [(a, b) for i, a in enumerate(arms) for b in arms[i + 1:]]
    header = ["outcome"] + arms + [f"{a} vs {b}: A12, p" for a, b in pairs]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    notes: set[str] = set()
    for label, var, sel, statistic in OUTCOMES:
        if var not in stacked:
            continue
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            res = compare(stacked, var, sel=sel or None, statistic=statistic)
        notes.update(res.notes)
        cells = [label] + [_fmt(list(res.values.values[np.asarray(res.values["optimizer"].values) == arm])) for arm in arms]
        mw = res.tests[res.tests["test"] == "mann_whitney"]
        for a, b in pairs:
            row = mw[((mw["a"] == a) & (mw["b"] == b)) | ((mw["a"] == b) & (mw["b"] == a))]
            if row.empty:
                cells.append("n/a")
                continue
            r = row.iloc[0]
            a12 = r["a12"] if r["a"] == a else 1.0 - r["a12"]
            p = r["p_holm"] if np.isfinite(r["p_holm"]) else r["p"]
            cells.append(f"{a12:.2f}, {p:.3g}{' *' if p < 0.05 else ''}")
        lines.append(" | ".join(cells))
    text = "\n".join(lines)
    # the same design warning arises for every pair and outcome: say each once
    general = sorted({n.split(": ", 1)[-1] for n in notes})
    if general:
        text += "\n" + "\n".join(f"note: {n}" for n in general)
    return text


def _settings(cfg: DemoConfig) -> dict[str, Any]:
    """The training settings that differ from the defaults: run metadata, and a sweep job's config."""
    default = DemoConfig()
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DemoConfig)
            if f.name not in ("out", "seeds", "optimizers") and getattr(cfg, f.name) != getattr(default, f.name)}


def train_all(cfg: DemoConfig, progress: bool = True, workers: int = 2) -> list[Path]:
    """Every (optimizer, seed) run of the demo, in optimizer then seed order. ``workers >= 2``: as
    a :func:`landscape.sweep` on that many single-threaded worker processes (the demo's 15 runs
    on 2 cores, back to back: 137.5 s and 142 s, against 180.4 s and 153 s one after the other
    with 2 torch threads, which the small CNN's operations use poorly); ``workers=1``: one after
    the other in this process."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    settings = _settings(cfg)
    if workers > 1:
        from landscape.sweeps import digits_train, sweep

        res = sweep(digits_train, {name: settings for name in cfg.optimizers}, list(cfg.seeds), cfg.out,
                    workers=workers, resume=False, progress=progress)
        if res.failed:
            raise RuntimeError(f"landscape demo: {len(res.failed)} of {len(res.failed) + len(res.finished)} runs "
                               f"failed\n{res.summary()}")
        return res.complete
    X, y = load_digits()
    data = split(X, y, 0.8, seed=0)
    steps_per_epoch = math.ceil(len(data[0][0]) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs * len(cfg.seeds) * len(cfg.optimizers)
    paths = []
    with tqdm(total=total, desc="training", unit="step", disable=not progress) as bar:
        for name in cfg.optimizers:
            for seed in cfg.seeds:
                bar.set_postfix_str(f"{name} seed {seed}")
                paths.append(train_one(name, seed, cfg, data, bar, run=settings))
    return paths


def run_demo(cfg: DemoConfig, progress: bool = True, workers: int = 2) -> list[Path]:
    """Train every (optimizer, seed) (:func:`train_all`), print the tables, write
    ``<out>/report.html``, return the store paths."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    paths = train_all(cfg, progress, workers)
    print(f"\n{len(paths)} runs in {time.perf_counter() - t0:.0f} s ({workers} worker process{'es' if workers > 1 else ''}), "
          f"written to {cfg.out}/\n")
    loaded = [landscape.open_run(p).load() for p in paths]  # read once for the tables and the report
    print(summary_table(loaded))
    print("\ngamma = cos(g, w - w_T) on 8 fixed probe batches; the null band is that of a random direction in d dims.")
    print()
    print(curvature_table(loaded))
    print(f"\nHessian of the loss on one probe batch of {cfg.batch_size} (BN in eval mode), every {cfg.curvature_every} steps: "
          "top-5 by warm-started Lanczos, trace by Hutch++ (30 products); stability ratio = lr * lambda / c with "
          "lambda of the optimizer's preconditioned Hessian (1 = edge of stability).")
    print()
    print(flatness_table(loaded))
    print(f"\nEvery {cfg.flatness_every} steps on the same probe batch: sharpness L(w + delta) - L(w) at rho = 0.05 "
          "(average: Gaussian delta; adaptive: scaled by |w|, invariant under rescalings that keep the function; worst: "
          "Auto-PGD, 20 steps; SAM/ASAM: one ascent step); valley widths t+ + t- where the loss rises by 0.1 along the "
          "trajectory direction (river) and the top Hessian eigenvector (wall), unit directions; every "
          f"{cfg.curvature_every} steps the curvature u'Hu along the step taken.")
    print()
    print(comparison_table(loaded))
    print(f"\nOver {len(cfg.seeds)} seeds per optimizer: mean ± sd; A12 = P(first arm's value > second's) (0.5: no "
          "difference), p = two-sided Mann-Whitney, Holm-corrected over the pairs (* p < 0.05).")
    print(f"Open one run: landscape.open_run('{paths[0]}'); all: landscape.open_runs('{cfg.out}/*.zarr')")
    from landscape.report import write_report  # plotly: only when the demo gets this far

    print(f"Report (open in a browser, works offline): {write_report(loaded, cfg.out / 'report.html')}")
    return paths
