"""Directions in parameter space for flatness, valley and slice measurements (REFERENCE.md §3-§4).

A direction is a flat vector laid out like the model's parameters (:class:`ParamLayout`). Raw
directions (unit Euclidean norm) give numbers in parameter-space units, which rescalings that
leave the network's function unchanged (ReLU: W1 -> a W1, b1 -> a b1, W2 -> W2 / a; Dinh et al.
2017) change at will. The scale-aware forms follow the weights:

- filter normalisation (Li et al. 2018): each filter of the direction (a slice along dim 0 of a
  weight with >= 2 dims: a conv output channel, a linear layer's row) is rescaled to the norm of
  the same filter of w; 1-D parameters (biases, norm scales) are zeroed (``bias="zero"``, Li et
  al.'s default) or rescaled as one filter (``bias="filter"``). Both keep a direction-based
  measure invariant under neuron-wise rescaling.
- the adaptive metric T_w = diag(|w| + eta0) (ASAM, Kwon et al. 2021): perturbations measured in
  units of |w|; eta0 > 0 lets zero weights move and breaks exact invariance by O(eta0 / |w|).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from landscape.functional import ParamLayout

Normalization = Literal["filter", "layer", "unit", "none"]
BiasMode = Literal["zero", "filter"]
NORMALIZATIONS = ("filter", "layer", "unit", "none")


def check_normalization(normalization: str, bias: str) -> None:
    """Raise a clear error for an unknown normalisation or bias mode."""
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS} ('filter': Li et al. 2018, scale-aware; "
                         f"'unit': |d| = 1), got {normalization!r}")
    if bias not in ("zero", "filter"):
        raise ValueError(f"bias must be 'zero' (1-D parameters get no perturbation) or 'filter' (rescaled like a "
                         f"filter), got {bias!r}")


def filter_normalized(d: Tensor, w: Tensor, layout: ParamLayout, *, bias: BiasMode = "zero",
                      per: Literal["filter", "layer"] = "filter") -> Tensor:
    """``d`` with each filter (``per="filter"``) or each parameter tensor (``per="layer"``) rescaled
    to the norm of the same part of ``w``; 1-D parameters zeroed or rescaled whole (``bias``).

    A part of ``d`` that is zero stays zero (no division by zero); so does a part where w is zero.
    """
    check_normalization(per, bias)
    if d.shape != w.shape or d.ndim != 1 or d.numel() != layout.numel:
        raise ValueError(f"d and w must be flat vectors of the model's {layout.numel} parameters, "
                         f"got shapes {tuple(d.shape)} and {tuple(w.shape)}")
    out = torch.empty_like(d)
    for shape, offset in zip(layout.shapes, layout.offsets):
        n = shape.numel()
        dp, wp = d.narrow(0, offset, n), w.narrow(0, offset, n)
        target = out.narrow(0, offset, n)
        if len(shape) <= 1:
            if bias == "zero":
                target.zero_()
                continue
            rows_d, rows_w = dp.view(1, -1), wp.view(1, -1)
        elif per == "layer":
            rows_d, rows_w = dp.view(1, -1), wp.view(1, -1)
        else:
            rows_d, rows_w = dp.view(shape[0], -1), wp.view(shape[0], -1)
        nd = torch.linalg.vector_norm(rows_d, dim=1, keepdim=True)
        nw = torch.linalg.vector_norm(rows_w, dim=1, keepdim=True)
        scale = torch.where(nd > 0, nw / nd.clamp_min(torch.finfo(d.dtype).tiny), torch.zeros_like(nd))
        target.view_as(rows_d).copy_(rows_d * scale)
    return out


def normalized(d: Tensor, w: Tensor, layout: ParamLayout, normalization: Normalization = "filter",
               bias: BiasMode = "zero") -> Tensor:
    """``d`` in the chosen normalisation: "filter" / "layer" (scaled like w, see
    :func:`filter_normalized`), "unit" (|d| = 1), "none" (as given)."""
    check_normalization(normalization, bias)
    if normalization in ("filter", "layer"):
        return filter_normalized(d, w, layout, bias=bias, per=normalization)  # type: ignore[arg-type]
    if normalization == "unit":
        n = torch.linalg.vector_norm(d)
        if not n > 0:
            raise ValueError("cannot normalise a zero direction to unit norm")
        return d / n
    return d


def random_direction(w: Tensor, layout: ParamLayout, generator: torch.Generator, *,
                     normalization: Normalization = "filter", bias: BiasMode = "zero") -> Tensor:
    """A Gaussian direction drawn from ``generator`` (CPU, so the same seed gives the same
    direction on every device), normalised as asked."""
    g = torch.randn(w.numel(), generator=generator, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
    return normalized(g, w, layout, normalization, bias)


def adaptive_scale(w: Tensor, eta0: float = 0.01) -> Tensor:
    """The diagonal of ASAM's adaptive metric T_w = diag(|w| + eta0)."""
    if eta0 < 0:
        raise ValueError(f"eta0 must be >= 0, got {eta0}")
    return w.abs() + eta0


def unit(v: Tensor) -> Tensor:
    """v / |v| (float64 norm); raises on a zero vector."""
    n = float(torch.linalg.vector_norm(v, dtype=torch.float64))
    if not n > 0:
        raise ValueError("cannot take the direction of a zero vector")
    return v / n


class TrajectoryDirection:
    """The trajectory direction: an EMA of the per-step displacement, fed at measurements.

    Between two measurements Delta steps apart, the average per-step displacement
    (w_t - w_prev) / Delta enters with weight 1 - beta^Delta (``beta`` is per optimizer step,
    so the smoothing does not depend on the cadence); the first measurement starts from the
    step's own update. The result is raw (not normalised): normalise with :func:`normalized`.
    """

    def __init__(self, beta: float = 0.9) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta (EMA factor per optimizer step) must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self._ema: Tensor | None = None
        self._prev: tuple[int, Tensor] | None = None

    def observe(self, step: int, w: Tensor, update: Tensor | None) -> Tensor | None:
        """Feed w_t (and the step's update w_{t+1} - w_t); return the smoothed direction, or None
        when there is no displacement yet (first call without an update)."""
        if self._prev is None or step <= self._prev[0]:
            if update is not None:
                self._ema = update.detach().clone()
        else:
            gap = step - self._prev[0]
            weight = 1.0 - self.beta ** gap
            disp = (w - self._prev[1]) / gap
            self._ema = disp if self._ema is None else self._ema * (1.0 - weight) + disp * weight
        self._prev = (step, w.detach().clone())
        return self._ema
