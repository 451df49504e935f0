"""A short bundled text for character-level language models (no download, ever).

``load_text()`` reads ``data/tinytext.txt`` (the opening of Shakespeare's *Coriolanus*, public
domain; source in data/README.md), :class:`CharVocab` maps its characters to integers,
:func:`split_text` holds out a seeded validation span, :func:`char_batches` draws fixed, seeded
``(x, y)`` blocks for training or for probes, and :func:`lm_loss` is the mean token
cross-entropy that ``landscape.attach(loss_fn=...)`` expects.

    text = load_text()
    vocab = CharVocab(text)
    train, val = split_text(vocab.encode(text), val_fraction=0.1, seed=0)
    probe_batches = char_batches(val, block=32, batch_size=16, count=4, seed=1)
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from landscape.data import data_dir

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def load_text(name: str = "tinytext") -> str:
    """The bundled text ``data/<name>.txt`` as one string (plain ASCII, ``\\n`` line ends).

    Source and licence: data/README.md.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"name must be the stem of a bundled text such as 'tinytext' (letters, digits, '_', '-'), got {name!r}")
    folder = data_dir()
    path = folder / f"{name}.txt"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.txt"))
        raise FileNotFoundError(f"no bundled text {name!r} in {folder}; available: {have}")
    return path.read_text(encoding="ascii")


class CharVocab:
    """Characters of a text <-> integer ids, in code-point order (the same text always gives the
    same ids, whatever order the characters first appear in)."""

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"CharVocab is built from a str, got {type(text).__name__}")
        if not text:
            raise ValueError("CharVocab needs a non-empty text")
        self.chars: tuple[str, ...] = tuple(sorted(set(text)))
        self._index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def size(self) -> int:
        """Number of distinct characters V (the model's output width)."""
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """The ids of ``text`` as a 1-D int64 tensor."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        try:
            return torch.tensor([self._index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary (built from another text?): "
                             "build CharVocab from a text that contains every character you encode") from None

    def decode(self, ids: Tensor | list[int]) -> str:
        """The text of a 1-D sequence of ids."""
        seq = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        if isinstance(seq, int) or (seq and isinstance(seq[0], list)):
            raise ValueError("decode takes a 1-D sequence of ids; decode the rows of a batch one by one")
        bad = [i for i in seq if not isinstance(i, int) or not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"id {bad[0]!r} is outside the vocabulary (0..{len(self.chars) - 1})")
        return "".join(self.chars[i] for i in seq)

    def __repr__(self) -> str:
        return f"CharVocab(size={self.size})"


def _check_ids(text_ids: Tensor, what: str = "text_ids") -> Tensor:
    if not isinstance(text_ids, Tensor) or text_ids.dim() != 1 or text_ids.dtype != torch.long:
        got = f"{tuple(text_ids.shape)} {text_ids.dtype}" if isinstance(text_ids, Tensor) else type(text_ids).__name__
        raise ValueError(f"{what} must be a 1-D int64 tensor of character ids (CharVocab.encode(text)), got {got}")
    return text_ids


def split_text(text_ids: Tensor, val_fraction: float = 0.1, *, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded train/validation split of a text: one contiguous validation span of
    ``round(val_fraction * n)`` characters at a seeded position, the rest (joined at that one
    seam) for training. A contiguous span keeps validation blocks from overlapping training ones.
    Uses its own generator, never the global RNG.
    """
    ids = _check_ids(text_ids)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n = ids.numel()
    n_val = int(round(val_fraction * n))
    if n_val < 2 or n - n_val < 2:
        raise ValueError(f"a text of {n} characters is too short for val_fraction={val_fraction}: both parts need "
                         "at least 2 characters")
    gen = torch.Generator().manual_seed(int(seed))
    start = int(torch.randint(0, n - n_val + 1, (1,), generator=gen))
    val = ids[start:start + n_val].clone()
    train = torch.cat([ids[:start], ids[start + n_val:]])
    return train, val


def char_batches(text_ids: Tensor, *, block: int, batch_size: int, count: int,
                 seed: int) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches ``(x, y)`` of ``batch_size`` windows of ``block`` characters at seeded
    random offsets; ``y`` is ``x`` shifted by one (the next character at every position).

    Drawn from a generator seeded by ``seed``, never the global RNG: the same call gives the same
    batches, and drawing probe batches leaves training unchanged.
    """
    ids = _check_ids(text_ids)
    for name, value in (("block", block), ("batch_size", batch_size), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if ids.numel() < block + 1:
        raise ValueError(f"the text has {ids.numel()} characters, too few for blocks of {block} plus the next "
                         f"character: use a block below {ids.numel()}")
    gen = torch.Generator().manual_seed(int(seed))
    # each window holds block + 1 characters: x is the first block, y the last block
    offsets = torch.arange(block + 1)
    out = []
    for _ in range(count):
        starts = torch.randint(0, ids.numel() - block, (batch_size,), generator=gen)
        windows = ids[starts[:, None] + offsets]
        out.append((windows[:, :-1].contiguous(), windows[:, 1:].contiguous()))
    return out


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean token cross-entropy of ``logits`` (B, T, V) against ``targets`` (B, T).

    This is the mean over all B*T tokens, which is the ``loss_fn(output, target)`` contract of
    landscape (a mean over the batch). Blocks have equal length T, so the mean over examples of
    each example's token mean equals the token mean: weighting batches (and per-example
    gradients) by examples, as landscape does, is exact.
    """
    if logits.dim() != 3 or targets.dim() != 2 or logits.shape[:2] != targets.shape:
        raise ValueError(f"lm_loss expects logits (B, T, V) and targets (B, T) with matching B and T, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
