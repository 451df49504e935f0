"""Large-model paths of the functional core: probe batches evaluated in chunks (bounded
activation memory) give the same loss, gradient, Hessian products and probe values as whole
batches; batches with keyword inputs (a mapping, as Hugging Face models take them) are the same
function as positional ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape
from landscape.data import load_digits
from landscape.functional import FunctionalModel, HessianOperator, check_batch, probe_guard
from landscape.models import DigitsCNN, DigitsMLP
from probes import GradientNoise, HessianSpectrum, HessianTrace, RestrictedSecant, Sharpness

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return (DigitsMLP(hidden=8) if kind == "mlp" else DigitsCNN(channels=4)).double()


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    X, y = load_digits(torch.float64)
    return [(X[:50], y[:50]), (X[50:130], y[50:130])]  # unequal sizes: the weighting matters


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_chunked_evaluation_equals_whole_batches(kind: str) -> None:
    model = _model(kind)
    whole, chunked = FunctionalModel(model, F.cross_entropy), FunctionalModel(model, F.cross_entropy)
    chunked.set_chunk_size(16)
    assert len(chunked.pieces(_batches())) == 4 + 5
    w = whole.flat_params()
    V = torch.randn(whole.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with probe_guard(model):  # BN in eval mode: examples are independent, so chunks are exact
        l0, g0 = whole.loss_and_grad(w, _batches())
        l1, g1 = chunked.loss_and_grad(w, _batches())
        op0, op1 = whole.hessian_operator(w, _batches()), chunked.hessian_operator(w, _batches())
        assert op0.route == "double_backward" and op1.route == "chunked"
        torch.testing.assert_close(l1, l0, rtol=1e-12, atol=0)
        torch.testing.assert_close(g1, g0, rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(op1.matmat(V), op0.matmat(V), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(op1.matvec(V[:, 0]), op0.matvec(V[:, 0]), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(op1.gradient(), g0, rtol=1e-11, atol=1e-14)
        assert float(op1.loss) == pytest.approx(float(l0), rel=1e-12)
        points = lambda lo, hi: w + 0.01 * V.T[lo:hi]  # noqa: E731
        np.testing.assert_allclose(chunked.losses(points, 3, _batches(), batched=False),
                                   whole.losses(points, 3, _batches(), batched=False), rtol=1e-12)
    assert op1.matvecs == 4


def test_chunked_hvp_against_finite_differences() -> None:
    model = _model("mlp")
    fm = FunctionalModel(model, F.cross_entropy)
    fm.set_chunk_size(7)
    w = fm.flat_params()
    v = torch.randn(fm.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eps = 1e-5
    fd = (fm.grad(w + eps * v, _batches()) - fm.grad(w - eps * v, _batches())) / (2 * eps)
    torch.testing.assert_close(HessianOperator(fm, w, _batches()).matvec(v), fd, rtol=1e-6, atol=1e-9)


def test_chunk_size_is_validated() -> None:
    fm = FunctionalModel(_model("mlp"), F.cross_entropy)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            fm.set_chunk_size(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="route must be"):
        HessianOperator(fm, fm.flat_params(), _batches(), route="sideways")  # type: ignore[arg-type]


def _record(tmp_path, name: str, chunk: int | None) -> "landscape.Recorder":
    torch.manual_seed(0)
    model = DigitsMLP(hidden=8).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X, y = load_digits(torch.float64)
    probes = [RestrictedSecant(every=2, samples=2), HessianSpectrum(every=3, k=2), HessianTrace(every=3, matvecs=9),
              GradientNoise(every=3, samples=2), Sharpness(every=3, kinds=("average", "sam"), noise_samples=4)]
    with landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(X[:400], y[:400]), probe_batch_size=100,
                          probes=probes, store=tmp_path / f"{name}.zarr", probe_chunk_size=chunk) as rec:
        for t in range(7):
            opt.zero_grad()
            F.cross_entropy(model(X[t * 32:(t + 1) * 32]), y[t * 32:(t + 1) * 32]).backward()
            opt.step()
    return rec


def test_probe_chunk_size_changes_no_number(tmp_path) -> None:
    a = _record(tmp_path, "whole", None).dataset().load()
    b = _record(tmp_path, "chunked", 30).dataset().load()
    assert a.attrs["probe_errors"] == {} and b.attrs["probe_errors"] == {}
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if x.dtype.kind == "f":
            np.testing.assert_allclose(y, x, rtol=1e-9, atol=1e-12, err_msg=name)


class _Keywords(nn.Module):
    """A model called with keyword inputs, like Hugging Face models."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DigitsMLP(hidden=8)

    def forward(self, pixels: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.net(pixels * scale)


def test_keyword_inputs_are_the_same_function() -> None:
    torch.manual_seed(0)
    kw = _Keywords().double()
    pos = FunctionalModel(kw.net, F.cross_entropy)
    named = FunctionalModel(kw, F.cross_entropy)
    w = pos.flat_params()
    tuples = _batches()
    dicts = [({"pixels": x, "scale": 1.0}, y) for x, y in tuples]
    torch.testing.assert_close(named.loss_and_grad(w, dicts)[1], pos.loss_and_grad(w, tuples)[1], rtol=1e-13, atol=0)
    v = torch.randn(pos.dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(named.hvp(w, dicts, v), pos.hvp(w, tuples, v), rtol=1e-12, atol=1e-14)
    rows = torch.cat(list(named.per_sample_grads(w, dicts[0], chunk=16)))
    ref = torch.cat(list(pos.per_sample_grads(w, tuples[0])))
    torch.testing.assert_close(rows, ref, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"dict batch: pass \(inputs_dict, target\)"):
        check_batch({"pixels": tuples[0][0], "labels": tuples[0][1]})
    with pytest.raises(ValueError, match="disagree on the batch size"):
        check_batch(({"pixels": tuples[0][0]}, tuples[1][1]))
