"""Layer 1 (functional model, HVP, guard, probe batches), the schedule and the Gaussian sketch,
checked against ground truth: dense float64 Hessians, finite differences, the live module's
autograd, closed-form statistics of the sketch, and property-based invariants."""
from __future__ import annotations

import math
from functools import lru_cache
from itertools import count as _count

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, TensorDataset

from landscape.data import load_digits
from landscape.functional import (
    FunctionalModel,
    draw_batches,
    probe_guard,
    set_probe_modes,
    trainable_parameters,
)
from landscape.linalg import GaussianSketch
from landscape.models import DigitsCNN, DigitsMLP, TinyTransformer
from landscape.schedule import Schedule
from tests._helpers import own_loss

# float64 everywhere below: products agree with the dense Hessian to ~1e-15 relative, so 1e-10
# leaves five orders of margin for summation order while still catching any real error.
RTOL64 = 1e-10


pytestmark = pytest.mark.usefixtures("one_thread")


# -- shared pieces -----------------------------------------------------------------------------


@lru_cache(maxsize=2)
def _digits(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    return load_digits(dtype)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two probe batches of unequal sizes (12 and 20), so the example weighting matters."""
    X, y = _digits()
    return [(X[:12], y[:12]), (X[12:32], y[12:32])]


def _concat(batches):
    return tuple(torch.cat(parts) for parts in zip(*batches))


def _make_model(name: str) -> nn.Module:
    """A small float64 model in probe (eval) modes; BN running stats warmed so eval-mode BN is
    a non-trivial affine map. The global RNG is left untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "mlp":
            model = DigitsMLP(hidden=8)
        elif name == "cnn":
            model = DigitsCNN(channels=4)
        else:
            model = TinyTransformer(width=8, heads=2)
        model = model.double()
        X, _ = _digits()
        model.train()
        with torch.no_grad():
            model(X[100:164])  # BN: running stats move away from (0, 1)
    set_probe_modes(model, "eval")
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _dense_hessian(fm: FunctionalModel, w: torch.Tensor, batches) -> torch.Tensor:
    # The math SDPA kernel is forced only for the reference: the CPU flash-attention kernel has
    # no double backward, and on the MLP/CNN this context changes nothing.
    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(lambda v: fm.loss(v, batches), w, vectorize=True)
    return H


class _Setup:
    def __init__(self, name: str) -> None:
        self.model = _make_model(name)
        self.fm = FunctionalModel(self.model, F.cross_entropy)
        self.batches = _batches()
        self.live = {k: v.clone() for k, v in self.model.state_dict().items()}
        gen = torch.Generator().manual_seed(1)
        # Evaluate away from the live parameters: the functional path must not read them.
        self.w = self.fm.flat_params() + 0.05 * torch.randn(self.fm.dim, generator=gen, dtype=torch.float64)
        self.H = _dense_hessian(self.fm, self.w, self.batches)
        self.v = torch.randn(self.fm.dim, generator=gen, dtype=torch.float64)
        self.V = torch.randn(self.fm.dim, 5, generator=gen, dtype=torch.float64)


@lru_cache(maxsize=None)
def _setup(name: str) -> _Setup:
    return _Setup(name)


MODELS = ["mlp", "cnn", "transformer"]


def test_model_sizes_keep_dense_hessians_cheap():
    dims = {name: FunctionalModel(_make_model(name), F.cross_entropy).dim for name in MODELS}
    assert all(300 < d < 2000 for d in dims.values()), dims


# -- 1. gradient and HVP against ground truth --------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_grad_matches_live_autograd_and_finite_differences(name):
    s = _setup(name)
    model, fm = s.model, s.fm
    X, y = _concat(s.batches)
    w0 = fm.flat_params()
    # (a) the live module's own backward on the concatenated batch, at the live parameters
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(X), y).backward()
    live_grad = fm.flat_grad()
    model.zero_grad(set_to_none=True)
    assert _rel(fm.grad(w0, s.batches), live_grad) < 1e-12
    # (b) central differences of the loss along random directions, at a point away from the live
    # parameters. Error ~ h^2 L''' + eps L / h ~ 1e-10: tolerance 1e-7 of |g||v|.
    g = fm.grad(s.w, s.batches)
    gen = torch.Generator().manual_seed(2)
    h = 1e-6
    for _ in range(3):
        v = torch.randn(fm.dim, generator=gen, dtype=torch.float64)
        v /= v.norm()
        fd = (fm.loss(s.w + h * v, s.batches) - fm.loss(s.w - h * v, s.batches)) / (2 * h)
        assert abs(float(fd) - float(g @ v)) < 1e-7 * float(g.norm())
    value, g2 = fm.loss_and_grad(s.w, s.batches)
    assert torch.equal(g2, g)
    assert float(value) == pytest.approx(float(fm.loss(s.w, s.batches)), rel=1e-14)


@pytest.mark.parametrize("name", MODELS)
def test_dense_hessian_reference_matches_finite_differences_of_grad(name):
    """The reference itself, checked independently: H v against central differences of the
    (autograd-validated) gradient."""
    s = _setup(name)
    assert _rel(s.H, s.H.T) < 1e-13
    h = 1e-5
    for j in range(2):
        v = s.V[:, j] / s.V[:, j].norm()
        fd = (s.fm.grad(s.w + h * v, s.batches) - s.fm.grad(s.w - h * v, s.batches)) / (2 * h)
        assert _rel(fd, s.H @ v) < 1e-6


@pytest.mark.parametrize("route", ["double_backward", "fwd_rev"])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_hvp_matches_dense_hessian(name, route):
    s = _setup(name)
    op = s.fm.hessian_operator(s.w, s.batches, route=route)
    assert op.shape == (s.fm.dim, s.fm.dim) and op.route == route
    assert _rel(op.matvec(s.v), s.H @ s.v) < RTOL64
    assert _rel(op(s.v), s.H @ s.v) < RTOL64  # __call__, and the graph survives reuse
    HV = op.matmat(s.V)
    assert HV.shape == s.V.shape
    assert _rel(HV, s.H @ s.V) < RTOL64
    assert op.matvecs == 2 + s.V.shape[1]
    assert _rel(s.fm.hvp(s.w, s.batches, s.v, route=route), s.H @ s.v) < RTOL64
    # nothing was written to the live module
    for k, t in s.model.state_dict().items():
        assert torch.equal(t, s.live[k]), k
    assert all(p.grad is None for p in s.model.parameters())


@pytest.mark.parametrize("route", ["double_backward", "fwd_rev"])
def test_hvp_transformer_matches_dense_hessian(route):
    """With the default attention kernels, as a user gets them. On torch 2.13 CPU the flash
    SDPA kernel has neither a double backward nor forward-mode AD, so this fails on both routes
    unless HessianOperator selects a differentiable attention kernel itself."""
    s = _setup("transformer")
    op = s.fm.hessian_operator(s.w, s.batches, route=route)
    assert _rel(op.matvec(s.v), s.H @ s.v) < RTOL64
    assert _rel(op.matmat(s.V), s.H @ s.V) < RTOL64


@pytest.mark.parametrize("route", ["double_backward", "fwd_rev"])
def test_hvp_transformer_matches_dense_hessian_with_math_attention(route):
    """The same with the math SDPA kernel forced: both routes are exact once attention is
    twice differentiable."""
    s = _setup("transformer")
    with sdpa_kernel(SDPBackend.MATH):
        op = s.fm.hessian_operator(s.w, s.batches, route=route)
        assert _rel(op.matvec(s.v), s.H @ s.v) < RTOL64
        assert _rel(op.matmat(s.V), s.H @ s.V) < RTOL64


def test_hvp_auto_route_and_argument_errors():
    s = _setup("mlp")
    op = s.fm.hessian_operator(s.w, s.batches)
    assert op.route == "double_backward"
    # a float32 vector is promoted to the operator's dtype
    assert _rel(op.matvec(s.v.float()), s.H @ s.v.float().double()) < RTOL64
    with pytest.raises(ValueError, match="route must be"):
        s.fm.hessian_operator(s.w, s.batches, route="finite_differences")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"matmat expects a \(682, m\) matrix"):
        op.matmat(s.v)
    with pytest.raises(ValueError, match="matmat expects"):
        op.matmat(s.V[:-1])


# -- 2. several batches = one concatenated batch -----------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_multi_batch_loss_is_example_weighted_mean(name):
    s = _setup(name)
    big = _concat(s.batches)
    X, y = big
    with torch.no_grad():
        ref = float(F.cross_entropy(s.model(X), y))  # the live module (eval) at its own parameters
    w0 = s.fm.flat_params()
    assert float(s.fm.loss(w0, s.batches)) == pytest.approx(ref, rel=1e-13)
    assert float(s.fm.loss(w0, big)) == pytest.approx(ref, rel=1e-13)
    # the plain mean of per-batch means is different: the check above discriminates
    plain = 0.5 * sum(float(s.fm.loss(w0, b)) for b in s.batches)
    assert abs(plain - ref) > 1e-6
    # same for gradient and Hessian products, at a point away from the live parameters
    assert _rel(s.fm.grad(s.w, s.batches), s.fm.grad(s.w, big)) < 1e-12
    hv_multi = s.fm.hessian_operator(s.w, s.batches).matvec(s.v)
    hv_big = s.fm.hessian_operator(s.w, big).matvec(s.v)
    assert _rel(hv_multi, hv_big) < 1e-12


# -- 3. the guard -----------------------------------------------------------------------------


def _guard_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DigitsCNN(channels=4)
    X, y = _digits(torch.float32)
    X, y = X[:16], y[:16]
    model.train()
    with torch.no_grad(), torch.random.fork_rng():
        model(X)  # running stats away from their defaults
    model.features[1].eval()  # a mix of flags, each must come back as it was
    return model, X, y


@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_probe_guard_restores_modes_buffers_rng_and_grads(bn_mode):
    model, X, y = _guard_model()
    flags = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(3)
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen) if i % 2 == 0 else None
    grad_objs = [p.grad for p in params]
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    expected_next = torch.randn(5)
    torch.set_rng_state(rng)

    with probe_guard(model, bn_mode):
        for n, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.training == (bn_mode == "train"), n
            else:
                assert not m.training, n  # Dropout included
        if bn_mode == "train":
            # batch statistics, and the running ones stay put (no in-place update to undo)
            model(X)
            assert torch.equal(model.features[1].running_mean, buffers["features.1.running_mean"])
        model.train()  # probe code that switches modes itself: its writes are undone too
        out = model(X)  # BN train-mode forward: running stats move; dropout draws from the RNG
        if bn_mode == "eval":
            assert not torch.equal(model.features[1].running_mean, buffers["features.1.running_mean"])
            assert int(model.features[1].num_batches_tracked) == int(buffers["features.1.num_batches_tracked"]) + 1
        torch.randn(1000)
        torch.rand(7)
        for p in params:
            p.grad = torch.zeros_like(p)
        assert out.shape == (16, 10)

    assert {n: m.training for n, m in model.named_modules()} == flags
    for n, b in model.named_buffers():
        assert b.dtype == buffers[n].dtype
        assert b.numpy().tobytes() == buffers[n].numpy().tobytes(), n  # bitwise
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(torch.randn(5), expected_next)
    assert all(p.grad is g for p, g in zip(params, grad_objs))


def test_probe_guard_restores_grad_values_after_backward_inside():
    """A backward inside the guard accumulates into the existing ``.grad`` tensors in place;
    restoring the same objects is not enough, their values must come back too."""
    model, X, y = _guard_model()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(4)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    grad_objs = [p.grad for p in params]
    grad_vals = [g.clone() for g in grad_objs]
    with probe_guard(model, "eval"):
        F.cross_entropy(model(X), y).backward()
    assert all(p.grad is g for p, g in zip(params, grad_objs))
    changed = [n for (n, p), v in zip(model.named_parameters(), grad_vals) if not torch.equal(p.grad, v)]
    assert changed == [], f".grad values left modified by the probe: {changed}"


def test_probe_guard_restores_on_exception_and_rejects_bad_mode():
    model, X, _ = _guard_model()
    flags = {n: m.training for n, m in model.named_modules()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="probe failed"):
        with probe_guard(model, "train"):
            model(X)
            torch.randn(3)
            raise RuntimeError("probe failed")
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="bn_mode must be 'eval' or 'train'"):
        with probe_guard(model, "inference"):  # type: ignore[arg-type]
            pass
    assert {n: m.training for n, m in model.named_modules()} == flags


# -- 4. probe batches -------------------------------------------------------------------------


def test_draw_batches_from_shuffled_loader_leaves_global_rng_alone():
    X, y = _digits(torch.float32)
    loader = DataLoader(TensorDataset(X[:200], y[:200]), batch_size=10, shuffle=True)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    batches = draw_batches(loader, 3)
    assert torch.equal(torch.get_rng_state(), before)
    assert len(batches) == 3
    assert all(isinstance(b, tuple) and b[0].shape == (10, 1, 8, 8) and b[1].shape == (10,) for b in batches)


def test_draw_batches_stops_after_count_on_endless_iterable():
    X, y = _digits(torch.float32)
    endless = ((X[i:i + 4], y[i:i + 4]) for i in _count(0, 4))
    batches = draw_batches(endless, 3)
    assert len(batches) == 3
    assert torch.equal(batches[2][0], X[8:12])


def test_draw_batches_from_pair_is_seeded_disjoint_and_aligned():
    n = 50
    X = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    Y = torch.arange(n) * 10
    rng = torch.get_rng_state()
    a = draw_batches((X, Y), 5, batch_size=7, seed=11)
    assert torch.equal(torch.get_rng_state(), rng)
    b = draw_batches((X, Y), 5, batch_size=7, seed=11)
    c = draw_batches((X, Y), 5, batch_size=7, seed=12)
    assert len(a) == 5
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == (7, 1) and ya.shape == (7,)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)  # deterministic
        assert torch.equal(ya, xa[:, 0].long() * 10)  # rows of X and Y stay paired
    seen = torch.cat([xa[:, 0] for xa, _ in a])
    assert len(set(seen.tolist())) == 35  # disjoint
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))  # the seed matters
    # default batch size: n // count
    assert [bx.shape[0] for bx, _ in draw_batches([X, Y], 4, seed=0)] == [12] * 4


def test_draw_batches_list_passthrough():
    X, y = _digits(torch.float32)
    src = [(X[:5], y[:5]), [X[5:9], y[5:9]], (X[9:12], y[9:12])]
    out = draw_batches(src, 2)
    assert len(out) == 2 and torch.equal(out[1][0], X[5:9]) and isinstance(out[1], tuple)


class _DictData(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return {"x": self.X[i], "y": self.y[i]}


def test_draw_batches_errors():
    X, y = _digits(torch.float32)
    with pytest.raises(ValueError, match="probe_data is required"):
        draw_batches(None, 1)
    with pytest.raises(ValueError, match="at least one probe batch"):
        draw_batches((X, y), 0)
    # empty data in every form
    with pytest.raises(ValueError, match=r"empty \(0 examples\)"):
        draw_batches((X[:0], y[:0]), 1)
    with pytest.raises(ValueError, match="empty: it yielded no batch"):
        draw_batches([], 1)
    with pytest.raises(ValueError, match="empty: it yielded no batch"):
        draw_batches(DataLoader(TensorDataset(X[:0], y[:0]), batch_size=4), 1)
    with pytest.raises(ValueError, match=r"a batch is empty \(batch size 0\)"):
        draw_batches([(X[:0], y[:0])], 1)
    # malformed batches
    with pytest.raises(ValueError, match=r"must be a tuple \(inputs..., target\).*got dict"):
        draw_batches(DataLoader(_DictData(X[:20], y[:20]), batch_size=4), 2)
    with pytest.raises(ValueError, match=r"must be a tuple \(inputs..., target\).*got dict"):
        draw_batches([{"x": X[:4], "y": y[:4]}], 1)
    with pytest.raises(ValueError, match=r"must be a tuple \(inputs..., target\).*got Tensor"):
        draw_batches(X[:20], 2)  # a single tensor, no targets
    with pytest.raises(ValueError, match=r"must be a tuple \(inputs..., target\).*length 1"):
        draw_batches([(X[:4],)], 1)
    with pytest.raises(ValueError, match="must contain tensors with a leading batch dimension"):
        draw_batches([(1.0, 2.0)], 1)
    with pytest.raises(ValueError, match="must be a list of"):
        draw_batches(42, 1)
    # too few
    with pytest.raises(ValueError, match="has 2 batches but the probes need 3"):
        draw_batches([(X[:4], y[:4]), (X[4:8], y[4:8])], 3)
    with pytest.raises(ValueError, match="has 2 batches but the probes need 3"):
        draw_batches(DataLoader(TensorDataset(X[:8], y[:8]), batch_size=4), 3)
    with pytest.raises(ValueError, match="has 10 examples, too few for 3 batches of 4"):
        draw_batches((X[:10], y[:10]), 3, batch_size=4)
    # mismatched batch sizes inside a batch
    with pytest.raises(ValueError, match=r"disagree on the batch size: \[4, 5\]"):
        draw_batches([(X[:5], y[:4])], 1)


def test_draw_batches_pair_with_mismatched_lengths_says_so():
    """(X, Y) with len(X) != len(Y) is a user error about sizes; the message must say that
    (not that each batch must be a tuple)."""
    X, y = _digits(torch.float32)
    with pytest.raises(ValueError, match=r"(?i)disagree|mismatch|differ|same number"):
        draw_batches((X[:30], y[:29]), 2)


# -- 5. trainable parameters -----------------------------------------------------------------


def test_trainable_parameters_selection_and_errors():
    model = DigitsMLP(hidden=8)
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in trainable_parameters(model)] == names
    model.net[1].weight.requires_grad_(False)
    assert [n for n, _ in trainable_parameters(model)] == [n for n in names if n != "net.1.weight"]
    # the optimizer's subset, in the model's order, frozen ones still excluded
    opt = torch.optim.SGD([model.net[5].bias, model.net[1].weight, model.net[3].weight], lr=0.1)
    assert [n for n, _ in trainable_parameters(model, opt)] == ["net.3.weight", "net.5.bias"]
    fm = FunctionalModel(model, F.cross_entropy, trainable_parameters(model, opt))
    assert fm.dim == 8 * 8 + 10

    other = DigitsMLP(hidden=8)
    with pytest.raises(ValueError, match="none of the model's trainable parameters is in the optimizer"):
        trainable_parameters(model, torch.optim.SGD(other.parameters(), lr=0.1))
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters \(all have requires_grad=False\)"):
        trainable_parameters(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        FunctionalModel(model, F.cross_entropy)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        FunctionalModel(other, "cross_entropy")  # type: ignore[arg-type]


# -- 6. schedule -----------------------------------------------------------------------------


def test_schedule_every_and_list():
    s = Schedule.of(10)
    assert [t for t in range(35) if s.due(t)] == [0, 10, 20, 30]
    s = Schedule.of(4, start=3)
    assert [t for t in range(20) if s.due(t)] == [3, 7, 11, 15, 19]
    s = Schedule.of([0, 5, 100, 5])
    assert [t for t in range(200) if s.due(t)] == [0, 5, 100]
    assert s.describe() == [0, 5, 100]
    assert Schedule.of(range(3, 9, 3)).describe() == [3, 6]
    assert Schedule.of(s) is s
    assert Schedule.of(1).describe() == 1


def test_schedule_accepts_numpy_integers():
    """Cadences often come out of numpy (np.arange sweeps, config arrays)."""
    s = Schedule.of(np.int64(5))
    assert [t for t in range(12) if s.due(t)] == [0, 5, 10]
    assert [t for t in range(12) if Schedule.of(np.array([2, 7])).due(t)] == [2, 7]


@pytest.mark.parametrize("per_decade", [3, 8, 20])
def test_schedule_log(per_decade):
    s = Schedule.of("log", per_decade=per_decade)
    due = [t for t in range(100_000) if s.due(t)]
    assert due[:per_decade] == list(range(per_decade))  # the first steps are all measured
    # about per_decade points per decade above the dense start
    for j in range(1, 5):
        if 10**j >= per_decade:
            in_decade = sum(10**j <= t < 10 ** (j + 1) for t in due)
            assert abs(in_decade - per_decade) <= 1, (j, in_decade)
    # in [0, 10^4): the dense start (per_decade steps, log10(per_decade) decades) then
    # per_decade per decade for the remaining 4 - log10(per_decade) decades
    n4 = sum(t < 10**4 for t in due)
    expected = per_decade * (1 + 4 - math.log10(per_decade))
    assert abs(n4 - expected) <= 2, (n4, expected)
    # density decreases: consecutive ratios stay near 10^(1/per_decade), gaps never shrink much
    tail = [t for t in due if t >= 10 * per_decade]
    ratios = np.array(tail[1:]) / np.array(tail[:-1])
    target = 10 ** (1 / per_decade)
    assert np.all(np.abs(ratios - target) < 0.1 * (target - 1) + 1.0 / 10 / per_decade), ratios
    gaps = np.diff(due)
    assert np.all(gaps[1:] >= gaps[:-1] - 1)
    # shifted start
    s3 = Schedule.of("log", per_decade=per_decade, start=5)
    assert [t for t in range(5 + 10**3) if s3.due(t)] == [t + 5 for t in due if t < 10**3]


def test_schedule_log_first_steps_per_decade_8():
    s = Schedule.of("log")
    assert all(s.due(t) for t in range(8))
    assert 32 <= sum(s.due(t) for t in range(10**4)) <= 40
    assert s.describe() == "log (8 per decade)"


def test_schedule_errors():
    with pytest.raises(ValueError, match="positive number of steps, got 0"):
        Schedule.of(0)
    with pytest.raises(ValueError, match="positive number of steps, got -3"):
        Schedule.of(-3)
    with pytest.raises(ValueError, match="empty list of steps"):
        Schedule.of([])
    with pytest.raises(ValueError, match="steps must be >= 0"):
        Schedule.of([3, -1])
    with pytest.raises(TypeError, match="not a bool"):
        Schedule.of(True)
    with pytest.raises(TypeError, match="not a bool"):
        Schedule.of(False)
    with pytest.raises(ValueError, match="'weekly' is not a cadence"):
        Schedule.of("weekly")
    with pytest.raises(ValueError, match="per_decade must be >= 1"):
        Schedule.of("log", per_decade=0)
    with pytest.raises(TypeError, match="got float"):
        Schedule.of(2.5)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), start=st.integers(0, 30), step=st.integers(0, 5000))
def test_schedule_every_property(n, start, step):
    s = Schedule.of(n, start=start)
    assert s.due(step) == (step >= start and (step - start) % n == 0)


@settings(max_examples=100, deadline=None)
@given(steps=st.sets(st.integers(0, 300), min_size=1, max_size=20), probe=st.integers(0, 300))
def test_schedule_list_property(steps, probe):
    s = Schedule.of(sorted(steps))
    assert s.due(probe) == (probe in steps)


# -- 7. Gaussian sketch ----------------------------------------------------------------------


def test_sketch_seeding_and_blocking():
    d, k = 1000, 16
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    a = GaussianSketch(k, d, seed=3, block=300)  # 4 blocks, the last one partial
    b = GaussianSketch(k, d, seed=3, block=300)
    c = GaussianSketch(k, d, seed=4, block=300)
    nocache = GaussianSketch(k, d, seed=3, block=300, cache_bytes=0)
    assert a._cache is not None and nocache._cache is None
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x), rtol=0.1, atol=0.0)
    assert torch.equal(a(x), nocache(x))  # same blocks whether cached or regenerated
    # one matrix: batches are row-wise, the map is linear
    assert a(x).shape == (3, k) and a(x).dtype == torch.float32
    assert torch.allclose(a(x)[1], a(x[1]), rtol=1e-6, atol=1e-6)
    S = a(torch.eye(d)).T  # (k, d)
    assert torch.allclose(a(x), x.float() @ S.T, rtol=1e-5, atol=1e-5)
    # S = G / sqrt(k) with G iid N(0, 1)
    g = (S * math.sqrt(k)).flatten().double().numpy()
    assert stats.kstest(g, "norm").pvalue > 1e-3
    assert a.describe() == {"kind": "gaussian", "k": k, "d": d, "seed": 3, "block": 300}


def test_sketch_errors():
    with pytest.raises(ValueError, match="k must be >= 1"):
        GaussianSketch(0, 10)
    with pytest.raises(ValueError, match="must be smaller than the parameter count"):
        GaussianSketch(10, 10)
    with pytest.raises(ValueError, match="vectors of length 20"):
        GaussianSketch(4, 20)(torch.zeros(19))


def test_sketch_cosine_and_inner_product_errors_match_the_documented_formulas():
    """Over many seeds: E<Sx,Sy> = <x,y> with var (|x|^2|y|^2 + <x,y>^2)/k, and the sketched
    cosine has std (1 - gamma^2)/sqrt(k) and no bias beyond a few standard errors."""
    d, k, seeds = 256, 64, 400
    gammas = [0.0, 0.5, 0.9]
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen, dtype=torch.float64))
    u, v = Q[:, 0], Q[:, 1]
    xs, ys = [], []
    for gm in gammas:
        xs.append(2.0 * u)
        ys.append(0.5 * (gm * u + math.sqrt(1 - gm**2) * v))  # |x|=2, |y|=0.5, cos = gm
    Z = torch.stack(xs + ys)  # (2 * len(gammas), d)
    out = torch.stack([GaussianSketch(k, d, seed=s)(Z) for s in range(seeds)]).double()  # (seeds, 6, k)
    m = len(gammas)
    sx, sy = out[:, :m], out[:, m:]
    inner = (sx * sy).sum(-1)  # (seeds, m)
    cos = inner / (sx.norm(dim=-1) * sy.norm(dim=-1))
    for i, gm in enumerate(gammas):
        true_inner = 2.0 * 0.5 * gm
        sd_inner = math.sqrt((4.0 * 0.25 + true_inner**2) / k)
        assert abs(float(inner[:, i].mean()) - true_inner) < 4 * sd_inner / math.sqrt(seeds)
        assert float(inner[:, i].std()) == pytest.approx(sd_inner, rel=0.15)
        sd_cos = (1 - gm**2) / math.sqrt(k)
        assert float(cos[:, i].std()) == pytest.approx(sd_cos, rel=0.25), (gm, float(cos[:, i].std()))
        assert abs(float(cos[:, i].mean()) - gm) < 4 * sd_cos / math.sqrt(seeds), (gm, float(cos[:, i].mean()))


def test_drawing_probe_batches_leaves_a_loaders_own_generator_alone() -> None:
    """A DataLoader with its own generator draws its shuffle order from it: taking probe batches
    from that loader must not advance it, or the training's order (and trajectory) changes."""
    data = TensorDataset(torch.arange(40.0).reshape(20, 2), torch.arange(20))

    def loader() -> DataLoader:
        return DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))

    untouched = [y.tolist() for _, y in loader()]
    used = loader()
    probe = draw_batches(used, 2)
    assert [y.tolist() for _, y in probe] == untouched[:2]
    assert [y.tolist() for _, y in used] == untouched  # the same order as if never drawn from


@pytest.mark.parametrize("name,bn_mode", [("mlp", "eval"), ("cnn", "train"), ("transformer", "eval")])
def test_losses_and_grads_per_batch_equal_one_batch_at_a_time(name: str, bn_mode: str) -> None:
    """The stacked (vmap) and looped per-batch gradients agree, and with separate loss_and_grad
    calls: BatchNorm in train mode takes each batch's own statistics either way."""
    torch.manual_seed(0)
    model = {"mlp": lambda: DigitsMLP(hidden=8), "cnn": lambda: DigitsCNN(channels=3),
             "transformer": lambda: TinyTransformer(width=8, heads=2)}[name]().double()
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _digits()
    batches = [(X[i * 24:(i + 1) * 24], y[i * 24:(i + 1) * 24]) for i in range(4)]
    w = fm.flat_params()
    with probe_guard(model, bn_mode):  # type: ignore[arg-type]
        ref = [fm.loss_and_grad(w, b) for b in batches]
        for losses, grads in (fm._grads_vmap(w, batches), fm._grads_loop(w, batches), fm.losses_and_grads(w, batches)):
            assert grads.shape == (4, fm.dim)
            for k, (l_ref, g_ref) in enumerate(ref):
                torch.testing.assert_close(losses[k], l_ref, rtol=RTOL64, atol=0)
                torch.testing.assert_close(grads[k], g_ref, rtol=RTOL64, atol=1e-14)
        assert fm._batching[("grads", ((24, 1, 8, 8), (24,)))] in (True, False)  # timed once, remembered
        uneven = batches[:2] + [(X[:10], y[:10])]  # shapes differ: the loop, no timing key
        _, g = fm.losses_and_grads(w, uneven)
        torch.testing.assert_close(g[2], fm.grad(w, uneven[2]), rtol=RTOL64, atol=1e-14)
    with pytest.raises(ValueError, match="at least one batch"):
        fm.losses_and_grads(w, [])


def test_a_3d_convolution_model_works_like_any_other() -> None:
    """Backends that implement layers one by one fail on 3-D convolutions; autograd does not:
    the HVP equals the dense float64 Hessian and per-example gradients equal a loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2 * 2, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 3, 3, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)
    fm = FunctionalModel(model, F.cross_entropy)
    w = fm.flat_params()
    H = torch.autograd.functional.hessian(own_loss(model, F.cross_entropy, (x, y)), w)  # no library code
    V = torch.randn(fm.dim, 3, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(fm.hessian_operator(w, (x, y)).matmat(V), H @ V, rtol=RTOL64, atol=1e-13)
    rows = torch.cat(list(fm.per_sample_grads(w, (x, y))))
    loop = torch.stack([fm.grad(w, (x[i:i + 1], y[i:i + 1])) for i in range(6)])
    torch.testing.assert_close(rows, loop, rtol=RTOL64, atol=1e-14)


def test_flat_copies_do_not_alias_the_model() -> None:
    """flat_params / flat_grad / flat_params_and_grad are copies, also for a model with a single
    parameter tensor (where a flatten of one tensor would return a view of it)."""
    model = nn.Linear(3, 1, bias=False).double()
    fm = FunctionalModel(model, F.mse_loss)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    F.mse_loss(model(x), y).backward()
    w0, g0 = model.weight.detach().reshape(-1).clone(), model.weight.grad.reshape(-1).clone()
    w, g = fm.flat_params(), fm.flat_grad()
    w2, g2 = fm.flat_params_and_grad()
    with torch.no_grad():
        model.weight.add_(1.0)
        model.weight.grad.mul_(3.0)
    for a, b in ((w, w0), (w2, w0), (g, g0), (g2, g0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.weight.grad = None  # no grad yet: zeros, through the separate copies
    w3, g3 = fm.flat_params_and_grad()
    torch.testing.assert_close(w3, w0 + 1.0, rtol=0, atol=0)
    assert torch.equal(g3, torch.zeros(3, dtype=torch.float64))


def test_per_batch_gradients_with_unused_parameters_and_given_buffers() -> None:
    """The one-swap loop of losses_and_grads gives zeros for a parameter the loss does not use
    and evaluates with FunctionalModel.buffers when set (rank 0's under torch.distributed)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)
            self.head = nn.Linear(72, 10)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))

    model = Net().double().eval()
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _digits()
    batches = [(X[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16]) for i in range(3)]
    w = fm.flat_params()
    fm.buffers = {"bn.running_mean": torch.full((2,), 0.3, dtype=torch.float64),
                  "bn.running_var": torch.full((2,), 2.0, dtype=torch.float64)}
    losses, grads = fm._grads_loop(w, batches)
    sl = fm.layout.slices()
    for k, b in enumerate(batches):
        loss, g = fm.loss_and_grad(w, b)
        torch.testing.assert_close(losses[k], loss, rtol=RTOL64, atol=0)
        torch.testing.assert_close(grads[k], g, rtol=RTOL64, atol=1e-14)
        assert not grads[k][sl["unused.weight"]].any() and not grads[k][sl["unused.bias"]].any()
    fm.buffers = None  # the module's own statistics give other numbers: the buffers were used
    assert not torch.allclose(fm._grads_loop(w, batches)[0], losses)


def test_batched_or_loop_choices_are_shared_by_models_of_one_structure() -> None:
    """The timing of vmap against a loop is done once per model structure (and chunk size,
    thread count) in a process: a second run of the same model reuses it."""
    a = FunctionalModel(DigitsMLP(hidden=5), F.cross_entropy)
    b = FunctionalModel(DigitsMLP(hidden=5), F.cross_entropy)
    other = FunctionalModel(DigitsMLP(hidden=6), F.cross_entropy)
    key = ("grads", "test-key")
    a._batching[key] = True
    assert b._batching.get(key) is True
    assert key not in other._batching  # other shapes
    b.set_chunk_size(4)
    assert key not in b._batching  # chunks change the arithmetic
    assert key not in FunctionalModel(DigitsMLP(hidden=5), F.mse_loss)._batching  # another loss
    del a._batching[key]
