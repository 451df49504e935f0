"""Small reference models for the demo, the tests and the benchmarks (digits-sized)."""
from __future__ import annotations

import math
from typing import Any

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


class _CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, C = h.shape
        q, k, v = self.qkv(h).split(C, dim=2)
        q, k, v = (t.reshape(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        # The fused CPU kernel has no double backward; landscape's HVPs switch to the math kernel
        # by themselves (landscape.functional.second_order_kernels), so training keeps the fast one.
        a = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                       is_causal=True)
        return self.proj(a.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.attn(self.norm1(h)))
        return h + self.mlp(self.norm2(h))


class CharTransformer(nn.Module):
    """A small causal (GPT-style) character language model: ids (B, T) -> logits (B, T, V).

    Token and learned position embeddings, ``layers`` pre-norm blocks (LayerNorm, causal
    self-attention through ``scaled_dot_product_attention(is_causal=True)``, LayerNorm, GELU MLP
    of ``mlp * width`` units), a final LayerNorm and a linear head (sharing the token embedding's
    weight with ``tie_weights=True``). ``vocab`` is a size or anything with ``len`` (a
    :class:`landscape.text.CharVocab`); ``block`` the longest context. The defaults with the
    bundled text's 58 characters give about 30k parameters.
    """

    def __init__(self, vocab: Any, width: int = 32, heads: int = 2, layers: int = 2, block: int = 32,
                 dropout: float = 0.0, *, mlp: int = 4, tie_weights: bool = False) -> None:
        super().__init__()
        if isinstance(vocab, str) or not (isinstance(vocab, int) or hasattr(vocab, "__len__")):
            raise TypeError(f"CharTransformer: vocab must be a vocabulary size (int) or a CharVocab, got {type(vocab).__name__}")
        size = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else len(vocab)
        for name, value in (("vocab size", size), ("width", width), ("heads", heads), ("layers", layers),
                            ("block", block), ("mlp", mlp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CharTransformer: {name} must be a positive int, got {value!r}")
        if width % heads:
            raise ValueError(f"CharTransformer: width ({width}) must be a multiple of heads ({heads})")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"CharTransformer: dropout must be a number in [0, 1), got {dropout!r}")
        self.vocab_size, self.block = size, block
        self.tok = nn.Embedding(size, width)
        self.pos = nn.Embedding(block, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp * width, float(dropout)) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, size)
        # GPT-2's initialisation: small normal weights, zero biases
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        if tie_weights:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ValueError(f"CharTransformer expects integer ids of shape (batch, time), got {tuple(idx.shape)} {idx.dtype}")
        T = idx.shape[1]
        if T > self.block:
            raise ValueError(f"CharTransformer: a sequence of {T} tokens exceeds the context of {self.block} (block=)")
        h = self.drop(self.tok(idx) + self.pos(torch.arange(T, device=idx.device)))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))
