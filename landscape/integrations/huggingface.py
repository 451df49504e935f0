"""Hugging Face Trainer: attach probes with one line in the trainer's callbacks.

    trainer = Trainer(model, args, train_dataset=data,
                      callbacks=[LandscapeTrainerCallback(probes=[HessianSpectrum(every=50)],
                                                          store="runs/gpt-0.zarr")])
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch

import landscape
from landscape.integrations import _probe_batches_for, _with_loggers

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError("landscape.integrations.LandscapeTrainerCallback needs transformers: pip install transformers "
                      "accelerate (or pip install 'landscape[huggingface]')") from exc

__all__ = ["LandscapeTrainerCallback", "model_loss"]


def model_loss(output: Any, target: Any) -> torch.Tensor:
    """The loss a Hugging Face model computed itself from the ``labels`` in its inputs
    (``output.loss``); the probes' default ``loss_fn``, with batches ``(inputs_dict, labels)``."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: the probe batches' inputs must hold 'labels' (batches "
                         "(inputs_dict, labels)), or pass loss_fn= to LandscapeTrainerCallback")
    return loss


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The plain torch optimizer inside accelerate's (or any) wrapper."""
    opt, seen = optimizer, 0
    # accelerate's AcceleratedOptimizer subclasses Optimizer but keeps no hooks of its own: go
    # down to the innermost optimizer, the one whose step() updates the parameters.
    while getattr(opt, "optimizer", None) is not None and opt.optimizer is not opt and seen < 8:
        opt, seen = opt.optimizer, seen + 1
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"LandscapeTrainerCallback: the Trainer's optimizer ({type(optimizer).__name__}) holds no "
                        "torch.optim.Optimizer to hook into")
    return opt


class LandscapeTrainerCallback(TrainerCallback):
    """Records a Hugging Face ``Trainer`` run with landscape probes.

    Args:
        probes: probe instances, e.g. ``[HessianSpectrum(every=50, samples=2)]``.
        loss_fn: what the probes evaluate, ``loss_fn(model(**inputs), target)``. Default
            :func:`model_loss`: the model's own loss from the ``labels`` in its inputs.
        probe_data: fixed probe batches ``(inputs_dict, labels)``. Default: the first batches of
            the Trainer's train dataloader (collated dicts, turned into ``(dict, dict["labels"])``),
            drawn at the start of training without changing it (RNG states and the loader's
            generators are restored); a DataLoader given here is drawn from the same way.
        store, run: the run's store path and metadata, as for :func:`landscape.attach`.
        log_to_trainer: also put the latest geometry scalars, under ``landscape/``, into the
            Trainer's log records (``state.log_history``) and the logs that callbacks after this
            one receive. The Trainer's own reporting integrations (``report_to``) run before user
            callbacks: to see the geometry in TensorBoard pass ``loggers=[TensorBoard(dir)]``.
        **options: any other :func:`landscape.attach` keyword (``loggers=``, ``overwrite=``, ...).

    Steps are the Trainer's optimizer steps (``state.global_step``), the learning rate the one
    each step used, and ``loss`` the value ``.backward()`` was called on, summed over the step's
    micro-batches: the Trainer divides each micro-batch loss by ``gradient_accumulation_steps``
    (or the model normalises by the number of tokens of the whole step), so the sum is the
    step's loss as the Trainer logs it with ``logging_steps=1``. ``epoch`` is recorded too: the
    Trainer's fractional epoch before the step (its log shows the one after). After training the
    recorder is ``callback.recorder``; if ``trainer.train()`` raises, call ``callback.close()``.
    """

    def __init__(
        self,
        probes: Sequence[Any] | Any = (),
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        probe_data: Any = None,
        store: Any = None,
        run: dict[str, Any] | None = None,
        *,
        log_to_trainer: bool = False,
        **options: Any,
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable loss_fn(output, target), got {type(loss_fn).__name__}")
        for key in ("model", "optimizer"):
            if key in options:
                raise TypeError(f"LandscapeTrainerCallback takes the {key} from the Trainer; do not pass {key}=")
        self.probes, self.loss_fn, self.probe_data = probes, loss_fn or model_loss, probe_data
        self.store, self.run, self.log_to_trainer = store, run, bool(log_to_trainer)
        self.options = options
        self.recorder: landscape.Recorder | None = None
        self._latest: dict[str, float] = {}

    @property
    def path(self) -> Any:
        """The store of the recorded run (None before training started)."""
        return None if self.recorder is None else self.recorder.path

    def _keep_latest(self, scalars: dict[str, float], step: int) -> None:
        self._latest.update(scalars)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if self.recorder is not None and not self.recorder._closed:
            return
        if model is None or optimizer is None:
            raise ValueError("LandscapeTrainerCallback: the Trainer passed no model or optimizer to on_train_begin")
        opt = _torch_optimizer(optimizer)
        probe_data = _probe_batches_for("LandscapeTrainerCallback", self.probes, self.probe_data, train_dataloader,
                                       getattr(args, "world_size", 1))
        self._latest = {}
        options = _with_loggers(self.options, [self._keep_latest] if self.log_to_trainer else [])
        self.recorder = landscape.attach(model, opt, loss_fn=self.loss_fn, probe_data=probe_data, probes=self.probes,
                                         store=self.store, run=self.run, **options)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        rec = self.recorder
        if rec is not None and not rec._closed and state.epoch is not None:
            rec.log(epoch=state.epoch)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not self.log_to_trainer or not self._latest:
            return
        extra = {f"landscape/{k}": v for k, v in self._latest.items()}
        self._latest = {}
        if logs is not None:
            logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the store (done at the end of training). The Trainer has no hook for a run that
        raises: its completed steps are readable anyway (the store is crash-safe); call this,
        e.g. in ``finally:`` after ``trainer.train()``, to run the end-of-run probes and commit all."""
        rec = self.recorder
        if rec is None or rec._closed:
            return
        try:
            rec.close()
        except Exception as exc:  # never mask the training's own outcome
            warnings.warn(f"landscape: closing the store at on_train_end failed: {exc!r}", RuntimeWarning, stacklevel=2)
