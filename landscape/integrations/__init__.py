"""Thin callbacks that attach probes from inside the trainers researchers use.

    from landscape.integrations import LandscapeCallback         # PyTorch Lightning
    from landscape.integrations import LandscapeTrainerCallback  # Hugging Face Trainer

Importing this package needs neither library: each class is imported on first use, with an
ImportError naming the extra to install (``landscape[lightning]``, ``landscape[huggingface]``).
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterable

import torch

from landscape.functional import check_batch, rng_preserved

if TYPE_CHECKING:
    from landscape.integrations.huggingface import LandscapeTrainerCallback
    from landscape.integrations.lightning import LandscapeCallback

__all__ = ["LandscapeCallback", "LandscapeTrainerCallback"]

_LAZY = {"LandscapeCallback": "landscape.integrations.lightning",
         "LandscapeTrainerCallback": "landscape.integrations.huggingface"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'landscape.integrations' has no attribute {name!r}")


def _probe_batch(batch: Any, where: str) -> Any:
    """A training batch as a probe batch: ``(x, y)`` stays; a dict with ``labels`` (Hugging Face)
    becomes ``(dict, dict["labels"])``, the model computing its own loss from the labels."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise ValueError(f"{where}: a dict batch without 'labels' cannot be turned into (inputs, target); "
                             "pass probe_data= explicitly as a list of (inputs, target) batches")
        return (dict(batch), batch["labels"])
    return check_batch(batch, where)


def _draw_probe_batches(loader: Iterable[Any], count: int, where: str) -> list[Any]:
    """The first ``count`` batches of a training DataLoader, drawn without changing training:
    the global RNGs (torch, numpy, random) and the loader's own generators are restored after,
    so the trainer then shuffles exactly as it would have."""
    batches: list[Any] = []
    with rng_preserved(loader):
        for batch in loader:
            batches.append(_probe_batch(batch, where))
            if len(batches) == count:
                break
    if len(batches) < count:
        raise ValueError(f"{where}: the training dataloader gave {len(batches)} batches but the probes need {count}: "
                         "pass probe_data= or lower the probes' samples")
    return batches


def _probe_batches_for(who: str, probes: Any, probe_data: Any, train_loader: Any, world_size: int) -> Any:
    """The ``probe_data`` a callback passes to :func:`landscape.attach`: as given, the first batches
    of a DataLoader given as ``probe_data`` or, by default, of the trainer's train loader (drawn
    without changing the training)."""
    needed = _samples_needed(probes)
    if not needed:
        return probe_data
    if probe_data is None:
        if world_size > 1:
            raise ValueError(f"under distributed training {who} needs probe_data= (the same batches on every rank); "
                             "the ranks' train dataloaders give different batches")
        if train_loader is None or isinstance(train_loader, (dict, list, tuple)):
            raise ValueError(f"{who} could not draw probe batches from the trainer's train dataloader "
                             f"({type(train_loader).__name__}): pass probe_data= explicitly")
        return _draw_probe_batches(train_loader, needed, f"{who} probe batches (train dataloader)")
    if _is_loader(probe_data):
        return _draw_probe_batches(probe_data, needed, f"{who} probe_data")
    return probe_data


def _with_loggers(options: dict[str, Any], extra: list[Any]) -> dict[str, Any]:
    """``attach`` options with ``extra`` loggers added to the user's ``loggers=``."""
    loggers = options.get("loggers", ())
    loggers = [] if loggers is None else [loggers] if not isinstance(loggers, (list, tuple)) else list(loggers)
    return {**options, "loggers": loggers + list(extra)}


def _is_loader(source: Any) -> bool:
    """A DataLoader-like iterable of batches (not a list of batches nor an (X, Y) pair)."""
    return isinstance(source, Iterable) and not isinstance(source, (list, tuple, Mapping, torch.Tensor))


def _samples_needed(probes: Any) -> int:
    from probes.base import Probe

    items = [probes] if isinstance(probes, Probe) else list(probes or ())
    return max([int(getattr(p, "samples_needed", 0) or 0) for p in items] + [0])
