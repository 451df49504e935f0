"""Gradient noise along training: the noise scale B_simple and the gradient signal-to-noise
ratio, per parameter block (REFERENCE.md §5).

With g_i the gradient of the loss on example i at w_t, G = E[g_i] the full gradient and Sigma the
per-example covariance, the probe estimates from the examples of its fixed probe batches

- ``grad_variance``  tr(Sigma)_B = sum over the block's parameters j of the unbiased variance v_j;
- ``grad_sqnorm``    |G_B|^2 = |m_B|^2 - tr(Sigma)_B / n, m the mean gradient over the n examples
  (E|m|^2 = |G|^2 + tr(Sigma) / n, so this is unbiased);
- ``noise_scale``    B_simple = tr(Sigma)_B / |G_B|^2 (McCandlish et al. 2018), the batch size
  at which a step's noise is as large as its signal;
- ``grad_snr`` / ``grad_snr_median``  mean / median over the block's parameters of m_j^2 / v_j
  (parameters with v_j = 0 left out). m_j^2 is not bias-corrected: its expectation is
  G_j^2 + v_j / n, so a parameter without signal reads about 1/n.

Both estimates assume the examples are independent draws. When the unbiased |G_B|^2 is <= 0 the
noise swamps the signal at this n: ``noise_scale`` is stored as +inf (NaN when tr(Sigma)_B is
0 as well: no signal and no noise, e.g. a parameter BatchNorm makes irrelevant).
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from landscape.functional import Batch, BlockSpec, FunctionalModel, batch_size
from landscape.schema import step_value
from probes.base import BlockProbe, Context, Measurement, positive_int

_METHODS = ("auto", "per_sample", "per_batch")


class _Moments:
    """Weighted mean and weighted sum of squared deviations of flat vectors, in float64 and O(d)
    memory, merged block by block (Chan et al. 1979): the streaming form of S1 = sum g and
    S2 = sum g^2 without S2 - n m^2's cancellation when a parameter's mean dwarfs its spread."""

    def __init__(self) -> None:
        self.observations = 0
        self.weight = 0.0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, rows: Tensor, weights: Sequence[float] | None = None) -> None:
        x = rows.to(torch.float64)
        if weights is None:
            wb = float(x.shape[0])
            mean_b = x.sum(dim=0) / wb
            m2_b = (x - mean_b).square_().sum(dim=0)
        else:
            w = torch.as_tensor(list(weights), dtype=torch.float64, device=x.device)
            wb = float(w.sum())
            mean_b = (w[:, None] * x).sum(dim=0) / wb
            m2_b = (w[:, None] * (x - mean_b).square_()).sum(dim=0)
        self.observations += int(x.shape[0])
        if self.mean is None or self.m2 is None:
            self.weight, self.mean, self.m2 = wb, mean_b, m2_b
            return
        total = self.weight + wb
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (wb / total)
        self.m2 = self.m2 + m2_b + delta.square() * (self.weight * wb / total)
        self.weight = total

    def merge_ranks(self, fm: FunctionalModel, batches: Sequence[Batch]) -> None:
        """Combine the moments of every rank's shard of distributed batches (Chan's merge as sums:
        W = sum w_r, m = sum w_r m_r / W, M2 = sum M2_r + w_r (m_r - m)^2)."""
        assert self.mean is not None and self.m2 is not None
        counts = fm.reduce(torch.tensor([self.weight, float(self.observations)], dtype=torch.float64), batches)
        mean = fm.reduce(self.mean * self.weight, batches) / counts[0]
        self.m2 = fm.reduce(self.m2 + (self.mean - mean).square() * self.weight, batches)
        self.mean, self.weight, self.observations = mean, float(counts[0]), int(round(float(counts[1])))


class GradientNoise(BlockProbe):
    """Gradient noise scale and signal-to-noise ratio from per-example or per-batch gradients.

    ``method="per_sample"`` streams the per-example gradients of every example in the first
    ``samples`` probe batches (:meth:`FunctionalModel.per_sample_grads`, vmap over single-example
    gradients, in blocks of about 64 MiB) into float64 running moments: memory O(d), never
    n x d. Cost per probe batch, relative to one gradient of the same batch (measured once on
    digits, 64 examples, float32, one thread; rough, the machine was busy): about 7-10x on
    DigitsMLP(hidden=32), where vmap's fixed overhead dominates a 0.7 ms gradient, and 2.5-3.5x
    on DigitsCNN(16); a Python loop of single-example gradients costs 50-90x and 15-20x.
    ``per_batch`` costs one gradient per batch.

    ``method="per_batch"`` takes one gradient per probe batch instead (``samples`` gradients,
    each of b examples; needs ``samples >= 2``): a batch-mean gradient of b examples has
    covariance Sigma / b, so v_j = sum_k b_k (g_kj - m_j)^2 / (K - 1) over the K batches is an
    unbiased per-example variance (b times the batch gradients' variance when sizes are equal)
    and n is the total number of examples. It works for any model, BatchNorm in train mode
    included, but its variance estimate has K - 1 degrees of freedom instead of n - 1.

    ``method="auto"`` (default) is per_sample, except with ``bn_mode="train"`` (BatchNorm would
    see single examples) or a model vmap cannot run (tried at the first measurement and
    remembered): then per_batch. The method used is the ``method`` attr of every variable.

    Args:
        every: cadence. samples: number of fixed probe batches (all their examples are used).
        method: "auto", "per_sample" or "per_batch". blocks: parameter blocks, as in the
        curvature probes (:func:`landscape.functional.resolve_blocks`; None: the whole model,
        label "model"). bn_mode: BatchNorm mode during the measurement. seed: unused (the
        estimate draws no random numbers), kept for a uniform probe signature.
    """

    name = "GradientNoise"

    def __init__(self, every: Any = 1, *, samples: int = 1, method: str = "auto", blocks: BlockSpec = None,
                 bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, blocks=blocks, bn_mode=bn_mode, seed=seed)  # type: ignore[arg-type]
        self.samples = positive_int("samples (number of fixed probe batches the gradients are taken over)", samples)
        if method not in _METHODS:
            raise ValueError(f"GradientNoise: method must be one of {_METHODS}, got {method!r}")
        if method == "per_sample" and self.bn_mode == "train":
            raise ValueError("GradientNoise: method='per_sample' with bn_mode='train' is undefined (BatchNorm in train "
                             "mode mixes the examples of a batch): use bn_mode='eval' or method='per_batch'")
        if self.samples < 2 and (method == "per_batch" or (method == "auto" and self.bn_mode == "train")):
            why = "method='per_batch'" if method == "per_batch" else "bn_mode='train' (which needs per-batch gradients)"
            raise ValueError(f"GradientNoise: {why} estimates the variance from the spread of the batch gradients, "
                             f"so it needs samples >= 2 probe batches; got samples={self.samples}")
        self.method = method
        # auto: None until the first measurement has tried per-example gradients
        self._per_sample: bool | None = {"per_sample": True, "per_batch": False}.get(method)
        if method == "auto" and self.bn_mode == "train":
            self._per_sample = False
        self.fallback_reason = ""

    @property
    def samples_needed(self) -> int:
        return self.samples

    # -- the moments ---------------------------------------------------------------------------
    def _per_sample_moments(self, fm: FunctionalModel, w: Tensor, batches: Iterable[Batch]) -> _Moments:
        acc = _Moments()
        for batch in batches:
            for rows in fm.per_sample_grads(w, batch):
                acc.add(rows)
        if fm.sharded(batches):
            acc.merge_ranks(fm, list(batches))
        return acc

    def _per_batch_moments(self, fm: FunctionalModel, w: Tensor, batches: Sequence[Batch]) -> _Moments:
        acc = _Moments()
        for batch in batches:  # one at a time: O(d) memory however many batches
            acc.add(fm.grad(w, batch).unsqueeze(0), [float(batch_size(batch))])
        return acc

    def _moments(self, ctx: Context, batches: Sequence[Batch]) -> tuple[_Moments, str]:
        fm, w = ctx.functional, ctx.params
        assert w is not None
        if self._per_sample is None:  # auto, first measurement: can this model give per-example gradients?
            try:
                acc = self._per_sample_moments(fm, w, batches)
            except RuntimeError as err:
                if self.samples < 2:
                    raise RuntimeError(f"GradientNoise: per-example gradients are not available ({err}); the "
                                       "per-batch fallback needs samples >= 2 probe batches: pass samples=2 or more") from err
                self._per_sample = False
                self.fallback_reason = str(err).split(". ")[0]
            else:
                self._per_sample = True
                return acc, "per_sample"
        if self._per_sample:
            return self._per_sample_moments(fm, w, batches), "per_sample"
        return self._per_batch_moments(fm, w, batches), "per_batch"

    # -- the measurement -----------------------------------------------------------------------
    def measure(self, ctx: Context) -> Measurement:
        if ctx.params is None:
            raise RuntimeError("GradientNoise needs the step's parameters (ctx.params)")
        if self.samples > len(ctx.probe_batches):
            raise ValueError(f"GradientNoise: asked for {self.samples} probe batches, the recorder drew {len(ctx.probe_batches)}")
        batches = ctx.probe_batches[:self.samples]
        acc, method = self._moments(ctx, batches)
        assert acc.mean is not None and acc.m2 is not None
        n = sum(batch_size(b) for b in batches)
        if acc.observations < 2:
            raise ValueError(f"GradientNoise: a variance needs at least 2 examples; the probe batches hold {n}")
        var = acc.m2 / (acc.observations - 1)  # unbiased per-example variance v_j
        stats = {k: np.empty(len(self.block_index)) for k in ("grad_variance", "grad_sqnorm", "noise_scale",
                                                               "grad_snr", "grad_snr_median")}
        for b, index in enumerate(self.block_index.values()):
            m = acc.mean if index is None else acc.mean[index.to(acc.mean.device)]
            v = var if index is None else var[index.to(var.device)]
            tr = float(v.sum())
            sq = float(m.square().sum()) - tr / n
            stats["grad_variance"][b] = tr
            stats["grad_sqnorm"][b] = sq
            stats["noise_scale"][b] = tr / sq if sq > 0 else (math.inf if tr > 0 else math.nan)
            ok = v > 0
            ratio = (m[ok].square() / v[ok]).cpu().numpy()
            stats["grad_snr"][b] = ratio.mean() if ratio.size else math.nan
            stats["grad_snr_median"][b] = np.median(ratio) if ratio.size else math.nan
        s: dict[str, Any] = {"samples": self.samples, "examples": n, "method": method,
                             "method_requested": self.method, "bn_mode": self.bn_mode}
        if method == "per_batch":
            s["batch_sizes"] = [batch_size(b) for b in batches]
        if self.fallback_reason:
            s["fallback_reason"] = self.fallback_reason
        return Measurement({name: step_value(name, data, **s) for name, data in stats.items()})

    def config(self) -> dict[str, Any]:
        return {**super().config(), "samples": self.samples, "method": self.method}
