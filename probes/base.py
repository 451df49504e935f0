"""What every probe is: a cadence, ``measure(context)`` and, when it needs the end of the run,
``finalize(context)``. A probe never touches the training loop or the disk: it receives a
:class:`Context` from the recorder and returns named arrays (:class:`landscape.schema.Var`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from landscape.functional import Batch, BlockSpec, BNMode, FunctionalModel, HessianOperator, HVPRoute, resolve_blocks
from landscape.schedule import Every, Schedule
from landscape.schema import Var

TrajectoryIter = Callable[[Sequence[str]], Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]]


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def number_in(name: str, value: Any, *, low: float = 0.0, high: float = math.inf, closed: bool = False) -> float:
    """``value`` as a finite float in (low, high), or [low, high) when ``closed``; else a ValueError."""
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(float(value))
    if not ok or not ((low <= value if closed else low < value) and value < high):
        bound = f"[{low}, {high})" if closed else f"({low}, {high})"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")
    return float(value)


@dataclass
class Context:
    """Everything a probe may read at one optimizer step (or at the end of the run).

    ``params`` is w_t (the point before update t), ``grad`` the gradient the optimizer received at
    step t (after the user's clipping/accumulation, before momentum or Adam), ``update`` the
    realised w_{t+1} - w_t (w_{t+1}: see :attr:`Probe.reads_only_step`). All flat, detached
    copies the probe may keep, unless every probe due at the step says
    :attr:`Probe.holds_step_vectors` is False: then they are buffers the recorder lends for the
    step and reuses afterwards. ``next_step_due``: the probes due at step t + 1 when that step
    is measured right after this one with w_{t+1} as its ``params`` (a probe streaming both
    then need not store ``update``, see ``landscape.schema``); empty otherwise.
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
    next_step_due: Sequence[Any] = ()
    # at finalize only
    final_params: Tensor | None = None
    trajectory: TrajectoryIter | None = None
    dataset: Callable[[], xr.Dataset] | None = None
    steps: np.ndarray | None = None
    # Results one probe leaves for the others at the same step (e.g. HessianSpectrum's Ritz
    # vectors under "hessian_eigenvectors"), and the Hessian operators built at this step.
    shared: dict[str, Any] = field(default_factory=dict)
    _operators: dict[tuple[Any, ...], HessianOperator] = field(default_factory=dict, repr=False)
    # Set by the recorder for a step measured in a batch: computes ``update`` in place when it
    # is first read. A step's update that no probe reads (one the store derives from the next
    # params, say) is then never computed.
    _finish_update: Callable[[], None] | None = field(default=None, repr=False)

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


def _context_update(ctx: Context) -> Tensor | None:
    finish = ctx._finish_update
    if finish is not None:
        ctx._finish_update = None
        finish()
    return ctx.__dict__["update"]


def _set_context_update(ctx: Context, value: Tensor | None) -> None:
    ctx.__dict__["update"] = value


# After @dataclass, which reads a class attribute named like a field as its default: the
# generated __init__ assigns ``update`` through the setter.
Context.update = property(_context_update, _set_context_update)  # type: ignore[assignment]


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

    @property
    def finalize_evaluates_model(self) -> bool:
        """Whether :meth:`finalize` runs the model. Under torch.distributed every rank runs such
        a finalize in step (its evaluations are summed across ranks); the others run on rank 0
        only. One that says False also skips the guard."""
        return True

    @property
    def holds_step_vectors(self) -> bool:
        """Whether :meth:`measure` may keep ``ctx.params``, ``ctx.grad`` or ``ctx.update`` (or
        views of them) after it returns. False promises it only reads them during the call, or
        returns them unchanged as trajectory vectors (the recorder streams those and reuses the
        buffers once written): the recorder then reads each step into buffers it already holds,
        one copy call instead of an allocation and a copy per parameter."""
        return True

    @property
    def reads_only_step(self) -> bool:
        """Whether :meth:`measure` depends on nothing but the Context's values of the step
        (step, params, grad, update, loss, lr, weight_decay, grad_norm) and this probe's own
        fixed settings: not on the model, the optimizer or the probe batches, which change or
        are evaluated as training goes on. True lets the recorder measure the step once it has
        read w_{t+1} where it reads w anyway, at the next step's start (quick steps a few steps
        late, in batches; see ``commit_delay`` of :class:`landscape.Recorder`): the update is
        then the move to the next iterate, an edit of the weights between steps included.
        Probes that evaluate the model are measured right after ``optimizer.step()``, with the
        update it made."""
        return False

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



class BlockProbe(Probe):
    """A probe that reports along the ``block`` dim: ``blocks=None`` is the whole model (label
    ``"model"``); name patterns, modules, ``"params"``, ``"modules"`` or a dict of them select
    parameter blocks (:func:`landscape.functional.resolve_blocks`). ``block_index`` maps each
    label to the indices of its parameters in the flat vector (None: all of them); the recorder
    checks that a label means the same parameters in every probe of a run."""

    def __init__(self, every: Every = 1, *, blocks: BlockSpec = None, bn_mode: BNMode = "eval", seed: int = 0) -> None:
        super().__init__(every, bn_mode=bn_mode, seed=seed)
        self.blocks = blocks
        self.block_index: dict[str, Tensor | None] = {}
        self._block_sizes: dict[str, int] = {}

    def setup(self, functional: FunctionalModel, optimizer: torch.optim.Optimizer) -> None:
        self.block_index = resolve_blocks(functional.layout, functional.model, self.blocks)
        self._block_sizes = {k: functional.dim if v is None else int(v.numel()) for k, v in self.block_index.items()}

    def coords(self) -> dict[str, list[Any]]:
        return {"block": list(self.block_index)}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "blocks": self._block_sizes or (None if self.blocks is None else repr(self.blocks))}

def trajectory_attrs(what: str, probe: str, sketch: Any = None) -> dict[str, Any]:
    """The attrs of a trajectory vector: what it is, who wrote it and, for a sketch (a
    :class:`landscape.linalg.GaussianSketch`), how it was sketched."""
    attrs: dict[str, Any] = {"long_name": what, "units": "1", "probe": probe}
    if sketch is not None:
        attrs["sketch"] = sketch.describe()
    return attrs


def trajectory_var(x: Tensor, dims: tuple[str, ...], what: str, probe: str, sketch: Any = None) -> Var:
    """A trajectory vector (float32) with :func:`trajectory_attrs`."""
    return Var(dims, float32(x), trajectory_attrs(what, probe, sketch))


def float32(x: Tensor) -> Tensor:
    """``x`` as a detached float32 tensor: ``x`` itself when it is one already (per-step path)."""
    return x if x.dtype == torch.float32 and not x.requires_grad else x.detach().to(torch.float32)
