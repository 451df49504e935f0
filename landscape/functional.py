"""Layer 1: the model as a pure function of one flat parameter vector.

Everything the probes evaluate goes through :class:`FunctionalModel`: the loss, its gradient and
Hessian-vector products at an arbitrary flat vector ``w`` on fixed batches, via
``torch.func.functional_call``. The live module is never written to; :func:`probe_guard` restores
modes, buffers, RNG state and ``.grad`` anyway, because a probe must never leave a trace on
training.
"""
from __future__ import annotations

import contextlib
import fnmatch
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

Batch = tuple[Any, ...]
"""A batch is ``(*inputs, target)``: the model is called as ``model(*inputs)`` and the loss as
``loss_fn(output, target)``."""

HVPRoute = Literal["auto", "double_backward", "fwd_rev", "chunked", "compiled"]
HVP_ROUTES = ("auto", "double_backward", "fwd_rev", "chunked", "compiled")
BNMode = Literal["eval", "train"]

_POINTS_BYTES = 256 * 2**20  # cap on a block of parameter vectors held at once by FunctionalModel.losses
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
# Which way is faster (one vmap call or a loop; see FunctionalModel.losses, losses_and_grads and
# HessianOperator.matmat), measured once per process for each model structure, loss, chunk size
# and thread count: the answer depends on shapes and arithmetic, not on the weights, so a second
# run of the same model in one process (a sweep, a benchmark, a notebook cell run again) reuses
# it instead of paying the timing again. Both ways give the same values up to rounding.
_TIMINGS: dict[tuple[Any, ...], dict[tuple[Any, ...], bool]] = {}


def _tensors(item: Any) -> Iterator[Tensor]:
    """The tensors of one batch item: the item itself, or the values of a mapping of keyword inputs."""
    if isinstance(item, Tensor):
        yield item
    elif isinstance(item, Mapping):
        for v in item.values():
            if isinstance(v, Tensor):
                yield v


def _map_tensors(item: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``fn`` applied to the tensors of one batch item (a tensor or a mapping of keyword inputs)."""
    if isinstance(item, Tensor):
        return fn(item)
    if isinstance(item, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in item.items()}
    return item


def _map_batched(item: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``fn`` applied to the tensors of one batch item that have a batch dimension."""
    return _map_tensors(item, lambda t: fn(t) if t.dim() > 0 else t)


def _has_batch_dim(item: Any) -> bool:
    return any(t.dim() > 0 for t in _tensors(item))


def _vmap_dims(item: Any) -> Any:
    """vmap's ``in_dims`` for one batch item: 0 where a tensor has the batch dimension."""
    if isinstance(item, Mapping):
        return {k: 0 if isinstance(v, Tensor) and v.dim() > 0 else None for k, v in item.items()}
    return 0 if isinstance(item, Tensor) and item.dim() > 0 else None


class Shard(tuple):
    """This process's part of a probe batch under torch.distributed: a batch whose examples are
    split across ranks. ``total`` is the size of the whole batch, which weights it among other
    batches; every reduction over it is summed across ranks (:class:`FunctionalModel`)."""

    total: int

    def __new__(cls, items: Iterable[Any], total: int) -> "Shard":
        self = super().__new__(cls, items)
        self.total = int(total)
        return self

    def __reduce__(self) -> Any:
        return (Shard, (tuple(self), self.total))


def local_size(batch: Batch) -> int:
    """Number of examples of a batch held by this process (first dimension of its first tensor)."""
    for item in batch:
        for t in _tensors(item):
            if t.dim() > 0:
                return int(t.shape[0])
    raise ValueError("a probe batch holds no tensor with a batch dimension")


def batch_size(batch: Batch) -> int:
    """Number of examples in a batch, over all processes for a distributed :class:`Shard` (the
    weight of the batch in example-weighted means)."""
    return batch.total if isinstance(batch, Shard) else local_size(batch)


def check_batch(batch: Any, where: str = "probe_data") -> Batch:
    """Validate one ``(*inputs, target)`` batch, with an error that says how to fix it.

    An input may be a mapping of tensors (keyword inputs, as Hugging Face models take them):
    the model is then called as ``model(*positional, **mapping)``.
    """
    if isinstance(batch, Mapping) or not isinstance(batch, (tuple, list)) or len(batch) < 2:
        hint = (" (a dict batch: pass (inputs_dict, target), e.g. (batch, batch['labels']))"
                if isinstance(batch, Mapping) else "")
        raise ValueError(
            f"{where}: each batch must be a tuple (inputs..., target) such as (x, y); got "
            f"{type(batch).__name__}{'' if not isinstance(batch, (tuple, list)) else f' of length {len(batch)}'}{hint}"
        )
    sizes = {int(t.shape[0]) for item in batch for t in _tensors(item) if t.dim() > 0}
    if not sizes:
        raise ValueError(f"{where}: a batch must contain tensors with a leading batch dimension")
    if len(sizes) > 1:
        raise ValueError(f"{where}: tensors in one batch disagree on the batch size: {sorted(sizes)}")
    if 0 in sizes:
        raise ValueError(f"{where}: a batch is empty (batch size 0)")
    return batch if isinstance(batch, Shard) else tuple(batch)


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """Move every tensor of a batch to ``device`` (no copy when already there)."""
    items = tuple(_map_tensors(t, lambda x: x.to(device)) for t in batch)
    return Shard(items, batch.total) if isinstance(batch, Shard) else items


class _Scope(nn.Module):
    """Runs a function while ``functional_call`` has swapped the model's parameters (the public
    way to evaluate the model several times at one point with one swap)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


def _flat_copy(tensors: Sequence[Tensor]) -> Tensor:
    """One flat detached copy of ``tensors`` in one C call (the recorder reads w_t and g_t at
    every recorded step, where a Python loop over the parameters measured more than the copy)."""
    with torch.no_grad():
        if len(tensors) == 1:  # flatten_dense_tensors returns a view of a single tensor, not a copy
            return tensors[0].detach().reshape(-1).clone()
        return torch._utils._flatten_dense_tensors(tensors)


def call_model(model: nn.Module, inputs: Sequence[Any], params: Mapping[str, Tensor] | None = None) -> Any:
    """``model(*positional, **keywords)`` for a batch's inputs (mappings are keyword inputs),
    through ``functional_call`` at ``params`` when given."""
    args = tuple(x for x in inputs if not isinstance(x, Mapping))
    kwargs: dict[str, Any] = {}
    for x in inputs:
        if isinstance(x, Mapping):
            kwargs.update(x)
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, params, args, kwargs)


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the trainable parameters inside the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def of(cls, named: Sequence[tuple[str, Tensor]]) -> "ParamLayout":
        names, shapes, offsets = [], [], []
        pos = 0
        for name, p in named:
            names.append(name)
            shapes.append(p.shape)
            offsets.append(pos)
            pos += p.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), pos)

    def views(self, w: Tensor) -> dict[str, Tensor]:
        """Views of ``w`` shaped like the parameters (gradients flow back to ``w``)."""
        return {
            n: w.narrow(0, o, s.numel()).view(s)
            for n, s, o in zip(self.names, self.shapes, self.offsets)
        }

    def slices(self) -> dict[str, slice]:
        """Slice of the flat vector for each parameter name."""
        return {n: slice(o, o + s.numel()) for n, s, o in zip(self.names, self.shapes, self.offsets)}


def trainable_parameters(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Named trainable parameters of ``model`` (those the optimizer updates, if given).

    Raises a clear error when there is nothing to measure.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "the model has no trainable parameters (all have requires_grad=False): there is no "
            "loss landscape to measure; unfreeze at least one parameter"
        )
    if optimizer is not None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        named = [(n, p) for n, p in named if id(p) in in_opt]
        if not named:
            raise ValueError(
                "none of the model's trainable parameters is in the optimizer: pass the optimizer "
                "built from model.parameters() (or a subset of them)"
            )
    return named


BlockSpec = Any
"""What a curvature probe's ``blocks=`` accepts: see :func:`resolve_blocks`."""


def _block_members(item: Any, names: Sequence[str], modules: dict[int, str]) -> list[str]:
    if item is None:
        return list(names)
    if isinstance(item, nn.Module):
        prefix = modules.get(id(item))
        if prefix is None:
            raise ValueError(f"blocks: the module {type(item).__name__} is not a submodule of the model")
        return [n for n in names if prefix == "" or n.startswith(prefix + ".")]
    if isinstance(item, str):
        return [n for n in names if fnmatch.fnmatchcase(n, item) or n.startswith(item + ".")]
    if isinstance(item, (list, tuple)):
        found = dict.fromkeys(m for sub in item for m in _block_members(sub, names, modules))
        return [n for n in names if n in found]
    raise TypeError(f"blocks: expected a name pattern (str), a module, or a list of them; got {type(item).__name__}")


def resolve_blocks(layout: ParamLayout, model: nn.Module, blocks: BlockSpec = None) -> dict[str, Tensor | None]:
    """Parameter blocks as ``{label: index into the flat vector}`` (``None``: the whole model).

    ``blocks`` is ``None`` (the whole model, label ``"model"``); ``"params"`` (one block per
    parameter tensor); ``"modules"`` (one block per module that owns parameters directly, e.g.
    each Linear or Conv layer); a name pattern (``fnmatch`` on parameter names, and a module
    path matches all its parameters: ``"features.0"``, ``"*.weight"``); a module of the model; a
    list of those (labelled by pattern or module path); or a dict ``{label: pattern, module or
    list}`` (``None`` there: the whole model). A block that matches no parameter is an error.
    """
    names = list(layout.names)
    if blocks is None:
        return {"model": None}
    modules = {id(m): n for n, m in model.named_modules()}
    if isinstance(blocks, str) and blocks == "params":
        spec: dict[str, Any] = {n: [n] for n in names}
    elif isinstance(blocks, str) and blocks == "modules":
        spec = {}
        for n in names:
            owner = n.rsplit(".", 1)[0] if "." in n else ""
            spec.setdefault(owner or "(root)", []).append(n)
    elif isinstance(blocks, dict):
        spec = {str(k): v for k, v in blocks.items()}
    elif isinstance(blocks, (str, nn.Module)):
        spec = {_block_label(blocks, modules): blocks}
    elif isinstance(blocks, (list, tuple)):
        spec = {}
        for item in blocks:
            label = _block_label(item, modules)
            if label in spec:
                raise ValueError(f"blocks: two blocks are labelled {label!r}: pass a dict {{label: pattern}}")
            spec[label] = item
    else:
        raise TypeError(f"blocks must be None, 'params', 'modules', a pattern, a module, a list or a dict; got {type(blocks).__name__}")
    if not spec:
        raise ValueError("blocks: no block given (pass None for the whole model)")
    slices = layout.slices()
    out: dict[str, Tensor | None] = {}
    for label, item in spec.items():
        members = _block_members(item, names, modules)
        if not members:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"blocks: {label!r} matches no trainable parameter (names are: {shown})")
        if len(members) == len(names):
            out[label] = None  # the whole model: no restriction needed
            continue
        out[label] = torch.cat([torch.arange(slices[n].start, slices[n].stop) for n in members])
    return out


def _block_label(item: Any, modules: dict[int, str]) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, nn.Module):
        return modules.get(id(item), type(item).__name__) or "model"
    if isinstance(item, (list, tuple)):
        return "+".join(_block_label(i, modules) for i in item)
    raise TypeError(f"blocks: expected a name pattern (str), a module, or a list of them; got {type(item).__name__}")


class FunctionalModel:
    """Loss, gradient and Hessian-vector products of ``model`` as functions of a flat vector.

    ``loss_fn(output, target)`` must return the mean loss over the batch. Losses over several
    batches are combined as the example-weighted mean, so several small batches equal one big
    batch of the same examples.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Any], Tensor],
        named_params: Sequence[tuple[str, Tensor]] | None = None,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (e.g. torch.nn.functional.cross_entropy), got {loss_fn!r}")
        self.model = model
        self.loss_fn = loss_fn
        named = list(named_params) if named_params is not None else trainable_parameters(model)
        self.params = [p for _, p in named]
        self.layout = ParamLayout.of(named)
        first = self.params[0]
        self.device = first.device
        self.dtype = first.dtype
        # How HessianOperator.matmat applies a block of vectors (see there); "auto" measures once
        # per batch shape and remembers the answer (in :attr:`_batching`).
        self.batched: bool | Literal["auto"] = "auto"
        self.max_batched = 32
        self._structure = (type(model).__module__, type(model).__qualname__, self.layout.names, self.layout.shapes,
                           tuple((n, tuple(b.shape)) for n, b in model.named_buffers()), str(self.dtype), str(self.device),
                           getattr(loss_fn, "__module__", None), getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__))
        # Examples per forward pass in probe computations (None: whole batches). Bigger batches
        # are evaluated in chunks and accumulated, so activation memory is that of one chunk.
        self.chunk_size: int | None = None
        # Process group over which reductions on distributed Shard batches are summed (None: the
        # default group). Set by the recorder under torch.distributed.
        self.group: Any = None
        # Buffers the probes use instead of the module's (under torch.distributed: rank 0's, so
        # every rank evaluates the same function; DDP only syncs buffers at its next forward).
        self.buffers: dict[str, Tensor] | None = None
        # route "compiled": one landscape.compiled.CompiledHVP per set of batches, kept for the
        # run (its graphs serve every point); keyed by the batches' identities, which it holds
        self._compiled: dict[tuple[int, ...], Any] = {}

    @property
    def dim(self) -> int:
        """Number of trainable parameters d."""
        return self.layout.numel

    @property
    def _batching(self) -> dict[tuple[Any, ...], bool]:
        """The remembered batched-or-loop choices of this model structure (see ``_TIMINGS``)."""
        return _TIMINGS.setdefault((self._structure, self.chunk_size, torch.get_num_threads()), {})

    # -- reading the live model --------------------------------------------------------------
    def flat_params(self) -> Tensor:
        """A detached copy of the current parameters as one flat vector."""
        return _flat_copy(self.params)

    def flat_grad(self) -> Tensor:
        """A copy of the current ``.grad`` as one flat vector (zeros where a grad is None)."""
        grads = [p.grad for p in self.params]
        if all(g is not None for g in grads):
            return _flat_copy(grads)  # type: ignore[arg-type]
        with torch.no_grad():
            return torch.cat([(g.reshape(-1) if g is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device))
                              for g, p in zip(grads, self.params)])

    def flat_params_and_grad(self) -> tuple[Tensor, Tensor]:
        """``(flat_params(), flat_grad())`` as two halves of one copy: one C call where every
        parameter has a ``.grad`` (the recorder reads both at every recorded step)."""
        grads = [p.grad for p in self.params]
        if any(g is None or g.dtype != p.dtype for g, p in zip(grads, self.params)):
            return self.flat_params(), self.flat_grad()
        w, g = _flat_copy([*self.params, *grads]).split(self.dim)  # type: ignore[list-item]
        return w, g

    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        """Parameter-shaped views of a flat vector."""
        return self.layout.views(w)

    # -- pure functions of w -----------------------------------------------------------------
    def _forward_loss(self, w: Tensor, batch: Batch) -> Tensor:
        return self.loss_fn(self.outputs(w, batch), batch[-1])

    def outputs(self, w: Tensor, batch: Batch) -> Any:
        """The model's output on one batch's inputs at ``w`` (this process's examples of a
        distributed :class:`Shard`)."""
        *inputs, _ = batch
        params = self.layout.views(w)
        if self.buffers:
            params = {**self.buffers, **params}
        return call_model(self.model, inputs, params)

    def set_chunk_size(self, chunk: int | None) -> None:
        """Evaluate probe batches in chunks of at most ``chunk`` examples (None: whole batches)."""
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk_size must be a positive int (examples per forward pass) or None, got {chunk!r}")
        self.chunk_size = chunk

    def pieces(self, batches: Batch | Sequence[Batch]) -> list[tuple[Batch, float]]:
        """The forward passes a reduction over ``batches`` takes: ``(piece, weight)`` with the
        weights of the example-weighted mean (this process's share under torch.distributed), each
        piece at most :attr:`chunk_size` examples."""
        batches = as_batch_list(batches)
        total = sum(batch_size(b) for b in batches)
        out: list[tuple[Batch, float]] = []
        chunk = self.chunk_size
        for b in batches:
            n = local_size(b)
            if chunk is None or n <= chunk:
                out.append((b, n / total))
                continue
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                piece = tuple(_map_batched(t, lambda x: x[lo:hi]) for t in b)
                out.append((piece, (hi - lo) / total))
        return out

    def sharded(self, batches: Batch | Sequence[Batch]) -> bool:
        """Whether ``batches`` are split across processes (results are then summed over ranks)."""
        return any(isinstance(b, Shard) for b in as_batch_list(batches))

    def reduce(self, t: Tensor, batches: Batch | Sequence[Batch]) -> Tensor:
        """Sum ``t`` (this process's share of a reduction over ``batches``) across ranks when the
        batches are distributed :class:`Shard` s; unchanged otherwise."""
        if not self.sharded(batches):
            return t
        import torch.distributed as dist

        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def local_loss(self, w: Tensor, batches: Batch | Sequence[Batch]) -> Tensor:
        """This process's share of the example-weighted mean loss (differentiable in ``w``); the
        whole loss when the batches are not distributed."""
        return sum(self._forward_loss(w, b) * c for b, c in self.pieces(batches))  # type: ignore[return-value]

    def loss(self, w: Tensor, batches: Batch | Sequence[Batch]) -> Tensor:
        """Example-weighted mean loss at ``w`` over one batch or a list of batches (over all
        processes for distributed batches, where it is a value, not differentiable: use
        :meth:`loss_and_grad` or :meth:`hessian_operator`)."""
        value = self.local_loss(w, batches)
        return self.reduce(value, batches) if self.sharded(batches) else value

    def loss_and_grad(self, w: Tensor, batches: Batch | Sequence[Batch]) -> tuple[Tensor, Tensor]:
        """Loss and flat gradient at ``w`` (both detached), one backward per chunk."""
        leaf = w.detach().requires_grad_(True)
        parts = self.pieces(batches)
        with torch.enable_grad():
            if len(parts) == 1 or self.chunk_size is None:
                value = sum(self._forward_loss(leaf, b) * c for b, c in parts)
                (g,) = torch.autograd.grad(value, leaf)
                value = value.detach()
            else:  # one graph at a time: the memory of one chunk
                value = torch.zeros((), dtype=w.dtype, device=w.device)
                g = torch.zeros_like(leaf)
                for b, c in parts:
                    v = self._forward_loss(leaf, b) * c
                    (gc,) = torch.autograd.grad(v, leaf)
                    value += v.detach()
                    g += gc
        if self.sharded(batches):
            both = self.reduce(torch.cat([value.reshape(1).to(g.dtype), g]), batches)
            return both[0].to(value.dtype), both[1:]
        return value, g

    def grad(self, w: Tensor, batches: Batch | Sequence[Batch]) -> Tensor:
        """Flat gradient of the loss at ``w``."""
        return self.loss_and_grad(w, batches)[1]

    def losses_and_grads(self, w: Tensor, batches: Sequence[Batch]) -> tuple[Tensor, Tensor]:
        """The loss and gradient on each of several batches separately: ``(K,)`` losses and
        ``(K, d)`` gradients, as ``loss_and_grad(w, b)`` for each ``b``.

        Batches of one shape can go through one ``torch.func.vmap`` call (one vectorised backward
        over K batches instead of K small ones). As in :meth:`losses`, which is faster depends on
        the model and batch size, so the first call per shape times both and keeps the faster
        for the process (a model vmap cannot run uses the loop); both give the same values up to
        rounding. The loop swaps the parameters in once for all K batches.
        """
        batches = [check_batch(b, "losses_and_grads") for b in batches]
        if not batches:
            raise ValueError("losses_and_grads needs at least one batch")
        key = self._stack_key(batches)
        choice = self._batching.get(key) if key is not None else False
        if choice is None:  # first call for this shape: time both once, keep the faster
            t0 = time.perf_counter()
            loop = self._grads_loop(w, batches)
            t1 = time.perf_counter()
            try:
                self._grads_vmap(w, batches)  # vmap's one-off set-up is not what we time
                t2 = time.perf_counter()
                stacked = self._grads_vmap(w, batches)
                t3 = time.perf_counter()
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                self._batching[key] = False
                return loop
            self._batching[key] = (t3 - t2) < (t1 - t0)
            return stacked if self._batching[key] else loop
        if choice:
            try:
                return self._grads_vmap(w, batches)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                self._batching[key] = False
        return self._grads_loop(w, batches)

    def _stack_key(self, batches: list[Batch]) -> tuple[Any, ...] | None:
        """The timing key of batches that can be stacked for vmap, or None (different shapes,
        keyword inputs, chunks, or distributed shards, whose reduction runs per batch)."""
        if len(batches) < 2 or self.chunk_size is not None or any(isinstance(b, Shard) for b in batches):
            return None
        shapes = [tuple(tuple(t.shape) if isinstance(t, Tensor) else type(t) for t in b) for b in batches]
        if any(sh != shapes[0] for sh in shapes) or not all(isinstance(t, Tensor) for t in batches[0]):
            return None
        return ("grads", shapes[0])

    def _grads_loop(self, w: Tensor, batches: list[Batch]) -> tuple[Tensor, Tensor]:
        if self._stack_key(batches) is None:  # chunks, shards, mixed shapes: loss_and_grad per batch
            losses, grads = zip(*(self.loss_and_grad(w, b) for b in batches))
            return torch.stack(losses), torch.stack(grads)
        # One functional_call around all K batches: the parameters are swapped in once instead
        # of K times (on the digits CNN that swap measured about a tenth of a batch's gradient),
        # and each parameter is its own leaf, so no backward through views of the flat vector.
        leaves = [t.detach().requires_grad_(True) for t in self.layout.views(w.detach()).values()]
        params: dict[str, Tensor] = {**(self.buffers or {}), **dict(zip(self.layout.names, leaves))}
        grads = torch.empty(len(batches), self.dim, dtype=w.dtype, device=w.device)
        losses = torch.empty(len(batches), dtype=w.dtype, device=w.device)

        def run() -> None:
            for i, batch in enumerate(batches):
                *inputs, target = batch
                loss = self.loss_fn(call_model(self.model, inputs), target)
                parts = torch.autograd.grad(loss, leaves, materialize_grads=True)
                torch.cat([g.reshape(-1) for g in parts], out=grads[i])
                losses[i] = loss.detach()

        with torch.enable_grad():
            functional_call(_Scope(self.model), {f"model.{k}": v for k, v in params.items()}, (run,))
        return losses, grads

    def _grads_vmap(self, w: Tensor, batches: list[Batch]) -> tuple[Tensor, Tensor]:
        stacked = [torch.stack([b[i] for b in batches]) for i in range(len(batches[0]))]
        fn = torch.func.grad_and_value(lambda x, *batch: self._forward_loss(x, batch))
        # the math attention kernel: the fused one has no vmap batching rule for its backward
        with torch.enable_grad(), second_order_kernels():
            grads, losses = torch.func.vmap(fn, in_dims=(None, *([0] * len(stacked))), randomness="error")(w.detach(), *stacked)
        return losses.detach(), grads.detach()

    def per_sample_grads(self, w: Tensor, batch: Batch, *, chunk: int | None = None) -> Iterator[Tensor]:
        """Flat per-example gradients at ``w``, as ``(n_chunk, d)`` blocks over the examples of
        ``batch`` in order.

        Row i is the gradient of the loss on example i alone (the model called on that example as
        a batch of one; ``loss_fn`` is a mean, so that is the example's loss), by ``torch.func.vmap``
        over ``torch.func.grad``: one vectorised backward per block instead of a Python loop.
        ``chunk`` examples per block; by default as many as keep a block near 64 MiB. A model that
        mixes examples (BatchNorm in train mode) has no per-example gradients and raises; so does
        one whose operations vmap cannot batch, or that draws random numbers (dropout in train
        mode): run it under :func:`probe_guard`, or take gradients of whole batches instead.
        """
        batch = check_batch(batch, "per_sample_grads")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive int (examples per block) or None, got {chunk!r}")
        coupled = [type(m).__name__ for m in self.model.modules() if isinstance(m, _NORM_TYPES) and m.training]
        if coupled:
            raise RuntimeError(
                f"per-example gradients are undefined for this model: {coupled[0]} is in train mode, so each "
                "example's output depends on the others through the batch statistics. Put batch norm in eval "
                "mode (probe bn_mode='eval') or use gradients of whole batches (GradientNoise method='per_batch')"
            )
        n = local_size(batch)
        if chunk is None:
            chunk = max(1, (64 << 20) // max(1, self.dim * w.element_size()))
        w = w.detach()
        # which items carry the batch dimension (vmapped); the rest (scalars, non-tensors) are shared
        # in_dims of a mapping: 0 for its batched tensors, None for the rest (e.g. a float option)
        dims = [_vmap_dims(t) for t in batch]

        def as_batch_of_one(e: Any, d: Any) -> Any:
            if isinstance(d, dict):
                return {k: v.unsqueeze(0) if d[k] == 0 else v for k, v in e.items()}
            return e.unsqueeze(0) if d == 0 else e

        def one(x: Tensor, *example: Any) -> Tensor:
            return self._forward_loss(x, tuple(as_batch_of_one(e, d) for e, d in zip(example, dims)))

        per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None, *dims), randomness="error")
        for start in range(0, n, chunk):
            part = tuple(_map_batched(t, lambda x: x[start:start + chunk]) for t in batch)
            try:
                with torch.enable_grad(), second_order_kernels():
                    out = per_example(w, *part)
            except (RuntimeError, NotImplementedError) as err:
                raise RuntimeError(
                    f"per-example gradients through torch.func.vmap failed for {type(self.model).__name__}: {err}. "
                    "A layer that mixes examples, an operation vmap cannot batch (data-dependent control flow, "
                    ".item(), in-place updates of buffers) or random numbers (dropout in train mode) prevent "
                    "it; use gradients of whole batches instead (GradientNoise method='per_batch')"
                ) from err
            yield out.detach()

    def losses(self, points: Callable[[int, int], Tensor], m: int, batches: Batch | Sequence[Batch], *,
               batched: bool | Literal["auto"] = "auto") -> np.ndarray:
        """L(w_j) on ``batches`` for m points, ``points(lo, hi)`` -> the (hi - lo, d) rows lo..hi
        (asked for in increasing order, each row once), as float64.

        ``batched=True`` evaluates blocks of points in one ``torch.func.vmap`` call (one forward
        over many parameter vectors), ``False`` one at a time (O(d) memory). ``"auto"`` (default)
        times both once per batch shape, like :meth:`HessianOperator.matmat`, and keeps the
        faster: on a 2-core CPU vmap measured 4x faster for a digits MLP (64 examples) and 3x
        slower for a digits CNN with 16 channels (256 examples), where arithmetic dominates. A
        model vmap cannot run falls back to the loop. Both give the same values up to rounding.
        Runs under no_grad; the caller sets the modes (e.g. :func:`probe_guard`).
        """
        if batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
        out = np.empty(m, dtype=np.float64)
        if m == 0:
            return out
        batches = as_batch_list(batches)
        key = ("losses", tuple(batch_size(b) for b in batches))
        size = max(1, min(self.max_batched, _POINTS_BYTES // max(1, self.dim * self.dtype.itemsize)))
        choice: bool | None = self._batching.get(key) if batched == "auto" else bool(batched)

        def one(x: Tensor) -> float:
            return float(self.local_loss(x, batches))

        batched_loss = torch.func.vmap(lambda x: self.local_loss(x, batches))

        def vm(W: Tensor) -> Tensor:
            # the fused CPU attention kernel has no vmap batching rule (torch loops over it, and warns)
            with second_order_kernels():
                return batched_loss(W)

        lo = 0
        with torch.no_grad():
            if choice is None and m > 1:
                hi = min(m, size)
                W = points(0, hi)
                try:
                    vm(W)  # vmap's one-off set-up is not what we time
                    t0 = time.perf_counter()
                    fast = vm(W).double().cpu().numpy()
                    t1 = time.perf_counter()
                except (RuntimeError, NotImplementedError, TypeError, ValueError):
                    fast = None
                t2 = time.perf_counter()
                slow = np.array([one(W[j]) for j in range(hi)])
                t3 = time.perf_counter()
                choice = self._batching[key] = fast is not None and (t1 - t0) < (t3 - t2)
                out[:hi] = fast if choice else slow
                lo = hi
            if choice:
                while lo < m:
                    hi = min(m, lo + size)
                    W = points(lo, hi)
                    try:
                        out[lo:hi] = vm(W).double().cpu().numpy()
                    except (RuntimeError, NotImplementedError, TypeError, ValueError):
                        if batched is True:
                            raise
                        self._batching[key] = False
                        out[lo:hi] = [one(W[j]) for j in range(hi - lo)]
                    lo = hi
            while lo < m:
                hi = min(m, lo + size)
                W = points(lo, hi)
                out[lo:hi] = [one(W[j]) for j in range(hi - lo)]
                lo = hi
        if self.sharded(batches):  # once, after the local evaluations, however they were batched
            out = self.reduce(torch.from_numpy(out), batches).numpy()
        return out

    def hessian_operator(
        self, w: Tensor, batches: Batch | Sequence[Batch], route: HVPRoute = "auto"
    ) -> "HessianOperator":
        """The Hessian at ``w`` as a matrix-free operator ``v -> H v``."""
        return HessianOperator(self, w, batches, route)

    def hvp(self, w: Tensor, batches: Batch | Sequence[Batch], v: Tensor, route: HVPRoute = "auto") -> Tensor:
        """One Hessian-vector product at ``w`` (builds the operator once; prefer
        :meth:`hessian_operator` for several products at the same point)."""
        return self.hessian_operator(w, batches, route).matvec(v)


def as_batch_list(batches: Batch | Sequence[Batch]) -> list[Batch]:
    """One ``(inputs..., target)`` batch or a sequence of them, as a list of batches."""
    if not isinstance(batches, (tuple, list)) or not batches:
        raise ValueError("batches must be one (inputs..., target) batch or a non-empty list of them")
    if isinstance(batches[0], (tuple, list)):
        return list(batches)  # a sequence of batches
    return [batches if isinstance(batches, Shard) else tuple(batches)]


@contextlib.contextmanager
def second_order_kernels() -> Iterator[None]:
    """Attention kernels that support double backward and forward-mode AD.

    The math kernel of ``scaled_dot_product_attention`` (the fused CPU kernel has neither a
    double backward nor forward-mode AD), and no fused ``nn.MultiheadAttention`` fast path (an
    eval-mode kernel that is not meant to be differentiated). Note: in torch 2.13, nested
    torch.func transforms (``torch.func.hessian``, ``jacrev(jacrev)``) are wrong by percents
    through LayerNorm or train-mode BatchNorm with an affine weight; the products used here
    (double backward, ``jvp`` of ``grad``, and their vmaps) agree with finite differences to
    1e-8 (tests/test_hessian.py).
    """
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class HessianOperator:
    """Matrix-free Hessian of the mean loss at a fixed point.

    Route ``double_backward`` (Pearlmutter) builds the first-order graph once and reuses it for
    every product: on a 2-core CPU it measured 1.6x (digits MLP) and 2.6x (digits CNN) the cost
    of a gradient per product, against 4.0x / 4.2x for torch.func forward-over-reverse
    (``fwd_rev``), so ``auto`` picks double backward. ``fwd_rev`` keeps no graph alive (less
    memory on large models). Known limit of ``fwd_rev``: ``F.mse_loss`` raises "ZeroTensors are
    immutable" there (pytorch#123996); double backward handles it. ``chunked`` (what ``auto``
    takes when :attr:`FunctionalModel.chunk_size` splits the batches) rebuilds one chunk's graph
    at a time for each product or block of products: the memory of one chunk, at the price of
    a gradient per chunk and call. ``compiled`` computes forward-over-reverse products through
    ``torch.compile`` (:class:`landscape.compiled.CompiledHVP`, one per set of batches for the
    run); it is opt-in, never chosen by ``auto``: on a 2-core CPU a compiled block of 10 products
    cost 0.21-0.90 gradients per product against 0.45-1.57 eager on the digits models, but each
    graph takes 10-40 s to compile (benchmarks/bench_compile.py). If compilation fails it warns
    once and the operator continues on ``double_backward``.

    Second derivatives run with the math kernel of ``scaled_dot_product_attention``: the fused CPU
    (flash) kernel has neither a double backward nor forward-mode AD, so attention models would
    otherwise fail on both routes. The math kernel computes the same function.

    Under torch.distributed, on :class:`Shard` batches, every product is this process's share
    summed across ranks (one all-reduce per :meth:`matvec` or :meth:`matmat` call), so each rank
    holds the Hessian of the loss over the whole batches.
    """

    def __init__(
        self, fm: FunctionalModel, w: Tensor, batches: Batch | Sequence[Batch], route: HVPRoute = "auto"
    ) -> None:
        if route not in HVP_ROUTES:
            raise ValueError(f"route must be one of {HVP_ROUTES}, got {route!r}")
        self.fm = fm
        self.w = w.detach()
        self.batches = as_batch_list(batches)
        self._pieces = fm.pieces(self.batches)
        if route == "auto":
            route = "chunked" if fm.chunk_size is not None and len(self._pieces) > 1 else "double_backward"
        self.route = route
        self.shape = (fm.dim, fm.dim)
        self.dtype = w.dtype
        self.device = self.w.device
        self.matvecs = 0
        self._leaf: Tensor | None = None
        self._g: Tensor | None = None
        self._sharded = fm.sharded(self.batches)
        self._loss: Tensor | None = None
        self._chvp: Any = None
        if self.route == "compiled":
            self._chvp = self._compiled_hvp()
            if self._chvp is None:
                self.route = "double_backward"
        if self.route == "double_backward":
            self._build_graph()

    def _compiled_hvp(self) -> Any:
        """The run's CompiledHVP for these batches, or None if compilation failed before."""
        from landscape.compiled import CompiledHVP

        key = tuple(id(b) for b in self.batches)
        chvp = self.fm._compiled.get(key)
        if chvp is None:
            if len(self.fm._compiled) >= 8:  # sets of batches that come and go: keep the newest
                self.fm._compiled.pop(next(iter(self.fm._compiled)))
            chvp = self.fm._compiled[key] = CompiledHVP(self.fm, self.batches)
        return chvp if chvp.ok else None

    def _fall_back(self) -> None:
        """Compilation failed (CompiledHVP warned once, with why): the eager default from here on."""
        self.route, self._chvp = "double_backward", None
        self._build_graph()

    def _reduce(self, t: Tensor) -> Tensor:
        """Summed across ranks for distributed batches (decided once, at construction)."""
        return self.fm.reduce(t, self.batches) if self._sharded else t

    def _build_graph(self) -> None:
        """The first-order graph the double-backward products reuse."""
        leaf = self.w.clone().requires_grad_(True)
        with torch.enable_grad(), second_order_kernels():
            value = self.fm.local_loss(leaf, self.batches)
            (g,) = torch.autograd.grad(value, leaf, create_graph=True)
        self._leaf, self._g, self._loss = leaf, g, value.detach()

    @property
    def loss(self) -> Tensor:
        """The loss at the point (free on the double-backward route)."""
        if self._loss is None:
            return self.fm.loss(self.w, self.batches)
        return self._reduce(self._loss)

    def gradient(self) -> Tensor:
        """The gradient of the same loss at the same point (free on the double-backward route,
        which computed it to build the graph; one gradient otherwise)."""
        if self._g is not None:
            return self._reduce(self._g.detach())
        return self.fm.grad(self.w, self.batches)

    def matvec(self, v: Tensor) -> Tensor:
        """H v for one flat vector ``v``."""
        self.matvecs += 1
        v = v.to(dtype=self.dtype, device=self.w.device)
        return self._reduce(self._local_matvec(v))

    def _local_matvec(self, v: Tensor) -> Tensor:
        if self._chvp is not None:
            from landscape.compiled import CompileUnavailable

            try:
                return self._chvp.local(self.w, v)
            except CompileUnavailable:
                self._fall_back()
        if self.route == "double_backward":
            assert self._g is not None and self._leaf is not None
            with torch.enable_grad():
                (hv,) = torch.autograd.grad(self._g, self._leaf, v, retain_graph=True)
            return hv.detach()
        if self.route == "chunked":
            return self._chunked(v.unsqueeze(1))[:, 0]
        grad_fn = torch.func.grad(lambda x: self.fm.local_loss(x, self.batches))
        with second_order_kernels():
            _, hv = torch.func.jvp(grad_fn, (self.w,), (v,))
        return hv.detach()

    def _chunked(self, V: Tensor) -> Tensor:
        """Local H V, one chunk's double-backward graph at a time (freed before the next)."""
        out = torch.zeros_like(V)
        for piece, c in self._pieces:
            leaf = self.w.clone().requires_grad_(True)
            with torch.enable_grad(), second_order_kernels():
                value = self.fm._forward_loss(leaf, piece) * c
                (g,) = torch.autograd.grad(value, leaf, create_graph=True)
                for j in range(V.shape[1]):
                    (hv,) = torch.autograd.grad(g, leaf, V[:, j], retain_graph=j + 1 < V.shape[1])
                    out[:, j] += hv.detach()
        return out

    def matmat(self, V: Tensor) -> Tensor:
        """H V for a (d, m) block of vectors (columns).

        Batching the products through vmap (one backward over m vectors) is much faster when a
        product is dominated by per-call overhead (small batches: digits MLP, 64 examples, 0.26x
        a gradient per vector in blocks of 10 against 0.74x one at a time) and slower when it is
        dominated by arithmetic (digits CNN, 1797 examples: 4.3x against 2.1x). ``batched``
        (set on the :class:`FunctionalModel`) picks: ``True``, ``False``, or ``"auto"`` (default),
        which times both once per batch shape and keeps the faster for the run. Both give the
        same products up to rounding. The ``chunked`` route applies the block chunk by chunk.
        """
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects a ({self.shape[0]}, m) matrix, got {tuple(V.shape)}")
        V = V.to(dtype=self.dtype, device=self.w.device)
        if V.shape[1] == 1:
            return self.matvec(V[:, 0]).unsqueeze(1)
        # Reduced once per call, whatever each rank's timing chose below.
        return self._reduce(self._local_matmat(V))

    def _local_matmat(self, V: Tensor) -> Tensor:
        m = V.shape[1]
        if self._chvp is not None:
            from landscape.compiled import CompileUnavailable

            try:
                out = self._chvp.local(self.w, V)
                self.matvecs += m
                return out
            except CompileUnavailable:
                self._fall_back()
        if self.route == "chunked":
            self.matvecs += m
            return self._chunked(V)
        choice = self.fm.batched
        if choice == "auto":
            key = (self.route, tuple(batch_size(b) for b in self.batches))
            choice = self.fm._batching.get(key)
            if choice is None:
                return self._calibrate(V, key)
        if not choice:
            self.matvecs += m
            return torch.stack([self._local_matvec(V[:, j]) for j in range(m)], dim=1)
        self.matvecs += m
        # vmap holds m copies of the activations: split very wide blocks
        step = max(1, self.fm.max_batched)
        return torch.cat([self._batched(V[:, j:j + step]) for j in range(0, m, step)], dim=1)

    def _batched(self, V: Tensor) -> Tensor:
        if self.route == "double_backward":
            assert self._g is not None and self._leaf is not None
            with torch.enable_grad():
                (HV,) = torch.autograd.grad(
                    self._g, self._leaf, V.T.contiguous(), retain_graph=True, is_grads_batched=True
                )
            return HV.detach().T
        grad_fn = torch.func.grad(lambda x: self.fm.local_loss(x, self.batches))
        jvp = lambda v: torch.func.jvp(grad_fn, (self.w,), (v,))[1]  # noqa: E731
        with second_order_kernels():
            return torch.func.vmap(jvp)(V.T.contiguous()).T

    def _calibrate(self, V: Tensor, key: tuple[Any, ...]) -> Tensor:
        """Time batched and one-at-a-time products on a few columns; remember the faster.

        The first batched call pays vmap's one-off set-up, so it is repeated before timing: the
        calibration costs ``c`` extra products (``c <= 8``), once per batch shape and run.
        """
        c = min(V.shape[1], 8)
        head = self._batched(V[:, :c])
        t0 = time.perf_counter()
        for j in range(c):
            self._local_matvec(V[:, j])
        t1 = time.perf_counter()
        self._batched(V[:, :c])
        t2 = time.perf_counter()
        self.fm._batching[key] = (t2 - t1) < (t1 - t0)
        self.matvecs += c
        if V.shape[1] == c:
            return head
        return torch.cat([head, self._local_matmat(V[:, c:])], dim=1)

    __call__ = matvec


# -- the guard ------------------------------------------------------------------------------


def set_probe_modes(model: nn.Module, bn_mode: BNMode) -> None:
    """Batch-norm layers in ``bn_mode``; every other module (dropout included) in eval."""
    if bn_mode not in ("eval", "train"):
        raise ValueError(f"bn_mode must be 'eval' or 'train', got {bn_mode!r}")
    for m in model.modules():
        # object.__setattr__: nn.Module.__setattr__ costs microseconds per module per probe call
        norm = isinstance(m, _NORM_TYPES)
        object.__setattr__(m, "training", bn_mode == "train" and norm)
        if norm and bn_mode == "train":
            # batch statistics without updating the running ones: a probe must not move them, and
            # an in-place buffer update inside torch.func transforms is an error
            object.__setattr__(m, "track_running_stats", False)


@contextlib.contextmanager
def probe_guard(model: nn.Module, bn_mode: BNMode = "eval") -> Iterator[None]:
    """Run probe code with the model in a measurement mode, then restore everything.

    Snapshots and restores: each module's train/eval flag, every buffer (BN running stats move in
    train mode), the global RNG states (CPU and CUDA), and each parameter's ``.grad`` (the same
    tensor object, with its values).
    """
    modes = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    # Restored only where changed: an unconditional copy_ would bump the version of buffers an
    # eval-mode graph saved and invalidate it (the Hessian operator the step's curvature probes
    # share; the user's pending backward). Values are compared too, because the CPU batch-norm
    # kernel updates running stats without bumping their version counter.
    buffers = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    # A backward inside the probe accumulates into the existing .grad tensors in place, so keep
    # their values as well as their identity (optimizers and user code may hold references).
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in model.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        set_probe_modes(model, bn_mode)
        yield
    finally:
        for m, flag, track in modes:
            object.__setattr__(m, "training", flag)
            if track is not None:
                object.__setattr__(m, "track_running_stats", track)
        with torch.no_grad():
            for b, version, saved in buffers:
                if b._version != version or not torch.equal(b, saved):
                    b.copy_(saved)
        with torch.no_grad():
            for p, g, saved_g in grads:
                p.grad = g
                if g is not None:
                    g.copy_(saved_g)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The torch generators a DataLoader draws its order from (its own, its samplers', and those
    of wrappers such as accelerate's), found by attribute."""
    found: list[torch.Generator] = []
    seen: set[int] = set()
    stack = [loader]
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Generator):
            found.append(obj)
            continue
        for attr in ("generator", "sampler", "batch_sampler", "base_dataloader", "synchronized_generator"):
            try:
                child = getattr(obj, attr, None)
            except Exception:
                child = None
            if child is not None and not isinstance(child, (int, float, str)):
                stack.append(child)
    return found


@contextlib.contextmanager
def rng_preserved(*sources: Any) -> Iterator[None]:
    """Leave the random state exactly as found (e.g. while drawing probe batches): torch's global
    generators (CPU and CUDA), numpy's and Python's, and the own generators of ``sources``
    (DataLoaders: iterating one draws its shuffle order and worker seeds from them)."""
    import random

    gens = [g for src in sources for g in loader_generators(src)]
    states = [g.get_state() for g in gens]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        for g, st in zip(gens, states):
            g.set_state(st)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        np.random.set_state(np_state)
        random.setstate(py_state)


def draw_batches(source: Any, count: int, *, batch_size: int | None = None, seed: int = 0) -> list[Batch]:
    """Turn ``probe_data`` into ``count`` fixed batches, drawn once.

    Accepts a list of ``(x, y)`` batches, an iterable such as a DataLoader (the first ``count``
    batches are taken, without touching the global RNG, so training is unchanged), or a pair of
    tensors ``(X, Y)`` that is shuffled with ``seed`` and split into batches of ``batch_size``.
    """
    if source is None:
        raise ValueError("probe_data is required by the probes you attached: pass a list of (x, y) batches, a DataLoader, or a (X, Y) pair of tensors")
    if count < 1:
        raise ValueError(f"need at least one probe batch, asked for {count}")
    # A pair of tensors (X, Y): shuffle with the seed and split it.
    if (
        isinstance(source, (tuple, list))
        and len(source) >= 2
        and all(isinstance(t, Tensor) for t in source)
        and all(t.dim() > 0 for t in source)
    ):
        if len({t.shape[0] for t in source}) != 1:
            sizes = " and ".join(str(int(t.shape[0])) for t in source)
            raise ValueError(
                f"probe_data (X, Y) tensors have different numbers of examples ({sizes}): "
                "pass tensors whose first dimensions match"
            )
        n = int(source[0].shape[0])
        if n == 0:
            raise ValueError("probe_data is empty (0 examples)")
        size = batch_size or max(1, n // count)
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(n, generator=gen)
        if size * count > n:
            raise ValueError(
                f"probe_data has {n} examples, too few for {count} batches of {size}: pass more data, "
                "a smaller probe_batch_size or fewer samples"
            )
        return [tuple(t[perm[i * size:(i + 1) * size]] for t in source) for i in range(count)]
    if isinstance(source, (tuple, list)):
        batches = [check_batch(b) for b in source]
    elif isinstance(source, Iterable):
        batches = []
        with rng_preserved(source):
            for b in source:
                batches.append(check_batch(b))
                if len(batches) == count:
                    break
    else:
        raise ValueError(
            f"probe_data must be a list of (x, y) batches, a DataLoader or a (X, Y) pair; got {type(source).__name__}"
        )
    if not batches:
        raise ValueError("probe_data is empty: it yielded no batch")
    if len(batches) < count:
        raise ValueError(
            f"probe_data has {len(batches)} batches but the probes need {count}: pass more batches or "
            f"lower `samples`"
        )
    return batches[:count]


def flat_point(reference: Any, fm: FunctionalModel) -> Tensor:
    """A point in parameter space as ``fm``'s flat vector, from a module of the same
    architecture, its state_dict, a checkpoint path (loaded with ``weights_only=True``) or a flat
    tensor."""
    if isinstance(reference, nn.Module):
        reference = reference.state_dict()
    if isinstance(reference, (str, os.PathLike)):
        path = Path(reference)
        if not path.exists():
            raise FileNotFoundError(f"reference checkpoint {path} does not exist")
        reference = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(reference, dict) and "state_dict" in reference and isinstance(reference["state_dict"], Mapping):
            reference = reference["state_dict"]
    if isinstance(reference, Tensor):
        flat = reference.detach().reshape(-1)
        if flat.numel() != fm.dim:
            raise ValueError(f"reference vector has {flat.numel()} entries, the model's trainable parameters {fm.dim}")
        return flat.to(device=fm.device, dtype=fm.dtype)
    if not isinstance(reference, Mapping):
        raise TypeError("expected a module, a state_dict, a checkpoint path, or a flat tensor of the parameters")
    missing = [n for n in fm.layout.names if n not in reference]
    if missing:
        raise KeyError(f"reference state_dict lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}: "
                       "pass model.state_dict() of the same architecture")
    parts = []
    for name, shape in zip(fm.layout.names, fm.layout.shapes):
        t = torch.as_tensor(reference[name])
        if t.shape != shape:
            raise ValueError(f"reference {name} has shape {tuple(t.shape)}, the model's is {tuple(shape)}")
        parts.append(t.reshape(-1).to(device=fm.device, dtype=fm.dtype))
    return torch.cat(parts)
