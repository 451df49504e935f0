"""Synthetic loss landscapes with known minima, as torch modules (REFERENCE.md §6).

Each landscape is an ``nn.Module`` with a single parameter ``w`` (the point, float64 by default)
whose ``forward(x)`` ignores the values of ``x`` and returns f(w) expanded to ``x``'s batch size.
With ``loss_fn=value_loss`` (the mean of the output) and any dummy batch they train with any
torch optimizer and record through :func:`landscape.attach` like a network::

    f = GaussianWells(dim=2, seed=3)
    opt = torch.optim.SGD(f.parameters(), lr=0.05)
    rec = landscape.attach(f, opt, loss_fn=value_loss, probe_data=f.dummy_batches(),
                           probes=[HessianSpectrum(every=10, k=2)], run={"optimizer": "sgd", "seed": 3})
    for x, y in f.dummy_batches() * 200:
        opt.zero_grad(); value_loss(f(x), y).backward(); opt.step()
    rec.close()
    f.basin_of(f.w)            # "flat", "sharp" or None

Every landscape has ``dim``, ``domain`` (a (dim, 2) tensor of [low, high] per coordinate: the
usual search box, where seeded starts are drawn), ``minima`` (an (m, dim) tensor of the known
global minimisers), ``f_star`` (the global minimum value), ``value(points)`` (f at any points,
batched over leading dimensions), ``gradient_at``, ``hessian_at`` (closed form where one is
written below, autograd otherwise), ``sample``, ``nearest_minimum`` and ``dummy_batches``.

The functions (x = w, d = dim):

- :class:`Himmelblau` (d = 2): (x1^2 + x2 - 11)^2 + (x1 + x2^2 - 7)^2 on [-5, 5]^2; four global
  minima with f* = 0: (3, 2) exactly and three others (roots of a polynomial system; stored to
  double precision); four different Hessians.
- :class:`SixHumpCamel` (d = 2): (4 - 2.1 x1^2 + x1^4 / 3) x1^2 + x1 x2 + (4 x2^2 - 4) x2^2 on
  [-3, 3] x [-2, 2]; two global minima +-(0.0898420131, -0.7126564030), f* = -1.0316284535
  (f(-w) = f(w): equal Hessians).
- :class:`Rastrigin`: 10 d + sum_i (x_i^2 - 10 cos(2 pi x_i)) on [-5.12, 5.12]^d; f* = 0 at 0,
  Hessian diag(2 + 40 pi^2 cos(2 pi x_i)); about 10^d local minima.
- :class:`Ackley`: -a exp(-b |x| / sqrt(d)) - exp(mean_i cos(c x_i)) + a + e, a = 20, b = 0.2,
  c = 2 pi, on [-32.768, 32.768]^d; f* = 0 at 0. Not differentiable at its minimum: near 0,
  f ~ a b |x| / sqrt(d), a cone, so the Hessian there does not exist (``hessian_at`` says so)
  and the gradient at 0 is the zero subgradient.
- :class:`StyblinskiTang`: sum_i (x_i^4 - 16 x_i^2 + 5 x_i) / 2 on [-5, 5]^d; minimiser
  x_i = -2.9035340277711770 (the smallest root of 4 x^3 - 32 x + 5, in closed form),
  f* = -39.166165703771415 d; Hessian diag(6 x_i^2 - 16).
- :class:`GaussianWells`: a flat and a sharp well of exactly equal depth (formula, minima and
  Hessians in its docstring).
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Ackley", "GaussianWells", "Himmelblau", "Rastrigin", "SixHumpCamel", "StyblinskiTang", "SyntheticLandscape",
           "WellFraction", "value_loss", "wilson_interval"]


def value_loss(output: Tensor, target: Any = None) -> Tensor:
    """The loss of a synthetic landscape: the mean of the module's output (f(w) per example),
    whatever the target. Use as ``loss_fn`` in :func:`landscape.attach` and in the loop."""
    return output.mean()


def _positive(name: str, value: Any) -> float:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _dim(value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"dim must be an int >= {minimum}, got {value!r}")
    return int(value)


class SyntheticLandscape(nn.Module):
    """Base class: a function f of one parameter vector ``w`` as a module (see the module
    docstring). Subclasses implement :meth:`function` (batched over leading dimensions) and set
    ``domain``, ``minima`` and ``f_star``; they may override :meth:`hessian_at` with a closed form.

    Args (common to every landscape):
        start: the initial point (``dim`` numbers). seed: else ``w`` is drawn uniformly in
            ``domain`` from ``torch.Generator().manual_seed(seed)`` (default seed 0); give one
            of the two. dtype: a floating dtype (float64 by default: the truth is known to
            double precision).
    """

    name = "synthetic"

    def __init__(self, dim: int, domain: Sequence[Sequence[float]], minima: Any, f_star: float, *,
                 start: Any = None, seed: int | None = None, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch dtype such as torch.float64, got {dtype!r}")
        self.dim = dim
        self.domain = torch.as_tensor(domain, dtype=torch.float64).reshape(dim, 2)
        self.minima = torch.as_tensor(minima, dtype=torch.float64).reshape(-1, dim)
        self.f_star = float(f_star)
        if start is not None and seed is not None:
            raise ValueError("give start (the initial point) or seed (a random start in the domain), not both")
        if start is None:
            self.seed = 0 if seed is None else seed
            w0 = self.sample(1, seed=self.seed)[0]
        else:
            self.seed = None
            w0 = self._point(start, "start")
        self.w = nn.Parameter(w0.to(dtype))

    # -- the function --------------------------------------------------------------------------
    def function(self, w: Tensor) -> Tensor:
        """f at ``w`` (..., dim) -> (...); differentiable, vmap-able."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """f(w) repeated for each of the ``x.shape[0]`` examples (the values of ``x`` are ignored)."""
        if not isinstance(x, Tensor) or x.dim() == 0:
            raise TypeError("a synthetic landscape's input must be a tensor with a batch dimension, e.g. "
                            "from dummy_batches()")
        return self.function(self.w).expand(x.shape[0])

    def value(self, points: Any) -> Tensor:
        """f at ``points`` (dim,) or (..., dim), in float64, without gradient."""
        p = torch.as_tensor(points, dtype=torch.float64)
        if p.dim() == 0 or p.shape[-1] != self.dim:
            raise ValueError(f"points must have {self.dim} numbers in their last dimension, got shape {tuple(p.shape)}")
        with torch.no_grad():
            return self.function(p)

    def gradient_at(self, point: Any = None) -> Tensor:
        """grad f at ``point`` (default: the current ``w``), float64, by autograd."""
        return torch.func.grad(self.function)(self._point(point))

    def hessian_at(self, point: Any = None) -> Tensor:
        """The (dim, dim) Hessian at ``point`` (default: the current ``w``), float64; autograd
        here, closed forms in the subclasses that have one."""
        return torch.func.hessian(self.function)(self._point(point))

    def _point(self, point: Any, what: str = "point") -> Tensor:
        if point is None:
            return self.w.detach().to(torch.float64).clone()
        if isinstance(point, nn.Module) and isinstance(getattr(point, "w", None), Tensor):
            point = point.w
        p = torch.as_tensor(point.detach() if isinstance(point, Tensor) else point, dtype=torch.float64).reshape(-1)
        if p.numel() != self.dim:
            raise ValueError(f"{what} must have {self.dim} numbers for this {self.dim}-dimensional landscape, got {p.numel()}")
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{what} has non-finite entries: {p.tolist()}")
        return p.clone()

    # -- helpers ---------------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0) -> Tensor:
        """``n`` points drawn uniformly in ``domain`` (n, dim), float64, from ``seed``'s own generator."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        u = torch.rand(int(n), self.dim, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
        lo, hi = self.domain[:, 0], self.domain[:, 1]
        return lo + u * (hi - lo)

    def nearest_minimum(self, point: Any = None) -> tuple[int, float]:
        """(index into ``minima``, Euclidean distance) of the known global minimiser nearest to
        ``point`` (default: the current ``w``)."""
        d = torch.linalg.vector_norm(self.minima - self._point(point), dim=1)
        i = int(torch.argmin(d))
        return i, float(d[i])

    def dummy_batches(self, n: int = 1) -> list[tuple[Tensor, Tensor]]:
        """``n`` one-example batches (x, y) of zeros: probe data for :func:`landscape.attach`
        (``probe_data=``) and input for the training loop; their values are never used."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        dtype = self.w.dtype
        return [(torch.zeros(1, 1, dtype=dtype), torch.zeros(1, dtype=dtype)) for _ in range(int(n))]

    def config(self) -> dict[str, Any]:
        """The landscape's settings (JSON-able), e.g. for ``run=`` metadata."""
        return {"name": self.name, "dim": self.dim, "f_star": self.f_star, "seed": self.seed}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, f_star={self.f_star:.10g}"


# -- two-dimensional classics ----------------------------------------------------------------------
# Himmelblau's minima: (3, 2) is exact; the other three solve grad f = 0 (mpmath, 40 digits, rounded).
_HIMMELBLAU_MINIMA = (
    (3.0, 2.0),
    (-2.8051180869527448531, 3.1313125182505729658),
    (-3.7793102533777468919, -3.2831859912861694123),
    (3.5844283403304917449, -1.8481265269644035535),
)
_CAMEL_MINIMUM = (0.089842013100318062422, -0.7126564030207396334)
_CAMEL_F_STAR = -1.0316284534898773504


class Himmelblau(SyntheticLandscape):
    """Himmelblau's function (x^2 + y - 11)^2 + (x + y^2 - 7)^2 on [-5, 5]^2: four global minima,
    f* = 0, with different curvatures. Hessian [[12x^2 + 4y - 42, 4(x + y)], [4(x + y), 12y^2 + 4x - 26]]."""

    name = "himmelblau"

    def __init__(self, *, start: Any = None, seed: int | None = None, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(2, [[-5.0, 5.0], [-5.0, 5.0]], _HIMMELBLAU_MINIMA, 0.0, start=start, seed=seed, dtype=dtype)

    def function(self, w: Tensor) -> Tensor:
        x, y = w[..., 0], w[..., 1]
        return (x * x + y - 11) ** 2 + (x + y * y - 7) ** 2

    def hessian_at(self, point: Any = None) -> Tensor:
        x, y = self._point(point).unbind()
        off = 4 * (x + y)
        return torch.stack([torch.stack([12 * x * x + 4 * y - 42, off]), torch.stack([off, 12 * y * y + 4 * x - 26])])


class SixHumpCamel(SyntheticLandscape):
    """The six-hump camel (4 - 2.1x^2 + x^4/3) x^2 + xy + (4y^2 - 4) y^2 on [-3, 3] x [-2, 2]: six
    local minima, two global ones at +-(0.08984, -0.71266) with f* = -1.0316284535. Hessian
    [[8 - 25.2x^2 + 10x^4, 1], [1, 48y^2 - 8]]."""

    name = "six_hump_camel"

    def __init__(self, *, start: Any = None, seed: int | None = None, dtype: torch.dtype = torch.float64) -> None:
        m = torch.tensor(_CAMEL_MINIMUM, dtype=torch.float64)
        super().__init__(2, [[-3.0, 3.0], [-2.0, 2.0]], torch.stack([m, -m]), _CAMEL_F_STAR, start=start, seed=seed,
                         dtype=dtype)

    def function(self, w: Tensor) -> Tensor:
        x, y = w[..., 0], w[..., 1]
        x2, y2 = x * x, y * y
        return (4 - 2.1 * x2 + x2 * x2 / 3) * x2 + x * y + (4 * y2 - 4) * y2

    def hessian_at(self, point: Any = None) -> Tensor:
        x, y = self._point(point).unbind()
        one = torch.ones((), dtype=torch.float64)
        return torch.stack([torch.stack([8 - 25.2 * x * x + 10 * x**4, one]), torch.stack([one, 48 * y * y - 8])])


# -- d-dimensional benchmarks ---------------------------------------------------------------------
class Rastrigin(SyntheticLandscape):
    """Rastrigin: A d + sum_i (x_i^2 - A cos(2 pi x_i)) on [-5.12, 5.12]^d (A = 10); f* = 0 at 0,
    a regular grid of local minima near the integers. Hessian diag(2 + 4 pi^2 A cos(2 pi x_i))."""

    name = "rastrigin"

    def __init__(self, dim: int = 2, *, A: float = 10.0, start: Any = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        dim = _dim(dim)
        self.A = _positive("A", A)
        super().__init__(dim, [[-5.12, 5.12]] * dim, torch.zeros(1, dim), 0.0, start=start, seed=seed, dtype=dtype)

    def function(self, w: Tensor) -> Tensor:
        return self.A * w.shape[-1] + (w * w - self.A * torch.cos(2 * math.pi * w)).sum(-1)

    def hessian_at(self, point: Any = None) -> Tensor:
        p = self._point(point)
        return torch.diag(2 + 4 * math.pi**2 * self.A * torch.cos(2 * math.pi * p))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "A": self.A}


class Ackley(SyntheticLandscape):
    """Ackley: -a exp(-b |x| / sqrt(d)) - exp(mean_i cos(c x_i)) + a + e on [-32.768, 32.768]^d
    (a = 20, b = 0.2, c = 2 pi); f* = 0 at 0, where f is a cone (f ~ a b |x| / sqrt(d)): no
    Hessian there, and the gradient returned at 0 is the zero subgradient. Hessian by autograd
    elsewhere (it grows like 1/|x| towards 0)."""

    name = "ackley"

    def __init__(self, dim: int = 2, *, a: float = 20.0, b: float = 0.2, c: float = 2 * math.pi, start: Any = None,
                 seed: int | None = None, dtype: torch.dtype = torch.float64) -> None:
        dim = _dim(dim)
        self.a, self.b, self.c = _positive("a", a), _positive("b", b), _positive("c", c)
        super().__init__(dim, [[-32.768, 32.768]] * dim, torch.zeros(1, dim), 0.0, start=start, seed=seed, dtype=dtype)

    def function(self, w: Tensor) -> Tensor:
        d = w.shape[-1]
        # vector_norm's backward is 0 at 0 (a subgradient); sqrt(mean(x^2)) would give NaN there
        r = torch.linalg.vector_norm(w, dim=-1) / math.sqrt(d)
        return -self.a * torch.exp(-self.b * r) - torch.exp(torch.cos(self.c * w).mean(-1)) + self.a + math.e

    def hessian_at(self, point: Any = None) -> Tensor:
        p = self._point(point)
        if float(torch.linalg.vector_norm(p)) == 0.0:
            raise ValueError("Ackley's function is a cone at its minimum 0 (f ~ a b |x| / sqrt(d)): it has no Hessian "
                             "there; ask at a point nearby (the curvature grows like 1/|x|)")
        return torch.func.hessian(self.function)(p)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "a": self.a, "b": self.b, "c": self.c}


def _styblinski_tang_root() -> float:
    """The smallest root of 4x^3 - 32x + 5 (x^3 + p x + q, p = -8, q = 5/4) by the trigonometric
    formula x_k = 2 sqrt(-p/3) cos(arccos(3q / (2p) sqrt(-3/p)) / 3 - 2 pi k / 3) (the smallest
    of k = 0, 1, 2), polished by one Newton step."""
    p, q = -8.0, 1.25
    theta = math.acos(3 * q / (2 * p) * math.sqrt(-3 / p)) / 3
    x = min(2 * math.sqrt(-p / 3) * math.cos(theta - 2 * math.pi * k / 3) for k in range(3))
    return x - (x**3 + p * x + q) / (3 * x * x + p)


_ST_ROOT = _styblinski_tang_root()
_ST_F1 = (_ST_ROOT**4 - 16 * _ST_ROOT**2 + 5 * _ST_ROOT) / 2


class StyblinskiTang(SyntheticLandscape):
    """Styblinski-Tang: sum_i (x_i^4 - 16 x_i^2 + 5 x_i) / 2 on [-5, 5]^d; one global minimum at
    x_i = -2.90353402777 (closed form, :func:`_styblinski_tang_root`), f* = -39.1661657037714 d;
    2^d - 1 other local minima (each x_i at -2.90 or 2.75). Hessian diag(6 x_i^2 - 16)."""

    name = "styblinski_tang"

    def __init__(self, dim: int = 2, *, start: Any = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        dim = _dim(dim)
        minimum = torch.full((1, dim), _ST_ROOT, dtype=torch.float64)
        super().__init__(dim, [[-5.0, 5.0]] * dim, minimum, _ST_F1 * dim, start=start, seed=seed, dtype=dtype)

    def function(self, w: Tensor) -> Tensor:
        w2 = w * w
        return 0.5 * (w2 * w2 - 16 * w2 + 5 * w).sum(-1)

    def hessian_at(self, point: Any = None) -> Tensor:
        p = self._point(point)
        return torch.diag(6 * p * p - 16)


# -- flat vs sharp ----------------------------------------------------------------------------------
class WellFraction(NamedTuple):
    """Which well a set of final points ended in: ``fraction`` = flat / n with its Wilson
    interval [``low``, ``high``] at ``confidence``; ``flat`` + ``sharp`` + ``neither`` = ``n``."""

    fraction: float
    low: float
    high: float
    flat: int
    sharp: int
    neither: int
    n: int
    confidence: float


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion k/n:
    (p + z^2/(2n) +- z sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n), z the two-sided normal quantile.
    Unlike p +- z sqrt(p(1-p)/n) it stays in [0, 1] and is not empty at k = 0 or k = n."""
    for name, v in (("successes", successes), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got successes={successes}, n={n}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), e.g. 0.95, got {confidence!r}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # at k = 0 (k = n) the bound is exactly 0 (1); the formula leaves rounding there
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


class GaussianWells(SyntheticLandscape):
    """A flat and a sharp Gaussian well of exactly the same depth.

    With g_i(w) = exp(-|w - c_i|^2 / (2 s_i^2)) (i = flat, sharp) the landscape is

        f(w) = -depth (1 - (1 - g_flat(w)) (1 - g_sharp(w)))  =  -depth (g_flat + g_sharp - g_flat g_sharp),

    a "soft union" of the wells: since 0 <= g_i <= 1, f >= -depth with equality exactly where a
    g_i = 1, so the global minima are exactly the centres

        c_flat = (-separation / 2, 0, ..., 0),   c_sharp = (+separation / 2, 0, ..., 0),   f* = -depth,

    (a plain sum of Gaussians would shift both and make their depths differ). With
    u = 1 - g_flat, v = 1 - g_sharp, the Hessian anywhere is
    depth (v grad^2 u + u grad^2 v + grad u grad v^T + grad v grad u^T), grad u = g_f r_f / s_f^2,
    grad^2 u = g_f (I / s_f^2 - r_f r_f^T / s_f^4) (r_i = w - c_i; same for v), and at the minima,
    where u (resp. v) and its gradient vanish, it is isotropic:

        H(c_flat)  = depth (1 - exp(-separation^2 / (2 s_sharp^2))) / s_flat^2  I,
        H(c_sharp) = depth (1 - exp(-separation^2 / (2 s_flat^2)))  / s_sharp^2 I.

    ``ratio`` is the exact ratio lambda_sharp / lambda_flat: s_sharp = s_flat / sqrt(ratio) up
    to the two (1 - exp) factors, solved for by a fixed-point iteration at construction.

    Args:
        dim: dimension (>= 1). depth: the wells' common depth. width: s_flat. ratio: the
            sharp well's curvature over the flat one's (> 1). separation: distance between the
            centres (more than s_flat + s_sharp, so that :meth:`basin_of` balls are disjoint).
        start, seed, dtype: as every landscape. The domain is the box
            [-separation / 2 - s_flat, separation / 2 + s_flat] x [-s_flat, s_flat]^(d-1); starts
            far from both centres (its corners on the sharp side; most of the box in high
            dimension) sit on a near-flat plateau (f ~ 0) and move slowly.

    ``minima`` is [c_flat, c_sharp] (rows in that order, labels in ``wells``); ``flat_width`` and
    ``sharp_width`` are s_flat and s_sharp; ``flat_curvature`` and ``sharp_curvature`` the
    eigenvalues above.
    """

    name = "gaussian_wells"
    wells = ("flat", "sharp")

    def __init__(self, dim: int = 2, *, depth: float = 1.0, width: float = 1.0, ratio: float = 16.0,
                 separation: float = 2.5, start: Any = None, seed: int | None = None,
                 dtype: torch.dtype = torch.float64) -> None:
        dim = _dim(dim)
        self.depth = _positive("depth", depth)
        self.flat_width = _positive("width", width)
        self.ratio = _positive("ratio", ratio)
        if self.ratio <= 1:
            raise ValueError(f"ratio (sharp curvature / flat curvature) must be > 1, got {ratio!r}")
        self.separation = _positive("separation", separation)
        sf, D = self.flat_width, self.separation
        if not D > sf:  # necessary for D > s_flat + s_sharp, and keeps the iteration below away from 0 / 0
            raise ValueError(f"separation must exceed width + sharp width (> width = {sf:.6g}) so that the wells are "
                             f"distinct, got {separation!r}: increase separation or decrease width")
        tail_f = math.exp(-D * D / (2 * sf * sf))  # g_flat at the sharp centre
        ss = sf / math.sqrt(self.ratio)
        for _ in range(100):  # contraction: exp(-D^2 / 2 s^2) is tiny wherever the balls are disjoint
            new = sf * math.sqrt((1 - tail_f) / (self.ratio * (1 - math.exp(-D * D / (2 * ss * ss)))))
            if new == ss:
                break
            ss = new
        self.sharp_width = ss
        if not D > sf + ss:
            raise ValueError(f"separation must exceed width + sharp width = {sf + ss:.6g} so that the wells are "
                             f"distinct, got {separation!r}: increase separation or decrease width")
        self.flat_curvature = self.depth * (1 - math.exp(-D * D / (2 * ss * ss))) / (sf * sf)
        self.sharp_curvature = self.depth * (1 - tail_f) / (ss * ss)
        c = torch.zeros(2, dim, dtype=torch.float64)
        c[0, 0], c[1, 0] = -D / 2, D / 2
        domain = [[-D / 2 - sf, D / 2 + sf]] + [[-sf, sf]] * (dim - 1)
        super().__init__(dim, domain, c, -self.depth, start=start, seed=seed, dtype=dtype)

    @property
    def flat_centre(self) -> Tensor:
        return self.minima[0]

    @property
    def sharp_centre(self) -> Tensor:
        return self.minima[1]

    def _centres(self, w: Tensor) -> tuple[Tensor, Tensor]:
        c = self.minima.to(device=w.device, dtype=w.dtype)
        return c[0], c[1]

    def function(self, w: Tensor) -> Tensor:
        cf, cs = self._centres(w)
        gf = torch.exp(-((w - cf) ** 2).sum(-1) / (2 * self.flat_width**2))
        gs = torch.exp(-((w - cs) ** 2).sum(-1) / (2 * self.sharp_width**2))
        return -self.depth * (1 - (1 - gf) * (1 - gs))

    def hessian_at(self, point: Any = None) -> Tensor:
        p = self._point(point)
        eye = torch.eye(self.dim, dtype=torch.float64)
        parts = []
        for c, s in zip(self.minima, (self.flat_width, self.sharp_width)):
            r = p - c
            g = torch.exp(-(r @ r) / (2 * s * s))
            parts.append((1 - g, g * r / s**2, g * (eye / s**2 - torch.outer(r, r) / s**4)))
        (u, du, ddu), (v, dv, ddv) = parts
        return self.depth * (v * ddu + u * ddv + torch.outer(du, dv) + torch.outer(dv, du))

    def basin_of(self, point: Any = None, *, within: float = 1.0) -> str | None:
        """"flat" if ``point`` (default: the current ``w``; a tensor, sequence or landscape
        module) lies within ``within`` widths (s_flat) of the flat centre, "sharp" if within
        ``within`` s_sharp of the sharp centre, else None (still on the way, or stuck on the
        plateau). ``within`` must keep the two balls disjoint."""
        within = _positive("within", within)
        if within * (self.flat_width + self.sharp_width) >= self.separation:
            raise ValueError(f"within={within} makes the two balls overlap: use within < "
                             f"{self.separation / (self.flat_width + self.sharp_width):.4g}")
        p = self._point(point)
        if float(torch.linalg.vector_norm(p - self.minima[0])) <= within * self.flat_width:
            return "flat"
        if float(torch.linalg.vector_norm(p - self.minima[1])) <= within * self.sharp_width:
            return "sharp"
        return None

    def fraction_in_flat(self, final_points: Any, *, within: float = 1.0, confidence: float = 0.95) -> WellFraction:
        """The fraction of ``final_points`` (an (n, dim) tensor/array, or an iterable of points
        or landscape modules, e.g. one per seed) that ended in the flat well, by
        :meth:`basin_of`, with its Wilson interval. Points in neither well count in n (they did
        not end in the flat one) and are reported as ``neither``."""
        if isinstance(final_points, (Tensor, np.ndarray)):
            arr = torch.as_tensor(final_points).detach()
            if arr.dim() != 2:
                raise ValueError(f"final_points as an array must be (n, {self.dim}), got shape {tuple(arr.shape)}")
            points: list[Any] = list(arr)
        elif isinstance(final_points, Iterable):
            points = list(final_points)
        else:
            raise TypeError("final_points must be an (n, dim) tensor or array, or an iterable of points or landscapes")
        if not points:
            raise ValueError("final_points is empty: give at least one final point")
        labels = [self.basin_of(p, within=within) for p in points]
        flat, sharp = labels.count("flat"), labels.count("sharp")
        n = len(labels)
        low, high = wilson_interval(flat, n, confidence)
        return WellFraction(flat / n, low, high, flat, sharp, n - flat - sharp, n, float(confidence))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "depth": self.depth, "width": self.flat_width, "ratio": self.ratio,
                "separation": self.separation, "sharp_width": self.sharp_width}
