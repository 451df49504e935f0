"""Flatness and sharpness measures (REFERENCE.md §3): average-case, worst-case (Auto-PGD),
one-step SAM / ASAM, Keskar's eps-sharpness, and PAC-Bayes flatness.

Every measure is a loss increase L(w + delta) - L(w) for a perturbation delta of size ``radius``
(rho); they differ in how delta is chosen and in what "size" means:

- ``average``: E over delta ~ N(0, rho^2 I). Raw.
- ``average_adaptive``: E over delta ~ N(0, rho^2 diag(w^2)). Scale-aware.
- ``worst_l2`` / ``worst_linf``: max over |delta|_p <= rho (Auto-PGD). Raw.
- ``worst_l2_adaptive`` / ``worst_linf_adaptive``: max over |delta / |w||_p <= rho. Scale-aware.
- ``sam``: delta = rho g / |g| (one ascent step). Raw.
- ``asam``: delta = rho T^2 g / |T g|, T = diag(|w| + eta0). Scale-aware for eta0 = 0.
- ``keskar``: 100 (max over |y_i| <= rho (|w_i| + 1) of L(w + y) - L(w)) / (1 + L(w)). Raw.

(Andriushchenko et al. 2023; Foret et al. 2021; Kwon et al. 2021; Keskar et al. 2017.)

Scale awareness. A rescaling that leaves the network's function unchanged (ReLU: W1 -> a W1,
b1 -> a b1, W2 -> W2 / a; Dinh et al. 2017) is a diagonal map w -> D w. The adaptive kinds
perturb by c * z with c = |w|, so delta -> D delta and the loss along every perturbation is the
same function of z: ``average_adaptive``, ``worst_l2_adaptive`` and ``worst_linf_adaptive`` are
exactly invariant (same seed, same number up to rounding). ``asam`` is invariant exactly when
``eta0 = 0`` and approximately (to O(eta0 / |w|)) for eta0 > 0, the ASAM default 0.01 that lets
zero weights move. The raw kinds and ``keskar`` (box |w| + 1) change under rescaling at will;
report them next to the adaptive ones, not instead. A weight that is exactly zero gets no
perturbation in the adaptive kinds.

m-sharpness. Worst-case, SAM, ASAM and Keskar values are computed per probe batch and averaged
(Andriushchenko et al.'s protocol: the worst perturbation of each batch of m examples), with the
spread over batches as ``sharpness_stderr`` (NaN for one batch). Average-case sharpness is taken
over all the probe batches together, with the Monte-Carlo standard error: antithetic pairs
(delta, -delta) give [L(w + d) + L(w - d)] / 2 - L(w), unbiased, with the first-order term
cancelled, so its variance is that of the curvature term only.

Worst-case values are lower bounds: Auto-PGD is a local method that keeps the best point it
visits (and delta = 0, so never below 0); when the ball holds several local maxima the seeded
random start decides which it finds, and with few steps it can stay below SAM's one-step point
(which lies in the l2 ball). 20 steps (the default, as in Andriushchenko et al.) reached it on
the digits MLP of the tests.

Cost per measurement, per radius (F: forward pass over one probe batch, G: gradient, about 2-3 F;
B = ``samples`` probe batches):

- ``average*``: 2 x ``noise_samples`` x B F.
- ``worst_*`` and ``keskar``: (``apgd_steps`` G + 1 F) x B.
- ``sam`` / ``asam``: 1 F per batch, plus 1 G per batch shared by both kinds and every radius.
- ``L(w)`` (``sharpness_base_loss``): B F once.
- PAC-Bayes (``pac_bayes=True``, once at the end of the run): per perturbation family
  ((1 + ``depth``) x ``noise_samples`` + 1) x B F, depth 15.

Optional logit normalisation (Andriushchenko et al.): the loss is taken of
z <- (z - mean z) / |z - mean z| per example, which removes the trivial sharpness that comes from
the scale of the logits.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor

from landscape.directions import adaptive_scale
from landscape.functional import Batch, FunctionalModel, as_batch_list, batch_size
from landscape.schema import attrs_for, step_value
from probes.base import Context, Measurement, Probe, positive_int

KINDS = ("average", "average_adaptive", "worst_l2", "worst_l2_adaptive", "worst_linf", "worst_linf_adaptive",
         "sam", "asam", "keskar")
"""Every sharpness kind, in a fixed order (their seeds derive from the position here)."""

DEFAULT_KINDS = ("average", "average_adaptive", "worst_l2_adaptive", "sam", "asam")
"""Raw and scale-aware forms of the three families, at 2 x 16 forward passes (average), 20
gradients (worst) and one gradient (SAM/ASAM) per batch and radius."""

PERTURBATIONS = ("isotropic", "magnitude")
_FINAL_STEP = -1  # generator key of finalize (PAC-Bayes): never a training step
_APGD_ALPHA = 0.75  # weight of the new step; 1 - alpha on the previous displacement (momentum)
_APGD_RHO = 0.75  # step-size halving when fewer than this fraction of steps increased f

Norm = Literal[2, "inf"]
Metric = Literal["accuracy", "loss"]


# -- small helpers ----------------------------------------------------------------------------


def _radius(value: Any, name: str = "radius") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a positive number, got {value!r}")
    r = float(value)
    if not (math.isfinite(r) and r > 0):
        raise ValueError(f"{name} must be a finite number > 0 (the perturbation size rho), got {value!r}")
    return r


def _eta0(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)) or float(value) < 0:
        raise ValueError(f"eta0 (ASAM's offset in T = |w| + eta0) must be a finite number >= 0, got {value!r}")
    return float(value)


def _norm(p: Any) -> Norm:
    if isinstance(p, str) and p.lower() in ("inf", "linf"):
        return "inf"
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        if p == 2:
            return 2
        if p == math.inf:
            return "inf"
    raise ValueError(f"p must be 2 (l2 ball) or 'inf' / math.inf (l-inf ball), got {p!r}")


def _check_w(fm: FunctionalModel, w: Tensor) -> Tensor:
    if not isinstance(w, Tensor) or w.ndim != 1 or w.numel() != fm.dim:
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"w must be the flat vector of the model's {fm.dim} parameters, got {shape}")
    return w.detach()


def _check_gen(generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError("generator must be a torch.Generator (e.g. torch.Generator().manual_seed(0)): the measures "
                        f"never draw from the global RNG; got {type(generator).__name__}")
    return generator


def _noise(n: int, generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal noise drawn on the CPU in float64 (the same numbers on every device)."""
    return torch.randn(n, generator=generator, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _loss(fm: FunctionalModel, w: Tensor, batches: list[Batch]) -> float:
    with torch.no_grad():
        return float(fm.loss(w, batches).double())


def _mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size < 2:
        return float(arr.mean()), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1) / math.sqrt(arr.size))


def logit_normalized(fm: FunctionalModel) -> FunctionalModel:
    """A :class:`FunctionalModel` over the same parameters whose loss sees normalised logits
    z <- (z - mean z) / |z - mean z| (per example, over the last dim)."""
    base = fm.loss_fn

    def loss_fn(out: Tensor, target: Any) -> Tensor:
        centred = out - out.mean(dim=-1, keepdim=True)
        norm = torch.linalg.vector_norm(centred, dim=-1, keepdim=True)
        return base(centred / norm.clamp_min(torch.finfo(out.dtype).tiny), target)

    out = FunctionalModel(fm.model, loss_fn, list(zip(fm.layout.names, fm.params)))
    _share_settings(fm, out)
    return out


def _share_settings(src: FunctionalModel, dst: FunctionalModel) -> None:
    """How ``src`` evaluates (chunks, the distributed group, rank 0's buffers), for a derived model."""
    dst.chunk_size, dst.group, dst.buffers = src.chunk_size, src.group, src.buffers


# -- Auto-PGD ---------------------------------------------------------------------------------


def apgd_checkpoints(steps: int) -> list[int]:
    """Auto-PGD's step-size checkpoints w_j = ceil(p_j steps) (Croce & Hein 2020): p_0 = 0,
    p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); those in [1, steps)."""
    ps = [0.0, 0.22]
    while ps[-1] < 1:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - 0.03, 0.06))
    return sorted({math.ceil(p * steps - 1e-9) for p in ps[1:]} & set(range(1, steps)))


def _project(z: Tensor, radius: float, p: Norm) -> Tensor:
    if p == "inf":
        return z.clamp(-radius, radius)
    n = float(torch.linalg.vector_norm(z, dtype=torch.float64))
    return z * (radius / n) if n > radius else z


def _ascent(g: Tensor, p: Norm) -> Tensor:
    if p == "inf":
        return g.sign()
    n = float(torch.linalg.vector_norm(g, dtype=torch.float64))
    return g / n if n > 0 else torch.zeros_like(g)


def auto_pgd(objective: Callable[[Tensor, bool], tuple[float, Tensor | None]], z0: Tensor, radius: float, *,
             p: Any = 2, steps: int = 20) -> tuple[float, Tensor]:
    """Maximise ``objective`` over the ball |z|_p <= radius by Auto-PGD (Croce & Hein 2020).

    ``objective(z, need_grad)`` returns ``(value, gradient or None)``. From ``z0`` (projected onto
    the ball): initial step 2 radius; step z + eta s(g) with s(g) = g / |g| (l2) or sign(g)
    (l-inf), projected, then the momentum combination z + 0.75 (step - z) + 0.25 (z - z_prev),
    projected; at each checkpoint (:func:`apgd_checkpoints`) the step is halved and the iterate
    restarted from the best point (momentum reset) when fewer than 75% of the steps since the
    last checkpoint increased f, or when neither the step nor the best value changed since the
    last checkpoint. Costs ``steps`` gradients and one value (the last iterate). Returns the best
    value seen (z0 included) and its point.
    """
    norm = _norm(p)
    radius = _radius(radius)
    steps = positive_int("steps (Auto-PGD iterations)", steps, 1)
    z = _project(z0.detach(), radius, norm)
    f, g = objective(z, True)
    best_f, best_z, best_g = f, z, g
    eta = 2.0 * radius
    checkpoints = set(apgd_checkpoints(steps))
    z_prev = z
    increased, last_check = 0, 0
    best_at_check, reduced_at_check = best_f, False
    for k in range(steps):
        assert g is not None
        zn = _project(z + eta * _ascent(g, norm), radius, norm)
        if k > 0:
            zn = _project(z + _APGD_ALPHA * (zn - z) + (1.0 - _APGD_ALPHA) * (z - z_prev), radius, norm)
        fn, gn = objective(zn, k < steps - 1)
        increased += fn > f
        z_prev, z, f, g = z, zn, fn, gn
        if fn > best_f:
            best_f, best_z, best_g = fn, zn, gn
        if k + 1 in checkpoints:
            stalled = increased < _APGD_RHO * (k + 1 - last_check)
            unchanged = not reduced_at_check and best_f <= best_at_check
            reduced_at_check = stalled or unchanged
            if reduced_at_check:
                eta /= 2.0
                z = z_prev = best_z
                f, g = best_f, best_g
            increased, last_check, best_at_check = 0, k + 1, best_f
    return float(best_f), best_z


def _random_start(n: int, radius: float, p: Norm, generator: torch.Generator, like: Tensor) -> Tensor:
    """Croce & Hein's random start: uniform in the box (l-inf), uniform on the sphere (l2)."""
    if p == "inf":
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return ((2.0 * u - 1.0) * radius).to(device=like.device, dtype=like.dtype)
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    return (z * (radius / z.norm())).to(device=like.device, dtype=like.dtype)


def _worst(fm: FunctionalModel, w: Tensor, batches: list[Batch], radius: float, c: Tensor | None, p: Norm,
           steps: int, generator: torch.Generator, base: float) -> float:
    """max over |z|_p <= radius of L(w + c z) - base (c None: 1)."""

    def objective(z: Tensor, need_grad: bool) -> tuple[float, Tensor | None]:
        point = w + (z if c is None else c * z)
        if not need_grad:
            return _loss(fm, point, batches) - base, None
        value, grad = fm.loss_and_grad(point, batches)
        return float(value.double()) - base, (grad if c is None else c * grad)

    z0 = _random_start(w.numel(), radius, p, generator, w)
    # delta = 0 is in the ball: the worst case is never below 0, even when every iterate is
    return max(0.0, auto_pgd(objective, z0, radius, p=p, steps=steps)[0])


# -- the measures -----------------------------------------------------------------------------


def average_sharpness(fm: FunctionalModel, w: Tensor, batches: Batch | Sequence[Batch], radius: float, *,
                      adaptive: bool = False, noise_samples: int = 16, generator: torch.Generator,
                      base_loss: float | None = None) -> tuple[float, float]:
    """Average-case sharpness E_{delta ~ N(0, rho^2 diag(c^2))}[L(w + delta) - L(w)] and its
    Monte-Carlo standard error (Andriushchenko et al. 2023); c = |w| (``adaptive``) or 1.

    Each of the ``noise_samples`` draws is used as an antithetic pair: the estimate
    [L(w + d) + L(w - d)] / 2 - L(w) is unbiased and free of the first-order term. L is the
    example-weighted mean over ``batches``. ``base_loss``: L(w) if already known. The standard
    error (spread of the pair estimates / sqrt(n)) is NaN for one draw. Costs 2 ``noise_samples``
    forward passes over the batches.
    """
    w = _check_w(fm, w)
    radius = _radius(radius)
    n = positive_int("noise_samples", noise_samples, 1)
    generator = _check_gen(generator)
    bl = as_batch_list(batches)
    base = _loss(fm, w, bl) if base_loss is None else float(base_loss)
    scale = radius * (w.abs() if adaptive else torch.ones_like(w))
    # one seed per draw from the caller's generator, each draw made when its points are due:
    # O(d) memory per point however many draws, and the same draws whatever the block size
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()

    def points(lo: int, hi: int) -> Tensor:  # rows 2j, 2j + 1: w + delta_j, w - delta_j
        rows, draw = [], None
        for i in range(lo, hi):
            if draw is None or i % 2 == 0:
                draw = scale * _noise(w.numel(), torch.Generator().manual_seed(seeds[i // 2]), w)
            rows.append(w + draw if i % 2 == 0 else w - draw)
        return torch.stack(rows)

    values = fm.losses(points, 2 * n, bl)  # through vmap where that is faster (small models)
    return _mean_stderr(0.5 * (values[0::2] + values[1::2]) - base)


def worst_sharpness(fm: FunctionalModel, w: Tensor, batch: Batch | Sequence[Batch], radius: float, *, p: Any = 2,
                    adaptive: bool = False, steps: int = 20, generator: torch.Generator,
                    base_loss: float | None = None) -> float:
    """Worst-case sharpness max over |delta / c|_p <= rho of L(w + delta) - L(w) (Andriushchenko
    et al. 2023), c = |w| (``adaptive``) or 1, p = 2 or inf, by :func:`auto_pgd` in z = delta / c
    from a random start (uniform in the box for l-inf, on the sphere for l2).

    The value is the best loss increase seen (and 0, for delta = 0): a lower bound on the true
    maximum, which Auto-PGD, a local method, may miss when the ball holds several local maxima.
    Pass one batch for m-sharpness (the probe averages it over its batches); a list is treated
    as one set. Costs ``steps`` gradients and 1 forward pass.
    """
    w = _check_w(fm, w)
    bl = as_batch_list(batch)
    base = _loss(fm, w, bl) if base_loss is None else float(base_loss)
    return _worst(fm, w, bl, _radius(radius), w.abs() if adaptive else None, _norm(p),
                  positive_int("steps (Auto-PGD iterations)", steps, 1), _check_gen(generator), base)


def _sam(fm: FunctionalModel, w: Tensor, batches: list[Batch], radius: float, adaptive: bool, eta0: float,
         grad: Tensor, base: float) -> float:
    if adaptive:
        T = adaptive_scale(w, eta0)
        n = float(torch.linalg.vector_norm(T * grad, dtype=torch.float64))
        eps = (radius / n) * T * T * grad if n > 0 else None
    else:
        n = float(torch.linalg.vector_norm(grad, dtype=torch.float64))
        eps = (radius / n) * grad if n > 0 else None
    if eps is None:  # no ascent direction: the step is zero
        return 0.0
    return _loss(fm, w + eps, batches) - base


def sam_sharpness(fm: FunctionalModel, w: Tensor, batches: Batch | Sequence[Batch], radius: float, *,
                  adaptive: bool = False, eta0: float = 0.01) -> float:
    """One-step SAM sharpness L(w + rho g / |g|) - L(w) (Foret et al. 2021), or ASAM's
    (``adaptive``; Kwon et al. 2021) L(w + eps) - L(w), eps = rho T^2 g / |T g|,
    T = diag(|w| + eta0) (exactly scale-invariant for eta0 = 0). g is the gradient over
    ``batches`` (one set); 0 where g (or T g) vanishes. Costs 1 gradient and 1 forward pass.
    """
    w = _check_w(fm, w)
    bl = as_batch_list(batches)
    value, grad = fm.loss_and_grad(w, bl)
    return _sam(fm, w, bl, _radius(radius), adaptive, _eta0(eta0), grad, float(value.double()))


def keskar_sharpness(fm: FunctionalModel, w: Tensor, batch: Batch | Sequence[Batch], radius: float, *,
                     steps: int = 20, generator: torch.Generator, base_loss: float | None = None) -> float:
    """Keskar et al. (2017) eps-sharpness 100 (max over the box |y_i| <= eps (|w_i| + 1) of
    L(w + y) - L(w)) / (1 + L(w)), eps = ``radius`` (the paper uses 1e-3 and 5e-4), the maximum
    by Auto-PGD (l-inf, c = |w| + 1) instead of the paper's L-BFGS-B. Not scale-invariant.
    Costs ``steps`` gradients and 1 forward pass.
    """
    w = _check_w(fm, w)
    bl = as_batch_list(batch)
    base = _loss(fm, w, bl) if base_loss is None else float(base_loss)
    rise = _worst(fm, w, bl, _radius(radius), w.abs() + 1.0, "inf",
                  positive_int("steps (Auto-PGD iterations)", steps, 1), _check_gen(generator), base)
    return 100.0 * rise / (1.0 + base)


# -- PAC-Bayes --------------------------------------------------------------------------------


def _metric_fn(fm: FunctionalModel, batches: list[Batch], metric: Metric) -> Callable[[Tensor], float]:
    if metric == "loss":
        return lambda w: _loss(fm, w, batches)
    total = sum(batch_size(b) for b in batches)

    def accuracy(w: Tensor) -> float:
        correct = torch.zeros((), dtype=torch.float64)
        with torch.no_grad():
            for piece, _ in fm.pieces(batches):
                correct += (fm.outputs(w, piece).argmax(dim=-1) == piece[-1]).sum()
        return float(fm.reduce(correct, batches)) / total

    return accuracy


def pac_bayes_sigma(fm: FunctionalModel, w: Tensor, batches: Batch | Sequence[Batch], *, magnitude: bool = False,
                    deviation: float = 0.1, metric: Metric = "accuracy", noise_samples: int = 16, lo: float = 0.0,
                    hi: float = 2.0, depth: int = 15, eps: float = 1e-3, generator: torch.Generator) -> float:
    """PAC-Bayes flatness sigma (Jiang et al. 2020): the largest sigma with
    |E_u metric(w + u) - metric(w)| <= ``deviation``, by bisection on [lo, hi].

    u ~ N(0, sigma^2 I) (isotropic) or u_i ~ N(0, sigma^2 w_i^2 + eps^2) (``magnitude``); the
    expectation is a mean over ``noise_samples`` draws, the same draws (common random numbers)
    at every sigma, so the bisection sees one consistent (for the loss: smooth) function of sigma. ``metric``:
    "accuracy" (argmax of the model output == target, over all examples of ``batches``) or
    "loss" (the mean loss). If even ``hi`` is within the deviation, returns ``hi`` (the search
    range did not bracket the crossing: a lower bound). Otherwise ``depth`` halvings of the
    bracket follow and the midpoint of the last bracket is returned: it lies within
    (hi - lo) / 2^(depth + 1) of the crossing of the estimated deviation. Costs
    (1 + depth) ``noise_samples`` + 1 evaluations of the metric.
    """
    w = _check_w(fm, w)
    bl = as_batch_list(batches)
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"metric must be 'accuracy' (Jiang et al.) or 'loss', got {metric!r}")
    deviation = _radius(deviation, "deviation")
    n = positive_int("noise_samples", noise_samples, 1)
    depth = positive_int("depth (bisection halvings)", depth, 0)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"need 0 <= lo < hi (the bisection range of sigma), got lo={lo!r}, hi={hi!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps (the floor of the magnitude-aware noise) must be >= 0, got {eps!r}")
    generator = _check_gen(generator)
    f = _metric_fn(fm, bl, metric)
    base = f(w)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))

    def dev(sigma: float) -> float:
        gen = torch.Generator().manual_seed(seed)  # the same draws at every sigma
        std = torch.sqrt((sigma * w.double()) ** 2 + eps**2).to(w.dtype) if magnitude else None
        total = 0.0
        for _ in range(n):
            z = _noise(w.numel(), gen, w)
            total += f(w + (sigma * z if std is None else std * z))
        return abs(total / n - base)

    if dev(hi) <= deviation:
        return float(hi)
    a, b = float(lo), float(hi)
    for _ in range(depth):
        mid = 0.5 * (a + b)
        if dev(mid) > deviation:
            b = mid
        else:
            a = mid
    return 0.5 * (a + b)


# -- the probe --------------------------------------------------------------------------------


def _kinds(kinds: Any) -> tuple[str, ...]:
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, (list, tuple)) or not kinds:
        raise ValueError(f"kinds must be a non-empty sequence of sharpness kinds from {KINDS}, got {kinds!r}")
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown sharpness kind {k!r}: choose from {KINDS}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds has duplicates: {list(kinds)}")
    return tuple(kinds)


def _radii(radius: Any) -> list[float]:
    values = list(radius) if isinstance(radius, (list, tuple, np.ndarray)) else [radius]
    if not values:
        raise ValueError("radius: give at least one perturbation radius (e.g. 0.05 or [0.01, 0.05])")
    out = [_radius(r) for r in values]
    if len(set(out)) != len(out):
        raise ValueError(f"radius has duplicates: {out}")
    return sorted(out)


class Sharpness(Probe):
    """Sharpness of the loss around w_t: average-case, worst-case, SAM/ASAM and Keskar kinds at
    every radius, raw and scale-aware (see the module docstring for definitions, scale
    invariance and costs).

    Per measured step: ``sharpness`` and ``sharpness_stderr`` (dims ``kind``, ``radius``; the
    stderr is Monte-Carlo for the average kinds and the spread over the probe batches for the
    others, NaN with one batch) and ``sharpness_base_loss`` L(w_t), all on the first ``samples``
    probe batches. With ``pac_bayes=True``, at the end of the run: ``pac_bayes_sigma`` and
    ``pac_bayes_flatness`` = 1 / sigma^2 along ``perturbation`` (isotropic, magnitude-aware), an
    end-point measure taken at the final parameters only (Jiang et al. 2020).

    Args:
        every: cadence. radius: rho, one number or several (every kind at every radius; for
            ``keskar`` it is the box's eps, 1e-3 or 5e-4 in the paper). kinds: from
            :data:`KINDS`; default :data:`DEFAULT_KINDS`. samples: probe batches used.
            noise_samples: Gaussian draws (antithetic pairs) per average-case estimate, and
            per sigma in PAC-Bayes. apgd_steps: Auto-PGD iterations of the worst-case kinds and
            Keskar. eta0: ASAM's offset in T = |w| + eta0 (0: exactly scale-invariant).
            logit_normalization: normalise the logits before the loss (Andriushchenko et al.).
            pac_bayes, pac_bayes_deviation, pac_bayes_metric: the end-point PAC-Bayes sigma, the
            allowed change of the metric ("accuracy" or "loss"). bn_mode, seed: as every probe;
            random numbers come from ``self.generator(step)``, so the same w_t and seed give the
            same numbers.
    """

    name = "Sharpness"

    def __init__(self, every: Any = 1, radius: float | Sequence[float] = 0.05, kinds: Sequence[str] = DEFAULT_KINDS, *,
                 samples: int = 1, noise_samples: int = 16, apgd_steps: int = 20, eta0: float = 0.01,
                 logit_normalization: bool = False, pac_bayes: bool = False, pac_bayes_deviation: float = 0.1,
                 pac_bayes_metric: Metric = "accuracy", bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, bn_mode=bn_mode, seed=seed)  # type: ignore[arg-type]
        self.radii = _radii(radius)
        self.kinds = _kinds(kinds)
        self.samples = positive_int("samples (number of fixed probe batches)", samples, 1)
        self.noise_samples = positive_int("noise_samples", noise_samples, 1)
        self.apgd_steps = positive_int("apgd_steps (Auto-PGD iterations)", apgd_steps, 1)
        self.eta0 = _eta0(eta0)
        for flag, value in (("logit_normalization", logit_normalization), ("pac_bayes", pac_bayes)):
            if not isinstance(value, bool):
                raise TypeError(f"{flag} must be True or False, got {value!r}")
        self.logit_normalization = logit_normalization
        self.pac_bayes = pac_bayes
        self.pac_bayes_deviation = _radius(pac_bayes_deviation, "pac_bayes_deviation")
        if pac_bayes_metric not in ("accuracy", "loss"):
            raise ValueError(f"pac_bayes_metric must be 'accuracy' or 'loss', got {pac_bayes_metric!r}")
        self.pac_bayes_metric: Metric = pac_bayes_metric
        self._wrapped: tuple[FunctionalModel, FunctionalModel] | None = None

    @property
    def samples_needed(self) -> int:
        return self.samples

    def coords(self) -> dict[str, list[Any]]:
        return {"kind": list(self.kinds), "radius": list(self.radii)}

    def _functional(self, fm: FunctionalModel) -> FunctionalModel:
        if not self.logit_normalization:
            return fm
        if self._wrapped is None or self._wrapped[0] is not fm:
            self._wrapped = (fm, logit_normalized(fm))
        _share_settings(fm, self._wrapped[1])  # the buffers may have changed since (distributed runs)
        return self._wrapped[1]

    def _batches(self, ctx: Context) -> list[Batch]:
        if len(ctx.probe_batches) < self.samples:
            raise ValueError(f"Sharpness asked for {self.samples} probe batches, the recorder drew {len(ctx.probe_batches)}")
        return list(ctx.probe_batches[:self.samples])

    def _settings(self, batches: list[Batch]) -> dict[str, Any]:
        sizes = sorted({batch_size(b) for b in batches})
        return {"samples": self.samples, "batch_size": sizes[0] if len(sizes) == 1 else sizes,
                "noise_samples": self.noise_samples, "apgd_steps": self.apgd_steps, "eta0": self.eta0,
                "logit_normalization": self.logit_normalization, "bn_mode": self.bn_mode, "seed": self.seed}

    def measure(self, ctx: Context) -> Measurement:
        if ctx.params is None:
            raise RuntimeError("Sharpness needs the step's parameters (ctx.params)")
        fm = self._functional(ctx.functional)
        batches = self._batches(ctx)
        w = ctx.params.detach()
        base_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator(ctx.step)))
        sizes = np.array([batch_size(b) for b in batches], dtype=np.float64)
        per_batch = [_loss(fm, w, [b]) for b in batches]
        base = float(np.dot(per_batch, sizes) / sizes.sum())
        grads: list[tuple[Tensor, float]] = []
        if {"sam", "asam"} & set(self.kinds):
            for b in batches:
                value, g = fm.loss_and_grad(w, [b])
                grads.append((g, float(value.double())))
        value = np.full((len(self.kinds), len(self.radii)), np.nan)
        stderr = np.full_like(value, np.nan)
        for i, kind in enumerate(self.kinds):
            # one seed per kind, re-used at every radius: the same draws scaled (common random numbers)
            kind_seed = (base_seed + 7919 * (KINDS.index(kind) + 1)) % 2**63
            for j, r in enumerate(self.radii):
                gen = torch.Generator().manual_seed(kind_seed)
                if kind.startswith("average"):
                    value[i, j], stderr[i, j] = average_sharpness(
                        fm, w, batches, r, adaptive=kind.endswith("adaptive"), noise_samples=self.noise_samples,
                        generator=gen, base_loss=base)
                    continue
                if kind.startswith("worst"):
                    c = w.abs() if kind.endswith("adaptive") else None
                    p: Norm = "inf" if "linf" in kind else 2
                    vals = [_worst(fm, w, [b], r, c, p, self.apgd_steps, gen, lb) for b, lb in zip(batches, per_batch)]
                elif kind == "keskar":
                    vals = [100.0 * _worst(fm, w, [b], r, w.abs() + 1.0, "inf", self.apgd_steps, gen, lb) / (1.0 + lb)
                            for b, lb in zip(batches, per_batch)]
                else:
                    vals = [_sam(fm, w, [b], r, kind == "asam", self.eta0, g, lb) for b, (g, lb) in zip(batches, grads)]
                value[i, j], stderr[i, j] = _mean_stderr(vals)
        s = self._settings(batches)
        return Measurement({
            "sharpness": step_value("sharpness", value, **s),
            "sharpness_stderr": step_value("sharpness_stderr", stderr, **s),
            "sharpness_base_loss": step_value("sharpness_base_loss", np.float64(base), **s),
        })

    def finalize(self, ctx: Context) -> xr.Dataset | None:
        """PAC-Bayes sigma at the final parameters (only with ``pac_bayes=True``)."""
        if not self.pac_bayes:
            return None
        if ctx.final_params is None:
            raise RuntimeError("Sharpness.finalize needs the final parameters (ctx.final_params)")
        fm = self._functional(ctx.functional)
        batches = self._batches(ctx)
        w = ctx.final_params.detach()
        base_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator(_FINAL_STEP)))
        sigma = np.array([
            pac_bayes_sigma(fm, w, batches, magnitude=kind == "magnitude", deviation=self.pac_bayes_deviation,
                            metric=self.pac_bayes_metric, noise_samples=self.noise_samples,
                            generator=torch.Generator().manual_seed(base_seed))
            for kind in PERTURBATIONS
        ])
        s = {**self._settings(batches), "deviation": self.pac_bayes_deviation, "metric": self.pac_bayes_metric,
             "lo": 0.0, "hi": 2.0, "depth": 15, "eps": 1e-3}
        return xr.Dataset(
            {"pac_bayes_sigma": (("perturbation",), sigma, attrs_for("pac_bayes_sigma", **s)),
             "pac_bayes_flatness": (("perturbation",), 1.0 / sigma**2, attrs_for("pac_bayes_flatness", **s))},
            coords={"perturbation": list(PERTURBATIONS)},
        )

    def config(self) -> dict[str, Any]:
        return {**super().config(), "radius": list(self.radii), "kinds": list(self.kinds), "samples": self.samples,
                "noise_samples": self.noise_samples, "apgd_steps": self.apgd_steps, "eta0": self.eta0,
                "logit_normalization": self.logit_normalization, "pac_bayes": self.pac_bayes,
                "pac_bayes_deviation": self.pac_bayes_deviation, "pac_bayes_metric": self.pac_bayes_metric}
