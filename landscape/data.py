"""The small datasets bundled in ``data/`` (no download, ever)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

_DATA = Path(__file__).resolve().parent.parent / "data"


def data_dir() -> Path:
    """The bundled data folder (``$LANDSCAPE_DATA`` overrides it)."""
    d = Path(os.environ.get("LANDSCAPE_DATA", _DATA))
    if not d.is_dir():
        raise FileNotFoundError(f"bundled data folder {d} not found: install landscape from its source tree "
                                "(pip install -e .) or set LANDSCAPE_DATA to the repo's data/ folder")
    return d


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """UCI optical handwritten digits: 1797 8x8 images (pixels 0..16 scaled to [0, 1]), 10 classes.

    Returns ``X`` of shape (1797, 1, 8, 8) and integer labels ``y`` of shape (1797,).
    Source and licence: data/README.md.
    """
    raw = np.loadtxt(data_dir() / "digits.csv.gz", delimiter=",", dtype=np.float64)
    X = torch.tensor(raw[:, :64] / 16.0, dtype=dtype).reshape(-1, 1, 8, 8)
    y = torch.tensor(raw[:, 64], dtype=torch.long)
    return X, y


def split(X: torch.Tensor, y: torch.Tensor, train_fraction: float = 0.8, seed: int = 0):  # type: ignore[no-untyped-def]
    """A seeded train/test split: ``(X_train, y_train), (X_test, y_test)``."""
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n = int(round(train_fraction * len(X)))
    tr, te = perm[:n], perm[n:]
    return (X[tr], y[tr]), (X[te], y[te])
