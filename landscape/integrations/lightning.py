"""PyTorch Lightning: attach probes with one line in the trainer's callbacks.

    trainer = Trainer(callbacks=[LandscapeCallback(probes=[HessianSpectrum(every=50)],
                                                   loss_fn=F.cross_entropy, store="runs/sgd-0.zarr",
                                                   run={"optimizer": "sgd", "seed": 0})])

Works with ``lightning.pytorch`` or, when only that is installed, ``pytorch_lightning``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

import landscape
from landscape.integrations import _probe_batches_for, _with_loggers

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # the older package name
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("landscape.integrations.LandscapeCallback needs PyTorch Lightning: "
                          "pip install lightning (or pip install 'landscape[lightning]')") from exc

__all__ = ["LandscapeCallback"]


class _TrainerLogger:
    """The trainer's logger as a landscape logger, names under ``landscape/`` so they do not
    collide with the training's own ``loss``."""

    def __init__(self, logger: Any, prefix: str) -> None:
        self.logger, self.prefix = logger, prefix
        self.__name__ = f"trainer.{type(logger).__name__}"

    def __call__(self, scalars: dict[str, float], step: int) -> None:
        self.logger.log_metrics({self.prefix + k: v for k, v in scalars.items()}, step)


class LandscapeCallback(Callback):
    """Records a Lightning training run with landscape probes.

    Args:
        probes: probe instances, e.g. ``[HessianSpectrum(every=50), RestrictedSecant(every=10)]``.
        loss_fn: ``loss_fn(module(*inputs), target)`` -> mean loss, what the probes evaluate (the
            LightningModule's ``forward`` must take the batch inputs; see ``module``).
        probe_data: fixed probe batches (as for :func:`landscape.attach`). Default: the first
            batches of the trainer's train dataloader, drawn at the start of training without
            changing the training (the RNG states and the loader's generators are restored).
            A DataLoader given here (even the training one) is drawn from the same way. Under
            DDP pass it explicitly (the same batches on every rank).
        store, run: the run's store path and metadata, as for :func:`landscape.attach`.
        optimizer_index: which of the trainer's optimizers to record when there are several.
        module: the module the probes evaluate, when not the LightningModule itself: a module,
            or a function of the LightningModule (``lambda m: m.net``).
        log_to_trainer: also send the geometry scalars to the trainer's logger(s), under
            ``landscape/``, beside the usual training curves.
        **options: any other :func:`landscape.attach` keyword (``loggers=``, ``overwrite=``, ...).

    What is recorded per optimizer step: Lightning's steps (``trainer.global_step`` steps), the
    optimizer's learning rate, ``epoch``, and as ``loss`` the training loss the user sees: the
    mean over the step's micro-batches of the ``training_step`` loss, unscaled (Lightning divides
    the loss it back-propagates by ``accumulate_grad_batches``; this undoes that, and an AMP grad
    scaler's factor). Under manual optimisation, ``loss`` is the mean of the losses passed to
    ``manual_backward`` since the previous step. The store is closed at the end of training and
    also when training raises (every completed step stays readable). After training the
    recorder is ``callback.recorder`` and the store ``callback.path``.
    """

    def __init__(
        self,
        probes: Sequence[Any] | Any = (),
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        probe_data: Any = None,
        store: Any = None,
        run: dict[str, Any] | None = None,
        *,
        optimizer_index: int | None = None,
        module: nn.Module | Callable[[Any], nn.Module] | None = None,
        log_to_trainer: bool = False,
        **options: Any,
    ) -> None:
        super().__init__()
        if loss_fn is None or not callable(loss_fn):
            raise TypeError("LandscapeCallback needs loss_fn=, the loss the probes evaluate: "
                            "loss_fn(module(*inputs), target), e.g. torch.nn.functional.cross_entropy")
        if optimizer_index is not None and (isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int)
                                            or optimizer_index < 0):
            raise ValueError(f"optimizer_index must be a non-negative int or None, got {optimizer_index!r}")
        if module is not None and not (isinstance(module, nn.Module) or callable(module)):
            raise TypeError(f"module= must be an nn.Module or a function of the LightningModule, got {type(module).__name__}")
        for key in ("model", "optimizer"):
            if key in options:
                raise TypeError(f"LandscapeCallback takes the {key} from the trainer; do not pass {key}=")
        self.probes, self.loss_fn, self.probe_data = probes, loss_fn, probe_data
        self.store, self.run = store, run
        self.optimizer_index, self.module, self.log_to_trainer = optimizer_index, module, bool(log_to_trainer)
        self.options = options
        self.recorder: landscape.Recorder | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._losses: list[float] = []

    # -- attach / close ---------------------------------------------------------------------
    @property
    def path(self) -> Any:
        """The store of the recorded run (None before training started)."""
        return None if self.recorder is None else self.recorder.path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.recorder is not None and not self.recorder._closed:
            return
        optimizer = self._choose_optimizer(trainer)
        module = pl_module if self.module is None else (
            self.module if isinstance(self.module, nn.Module) else self.module(pl_module))
        if not isinstance(module, nn.Module):
            raise TypeError(f"module= gave {type(module).__name__}, not an nn.Module")
        probe_data = _probe_batches_for("LandscapeCallback", self.probes, self.probe_data,
                                       trainer.train_dataloader if self.probe_data is None else None,
                                       getattr(trainer, "world_size", 1))
        extra = [_TrainerLogger(lg, "landscape/") for lg in getattr(trainer, "loggers", None) or ()] if self.log_to_trainer else []
        options = _with_loggers(self.options, extra)
        self._optimizer = optimizer
        self._losses = []
        self.recorder = landscape.attach(module, optimizer, loss_fn=self.loss_fn, probe_data=probe_data,
                                         probes=self.probes, store=self.store, run=self.run, **options)

    def _choose_optimizer(self, trainer: Trainer) -> torch.optim.Optimizer:
        optimizers = list(trainer.optimizers)
        if not optimizers:
            raise ValueError("LandscapeCallback: the trainer has no optimizer (configure_optimizers returned none)")
        if self.optimizer_index is None:
            if len(optimizers) > 1:
                raise ValueError(f"the trainer has {len(optimizers)} optimizers: choose the one to record with "
                                 "LandscapeCallback(..., optimizer_index=i)")
            index = 0
        else:
            index = self.optimizer_index
            if index >= len(optimizers):
                raise ValueError(f"optimizer_index={index} but the trainer has {len(optimizers)} optimizer(s)")
        opt = optimizers[index]
        while getattr(opt, "optimizer", None) is not None and opt.optimizer is not opt:  # wrappers: the innermost
            opt = opt.optimizer
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"LandscapeCallback: the trainer's optimizer {type(opt).__name__} is not a torch.optim.Optimizer")
        return opt

    def _close(self, reason: str) -> None:
        rec = self.recorder
        if rec is None or rec._closed:
            return
        try:
            rec.close()
        except Exception as exc:  # never mask the training's own outcome
            warnings.warn(f"landscape: closing the store at {reason} failed: {exc!r}", RuntimeWarning, stacklevel=2)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close("on_train_end")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._close("on_fit_end")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close("on_exception")

    # -- the step's loss and epoch ----------------------------------------------------------
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self.recorder is None or self.recorder._closed or not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        value = float(loss.detach())
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
            value /= float(scaler.get_scale())
        if pl_module.automatic_optimization:
            value *= trainer.accumulate_grad_batches
        self._losses.append(value)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        rec = self.recorder
        if rec is None or rec._closed or getattr(optimizer, "optimizer", optimizer) is not self._optimizer:
            return
        if self._losses:
            rec.log(loss=math.fsum(self._losses) / len(self._losses))
            self._losses = []
        rec.log(epoch=trainer.current_epoch)
