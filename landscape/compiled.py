"""Hessian-vector products through ``torch.compile``, with a fallback.

:class:`CompiledHVP` computes ``H V`` for a :class:`~landscape.functional.FunctionalModel` on fixed
batches as forward-over-reverse (``jvp`` of ``grad``, vmapped over the columns of a block),
compiled by ``torch.compile`` on first use. It computes every product from scratch at the given
``w`` (no graph is kept between calls), so one instance serves every point of a run: different
``w`` values with the same shapes reuse the compiled code.

Compilation can fail in many ways (no C++ compiler, an operation dynamo or inductor does not
support, a compiled result that disagrees with the eager one). Every such failure is caught: the
instance records why in ``reason``, sets ``ok`` to False, warns once (``RuntimeWarning``) and
raises :class:`CompileUnavailable` from this call on, so the caller uses an eager route instead.

Shapes are static (one graph per shape; dynamic shapes fail on the vmapped dimension): a single
vector ``(d,)`` has its own graph, and blocks ``(d, m)`` compile one graph per width for the first
``max_widths`` widths (4); later widths are padded with zero columns to the next compiled width,
or split. Compiling a graph takes 10-30 s on a small CPU; it pays off only over many products.
"""
from __future__ import annotations

import shutil
import time
import warnings
import weakref
from typing import Any, Callable, NoReturn, Sequence

import torch
from torch import Tensor

from landscape.functional import Batch, FunctionalModel, as_batch_list, check_batch, second_order_kernels

__all__ = ["CompileUnavailable", "CompiledHVP", "compile_available"]

_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Agreement with the eager forward-over-reverse product demanded of the first compiled product of
# each graph (max abs difference / max abs value): far above reordering noise, far below a bug.
_VERIFY_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}


class CompileUnavailable(RuntimeError):
    """The compiled HVP path cannot be used (see the message); use an eager route instead."""


_AVAILABLE: dict[str, tuple[bool, str]] = {}


def compile_available(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``torch.compile`` can be tried on ``device`` here: ``(True, "")`` or ``(False, why)``.

    Checks what is cheap to check without compiling: ``torch.compile`` and dynamo support for this
    Python, and the code generator's toolchain (a C++ compiler on CPU, Triton on CUDA). A True
    answer does not promise that a given model compiles; :class:`CompiledHVP` finds that out.
    """
    kind = torch.device(device).type
    if kind in _AVAILABLE:
        return _AVAILABLE[kind]
    ok, why = True, ""
    try:
        import torch._dynamo as dynamo

        if not hasattr(torch, "compile"):
            ok, why = False, f"torch {torch.__version__} has no torch.compile"
        elif not dynamo.is_dynamo_supported():
            ok, why = False, "torch.compile (dynamo) does not support this Python version"
        elif kind == "cpu":
            from torch._inductor import cpp_builder

            cxx = cpp_builder.get_cpp_compiler()
            if shutil.which(cxx) is None and not _is_file(cxx):
                ok, why = False, f"no C++ compiler for inductor: {cxx!r} was not found on PATH (install g++ or clang++)"
        elif kind == "cuda":
            from torch.utils._triton import has_triton

            if not has_triton():
                ok, why = False, "inductor needs Triton on CUDA and it is not installed (pip install triton)"
    except Exception as exc:  # e.g. get_cpp_compiler raising when no compiler is found
        ok, why = False, f"torch.compile is not usable here: {type(exc).__name__}: {exc}"
    _AVAILABLE[kind] = (ok, why)
    return ok, why


def _is_file(path: str) -> bool:
    import os

    return os.path.isfile(path) and os.access(path, os.X_OK)


# Dynamo keeps compiled graphs on the code object of the compiled function and, after
# ``recompile_limit`` (8) variants of one code object, silently runs it eagerly. So each
# (model, kind, piece shapes, backend, mode) gets its own copy of the code object: instances for
# the same model and shapes share graphs (a new instance recompiles nothing), and many models,
# batch shapes or backends in one process never add up to the limit.
_CODES: "weakref.WeakKeyDictionary[FunctionalModel, dict[Any, Any]]" = weakref.WeakKeyDictionary()


def _function(fm: FunctionalModel, kind: str, key: Any = None) -> Callable[..., Tensor]:
    """The uncompiled product ``(w, v, piece) -> H_piece v`` (kind "vector") or
    ``(w, V, piece) -> H_piece V`` (kind "block"), with the code object kept for ``key``."""

    def vector(w: Tensor, v: Tensor, piece: Batch) -> Tensor:
        grad = torch.func.grad(lambda x: fm._forward_loss(x, piece))
        return torch.func.jvp(grad, (w,), (v,))[1]

    def block(w: Tensor, V: Tensor, piece: Batch) -> Tensor:
        grad = torch.func.grad(lambda x: fm._forward_loss(x, piece))
        return torch.func.vmap(lambda v: torch.func.jvp(grad, (w,), (v,))[1], in_dims=1, out_dims=1)(V)

    fn = vector if kind == "vector" else block
    if key is not None:
        codes = _CODES.setdefault(fm, {})
        code = codes.get((kind, key))
        if code is None:
            code = codes[(kind, key)] = fn.__code__.replace(co_name=f"compiled_hvp_{kind}_{len(codes)}")
        fn.__code__ = code
    return fn


def _graphs() -> int:
    """Graphs dynamo has compiled in this process (a recompilation adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledHVP:
    """(w, V) -> H V for a FunctionalModel on fixed batches, through torch.compile.

    ``H`` is the Hessian of ``fm.loss(w, batches)`` (the example-weighted mean; each chunk of
    :attr:`FunctionalModel.chunk_size` examples is a separate call of the compiled code, and
    distributed batches are summed across ranks). ``mode`` is passed to ``torch.compile``;
    ``backend`` too (default inductor). With ``verify`` (default) the first product of each
    compiled graph is checked against the same product computed eagerly, and a disagreement is
    treated as a compile failure.

    Blocks: the first ``max_widths`` distinct widths m (up to ``max_width``, default
    ``fm.max_batched``, since vmap holds m copies of the activations) get a graph each; another m
    is padded with zero columns to the next compiled width, or split into blocks of the widest.

    Attributes: ``ok`` (False once the compiled path failed), ``reason`` (why), ``compiles``
    (graphs this instance compiled), ``compile_seconds`` (wall time of each first call that
    compiled, by graph), ``calls``.
    """

    def __init__(self, fm: FunctionalModel, batches: Batch | Sequence[Batch], *, mode: str | None = None,
                 backend: str | Callable[..., Any] = "inductor", verify: bool = True, max_widths: int = 4,
                 max_width: int | None = None) -> None:
        if not isinstance(fm, FunctionalModel):
            raise TypeError(f"CompiledHVP needs a landscape.functional.FunctionalModel, got {type(fm).__name__}")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES} (torch.compile's modes), got {mode!r}")
        if not (isinstance(backend, str) or callable(backend)):
            raise TypeError(f"backend must be a torch.compile backend name or callable, got {backend!r}")
        for name, value in (("max_widths", max_widths), ("max_width", max_width)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.fm = fm
        self.max_widths = max_widths
        # vmap holds one copy of the activations per column: blocks wider than this are split
        self.max_width = max(2, max_width if max_width is not None else fm.max_batched)
        self._widths: list[int] = []
        self.batches = [check_batch(b, "CompiledHVP batches") for b in as_batch_list(batches)]
        self.mode = mode
        self.backend = backend
        self.verify = bool(verify)
        self.ok = True
        self.reason = ""
        self.compiles = 0
        self.compile_seconds: dict[str, float] = {}
        self.calls = 0
        self._compiled: dict[Any, Callable[..., Tensor]] = {}
        self._verified: set[Any] = set()

    # -- public ------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        """Number of parameters d."""
        return self.fm.dim

    def __call__(self, w: Tensor, V: Tensor) -> Tensor:
        """H V at ``w``: ``V`` of shape (d, m) gives (d, m), (d,) gives (d,). Raises
        :class:`CompileUnavailable` when the compiled path failed (now or before)."""
        out = self.local(w, V)
        return self.fm.reduce(out, self.batches) if self.fm.sharded(self.batches) else out

    def local(self, w: Tensor, V: Tensor) -> Tensor:
        """This process's share of H V (all of it unless the batches are distributed
        :class:`~landscape.functional.Shard` s, whose shares ``__call__`` sums across ranks)."""
        d = self.fm.dim
        if not isinstance(w, Tensor) or w.shape != (d,):
            raise ValueError(f"w must be a flat tensor of the model's {d} parameters, got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if not isinstance(V, Tensor) or V.dim() not in (1, 2) or V.shape[0] != d or V.numel() == 0:
            raise ValueError(f"V must be a ({d},) vector or a ({d}, m) block of vectors with m >= 1, got "
                             f"{tuple(V.shape) if isinstance(V, Tensor) else type(V).__name__}")
        if not self.ok:
            raise CompileUnavailable(self.reason)
        w = w.detach().to(dtype=self.fm.dtype, device=self.fm.device)
        V = V.detach().to(dtype=self.fm.dtype, device=self.fm.device)
        self.calls += 1
        try:
            if V.dim() == 1:
                out = self._local(w, V.contiguous(), "vector")
            else:
                out = self._blocks(w, V)
        except Exception as exc:  # every failure of the compiled path: the caller falls back
            self._fail(exc)
        return out

    def eager(self, w: Tensor, V: Tensor) -> Tensor:
        """The same product without compilation (forward-over-reverse, vmapped over columns)."""
        w = w.detach().to(dtype=self.fm.dtype, device=self.fm.device)
        V = V.detach().to(dtype=self.fm.dtype, device=self.fm.device)
        fn = _function(self.fm, "vector" if V.dim() == 1 else "block")
        out = torch.zeros_like(V)
        with torch.enable_grad(), second_order_kernels():
            for piece, c in self.fm.pieces(self.batches):
                out += c * fn(w, V, tuple(piece)).detach()
        return self.fm.reduce(out, self.batches) if self.fm.sharded(self.batches) else out

    # -- internals ---------------------------------------------------------------------------
    def _blocks(self, w: Tensor, V: Tensor) -> Tensor:
        """H V through block graphs of few widths (see the class docstring)."""
        m = V.shape[1]
        if m == 1:
            # contiguous inputs: dynamo guards on strides, and a strided column would recompile
            return self._local(w, V[:, 0].contiguous(), "vector").unsqueeze(1)
        widths = self._widths
        if m in widths:
            width = m
        elif len(widths) < self.max_widths and m <= self.max_width:
            width = m  # a new width: compile it
            widths.append(m)
        else:
            wider = [k for k in widths if k >= m]
            if not wider:  # split into blocks of the widest compiled width (or max_width)
                step = max(widths) if widths and len(widths) >= self.max_widths else self.max_width
                return torch.cat([self._blocks(w, V[:, j:j + step]) for j in range(0, m, step)], dim=1)
            width = min(wider)
        if width > m:  # zero columns cost products but no new graph
            V = torch.cat([V, V.new_zeros(V.shape[0], width - m)], dim=1)
        return self._local(w, V.contiguous(), "block")[:, :m]

    def _local(self, w: Tensor, V: Tensor, kind: str) -> Tensor:
        """This process's share of H V, chunk by chunk through the compiled function of ``kind``."""
        out = torch.zeros_like(V)
        for piece, c in self.fm.pieces(self.batches):
            piece = tuple(piece)  # a plain tuple: dynamo need not trace a tuple subclass (Shard)
            sig = tuple((tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t).__name__ for t in piece)
            fn = self._compiled.get((kind, sig))
            if fn is None:
                fn = self._compile(kind, sig)
            before, t0 = _graphs(), time.perf_counter()
            with torch.enable_grad(), second_order_kernels():
                hv = fn(w, V, piece).detach()
            new = _graphs() - before
            if new:
                self.compiles += new
                self.compile_seconds[f"{kind}{tuple(V.shape)}"] = time.perf_counter() - t0
            key = (kind, tuple(V.shape), sig)
            if self.verify and key not in self._verified:
                self._check(hv, w, V, piece, kind)
                self._verified.add(key)
            out += c * hv
        return out

    def _check(self, hv: Tensor, w: Tensor, V: Tensor, piece: Batch, kind: str) -> None:
        with torch.enable_grad(), second_order_kernels():
            ref = _function(self.fm, kind)(w, V, piece).detach()
        scale = float(ref.abs().max())
        err = float((hv - ref).abs().max()) / scale if scale > 0 else float(hv.abs().max())
        tol = _VERIFY_TOL.get(self.fm.dtype, 5e-2)
        if not err <= tol:  # also catches NaN
            raise CompileUnavailable(
                f"the compiled product disagrees with the eager one (relative difference {err:.2e} > {tol:.0e}); "
                "the compiled path is not used")

    def _compile(self, kind: str, sig: Any) -> Callable[..., Tensor]:
        ok, why = compile_available(self.fm.device)
        if not ok:
            raise CompileUnavailable(why)
        backend = self.backend if isinstance(self.backend, str) else id(self.backend)
        fn = _function(self.fm, kind, (sig, backend, self.mode))
        options: dict[str, Any] = {} if self.mode is None else {"mode": self.mode}
        # static shapes: a new shape is a new graph (few, see the class docstring), never a
        # dynamic-shape graph that is slower for every shape
        compiled = torch.compile(fn, backend=self.backend, dynamic=False, **options)
        self._compiled[(kind, sig)] = compiled
        return compiled

    def _fail(self, exc: BaseException) -> NoReturn:
        reason = _describe(exc)
        self.ok = False
        self.reason = reason
        warnings.warn(f"torch.compile of the Hessian-vector product failed ({reason}); the eager route is used "
                      "instead", RuntimeWarning, stacklevel=4)
        raise CompileUnavailable(reason) from exc


def _describe(exc: BaseException) -> str:
    """One line saying what failed: dynamo's wrapper errors name the backend's own error inside."""
    if isinstance(exc, CompileUnavailable):
        return str(exc)
    inner = getattr(exc, "inner_exception", None) or (exc.__cause__ if "Backend" in type(exc).__name__ else None)
    parts = [type(exc).__name__]
    for e in ([inner] if inner is not None else []) + [exc]:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if e is inner:
            parts.append(f"{type(e).__name__}: {lines[0] if lines else ''}")
            break
        if lines:
            parts.append(lines[0])
    return ": ".join(parts)[:500]
