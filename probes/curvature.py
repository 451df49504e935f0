"""Hessian curvature along training: top-k spectrum, trace, spectral density, preconditioned
sharpness and the edge of stability, per parameter block (REFERENCE.md §2).

Every probe here measures the Hessian of the mean loss over the first ``samples`` fixed probe
batches at w_t (BN in ``bn_mode``, eval by default; dropout off), through the step's shared
:meth:`probes.base.Context.hessian` operator, so several curvature probes due at one step build
the first-order graph once. Values are reported along a ``block`` dim: ``blocks=None`` is the
whole model (label ``"model"``); see :func:`landscape.functional.resolve_blocks` for blocks by
name pattern or module. A block's curvature is that of the diagonal block H_BB (the other
parameters held fixed).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Literal, Sequence, Union

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from landscape import linalg
from landscape.functional import HVP_ROUTES, BlockSpec, FunctionalModel, HVPRoute
from landscape.schema import step_value
from probes.base import BlockProbe, Context, Measurement, positive_int


def _tolerance(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(f"tol must be a relative tolerance in (0, 1), e.g. 1e-4; got {tol!r}")
    return float(tol)


class CurvatureProbe(BlockProbe):
    """Shared set-up of the Hessian probes: evaluation batches, BN mode, HVP route, blocks."""

    def __init__(self, every: Any = 1, *, samples: int = 1, blocks: BlockSpec = None, bn_mode: str = "eval",
                 route: HVPRoute = "auto", seed: int = 0) -> None:
        super().__init__(every, blocks=blocks, bn_mode=bn_mode, seed=seed)  # type: ignore[arg-type]
        self.samples = positive_int("samples (number of fixed probe batches the Hessian is taken over)", samples)
        if route not in HVP_ROUTES:
            raise ValueError(f"route must be one of {HVP_ROUTES}, got {route!r}")
        self.route: HVPRoute = route

    @property
    def samples_needed(self) -> int:
        return self.samples

    def _blocks(self, op: Any) -> Iterator[tuple[str, linalg.SymmetricOperator]]:
        """Each block's operator: the whole ``op`` or its diagonal block."""
        base = linalg.as_operator(op)
        for label, index in self.block_index.items():
            yield label, base if index is None else linalg.restricted(base, index.to(base.device))

    def _settings(self) -> dict[str, Any]:
        return {"samples": self.samples, "bn_mode": self.bn_mode, "route": self.route}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "samples": self.samples, "route": self.route}


WarmStart = Union[bool, Literal["block"]]


def _warm_start(value: Any) -> WarmStart:
    if value not in (True, False, "block"):
        raise ValueError(f"warm_start must be True, False or 'block', got {value!r}")
    return value  # type: ignore[no-any-return]


class _Tracker:
    """Top-k Ritz pairs of one operator per block, warm-started from the previous measurement.

    ``warm_start=True`` starts single-vector Lanczos from the sum of the previous Ritz vectors
    (plus a small seeded random part, so no direction is missed); ``"block"`` runs block Lanczos
    from the previous Ritz vectors themselves. Measured along a digits-CNN SGD run, top-5 at tol
    1e-5 every 16 steps: cold 12-19 products, single-vector warm 12-21, block warm 30-48 (the
    top eigenvectors turn too much in 16 steps for one or two block steps to suffice, and each
    block step costs k + 1 products). The block start pays off when the Hessian moves little
    between measurements (6-12 products against 56 cold on a slowly changing clustered spectrum,
    tests/test_linalg.py).
    """

    def __init__(self, k: int, bottom: int, tol: float, max_matvecs: int | None, warm_start: WarmStart) -> None:
        self.k, self.bottom, self.tol, self.max_matvecs, self.warm_start = k, bottom, tol, max_matvecs, warm_start
        self.vectors: dict[str, Tensor] = {}

    def run(self, label: str, op: linalg.SymmetricOperator, generator: torch.Generator) -> linalg.LanczosResult:
        if self.bottom and self.bottom != self.k:
            which_k, which = max(self.k, self.bottom), "both"
        else:
            which_k, which = self.k, "both" if self.bottom else "top"
        previous = self.vectors.get(label) if self.warm_start else None
        start, extra = None, 1
        if previous is not None and self.warm_start == "block":
            start = previous
        elif previous is not None:
            noise = torch.randn(previous.shape[0], generator=generator, dtype=torch.float64).to(previous)
            start = previous.sum(dim=1) / math.sqrt(previous.shape[1]) + 0.1 * noise / noise.norm()
            extra = 0
        res = linalg.lanczos(op, which_k, which=which, tol=self.tol, max_matvecs=self.max_matvecs,  # type: ignore[arg-type]
                             warm_start=start, extra_random=extra, generator=generator)
        if self.warm_start:
            self.vectors[label] = res.eigenvectors.detach().clone()
        return res


def _split(res: linalg.LanczosResult, kind: str, n: int) -> dict[str, np.ndarray]:
    sel = [i for i, k in enumerate(res.kind) if k == kind][:n]
    return {
        "values": res.eigenvalues[sel].double().cpu().numpy(),
        "residuals": res.residuals[sel].double().cpu().numpy(),
        "bounds": res.error_bounds[sel].double().cpu().numpy(),
        "converged": res.converged[sel].cpu().numpy().astype(bool),
    }


class HessianSpectrum(CurvatureProbe):
    """Top-k (and optionally bottom-k) Hessian eigenvalues by Lanczos, tracked along training.

    Lanczos with full reorthogonalisation and a float64 projected matrix; each measurement is
    warm-started from the previous one's Ritz vectors (see ``warm_start`` below). A value is
    converged when its error bound min(r, r^2/gap) (r the Ritz residual) is below ``tol`` times
    its magnitude; residuals, bounds, flags and the number of products are stored with it. The
    bound is that of the operator as computed: a float32 model's products carry rounding noise,
    which limits the eigenvalues to about 1e-6 relative for lambda_max and 1e-5 for smaller ones
    (digits CNN, 64 examples, against float64), whatever ``tol`` says. The
    top-k Ritz pairs are left for other probes at the same step in
    ``ctx.shared["hessian_eigenvectors"][block]`` (a dict: eigenvalues, eigenvectors (d_block, k),
    and the samples and bn_mode of the Hessian they belong to).

    Args:
        every: cadence. k: number of top eigenvalues. bottom: number of bottom eigenvalues (0:
        none). tol: relative accuracy of the eigenvalues. max_matvecs: cap on products per
        block and measurement. warm_start: True starts from the sum of the previous Ritz vectors,
        "block" from the vectors themselves (cheaper when the Hessian moves little between
        measurements), False cold (see ``_Tracker``). samples, blocks,
        bn_mode, route, seed: see :class:`CurvatureProbe` and the module docstring.
    """

    name = "HessianSpectrum"

    def __init__(self, every: Any = 1, k: int = 5, *, bottom: int = 0, tol: float = 1e-5, max_matvecs: int | None = None,
                 warm_start: WarmStart = True, samples: int = 1, blocks: BlockSpec = None, bn_mode: str = "eval",
                 route: HVPRoute = "auto", seed: int = 0) -> None:
        super().__init__(every, samples=samples, blocks=blocks, bn_mode=bn_mode, route=route, seed=seed)
        self.k = positive_int("k (number of top eigenvalues)", k)
        self.bottom = positive_int("bottom (number of bottom eigenvalues)", bottom, 0)
        self.tol = _tolerance(tol)
        self.max_matvecs = None if max_matvecs is None else positive_int("max_matvecs", max_matvecs)
        self.warm_start = _warm_start(warm_start)
        self._tracker = _Tracker(self.k, self.bottom, self.tol, self.max_matvecs, self.warm_start)

    def setup(self, functional: FunctionalModel, optimizer: torch.optim.Optimizer) -> None:
        super().setup(functional, optimizer)
        for label, size in self._block_sizes.items():
            if max(self.k, self.bottom) > size:
                raise ValueError(f"HessianSpectrum: k={max(self.k, self.bottom)} eigenvalues asked of block {label!r}, "
                                 f"which has only {size} parameters")

    def measure(self, ctx: Context) -> Measurement:
        op = ctx.hessian(self.samples, self.bn_mode, self.route)
        gen = self.generator(ctx.step)
        top: list[dict[str, np.ndarray]] = []
        bottom: list[dict[str, np.ndarray]] = []
        matvecs = []
        shared = ctx.shared.setdefault("hessian_eigenvectors", {})
        for label, A in self._blocks(op):
            res = self._tracker.run(label, A, gen)
            top.append(_split(res, "top", self.k))
            if self.bottom:
                bottom.append(_split(res, "bottom", self.bottom))
            matvecs.append(res.matvecs)
            sel = [i for i, kind in enumerate(res.kind) if kind == "top"][:self.k]
            shared[label] = {"eigenvalues": res.eigenvalues[sel], "eigenvectors": res.eigenvectors[:, sel],
                             "samples": self.samples, "bn_mode": self.bn_mode}
        s = {**self._settings(), "k": self.k, "tol": self.tol, "warm_start": self.warm_start}
        values = {
            "eigenvalues": step_value("eigenvalues", np.stack([t["values"] for t in top]), **s),
            "lambda_max": step_value("lambda_max", np.array([t["values"][0] for t in top]), **s),
            "eigenvalue_residuals": step_value("eigenvalue_residuals", np.stack([t["residuals"] for t in top]), **s),
            "eigenvalue_error_bounds": step_value("eigenvalue_error_bounds", np.stack([t["bounds"] for t in top]), **s),
            "eigenvalues_converged": step_value("eigenvalues_converged", np.stack([t["converged"] for t in top]), **s),
            "spectrum_matvecs": step_value("spectrum_matvecs", np.array(matvecs, dtype=np.int64), **s),
        }
        if self.bottom:
            s = {**s, "bottom": self.bottom}
            values["eigenvalues_bottom"] = step_value("eigenvalues_bottom", np.stack([b["values"] for b in bottom]), **s)
            values["lambda_min"] = step_value("lambda_min", np.array([b["values"][0] for b in bottom]), **s)
            values["eigenvalue_residuals_bottom"] = step_value("eigenvalue_residuals_bottom", np.stack([b["residuals"] for b in bottom]), **s)
            values["eigenvalues_converged_bottom"] = step_value("eigenvalues_converged_bottom", np.stack([b["converged"] for b in bottom]), **s)
        return Measurement(values)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "bottom": self.bottom, "tol": self.tol, "max_matvecs": self.max_matvecs,
                "warm_start": self.warm_start}


class HessianTrace(CurvatureProbe):
    """tr(H) by Hutch++ (default) or Hutchinson with Rademacher vectors, with its standard error.

    Hutch++ (Meyer et al. 2021) spends a third of ``matvecs`` on a sketch of the top of the
    spectrum, whose trace it takes exactly, and the rest on Hutchinson for the remainder: its
    error falls like 1/m instead of 1/sqrt(m). ``trace_stderr`` is the standard error of the
    stochastic part (the exact part has none), from the spread of its terms.
    """

    name = "HessianTrace"

    def __init__(self, every: Any = 1, *, method: str = "hutch++", matvecs: int = 30, samples: int = 1,
                 blocks: BlockSpec = None, bn_mode: str = "eval", route: HVPRoute = "auto", seed: int = 0) -> None:
        super().__init__(every, samples=samples, blocks=blocks, bn_mode=bn_mode, route=route, seed=seed)
        if method not in ("hutch++", "hutchinson"):
            raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
        self.method = method
        self.matvecs = positive_int("matvecs", matvecs, 3 if method == "hutch++" else 2)

    def measure(self, ctx: Context) -> Measurement:
        op = ctx.hessian(self.samples, self.bn_mode, self.route)
        gen = self.generator(ctx.step)
        est = [(linalg.hutchpp if self.method == "hutch++" else linalg.hutchinson)(A, self.matvecs, generator=gen)
               for _, A in self._blocks(op)]
        s = {**self._settings(), "method": self.method, "matvecs": self.matvecs}
        return Measurement({
            "trace": step_value("trace", np.array([e.trace for e in est], dtype=np.float64), **s),
            "trace_stderr": step_value("trace_stderr", np.array([e.stderr for e in est], dtype=np.float64), **s),
        })

    def config(self) -> dict[str, Any]:
        return {**super().config(), "method": self.method, "matvecs": self.matvecs}


class SpectralDensity(CurvatureProbe):
    """The Hessian's spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    Per probe vector, ``steps`` Lanczos steps give nodes (Ritz values) and weights (squared first
    components); they are stored flat along ``node`` (``vectors * steps`` entries, weights already
    divided by ``vectors`` so they sum to 1). Smoothing is a plotting choice and is not stored:
    :func:`density_on_grid` gives the density. A block smaller than ``steps`` pads with NaN nodes
    of weight 0.
    """

    name = "SpectralDensity"

    def __init__(self, every: Any = 1, *, vectors: int = 1, steps: int = 90, samples: int = 1, blocks: BlockSpec = None,
                 bn_mode: str = "eval", route: HVPRoute = "auto", seed: int = 0) -> None:
        super().__init__(every, samples=samples, blocks=blocks, bn_mode=bn_mode, route=route, seed=seed)
        self.vectors = positive_int("vectors (SLQ probe vectors)", vectors)
        self.steps = positive_int("steps (Lanczos steps per probe vector)", steps, 2)

    def measure(self, ctx: Context) -> Measurement:
        op = ctx.hessian(self.samples, self.bn_mode, self.route)
        gen = self.generator(ctx.step)
        width = self.vectors * self.steps
        nodes = np.full((len(self.block_index), width), np.nan)
        weights = np.zeros((len(self.block_index), width))
        for b, (_, A) in enumerate(self._blocks(op)):
            res = linalg.slq(A, self.vectors, self.steps, generator=gen)
            n = res.nodes.double().cpu().numpy()
            w = res.weights.double().cpu().numpy() / self.vectors
            m = n.shape[1]
            for v in range(self.vectors):
                nodes[b, v * self.steps:v * self.steps + m] = n[v]
                weights[b, v * self.steps:v * self.steps + m] = w[v]
        weights[~np.isfinite(nodes)] = 0.0
        s = {**self._settings(), "vectors": self.vectors, "lanczos_steps": self.steps}
        return Measurement({"slq_nodes": step_value("slq_nodes", nodes, **s), "slq_weights": step_value("slq_weights", weights, **s)})

    def config(self) -> dict[str, Any]:
        return {**super().config(), "vectors": self.vectors, "steps": self.steps}


def density_on_grid(ds: xr.Dataset, *, block: str = "model", grid: int | Sequence[float] | np.ndarray = 256,
                    sigma2: float | None = None) -> xr.DataArray:
    """The Gaussian-smoothed spectral density at every measured step, on a grid of eigenvalues.

    ``grid`` is a number of points (spanning all nodes of all steps, with a margin) or the points
    themselves; ``sigma2`` the smoothing variance (default 1e-5 max(1, lmax - lmin), REFERENCE.md
    §2, widened to two grid spacings when ``grid`` is a count, so the curve keeps its mass).
    Returns a DataArray (``step``, ``eigenvalue``) that integrates to 1 over a wide grid.
    """
    for name in ("slq_nodes", "slq_weights"):
        if name not in ds:
            raise KeyError(f"the dataset has no {name!r}: attach SpectralDensity(...) to record the spectral density")
    nodes, weights = ds["slq_nodes"], ds["slq_weights"]
    if "block" in nodes.dims:
        if block not in list(nodes["block"].values):
            raise KeyError(f"block {block!r} not recorded; blocks are {list(nodes['block'].values)}")
        nodes, weights = nodes.sel(block=block), weights.sel(block=block)
    n = np.asarray(nodes.transpose("step", "node").values, dtype=np.float64)
    w = np.asarray(weights.transpose("step", "node").values, dtype=np.float64)
    rows = np.isfinite(n).any(axis=1)
    if not rows.any():
        raise ValueError(f"no spectral density was measured for block {block!r}")
    n, w, steps = n[rows], w[rows], np.asarray(ds["step"].values)[rows]
    lo, hi = float(np.nanmin(n)), float(np.nanmax(n))
    if isinstance(grid, (int, np.integer)):
        if grid < 2:
            raise ValueError(f"grid must have at least 2 points, got {grid}")
        span = max(hi - lo, 1e-12)
        # the kernels must be wider than the grid spacing, or the curve is a comb that misses mass
        spacing = span / (int(grid) - 1)
        width = math.sqrt(sigma2) if sigma2 is not None else max(math.sqrt(1e-5 * max(1.0, span)), 2 * spacing)
        points = np.linspace(lo - 0.05 * span - 5 * width, hi + 0.05 * span + 5 * width, int(grid))
        sigma2 = width**2
    else:
        points = np.asarray(grid, dtype=np.float64)
    out = np.empty((len(steps), len(points)))
    for i in range(len(steps)):
        ok = np.isfinite(n[i]) & (w[i] > 0)
        out[i] = linalg.spectral_density(n[i][ok], w[i][ok], points, sigma2=sigma2)
    return xr.DataArray(out, dims=("step", "eigenvalue"), coords={"step": steps, "eigenvalue": points},
                        attrs={"long_name": "Hessian spectral density", "units": "1", "block": block,
                               "sigma2": "1e-5 max(1, lmax - lmin) per step" if sigma2 is None else sigma2})


# -- preconditioned sharpness and the edge of stability -----------------------------------------


def _same(groups: Sequence[dict[str, Any]], key: str) -> Any:
    values = {repr(g.get(key)) for g in groups}
    if len(values) > 1:
        raise ValueError(f"PreconditionedSharpness: param groups differ in {key!r} ({sorted(values)}), so the "
                         "edge of stability differs between them: measure them in separate runs or pass threshold=")
    return groups[0].get(key)


def stability_constant(optimizer: torch.optim.Optimizer) -> tuple[float, str]:
    """The constant c of the edge of stability eta * lambda = c, and how it was derived.

    GD: 2; heavy ball (torch SGD, momentum beta, dampening tau): (2 + 2 beta) / (1 - tau);
    Nesterov: (2 + 2 beta) / (1 + 2 beta); Adam/AdamW (on the preconditioned Hessian):
    (2 + 2 beta1) / (1 - beta1) (Cohen et al. 2021, 2022); RMSprop with momentum beta: 2 + 2 beta;
    Adagrad: 2. The heavy-ball and Nesterov constants are where the linear recurrence on a quadratic
    with curvature lambda gets an eigenvalue -1.
    """
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        beta = float(_same(groups, "momentum") or 0.0)
        if beta == 0:
            return 2.0, "GD: 2"
        if _same(groups, "nesterov"):
            return (2 + 2 * beta) / (1 + 2 * beta), f"Nesterov momentum {beta}: (2 + 2 beta) / (1 + 2 beta)"
        tau = float(_same(groups, "dampening") or 0.0)
        return (2 + 2 * beta) / (1 - tau), f"heavy ball momentum {beta}, dampening {tau}: (2 + 2 beta) / (1 - dampening)"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        beta1 = float(_same(groups, "betas")[0])
        return (2 + 2 * beta1) / (1 - beta1), f"Adam beta1 {beta1}: (2 + 2 beta1) / (1 - beta1)"
    if isinstance(optimizer, torch.optim.RMSprop):
        beta = float(_same(groups, "momentum") or 0.0)
        return 2 + 2 * beta, f"RMSprop momentum {beta}: 2 + 2 beta"
    if isinstance(optimizer, torch.optim.Adagrad):
        return 2.0, "Adagrad: 2"
    raise TypeError(f"PreconditionedSharpness does not know the preconditioner of {type(optimizer).__name__}: "
                    "supported are SGD, Adam, AdamW, RMSprop and Adagrad; pass preconditioner= and threshold= for others")


_ADAPTIVE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad)


def _decoupled(optimizer: torch.optim.Optimizer) -> bool:
    return isinstance(optimizer, torch.optim.AdamW) or bool(optimizer.param_groups[0].get("decoupled_weight_decay", False))


def preconditioner_diagonal(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> Tensor | None:
    """The diagonal P of the optimizer's current preconditioner, flat over ``params`` (None: identity).

    Adam/AdamW: sqrt(v_hat) + eps with v_hat = v / (1 - beta2^t) (amsgrad: the running max);
    RMSprop: sqrt(v) + eps (centered: sqrt(v - m^2) + eps); Adagrad: sqrt(sum g^2) + eps. A parameter
    without optimizer state yet (never stepped) gets P = 1.
    """
    if isinstance(optimizer, torch.optim.SGD):
        return None
    if not isinstance(optimizer, _ADAPTIVE):
        raise TypeError(f"no preconditioner known for {type(optimizer).__name__} (known: SGD, Adam, AdamW, RMSprop, "
                        "Adagrad): pass preconditioner=")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    for p in params:
        g = group_of[id(p)]
        st = optimizer.state.get(p, {})
        eps = float(g.get("eps", 0.0))
        with torch.no_grad():
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and "exp_avg_sq" in st:
                v = st["max_exp_avg_sq"] if g.get("amsgrad") else st["exp_avg_sq"]
                bc2 = 1 - float(g["betas"][1]) ** float(st["step"])
                P = (v / bc2).sqrt() + eps
            elif isinstance(optimizer, torch.optim.RMSprop) and "square_avg" in st:
                v = st["square_avg"] - st["grad_avg"] ** 2 if g.get("centered") else st["square_avg"]
                P = v.sqrt() + eps
            elif isinstance(optimizer, torch.optim.Adagrad) and "sum" in st:
                P = st["sum"].sqrt() + eps
            else:
                P = torch.ones_like(p)
        parts.append(P.reshape(-1).to(p.dtype))
    return torch.cat(parts) if parts else torch.empty(0)


def _effective_lrs(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> list[float]:
    """Per-parameter step size of the update just taken (Adagrad's lr decay included)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for p in params:
        g = group_of[id(p)]
        lr = float(g["lr"].item() if isinstance(g["lr"], Tensor) else g["lr"])
        if isinstance(optimizer, torch.optim.Adagrad):
            step = float(optimizer.state.get(p, {}).get("step", 1))
            lr = lr / (1 + (step - 1) * float(g.get("lr_decay", 0.0)))
        out.append(lr)
    return out


class PreconditionedSharpness(CurvatureProbe):
    """lambda_max of P^-1/2 H P^-1/2 with P from the optimizer's state, and the edge of stability.

    P is the optimizer's diagonal preconditioner at the update just taken (Adam/AdamW:
    sqrt(v_hat) + eps; RMSprop, Adagrad likewise; SGD: identity, so this is the plain lambda_max).
    With coupled L2 weight decay (SGD, Adam, RMSprop, Adagrad ``weight_decay``) the update sees
    H + lambda I, and that is what is measured; AdamW's decoupled decay is not part of it.
    ``stability_ratio`` = eta * lambda / c, with c from :func:`stability_constant`: 1 is the edge
    of stability. ``eos_threshold`` = c / eta is the curvature at the edge, comparable with
    ``preconditioned_lambda_max`` (and with ``lambda_max`` for SGD). When param groups have
    different learning rates, each group's curvature is weighted by its lr relative to the first
    group's (the operator is D^1/2 (H + lambda I) D^1/2, D = diag(eta_i / (eta_0 P_i))), and eta is
    the first group's.

    BN is in train mode by default here, unlike the other curvature probes: P comes from
    train-mode gradients, and the eval-mode Hessian has curvature in directions those gradients
    never see (a conv bias before BatchNorm has zero train-mode gradient, so P = eps there), which
    P^-1 would amplify by 1/eps (a stability ratio of thousands on the demo's CNN under Adam).

    Args: k (top eigenvalues of the preconditioned Hessian), tol, max_matvecs, warm_start as in
    :class:`HessianSpectrum`; ``preconditioner``: optional callable ``optimizer -> flat P (d,)``
    for other optimizers; ``threshold``: the constant c, overriding the optimizer's.
    """

    name = "PreconditionedSharpness"

    def __init__(self, every: Any = 1, *, k: int = 1, tol: float = 1e-4, max_matvecs: int | None = None,
                 warm_start: WarmStart = True, preconditioner: Callable[[torch.optim.Optimizer], Tensor] | None = None,
                 threshold: float | None = None, samples: int = 1, blocks: BlockSpec = None, bn_mode: str = "train",
                 route: HVPRoute = "auto", seed: int = 0) -> None:
        super().__init__(every, samples=samples, blocks=blocks, bn_mode=bn_mode, route=route, seed=seed)
        self.k = positive_int("k", k)
        self.tol = _tolerance(tol)
        self.max_matvecs = None if max_matvecs is None else positive_int("max_matvecs", max_matvecs)
        self.warm_start = _warm_start(warm_start)
        if preconditioner is not None and not callable(preconditioner):
            raise TypeError("preconditioner must be a callable optimizer -> flat tensor of P's diagonal")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold <= 0):
            raise ValueError(f"threshold must be a positive number (the constant c of eta * lambda = c), got {threshold!r}")
        self.preconditioner = preconditioner
        self.threshold = threshold
        self.constant = float("nan")
        self.rule = ""
        self._tracker = _Tracker(self.k, 0, self.tol, self.max_matvecs, self.warm_start)
        self._params: list[Tensor] = []

    def setup(self, functional: FunctionalModel, optimizer: torch.optim.Optimizer) -> None:
        super().setup(functional, optimizer)
        self._params = list(functional.params)
        if self.threshold is not None:
            self.constant, self.rule = float(self.threshold), "given"
        else:
            self.constant, self.rule = stability_constant(optimizer)
        if self.preconditioner is None and not isinstance(optimizer, torch.optim.SGD):
            preconditioner_diagonal(optimizer, [])  # unsupported optimizers fail here, before training

    def _operator(self, ctx: Context) -> tuple[Any, float]:
        opt = ctx.optimizer
        lrs = _effective_lrs(opt, self._params)
        lr0 = lrs[0]
        if self.preconditioner is not None:
            P = torch.as_tensor(self.preconditioner(opt)).reshape(-1)
            if P.numel() != ctx.functional.dim:
                raise ValueError(f"preconditioner returned {P.numel()} values for {ctx.functional.dim} parameters")
        else:
            P = preconditioner_diagonal(opt, self._params)
        if P is not None and not bool(torch.all(P > 0)):
            raise FloatingPointError("the preconditioner has non-positive entries: P must be a positive diagonal")
        rel = None
        if len(set(lrs)) > 1 and lr0 > 0:
            rel = torch.cat([torch.full((p.numel(),), lr / lr0, dtype=p.dtype, device=p.device)
                             for p, lr in zip(self._params, lrs)])
        scale = None
        if P is not None or rel is not None:
            d = torch.ones(ctx.functional.dim, dtype=ctx.functional.dtype, device=ctx.functional.device)
            if P is not None:
                d = d / P.to(d)
            if rel is not None:
                d = d * rel
            scale = d.sqrt()
        shift = None if _decoupled(opt) else ctx.weight_decay
        op = ctx.hessian(self.samples, self.bn_mode, self.route)
        if scale is None and shift is None:
            return op, lr0
        return linalg.transformed(linalg.as_operator(op), scale if scale is not None else torch.ones_like(ctx.params), shift), lr0

    def measure(self, ctx: Context) -> Measurement:
        op, lr = self._operator(ctx)
        gen = self.generator(ctx.step)
        vals, res_, conv, mv = [], [], [], []
        for label, A in self._blocks(op):
            res = self._tracker.run(label, A, gen)
            top = _split(res, "top", self.k)
            vals.append(top["values"])
            res_.append(top["residuals"][0])
            conv.append(top["converged"][0])
            mv.append(res.matvecs)
        lam = np.array([v[0] for v in vals])
        s = {**self._settings(), "k": self.k, "tol": self.tol, "threshold_constant": self.constant,
             "threshold_rule": self.rule, "optimizer": type(ctx.optimizer).__name__}
        with np.errstate(invalid="ignore", divide="ignore"):
            eos = self.constant / lr if lr > 0 else math.inf
        return Measurement({
            "preconditioned_eigenvalues": step_value("preconditioned_eigenvalues", np.stack(vals), **s),
            "preconditioned_lambda_max": step_value("preconditioned_lambda_max", lam, **s),
            "preconditioned_residual": step_value("preconditioned_residual", np.array(res_), **s),
            "preconditioned_converged": step_value("preconditioned_converged", np.array(conv, dtype=bool), **s),
            "preconditioned_matvecs": step_value("preconditioned_matvecs", np.array(mv, dtype=np.int64), **s),
            "stability_ratio": step_value("stability_ratio", lr * lam / self.constant, **s),
            "eos_threshold": step_value("eos_threshold", np.float64(eos), **s),
        })

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "tol": self.tol, "max_matvecs": self.max_matvecs,
                "warm_start": self.warm_start, "threshold": self.threshold, "custom_preconditioner": self.preconditioner is not None}


def top_eigenpairs(ctx: Context, k: int, *, samples: int = 1, bn_mode: str = "eval", route: HVPRoute = "auto",
                   tol: float = 1e-3, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The top-k eigenvalues (descending) and unit eigenvectors (d, k) of the whole-model
    Hessian at this step, on the first ``samples`` probe batches in ``bn_mode``.

    Reuses HessianSpectrum's Ritz pairs when it ran earlier at this step on the same Hessian
    with at least k pairs; otherwise runs Lanczos to relative accuracy ``tol`` and leaves the
    pairs in ``ctx.shared`` for the probes after it. Call it inside the probe's guard.
    """
    shared = ctx.shared.setdefault("hessian_eigenvectors", {})
    entry = shared.get("model")
    if (entry is not None and entry["samples"] == samples and entry["bn_mode"] == bn_mode
            and entry["eigenvectors"].shape[1] >= k):
        return entry["eigenvalues"][:k], entry["eigenvectors"][:, :k]
    op = ctx.hessian(samples, bn_mode, route)  # type: ignore[arg-type]
    res = linalg.lanczos(op, k, which="top", tol=tol, generator=generator)
    shared["model"] = {"eigenvalues": res.eigenvalues[:k], "eigenvectors": res.eigenvectors[:, :k],
                       "samples": samples, "bn_mode": bn_mode}
    return res.eigenvalues[:k], res.eigenvectors[:, :k]
