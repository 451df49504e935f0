"""Layer 2: matrix-free numerics that know nothing about models.

For now: the seeded Gaussian sketch used to store large trajectories compactly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianSketch:
    """A seeded Gaussian random projection S = G / sqrt(k), G_ij ~ N(0, 1), of shape (k, d).

    Inner products are preserved in expectation: E<Sx, Sy> = <x, y>, with variance
    (|x|^2 |y|^2 + <x, y>^2) / k. What that means for the secant quantities (standard deviations,
    with gamma = cos(g, w - w*)):

    - gamma:      absolute error ~ (1 - gamma^2) / sqrt(k)   (it cannot resolve |gamma| << 1/sqrt(k))
    - EB, norms:  relative error ~ sqrt((1 - gamma^2) / k) <= 1 / sqrt(k)
    - RSI:        absolute error ~ EB * sqrt(1 - gamma^2) / sqrt(k) <= EB / sqrt(k)

    S is generated block by block from ``seed`` on the CPU generator (columns in blocks of
    ``block``), so a given (k, d, seed, block) gives the same S on every machine and device, and
    memory stays at one block when the whole of S (k*d*4 bytes) exceeds ``cache_bytes``.
    """

    def __init__(self, k: int, d: int, seed: int = 0, *, block: int = 65536, cache_bytes: int = 256 * 2**20,
                 device: torch.device | str = "cpu") -> None:
        if k < 1:
            raise ValueError(f"sketch dimension k must be >= 1, got {k}")
        if k >= d:
            raise ValueError(f"sketch dimension k={k} must be smaller than the parameter count d={d}: store full vectors instead")
        self.k, self.d, self.seed, self.block = int(k), int(d), int(seed), int(block)
        self.device = torch.device(device)
        self._cache: list[Tensor] | None = None
        if self.k * self.d * 4 <= cache_bytes:
            self._cache = [self._block(i) for i in range(self._nblocks)]

    @property
    def _nblocks(self) -> int:
        return math.ceil(self.d / self.block)

    def _block(self, i: int) -> Tensor:
        lo = i * self.block
        width = min(self.block, self.d - lo)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        g = torch.randn(self.k, width, generator=gen, dtype=torch.float32)
        return (g / math.sqrt(self.k)).to(self.device)

    def __call__(self, x: Tensor) -> Tensor:
        """Sketch a vector (d,) -> (k,) or a batch (..., d) -> (..., k), in float32."""
        if x.shape[-1] != self.d:
            raise ValueError(f"sketch expects vectors of length {self.d}, got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        out = torch.zeros(*x.shape[:-1], self.k, dtype=torch.float32, device=self.device)
        for i in range(self._nblocks):
            S = self._cache[i] if self._cache is not None else self._block(i)
            lo = i * self.block
            out += x[..., lo:lo + S.shape[1]] @ S.T
        return out

    def describe(self) -> dict[str, int | str]:
        """JSON-able settings stored with the sketched data."""
        return {"kind": "gaussian", "k": self.k, "d": self.d, "seed": self.seed, "block": self.block}
