"""Small reference models for the demo, the tests and the benchmarks (digits-sized)."""
from __future__ import annotations

import math

import torch
from torch import nn


class DigitsMLP(nn.Module):
    """64 -> hidden -> hidden -> 10 with tanh (smooth, so Hessians are well defined)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """Two 3x3 conv layers with BatchNorm, a pooling step and a linear head (about 6k params)."""

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(channels * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyTransformer(nn.Module):
    """A one-block transformer classifier over the 8 rows of a digit (LayerNorm, attention)."""

    def __init__(self, width: int = 16, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.pos = nn.Parameter(torch.randn(8, width) / math.sqrt(width))
        self.block = nn.TransformerEncoderLayer(width, heads, dim_feedforward=2 * width, dropout=0.0,
                                                batch_first=True, norm_first=True, activation="gelu")
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 8, 8)) + self.pos
        h = self.block(h)
        return self.head(self.norm(h).mean(dim=1))
