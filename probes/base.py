"""What every probe is: a cadence, ``measure(context)`` and, when it needs the end of the run,
``finalize(context)``. A probe never touches the training loop or the disk: it receives a
:class:`Context` from the recorder and returns named arrays (:class:`landscape.schema.Var`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from landscape.functional import Batch, BNMode, FunctionalModel, HessianOperator, HVPRoute
from landscape.schedule import Every, Schedule
from landscape.schema import Var

TrajectoryIter = Callable[[Sequence[str]], Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]]


@dataclass
class Context:
    """Everything a probe may read at one optimizer step (or at the end of the run).

    ``params`` is w_t (the point before update t), ``grad`` the gradient the optimizer received at
    step t (after the user's clipping/accumulation, before momentum or Adam), ``update`` the
    realised w_{t+1} - w_t. All flat, detached copies the probe may keep.
    """

    step: int
    functional: FunctionalModel
    model: nn.Module
    optimizer: torch.optim.Optimizer
    probe_batches: list[Batch]
    params: Tensor | None = None
    grad: Tensor | None = None
    update: Tensor | None = None
    loss: float = float("nan")
    lr: float = float("nan")
    weight_decay: Tensor | None = None
    grad_norm: float = float("nan")  # |grad| in float64, computed once by the recorder
    # at finalize only
    final_params: Tensor | None = None
    trajectory: TrajectoryIter | None = None
    dataset: Callable[[], xr.Dataset] | None = None
    steps: np.ndarray | None = None
    # Results one probe leaves for the others at the same step (e.g. HessianSpectrum's Ritz
    # vectors under "hessian_eigenvectors"), and the Hessian operators built at this step.
    shared: dict[str, Any] = field(default_factory=dict)
    _operators: dict[tuple[Any, ...], HessianOperator] = field(default_factory=dict, repr=False)

    def hessian(self, samples: int, bn_mode: BNMode = "eval", route: HVPRoute = "auto") -> HessianOperator:
        """The Hessian of the mean loss over the first ``samples`` probe batches at w_t.

        Built once per step and shared by every curvature probe that asks for the same batches,
        mode and route: building it costs about one gradient.
        """
        key = (samples, bn_mode, route)
        op = self._operators.get(key)
        if op is None:
            if self.params is None:
                raise RuntimeError("the Hessian needs the step's parameters (ctx.params)")
            if samples > len(self.probe_batches):
                raise ValueError(f"asked for {samples} probe batches, the recorder drew {len(self.probe_batches)}")
            op = self._operators[key] = self.functional.hessian_operator(self.params, self.probe_batches[:samples], route)
        return op


@dataclass
class Measurement:
    """A probe's output at one step: per-step values (dims without ``step``) and, for probes
    that need the end of the run, trajectory vectors to be streamed to the store."""

    values: dict[str, Var] = field(default_factory=dict)
    trajectory: dict[str, Var] = field(default_factory=dict)


class Probe:
    """Base class. Subclasses set ``name``, implement :meth:`measure`, and :meth:`finalize` if
    they need the end of the run."""

    name: str = "Probe"

    def __init__(self, every: Every = 1, *, bn_mode: BNMode = "eval", seed: int = 0) -> None:
        self.schedule = Schedule.of(every)
        if bn_mode not in ("eval", "train"):
            raise ValueError(f"{type(self).__name__}: bn_mode must be 'eval' or 'train', got {bn_mode!r}")
        self.bn_mode: BNMode = bn_mode
        self.seed = int(seed)

    @property
    def samples_needed(self) -> int:
        """How many fixed probe batches this probe reads (0 if none)."""
        return 0

    @property
    def evaluates_model(self) -> bool:
        """Whether :meth:`measure` runs the model (forward passes, HVPs). Probes that only read
        the step's vectors (params, gradient, update) say False and skip the guard, which costs
        more than they do."""
        return True

    def setup(self, functional: FunctionalModel, optimizer: torch.optim.Optimizer) -> None:
        """Called once by ``attach``, before training: validate against the model."""

    def coords(self) -> dict[str, list[Any]]:
        """Labels of the extra dims this probe's per-step values use (e.g. ``block``). Probes
        of one run share a dim: the recorder stores the union of their labels and fills NaN
        where a probe has no value."""
        return {}

    def trajectory_vectors(self) -> dict[str, str]:
        """The trajectory vectors this probe streams to the store, as ``{name: vector dim}``
        (``"param"`` for full vectors, ``"sketch"`` for sketches). Probes may share a name
        (e.g. ``params``, the same w_t whoever writes it) only with the same vector dim."""
        return {}

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def measure(self, ctx: Context) -> Measurement:
        raise NotImplementedError

    def finalize(self, ctx: Context) -> xr.Dataset | None:
        """Results that need the whole run (e.g. against the final iterate). Default: none."""
        return None

    def generator(self, step: int) -> torch.Generator:
        """A generator seeded by (probe seed, step): reproducible, and never the global RNG."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def config(self) -> dict[str, Any]:
        """JSON-able configuration stored in the run's attrs."""
        return {"probe": self.name, "every": self.schedule.describe(), "bn_mode": self.bn_mode, "seed": self.seed}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "probe")
        return f"{self.name}({args})"
