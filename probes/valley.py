"""Valleys along the trajectory: the floor versus the walls, measured (REFERENCE.md §4).

A valley is a region of low, nearly equal loss: flat along its floor (where training drifts),
steep across its walls (where the top Hessian eigenvectors point). The probes here measure that
picture instead of reading it off a contour plot:

- :class:`StepCurvature`: curvature along the step the optimizer took (u^T H u and the secant
  form from gradients on the same batches at w_t and w_{t+1}) and the anisotropy lambda_max / it.
- :class:`RiverHill`: the river/hill split of Wen et al. 2024: an EMA of the iterate follows the
  river; the hill height L(w) - L(w_ema) is the loss spent oscillating across the walls; floor
  progress is how far the EMA moved.
- :class:`ValleyWidth`: t+- = sup{t >= 0: L(w +- t d) - L(w) <= tau} by doubling then bisection,
  along the trajectory direction (river), the top eigenvector (wall) and random directions, and
  the anisotropy index W(river) / W(wall).
- :class:`GradientOverlap`: the share of the gradient in the top-k Hessian eigenspace
  (Gur-Ari et al. 2018).
- :class:`Interpolation`: the loss on the segment between consecutive checkpoints (barrier,
  monotonicity) and, at the end, from the first checkpoint to the final iterate (monotonic linear
  interpolation, Lucas et al. 2021); :func:`landscape.slices.interpolate` between any two
  points, e.g. the final iterates of two runs.

All losses are the mean over the first ``samples`` fixed probe batches, BN in ``bn_mode`` (eval
by default), dropout off. Hessian quantities reuse HessianSpectrum's eigenvectors when it ran at
the same step on the same batches (``probes.curvature.top_eigenpairs``).
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from landscape.directions import BiasMode, Normalization, TrajectoryDirection, check_normalization, normalized, random_direction
from landscape.functional import Batch, FunctionalModel, HVPRoute
from landscape.geometry import exit_distances, interpolation_stats
from landscape.schema import attrs_for, step_value
from landscape.slices import alpha_grid, segment_losses
from probes.base import Context, Measurement, Probe, number_in, positive_int
from probes.curvature import top_eigenpairs


class _ValleyProbe(Probe):
    """Shared set-up: the probe batches the losses are taken on."""

    def __init__(self, every: Any = 1, *, samples: int = 1, bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, bn_mode=bn_mode, seed=seed)  # type: ignore[arg-type]
        self.samples = positive_int("samples (number of fixed probe batches)", samples)

    @property
    def samples_needed(self) -> int:
        return self.samples

    def _batches(self, ctx: Context) -> list[Batch]:
        return ctx.probe_batches[: self.samples]

    def _settings(self) -> dict[str, Any]:
        return {"samples": self.samples, "bn_mode": self.bn_mode}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "samples": self.samples}


def _loss_fn(fm: FunctionalModel, batches: list[Batch]) -> Callable[[Tensor], float]:
    def f(w: Tensor) -> float:
        with torch.no_grad():
            return float(fm.loss(w, batches))
    return f


# -- curvature along the step ------------------------------------------------------------------
class StepCurvature(_ValleyProbe):
    """Curvature of the loss along the step the optimizer took.

    ``floor_curvature`` = u^T H u, u = dw / |dw| (one Hessian-vector product);
    ``floor_curvature_secant`` = <g_B(w_t + dw) - g_B(w_t), dw> / |dw|^2 with the same probe
    batches B at both points (one extra gradient: g_B(w_t) comes with the Hessian's graph): the
    average curvature over the step, which the optimizer "feels" (ALTO's g_k - g_{k-1} ~ H dw);
    ``valley_anisotropy`` = lambda_max / floor_curvature (``anisotropy=False`` skips the Lanczos
    run it needs when no HessianSpectrum shares its eigenvalues). A zero or non-finite step gives
    NaN. Costs (digits MLP): 1 HVP + 1 gradient, plus ~15-25 HVPs for lambda_max when not shared.
    """

    name = "StepCurvature"

    def __init__(self, every: Any = 1, *, anisotropy: bool = True, tol: float = 1e-3, samples: int = 1,
                 bn_mode: str = "eval", route: HVPRoute = "auto", seed: int = 0) -> None:
        super().__init__(every, samples=samples, bn_mode=bn_mode, seed=seed)
        self.anisotropy = bool(anisotropy)
        self.tol = number_in("tol", tol, high=1.0)
        if route not in ("auto", "double_backward", "fwd_rev"):
            raise ValueError(f"route must be 'auto', 'double_backward' or 'fwd_rev', got {route!r}")
        self.route: HVPRoute = route

    def measure(self, ctx: Context) -> Measurement:
        assert ctx.params is not None and ctx.update is not None
        s = self._settings()
        dw = ctx.update
        norm = float(torch.linalg.vector_norm(dw, dtype=torch.float64))
        nan = np.float64(np.nan)
        kappa = kappa_secant = lam = nan
        if norm > 0 and math.isfinite(norm):
            op = ctx.hessian(self.samples, self.bn_mode, self.route)
            u = dw / norm
            kappa = np.float64(torch.dot(u.double(), op.matvec(u).double()))
            g0 = op.gradient()
            g1 = ctx.functional.grad(ctx.params + dw, self._batches(ctx))
            kappa_secant = np.float64(torch.dot((g1 - g0).double(), dw.double()) / norm**2)
            if self.anisotropy:
                values, _ = top_eigenpairs(ctx, 1, samples=self.samples, bn_mode=self.bn_mode, route=self.route,
                                           tol=self.tol, generator=self.generator(ctx.step))
                lam = np.float64(values[0])
        out = {
            "floor_curvature": step_value("floor_curvature", kappa, **s),
            "floor_curvature_secant": step_value("floor_curvature_secant", kappa_secant, **s),
        }
        if self.anisotropy:
            ratio = lam / kappa if kappa != 0 else np.float64(np.inf * np.sign(lam))
            out["valley_anisotropy"] = step_value("valley_anisotropy", np.float64(ratio), **s, tol=self.tol)
        return Measurement(out)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "anisotropy": self.anisotropy, "tol": self.tol, "route": self.route}


# -- river / hill ------------------------------------------------------------------------------
class RiverHill(_ValleyProbe):
    """The river/hill decomposition (Wen et al. 2024): w_ema follows the valley floor.

    The EMA is taken per optimizer step with factor ``beta`` and updated at each measurement as
    w_ema <- beta^D w_ema + (1 - beta^D) w_t (D = steps since the previous measurement): exact
    for the iterate held constant between measurements, so ``every=1`` gives the per-step EMA and
    a sparser cadence a coarser one with the same time constant 1 / (1 - beta) steps.
    ``hill_height`` = L(w_t) - L(w_ema) (> 0: the iterate sits up the wall), ``ema_loss``,
    ``ema_distance`` = |w_t - w_ema|, ``floor_progress`` = |w_ema(t) - w_ema(t - lag)| (``lag``
    steps, default the previous measurement; NaN until the EMA is that old). Costs 2 forward
    passes over the probe batches and O(d * lag / every) memory.
    """

    name = "RiverHill"

    def __init__(self, every: Any = 1, *, beta: float = 0.99, lag: int | None = None, samples: int = 1,
                 bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, samples=samples, bn_mode=bn_mode, seed=seed)
        self.beta = number_in("beta (EMA factor per optimizer step)", beta, high=1.0, closed=True)
        self.lag = None if lag is None else positive_int("lag (steps)", lag)
        self._ema: Tensor | None = None
        self._last = -1
        self._history: deque[tuple[int, Tensor]] = deque()

    def measure(self, ctx: Context) -> Measurement:
        assert ctx.params is not None
        w = ctx.params
        if self._ema is None or ctx.step <= self._last:
            self._ema = w.detach().clone()
        else:
            keep = self.beta ** (ctx.step - self._last)
            self._ema = self._ema * keep + w * (1.0 - keep)
        self._last = ctx.step
        f = _loss_fn(ctx.functional, self._batches(ctx))
        loss_w, loss_ema = f(w), f(self._ema)
        progress = np.nan
        if self.lag is None:
            if self._history:
                progress = float(torch.linalg.vector_norm((self._ema - self._history[-1][1]).double()))
            self._history.clear()
        else:
            target = ctx.step - self.lag
            while len(self._history) > 1 and self._history[1][0] <= target:
                self._history.popleft()
            if self._history and self._history[0][0] <= target:
                progress = float(torch.linalg.vector_norm((self._ema - self._history[0][1]).double()))
        self._history.append((ctx.step, self._ema.clone()))
        s = {**self._settings(), "beta": self.beta, "lag": self.lag if self.lag is not None else "previous measurement"}
        return Measurement({
            "hill_height": step_value("hill_height", np.float64(loss_w - loss_ema), **s),
            "ema_loss": step_value("ema_loss", np.float64(loss_ema), **s),
            "ema_distance": step_value("ema_distance", np.float64(torch.linalg.vector_norm((w - self._ema).double())), **s),
            "floor_progress": step_value("floor_progress", np.float64(progress), **s),
        })

    def config(self) -> dict[str, Any]:
        return {**super().config(), "beta": self.beta, "lag": self.lag}


# -- directions at a step ----------------------------------------------------------------------
DIRECTION_KINDS = ("trajectory", "eigenvector", "random")


def _sign_fixed(v: Tensor) -> Tensor:
    """An eigenvector with a reproducible sign: its largest-magnitude entry positive."""
    i = int(torch.argmax(v.abs()))
    return v if v[i] >= 0 else -v


class StepDirections:
    """The directions a probe measures along, by label, normalised the same way:

    - ``trajectory``: the EMA-smoothed displacement (:class:`landscape.directions.TrajectoryDirection`,
      ``beta`` per optimizer step), fed at each call; None until there is a displacement.
    - ``eigenvector``: the top Hessian eigenvector on the probe's Hessian (shared with
      HessianSpectrum at the same step when it measured the same Hessian; else Lanczos to
      relative accuracy ``tol``, which bounds the Rayleigh quotient's error by about ``tol``
      lambda_max while the vector may be off by ~sqrt(tol lambda_max / gap) radians), its
      largest-magnitude entry made positive (an eigenvector's sign is arbitrary).
    - ``random_0``, ``random_1``, ...: Gaussian directions from the probe's generator for the
      step (their own stream: they do not depend on which other directions are asked for).

    A direction whose normalised form is zero or non-finite (e.g. a filter-normalised one that
    lives only in zeroed biases) is None.
    """

    def __init__(self, kinds: Sequence[str] | str, random: int, normalization: Normalization, bias: BiasMode,
                 beta: float, tol: float) -> None:
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        bad = [k for k in kinds if k not in DIRECTION_KINDS]
        if bad or not kinds or len(set(kinds)) != len(kinds):
            raise ValueError(f"directions must be names from {DIRECTION_KINDS} without repeats, got {kinds!r}")
        self.kinds = kinds
        self.random = positive_int("random (number of random directions)", random, 1 if "random" in kinds else 0)
        check_normalization(normalization, bias)
        self.normalization, self.bias = normalization, bias
        self.tol = number_in("tol", tol, high=1.0)
        self.trajectory = TrajectoryDirection(beta)
        self.labels = [lab for k in kinds for lab in ([f"random_{i}" for i in range(self.random)] if k == "random" else [k])]

    def _normalized(self, d: Tensor | None, w: Tensor, ctx: Context) -> Tensor | None:
        if d is None or not float(torch.linalg.vector_norm(d)) > 0:
            return None
        out = normalized(d.to(w), w, ctx.functional.layout, self.normalization, self.bias)
        usable = bool(torch.isfinite(out).all()) and float(torch.linalg.vector_norm(out)) > 0
        return out if usable else None

    def at(self, ctx: Context, probe: Probe, *, samples: int, route: HVPRoute = "auto") -> dict[str, Tensor | None]:
        """The step's normalised directions by label (feeds the trajectory direction: call once per step)."""
        assert ctx.params is not None
        w = ctx.params
        out: dict[str, Tensor | None] = {}
        raw_traj = self.trajectory.observe(ctx.step, w, ctx.update) if "trajectory" in self.kinds else None
        gen = probe.generator(ctx.step)
        for label in self.labels:
            if label == "trajectory":
                out[label] = self._normalized(raw_traj, w, ctx)
            elif label == "eigenvector":
                _, V = top_eigenpairs(ctx, 1, samples=samples, bn_mode=probe.bn_mode, route=route, tol=self.tol,
                                      generator=probe.generator(ctx.step))
                out[label] = self._normalized(_sign_fixed(V[:, 0]), w, ctx)
            else:
                d = random_direction(w, ctx.functional.layout, gen, normalization="none")
                out[label] = self._normalized(d, w, ctx)
        return out

    def settings(self) -> dict[str, Any]:
        return {"normalization": self.normalization, "bias": self.bias, "beta": self.trajectory.beta, "tol": self.tol}


# -- valley width ------------------------------------------------------------------------------
class ValleyWidth(_ValleyProbe):
    """Directional valley width W_tau(d) = t+ + t-, t+- = sup{t >= 0: L(w +- t d) - L(w) <= tau}.

    Each side is bracketed by doubling (or halving) from ``t0`` and then bisected until the
    bracket is within ``rtol`` (:func:`landscape.geometry.exit_distances`, all sides in lockstep so
    their points are evaluated together; the first exit from the
    sublevel set). Directions: ``trajectory`` (the EMA-smoothed displacement, see
    :class:`landscape.directions.TrajectoryDirection`: the river), ``eigenvector`` (the top
    Hessian eigenvector: the wall), ``random`` (``random`` Gaussian directions, drawn per
    measurement). ``normalization="unit"`` (default) gives widths as distances in parameter
    space; ``"filter"`` as fractions of the filters' norms (scale-aware: unchanged under ReLU
    rescaling). ``valley_width_anisotropy`` = W(trajectory) / W(eigenvector). A direction not
    available yet (no displacement) gives NaN; a side that never exits within ``t0 * 2^40`` inf.
    Costs about 2 (log2 of the bracket + log2(1/rtol)) forward passes per direction.
    """

    name = "ValleyWidth"

    def __init__(self, every: Any = 1, *, tau: float = 0.1, directions: Sequence[str] = DIRECTION_KINDS, random: int = 1,
                 normalization: Normalization = "unit", bias: BiasMode = "zero", beta: float = 0.9, rtol: float = 1e-2,
                 t0: float | None = None, tol: float = 1e-3, samples: int = 1, bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, samples=samples, bn_mode=bn_mode, seed=seed)
        self.tau = number_in("tau (loss increase that bounds the valley)", tau)
        if normalization == "none":
            raise ValueError("normalization='none' makes widths depend on an arbitrary direction scale: use 'unit' or 'filter'")
        self.directions = StepDirections(directions, random, normalization, bias, beta, tol)
        self.labels = self.directions.labels
        self.rtol = number_in("rtol", rtol, high=1.0)
        self.t0 = None if t0 is None else number_in("t0", t0)

    def coords(self) -> dict[str, list[Any]]:
        return {"direction": list(self.labels)}

    def measure(self, ctx: Context) -> Measurement:
        assert ctx.params is not None
        w = ctx.params
        batches = self._batches(ctx)
        base = _loss_fn(ctx.functional, batches)(w)
        t0 = self.t0 if self.t0 is not None else (1.0 if self.directions.normalization != "unit" else
                                                   max(1e-3, 0.01 * float(torch.linalg.vector_norm(w))))
        plus, minus = np.full(len(self.labels), np.nan), np.full(len(self.labels), np.nan)
        dirs = self.directions.at(ctx, self, samples=self.samples)
        rays = [(i, sign, d) for i, d in enumerate(dirs.values()) if d is not None for sign in (1.0, -1.0)]

        def phis(queries: list[tuple[int, float]]) -> np.ndarray:
            # every unfinished side's next point in one call: several per forward through vmap where faster
            points = [w + (rays[r][1] * t) * rays[r][2] for r, t in queries]
            return ctx.functional.losses(lambda lo, hi: torch.stack(points[lo:hi]), len(points), batches) - base

        for (i, sign, _), res in zip(rays, exit_distances(phis, len(rays), self.tau, t0=t0, rtol=self.rtol)):
            (plus if sign > 0 else minus)[i] = res.t
        width = plus + minus
        s = {**self._settings(), "tau": self.tau, **self.directions.settings(), "rtol": self.rtol, "seed": self.seed}
        out = {
            "valley_width": step_value("valley_width", width, **s),
            "valley_width_plus": step_value("valley_width_plus", plus, **s),
            "valley_width_minus": step_value("valley_width_minus", minus, **s),
        }
        if "trajectory" in self.labels and "eigenvector" in self.labels:
            ratio = width[self.labels.index("trajectory")] / width[self.labels.index("eigenvector")]
            out["valley_width_anisotropy"] = step_value("valley_width_anisotropy", np.float64(ratio), **s)
        return Measurement(out)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "tau": self.tau, "directions": self.labels, **self.directions.settings(),
                "rtol": self.rtol, "t0": self.t0}


# -- gradient overlap --------------------------------------------------------------------------
class GradientOverlap(_ValleyProbe):
    """|V^T g|^2 / |g|^2: the share of the gradient in the top-k Hessian eigenspace (Gur-Ari et
    al. 2018 found it close to 1 after a short transient: gradient descent happens in a tiny
    subspace). ``gradient_overlap`` uses the training gradient the optimizer received,
    ``gradient_overlap_probe`` the gradient of the loss the Hessian is taken on. V: top-k Ritz
    vectors (shared with HessianSpectrum when it ran at this step on the same batches)."""

    name = "GradientOverlap"

    def __init__(self, every: Any = 1, *, k: int = 10, tol: float = 1e-3, samples: int = 1, bn_mode: str = "eval",
                 route: HVPRoute = "auto", seed: int = 0) -> None:
        super().__init__(every, samples=samples, bn_mode=bn_mode, seed=seed)
        self.k = positive_int("k (dimension of the top eigenspace)", k)
        self.tol = number_in("tol", tol, high=1.0)
        self.route: HVPRoute = route

    def setup(self, functional: FunctionalModel, optimizer: torch.optim.Optimizer) -> None:
        if self.k > functional.dim:
            raise ValueError(f"GradientOverlap: k={self.k} exceeds the number of parameters {functional.dim}")

    def measure(self, ctx: Context) -> Measurement:
        assert ctx.grad is not None
        _, V = top_eigenpairs(ctx, self.k, samples=self.samples, bn_mode=self.bn_mode, route=self.route, tol=self.tol,
                              generator=self.generator(ctx.step))
        V = V.double()
        # orthonormal up to Lanczos' rounding; a QR makes the projection exact
        Q, _ = torch.linalg.qr(V)

        def overlap(g: Tensor) -> np.float64:
            g = g.double()
            gg = float(g @ g)
            if not gg > 0 or not math.isfinite(gg):
                return np.float64(np.nan)
            c = Q.T @ g
            return np.float64(float(c @ c) / gg)

        g_probe = ctx.hessian(self.samples, self.bn_mode, self.route).gradient()
        s = {**self._settings(), "k": self.k, "tol": self.tol}
        return Measurement({
            "gradient_overlap": step_value("gradient_overlap", overlap(ctx.grad.to(Q.device)), **s),
            "gradient_overlap_probe": step_value("gradient_overlap_probe", overlap(g_probe.to(Q.device)), **s),
        })

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "tol": self.tol}


# -- linear interpolation ----------------------------------------------------------------------
class Interpolation(_ValleyProbe):
    """Loss on straight segments between checkpoints: barriers and monotonicity.

    At each measurement, L((1 - a) w_prev + a w_t) for a in ``alphas`` (which must include 0 and
    1; values outside [0, 1] extrapolate), w_prev the previous measurement's parameters:
    ``interpolation_loss``, ``interpolation_barrier`` (max over [0, 1] of the loss above the
    chord), ``interpolation_violations`` (rises larger than ``tol`` along a), and
    ``interpolation_max_rise``. At the end, the same from the first checkpoint to the final
    iterate (``mli_*``, Lucas et al. 2021: monotonic linear interpolation holds when
    ``mli_violations`` is 0). Costs len(alphas) forward passes and one stored vector.
    """

    name = "Interpolation"

    def __init__(self, every: Any = 1, *, alphas: Any = np.linspace(0.0, 1.0, 11), tol: float = 0.0, samples: int = 1,
                 bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, samples=samples, bn_mode=bn_mode, seed=seed)
        self.alphas = alpha_grid(alphas, need=(0.0, 1.0))
        self.tol = number_in("tol", tol, closed=True)
        self._first: Tensor | None = None
        self._prev: Tensor | None = None

    def coords(self) -> dict[str, list[Any]]:
        return {"alpha": [float(a) for a in self.alphas]}

    def measure(self, ctx: Context) -> Measurement:
        assert ctx.params is not None
        w = ctx.params
        prev, self._prev = self._prev, w.detach().clone()
        if self._first is None:
            self._first = self._prev
        s = {**self._settings(), "tol": self.tol}
        if prev is None:
            losses = np.full(self.alphas.size, np.nan)
            barrier, violations, rise = np.nan, -1, np.nan
        else:
            losses = segment_losses(ctx.functional, self._batches(ctx), prev, w, self.alphas)
            st = interpolation_stats(self.alphas, losses, tol=self.tol)
            barrier, violations, rise = st.barrier, st.violations, st.max_rise
        return Measurement({
            "interpolation_loss": step_value("interpolation_loss", losses, **s),
            "interpolation_barrier": step_value("interpolation_barrier", np.float64(barrier), **s),
            "interpolation_violations": step_value("interpolation_violations", np.int64(violations), **s),
            "interpolation_max_rise": step_value("interpolation_max_rise", np.float64(rise), **s),
        })

    def finalize(self, ctx: Context) -> xr.Dataset | None:
        if self._first is None or ctx.final_params is None:
            return None
        losses = segment_losses(ctx.functional, self._batches(ctx), self._first, ctx.final_params, self.alphas)
        st = interpolation_stats(self.alphas, losses, tol=self.tol)
        s = {**self._settings(), "tol": self.tol}
        return xr.Dataset({
            "mli_loss": (("alpha",), losses, attrs_for("mli_loss", **s)),
            "mli_barrier": ((), st.barrier, attrs_for("mli_barrier", **s)),
            "mli_violations": ((), np.int64(st.violations), attrs_for("mli_violations", **s)),
            "mli_max_rise": ((), st.max_rise, attrs_for("mli_max_rise", **s)),
        }, coords={"alpha": self.alphas})

    def config(self) -> dict[str, Any]:
        return {**super().config(), "alphas": [float(a) for a in self.alphas], "tol": self.tol}
