"""CompiledHVP: torch.compile'd Hessian-vector products, against double backward and a dense
float64 Hessian, without recompiling; and its fallback when compilation fails."""
from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape.compiled as compiled_mod
from landscape.compiled import CompiledHVP, CompileUnavailable, compile_available
from landscape.functional import FunctionalModel, HessianOperator
from landscape.models import DigitsMLP
from tests._helpers import digits

pytestmark = pytest.mark.usefixtures("one_thread")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _tiny64() -> tuple[FunctionalModel, torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A float64 two-layer tanh net (d = 39), a batch of 20, and its dense Hessian from
    torch.autograd.functional.hessian (no HVP code involved)."""
    torch.manual_seed(3)
    model = _Tiny().double()
    fm = FunctionalModel(model, F.cross_entropy)
    gen = torch.Generator().manual_seed(3)
    batch = (torch.randn(20, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (20,), generator=gen))
    w = fm.flat_params()
    H = torch.autograd.functional.hessian(lambda x: fm.loss(x, batch), w)
    return fm, w, batch, H


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _need_compile() -> None:
    ok, why = compile_available()
    if not ok:
        pytest.skip(f"torch.compile unavailable here: {why}")


# Inductor compiles (10-30 s each on 2 busy cores): two in this file, one graph per test. The
# single-vector graph is tested on the float32 digits MLP, the block graph on the float64 net.


@pytest.mark.slow
def test_float32_vector_equals_double_backward_without_recompiling() -> None:
    _need_compile()
    (X, y), _ = digits()
    torch.manual_seed(0)
    fm = FunctionalModel(DigitsMLP(hidden=8).eval(), F.cross_entropy)
    batch = (X[:64], y[:64])
    gen = torch.Generator().manual_seed(0)
    w0 = fm.flat_params() + 0.1 * torch.randn(fm.dim, generator=gen)  # a generic point, not the init
    chvp = CompiledHVP(fm, batch)
    v = torch.randn(fm.dim, generator=gen)
    hv = chvp(w0, v)
    assert hv.shape == (fm.dim,) and hv.dtype == torch.float32
    assert _rel(hv, HessianOperator(fm, w0, batch, "double_backward").matvec(v)) < 1e-5  # float32 rounding (2e-7 seen)
    assert chvp.ok and chvp.reason == "" and chvp.compiles == 1
    assert list(chvp.compile_seconds) == [f"vector({fm.dim},)"]
    graphs = _graphs()
    for _ in range(2):  # new points, new vectors: the same graph gives the Hessian at each point
        w = w0 + 0.05 * torch.randn(fm.dim, generator=gen)
        op = HessianOperator(fm, w, batch, "double_backward")
        V = torch.randn(fm.dim, 2, generator=gen)
        assert _rel(chvp(w, V[:, 1]), op.matvec(V[:, 1])) < 1e-5  # a strided column: made contiguous inside
        assert _rel(chvp(w, V[:, :1]), op.matvec(V[:, 0]).unsqueeze(1)) < 1e-5  # (d, 1): the vector graph
    # another instance, on other examples of the same shapes, reuses the model's graph
    other_batch = (X[64:128], y[64:128])
    other = CompiledHVP(fm, other_batch)
    assert _rel(other(w0, v), HessianOperator(fm, w0, other_batch, "double_backward").matvec(v)) < 1e-5
    assert _graphs() == graphs and chvp.compiles == 1 and other.compiles == 0


@pytest.mark.slow
def test_float64_block_against_dense_hessian_and_double_backward() -> None:
    _need_compile()
    fm, w, batch, H = _tiny64()
    assert torch.allclose(H, H.T, atol=1e-14)
    chvp = CompiledHVP(fm, batch)
    gen = torch.Generator().manual_seed(4)
    V = torch.randn(fm.dim, 3, generator=gen, dtype=torch.float64)
    HV = chvp(w, V)
    assert HV.shape == (fm.dim, 3) and HV.dtype == torch.float64
    assert _rel(HV, H @ V) < 1e-10
    assert chvp.compiles == 1 and list(chvp.compile_seconds) == [f"block({fm.dim}, 3)"]
    graphs = _graphs()
    for m in (3, 3):  # same width, new points: no new graph
        w2 = w + 0.1 * torch.randn(fm.dim, generator=gen, dtype=torch.float64)
        op = HessianOperator(fm, w2, batch, "double_backward")
        V = torch.randn(fm.dim, m, generator=gen, dtype=torch.float64)
        ref = torch.stack([op.matvec(V[:, j]) for j in range(m)], dim=1)
        assert _rel(chvp(w2, V), ref) < 1e-10
    assert _graphs() == graphs and chvp.compiles == 1 and chvp.ok


def test_chunks_and_batches_accumulate_to_the_mean_hessian() -> None:
    """Several batches and chunk_size pieces sum to the example-weighted mean's Hessian
    (dynamo's eager backend: the tracing and the accumulation, without inductor's compile time)."""
    fm, w, batch, H = _tiny64()
    X, Y = batch
    batches = [(X[:12], Y[:12]), (X[12:], Y[12:])]  # 12 + 8 examples: weights 0.6 and 0.4
    fm.set_chunk_size(4)  # pieces of 4: 3 + 2, one shape
    chvp = CompiledHVP(fm, batches, backend="eager")
    V = torch.randn(fm.dim, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert _rel(chvp(w, V), H @ V) < 1e-10
    assert _rel(chvp(w, V[:, 0]), H @ V[:, 0]) < 1e-10
    assert _rel(chvp.eager(w, V), H @ V) < 1e-10
    assert chvp.ok and chvp.compiles == 2  # one vector and one block graph, shared by the 5 pieces


def test_block_widths_compiled_padded_and_split() -> None:
    """The first max_widths widths get a graph; others are padded or split, with the same products."""
    fm, w, batch, H = _tiny64()
    chvp = CompiledHVP(fm, batch, backend="eager", max_widths=2, max_width=6)
    V = torch.randn(fm.dim, 15, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for m, graphs in ((2, 1), (5, 2), (3, 2), (4, 2), (15, 2), (2, 2)):
        # 2 and 5 compile; 3 and 4 are padded to 5; 15 is split into 5 + 5 + 5
        assert _rel(chvp(w, V[:, :m]), H @ V[:, :m]) < 1e-10, m
        assert chvp.compiles == graphs, m
    assert chvp._widths == [2, 5]
    wide = CompiledHVP(fm, batch, backend="eager", max_widths=2, max_width=6)
    assert _rel(wide(w, V[:, :8]), H @ V[:, :8]) < 1e-10  # wider than max_width: 6 + 2
    assert wide._widths == [6, 2]
    with pytest.raises(ValueError, match="max_widths"):
        CompiledHVP(fm, batch, max_widths=0)


# -- the fallback ------------------------------------------------------------------------------


def _small() -> tuple[FunctionalModel, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    fm, w, batch, _ = _tiny64()
    return fm, batch, w, torch.ones(fm.dim, dtype=torch.float64)


def _fails_once(chvp: CompiledHVP, w: torch.Tensor, v: torch.Tensor, match: str) -> None:
    """First call: one RuntimeWarning naming the reason and the eager route, CompileUnavailable;
    later calls: CompileUnavailable again, no new warning, no new attempt."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CompileUnavailable, match=match):
            chvp(w, v)
        with pytest.raises(CompileUnavailable, match=match):
            chvp(w, v.unsqueeze(1))
    ours = [c for c in caught if issubclass(c.category, RuntimeWarning) and "eager route" in str(c.message)]
    assert len(ours) == 1, [str(c.message) for c in caught]
    assert re.search(match, str(ours[0].message))
    assert chvp.ok is False and chvp.reason
    assert isinstance(CompileUnavailable(chvp.reason), RuntimeError)  # callers may catch RuntimeError


def test_backend_error_falls_back() -> None:
    fm, batch, w, v = _small()

    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("C++ compile error: g++ exited with status 1")

    chvp = CompiledHVP(fm, batch, backend=broken)
    _fails_once(chvp, w, v, "g\\+\\+ exited")
    assert "g++ exited" in chvp.reason


def test_torch_compile_raising_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    fm, batch, w, v = _small()

    def no_compile(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", no_compile)
    chvp = CompiledHVP(fm, batch)
    _fails_once(chvp, w, v, "not supported on this platform")


def test_no_compiler_falls_back_without_trying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled_mod, "_AVAILABLE", {})
    monkeypatch.setattr(compiled_mod.shutil, "which", lambda name: None)
    monkeypatch.setattr(compiled_mod, "_is_file", lambda path: False)
    ok, why = compile_available("cpu")
    assert ok is False and "C++ compiler" in why

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("torch.compile called although no compiler is available")

    monkeypatch.setattr(torch, "compile", must_not_run)
    fm, batch, w, v = _small()
    chvp = CompiledHVP(fm, batch)
    _fails_once(chvp, w, v, "C\\+\\+ compiler")


def test_wrong_compiled_result_is_rejected() -> None:
    """A backend whose code computes something else: the first product's check catches it."""
    fm, batch, w, v = _small()

    def doubling(gm: Any, example_inputs: Any) -> Any:
        def run(*args: Any) -> Any:
            out = gm(*args)
            return type(out)(o * 2 if isinstance(o, torch.Tensor) else o for o in out)
        return run

    chvp = CompiledHVP(fm, batch, backend=doubling)
    _fails_once(chvp, w, v, "disagrees")


def test_compile_available_here_and_bad_input() -> None:
    ok, why = compile_available()
    assert isinstance(ok, bool) and isinstance(why, str) and (ok or why)
    fm, batch, w, v = _small()
    with pytest.raises(TypeError, match="FunctionalModel"):
        CompiledHVP(_Tiny(), batch)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        CompiledHVP(fm, batch, mode="fastest")
    with pytest.raises(ValueError, match="batch"):
        CompiledHVP(fm, [])
    chvp = CompiledHVP(fm, batch, backend="eager")
    with pytest.raises(ValueError, match=f"\\({fm.dim},\\)"):
        chvp(w, torch.ones(fm.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat tensor"):
        chvp(w[:-1], v)
    with pytest.raises(ValueError, match="m >= 1"):
        chvp(w, torch.ones(fm.dim, 0, dtype=torch.float64))
    assert chvp.ok  # a caller's mistake is not a compile failure


# -- the operator's route "compiled" ----------------------------------------------------------


def test_operator_route_compiled_equals_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    # dynamo's "eager" backend: the same traced, vmapped forward-over-reverse, without inductor's
    # compile time (inductor itself is checked above)
    monkeypatch.setattr(compiled_mod, "CompiledHVP",
                        lambda fm, batches: CompiledHVP(fm, batches, backend="eager"))
    fm, w, batch, H = _tiny64()
    V = torch.randn(fm.dim, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = HessianOperator(fm, w, batch, "double_backward")
    op = HessianOperator(fm, w, batch, "compiled")
    assert op.route == "compiled"
    torch.testing.assert_close(op.matvec(V[:, 0]), ref.matvec(V[:, 0]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.gradient(), ref.gradient(), rtol=1e-12, atol=1e-14)
    assert op.matvecs == 4
    w2 = w + 0.1
    op2 = HessianOperator(fm, w2, batch, "compiled")  # another point: the run's instance, reused
    torch.testing.assert_close(op2.matmat(V), HessianOperator(fm, w2, batch).matmat(V), rtol=1e-10, atol=1e-12)
    assert len(fm._compiled) == 1 and next(iter(fm._compiled.values())).calls == 3


def test_operator_route_compiled_falls_back_to_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compile(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("torch.compile is not supported on this platform")

    monkeypatch.setattr(torch, "compile", no_compile)
    fm, w, batch, H = _tiny64()
    v = torch.ones(fm.dim, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = HessianOperator(fm, w, batch, "compiled")
        hv = op.matvec(v)
        again = HessianOperator(fm, w, batch, "compiled")  # knows it failed: no new attempt, no new warning
        hv2 = again.matvec(v)
    assert op.route == "double_backward" and again.route == "double_backward"
    torch.testing.assert_close(hv, H @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(hv2, H @ v, rtol=1e-10, atol=1e-12)
    assert len([c for c in caught if "eager route" in str(c.message)]) == 1


def test_probes_take_the_compiled_route_and_reject_unknown_ones() -> None:
    from probes import HessianSpectrum

    assert HessianSpectrum(every=1, route="compiled").route == "compiled"
    with pytest.raises(ValueError, match="route must be one of"):
        HessianSpectrum(every=1, route="jit")  # type: ignore[arg-type]
