"""Hessian-vector products of the functional layer against ground truth (all float64).

1. Closed forms: linear regression (MSE), logistic regression (BCE with logits) and softmax
   regression (cross-entropy), whose Hessians are known exactly; the dense H is rebuilt column by
   column from ``matvec`` and from ``matmat`` on identity blocks, for both routes.
2. Dense Hessians of the reference models (MLP, CNN with eval-mode BN and dropout off, a tiny
   transformer) of an independently written loss (own flattening of the parameters, own
   ``functional_call``), cross-checked by central finite differences of the gradient: products,
   symmetry and the ends of the spectrum.
3. A list of batches is the example-weighted mean: batches of 20 and 44 give the Hessian of the
   concatenated 64.
4. BN in train mode: a different Hessian (batch statistics depend on w), still exact, and the
   guard restores modes, running stats and ``.grad`` afterwards.
5. Property-based: u^T H v == v^T H u and linearity of v -> H v.

About the reference: ``torch.func.hessian`` (``jacfwd(jacrev)``) is exact on the MLP and on the CNN
with eval-mode BN, but on this torch it is wrong (asymmetric, 5-15 % off finite differences)
through LayerNorm, or train-mode BatchNorm, with an affine weight whose input depends on the
parameters; ``jacrev(jacrev)`` and ``jacfwd(jacfwd)`` too (cf. pytorch/pytorch#196700). The
library's own routes, ``jvp(grad)`` and ``vmap(jvp(grad))``, are not affected. So the dense
reference is reverse-over-reverse (``torch.autograd.functional.hessian``) of the independent loss,
checked column-wise against finite differences, and ``torch.func.hessian`` is compared only where
it is exact.
"""
from __future__ import annotations

import copy
import ctypes
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from landscape.functional import FunctionalModel, probe_guard
from landscape.models import DigitsCNN, DigitsMLP, TinyTransformer
from tests._helpers import digits
from tests._helpers import own_loss as _own_loss

ROUTES = ["double_backward", "fwd_rev"]
CLOSED_RTOL = 1e-10
MODEL_RTOL = 1e-9
FD_RTOL = 1e-7  # central differences, eps = 1e-5: truncation ~1e-10, rounding ~1e-11


def _numpy_openblas():
    """numpy's bundled OpenBLAS (set/get thread count), or None where it cannot be found."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "numpy" in line}
        for path in paths:
            lib = ctypes.CDLL(path)
            for suffix in ("64_", ""):
                setter = getattr(lib, f"scipy_openblas_set_num_threads{suffix}", None)
                getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
                if setter is not None and getter is not None:
                    return setter, getter
    except OSError:
        pass
    return None


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast and avoids oversubscribing a shared machine.
    numpy's BLAS too: a threaded eigvalsh of an 850 x 850 matrix is 5-50x slower than a
    single-threaded one when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    blas = _numpy_openblas()
    blas_before = blas[1]() if blas else None
    if blas:
        blas[0](1)
    yield
    torch.set_num_threads(before)
    if blas:
        blas[0](blas_before)


# -- shared pieces -----------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 64 training digits, float64 images (64, 1, 8, 8) and integer labels."""
    (X, y), _ = digits()
    return X[:64].double().clone(), y[:64].clone()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _basis(d: int, j: int) -> torch.Tensor:
    e = torch.zeros(d, dtype=torch.float64)
    e[j] = 1.0
    return e


def _dense_by_matvec(op, d: int) -> torch.Tensor:
    return torch.stack([op.matvec(_basis(d, j)) for j in range(d)], dim=1)


def _dense_by_matmat(op, d: int, block: int = 128) -> torch.Tensor:
    eye = torch.eye(d, dtype=torch.float64)
    return torch.cat([op.matmat(eye[:, j:j + block]) for j in range(0, d, block)], dim=1)


def _reference_hessian(f, w: torch.Tensor) -> torch.Tensor:
    """Dense reverse-over-reverse Hessian (math attention: the fused CPU kernel has no double
    backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(f, w, vectorize=True)


def _reference_hvp(f, w: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """H V of ``f`` at ``w`` for a (d, m) block, by reverse-over-reverse."""
    leaf = w.detach().clone().requires_grad_(True)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        (g,) = torch.autograd.grad(f(leaf), leaf, create_graph=True)
        (HV,) = torch.autograd.grad(g, leaf, V.T.contiguous(), is_grads_batched=True)
    return HV.T


def _fd_columns(f, w: torch.Tensor, cols, eps: float = 1e-5) -> torch.Tensor:
    """Central finite differences of the gradient of ``f`` along basis vectors: columns of H
    without any second-order AD."""
    def grad(x):
        leaf = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.grad(f(leaf), leaf)[0]

    d = w.numel()
    return torch.stack([(grad(w + eps * _basis(d, j)) - grad(w - eps * _basis(d, j))) / (2 * eps) for j in cols], 1)


# -- 1. closed forms -----------------------------------------------------------------------------


def _explicit_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F.mse_loss written out: the same function, without aten's mse_loss_backward."""
    return ((out - target) ** 2).mean()


# torch.func forward-over-reverse through F.mse_loss(reduction="mean") raises "ZeroTensors are
# immutable" (pytorch/pytorch#123996: an in-place division in mse_loss_double_backward when the
# target carries no tangent). The library's fwd_rev route inherits it; double backward is fine.
_MSE_FWD_REV = pytest.mark.xfail(
    raises=RuntimeError, strict=False,
    reason="torch.func jvp(grad(F.mse_loss)) -> 'ZeroTensors are immutable' (pytorch#123996)",
)

CLOSED_CASES = [
    pytest.param("linear", "double_backward", id="linear-double_backward"),
    pytest.param("linear", "fwd_rev", id="linear-fwd_rev", marks=_MSE_FWD_REV),
    *[pytest.param(k, r, id=f"{k}-{r}") for k in ("linear_explicit", "logistic", "softmax") for r in ROUTES],
]


def _closed_form_case(kind: str):
    """(model, loss_fn, batch, H_exact) for a bias-free linear model on 64 digits."""
    X4, labels = _data()
    X = X4.reshape(64, -1)
    if kind == "softmax":
        X = X[:, 24:40].contiguous()  # the 16 central pixels: d = 10 * 16 keeps the column loop short
    N, p = X.shape
    gen = torch.Generator().manual_seed(7)
    C = 10 if kind == "softmax" else 1
    model = nn.Linear(p, C, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(C, p, generator=gen, dtype=torch.float64))
    W = model.weight.detach()
    if kind in ("linear", "linear_explicit"):
        y = torch.randn(N, 1, generator=gen, dtype=torch.float64)
        H = 2.0 / N * X.T @ X
        return model, (F.mse_loss if kind == "linear" else _explicit_mse), (X, y), H
    if kind == "logistic":
        y = (labels % 2).double().reshape(N, 1)
        s = torch.sigmoid(X @ W.T).reshape(N)
        H = X.T @ (X * (s * (1 - s))[:, None]) / N
        return model, F.binary_cross_entropy_with_logits, (X, y), H
    P = torch.softmax(X @ W.T, dim=1)  # (N, C)
    H = torch.zeros(C * p, C * p, dtype=torch.float64)
    for n in range(N):
        A = torch.diag(P[n]) - torch.outer(P[n], P[n])
        H += torch.kron(A, torch.outer(X[n], X[n]))  # index c * p + j: row-major W (C, p)
    H /= N
    # sanity of the closed form itself: rows of the softmax block sum to zero over classes
    assert float(H.reshape(C, p, C, p).sum(dim=0).abs().max()) < 1e-12
    return model, F.cross_entropy, (X, labels), H


@pytest.mark.parametrize(("kind", "route"), CLOSED_CASES)
def test_closed_form_hessians(kind, route):
    model, loss_fn, batch, H = _closed_form_case(kind)
    fm = FunctionalModel(model, loss_fn)
    assert fm.dim == H.shape[0]
    w = fm.flat_params()
    assert torch.equal(w, model.weight.detach().reshape(-1))  # flat layout = row-major (C, p)
    op = fm.hessian_operator(w, batch, route=route)
    H_mv = _dense_by_matvec(op, fm.dim)
    H_mm = _dense_by_matmat(op, fm.dim)
    assert _rel(H_mv, H) < CLOSED_RTOL
    assert _rel(H_mm, H) < CLOSED_RTOL
    # the one-shot entry point agrees too
    v = torch.randn(fm.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert _rel(fm.hvp(w, batch, v, route=route), H @ v) < CLOSED_RTOL


@pytest.mark.parametrize("route", ROUTES)
def test_closed_form_hessian_away_from_the_live_weights(route):
    """The operator evaluates at the w it is given, not at the module's parameters, and leaves
    the module alone."""
    model, loss_fn, batch, _ = _closed_form_case("logistic")
    fm = FunctionalModel(model, loss_fn)
    X, _ = batch
    w = fm.flat_params() + 0.5 * torch.randn(fm.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = torch.sigmoid(X @ w)
    H = X.T @ (X * (s * (1 - s))[:, None]) / X.shape[0]
    before = model.weight.detach().clone()
    op = fm.hessian_operator(w, batch, route=route)
    assert _rel(_dense_by_matmat(op, fm.dim), H) < CLOSED_RTOL
    assert torch.equal(model.weight.detach(), before)
    assert model.weight.grad is None


# -- 2. dense Hessians of the reference models --------------------------------------------------


def _make_model(name: str) -> nn.Module:
    """Seeded float64 model; BN running stats warmed so eval-mode BN is a non-trivial affine map.
    The global RNG is left alone."""
    X, _ = _data()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "mlp":
            model = DigitsMLP(hidden=8)
        elif name == "cnn":
            model = DigitsCNN(channels=4)
        else:
            model = TinyTransformer(width=8, heads=2)
        model = model.double()
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(X + 0.1 * torch.randn_like(X))
    return model


class _Case:
    """A model, a point w away from its parameters, the reference Hessian there, and the dense
    Hessian rebuilt from ``double_backward`` matmat on identity blocks."""

    def __init__(self, name: str) -> None:
        self.model = _make_model(name)
        self.fm = FunctionalModel(self.model, F.cross_entropy)
        X, y = _data()
        # d is 680-850 here: the dense work scales with the batch, so the bigger two use 16 examples
        n = 32 if name == "mlp" else 16
        self.batch = (X[:n], y[:n])
        gen = torch.Generator().manual_seed(1)
        self.w = self.fm.flat_params() + 0.05 * torch.randn(self.fm.dim, generator=gen, dtype=torch.float64)
        self.f = _own_loss(self.model, F.cross_entropy, self.batch)
        d = self.fm.dim
        self.fd_cols = [0, d // 3, d // 2, d - 1]
        with probe_guard(self.model, "eval"):
            self.loss_gap = abs(float(self.f(self.w)) - float(self.fm.loss(self.w, self.batch)))
            self.H = _reference_hessian(self.f, self.w)
            self.fd = _fd_columns(self.f, self.w, self.fd_cols)
            op = self.fm.hessian_operator(self.w, self.batch, route="double_backward")
            self.dense = _dense_by_matmat(op, d)
        self.V = torch.randn(d, 6, generator=gen, dtype=torch.float64)


@lru_cache(maxsize=None)
def _case(name: str) -> _Case:
    return _Case(name)


MODELS = ["mlp", "cnn", "transformer"]


@pytest.mark.parametrize("name", MODELS)
def test_model_reference_is_sound(name):
    """The independent loss equals the library's, and the reference Hessian matches finite
    differences of the gradient (no second-order AD involved) and is symmetric."""
    c = _case(name)
    assert 300 < c.fm.dim < 1000
    assert c.loss_gap < 1e-13
    assert float((c.H[:, c.fd_cols] - c.fd).norm()) <= FD_RTOL * float(c.fd.norm())
    assert _rel(c.H, c.H.T) < 1e-13


def test_model_reference_matches_torch_func_hessian_on_mlp():
    """Where torch.func.hessian is exact (no affine normalisation), it agrees with the reference."""
    c = _case("mlp")
    with probe_guard(c.model, "eval"):
        H = torch.func.hessian(c.f)(c.w)
    assert _rel(H, c.H) < 1e-12


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", MODELS)
def test_model_hvp_matches_dense_hessian(name, route):
    c = _case(name)
    H, d = c.H, c.fm.dim
    with probe_guard(c.model, "eval"):
        op = c.fm.hessian_operator(c.w, c.batch, route=route)
        HV = op.matmat(c.V)
        Hv = torch.stack([op.matvec(c.V[:, j]) for j in range(c.V.shape[1])], dim=1)
        cols = [0, 1, d // 2, d - 1]  # first and last parameter included
        H_cols = torch.stack([op.matvec(_basis(d, j)) for j in cols], dim=1)
        H_cols_mm = op.matmat(torch.eye(d, dtype=torch.float64)[:, cols])
    assert HV.shape == c.V.shape
    assert _rel(HV, H @ c.V) < MODEL_RTOL
    assert _rel(Hv, H @ c.V) < MODEL_RTOL
    assert _rel(H_cols, H[:, cols]) < MODEL_RTOL
    assert _rel(H_cols_mm, H[:, cols]) < MODEL_RTOL


@pytest.mark.parametrize("name", MODELS)
def test_model_dense_hessian_from_hvps(name):
    """Dense H from matmat on identity blocks: equal to the reference, symmetric; on the MLP also
    from the fwd_rev route."""
    c = _case(name)
    assert _rel(c.dense, c.H) < MODEL_RTOL
    assert _rel(c.dense, c.dense.T) < 1e-12
    if name == "mlp":
        with probe_guard(c.model, "eval"):
            op = c.fm.hessian_operator(c.w, c.batch, route="fwd_rev")
            dense = _dense_by_matmat(op, c.fm.dim)
        assert _rel(dense, c.H) < MODEL_RTOL
        assert _rel(dense, dense.T) < 1e-12


@pytest.mark.parametrize("name", MODELS)
def test_model_top_eigenvalues(name):
    c = _case(name)
    ref = np.linalg.eigvalsh(c.H.numpy())
    scale = float(np.abs(ref).max())
    assert scale > 0
    # (torch's eigvalsh for the HVP side: numpy's threaded BLAS crawls on a busy 2-core machine)
    got = torch.linalg.eigvalsh(0.5 * (c.dense + c.dense.T)).numpy()
    np.testing.assert_allclose(got[-5:], ref[-5:], rtol=0, atol=MODEL_RTOL * scale)
    # the bottom of the spectrum too (indefinite away from a minimum)
    np.testing.assert_allclose(got[:3], ref[:3], rtol=0, atol=MODEL_RTOL * scale)
    assert ref[0] < 0 < ref[-1]


def test_fwd_rev_route_exact_through_affine_layer_norm():
    """The fwd_rev route is jvp(grad) / vmap(jvp(grad)), which is exact through LayerNorm with an
    affine weight (torch.func.hessian is not, on this torch): a guard against switching it to
    jacfwd(jacrev)."""

    class LN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.linspace(0.5, 1.5, 8, dtype=torch.float64))
            self.norm = nn.LayerNorm(8).double()
            self.head = nn.Linear(8, 3).double()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(x * self.a).tanh())

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = LN()
        with torch.no_grad():
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(16, 8, dtype=torch.float64)
        y = torch.randint(0, 3, (16,))
    fm = FunctionalModel(model, F.cross_entropy)
    w = fm.flat_params()
    f = _own_loss(model, F.cross_entropy, (x, y))
    H = _reference_hessian(f, w)
    cols = list(range(fm.dim))
    assert float((H - _fd_columns(f, w, cols)).norm()) <= FD_RTOL * float(H.norm())
    for route in ROUTES:
        op = fm.hessian_operator(w, (x, y), route=route)
        assert _rel(_dense_by_matvec(op, fm.dim), H) < MODEL_RTOL, route
        assert _rel(_dense_by_matmat(op, fm.dim, block=16), H) < MODEL_RTOL, route


# -- 3. several batches --------------------------------------------------------------------------


def test_list_of_batches_equals_concatenated_batch_dense_mlp():
    model = _make_model("mlp")
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _data()
    parts = [(X[:20], y[:20]), (X[20:64], y[20:64])]
    whole = (X, y)
    w = fm.flat_params()
    f = _own_loss(model, F.cross_entropy, whole)
    assert abs(float(fm.loss(w, parts)) - float(f(w))) < 1e-13
    # example-weighted, not the plain mean of the two batch losses
    assert abs(float(0.5 * (fm.loss(w, parts[0]) + fm.loss(w, parts[1]))) - float(f(w))) > 1e-6
    H_true = _reference_hessian(f, w)
    H_parts = _dense_by_matmat(fm.hessian_operator(w, parts, route="double_backward"), fm.dim)
    H_whole = _dense_by_matmat(fm.hessian_operator(w, whole, route="double_backward"), fm.dim)
    assert _rel(H_parts, H_whole) < 1e-10
    assert _rel(H_parts, H_true) < MODEL_RTOL
    V = torch.randn(fm.dim, 8, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    HV_parts = fm.hessian_operator(w, parts, route="fwd_rev").matmat(V)
    assert _rel(HV_parts, fm.hessian_operator(w, whole, route="fwd_rev").matmat(V)) < 1e-10
    assert _rel(HV_parts, H_true @ V) < MODEL_RTOL


@pytest.mark.parametrize("route", ROUTES)
def test_list_of_batches_equals_concatenated_batch_cnn(route):
    """Eval-mode BN makes the CNN loss a per-example mean, so the split is exact there too."""
    model = _make_model("cnn")
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _data()
    parts = [(X[:20], y[:20]), (X[20:64], y[20:64])]
    w = fm.flat_params()
    V = torch.randn(fm.dim, 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with probe_guard(model, "eval"):
        HV_parts = fm.hessian_operator(w, parts, route=route).matmat(V)
        HV_whole = fm.hessian_operator(w, (X, y), route=route).matmat(V)
        HV_true = _reference_hvp(_own_loss(model, F.cross_entropy, (X, y)), w, V)
    assert _rel(HV_parts, HV_whole) < 1e-10
    assert _rel(HV_parts, HV_true) < MODEL_RTOL


# -- 4. batch norm in train mode -----------------------------------------------------------------


def _batch_stats_twin(model: nn.Module) -> nn.Module:
    """A copy whose BN layers always normalise with batch statistics and keep no running stats:
    the function train-mode BN computes, written independently of the guard's mode switching."""
    twin = copy.deepcopy(model)
    twin.eval()
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
            m.train()
    return twin


def _cnn_with_state() -> nn.Module:
    model = _make_model("cnn")
    model.train()
    model.features[4].eval()  # a mix of flags: each must come back as it was
    gen = torch.Generator().manual_seed(5)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) if i % 3 else None
    return model


def test_bn_train_mode_hessian_is_exact_differs_from_eval_and_guard_restores():
    model = _cnn_with_state()
    flags = {n: m.training for n, m in model.named_modules()}
    tracking = {n: m.track_running_stats for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    grad_objs = [p.grad for p in params]
    grad_vals = [None if g is None else g.clone() for g in grad_objs]

    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _data()
    batch = (X[:32], y[:32])
    w = fm.flat_params()
    d = fm.dim
    V = torch.randn(d, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cols = [0, 45, 200, d - 1]  # conv1, BN1, conv2 and head parameters
    E = torch.eye(d, dtype=torch.float64)[:, cols]

    with probe_guard(model, "eval"):
        HV_eval = fm.hessian_operator(w, batch, route="double_backward").matmat(V)

    twin = _batch_stats_twin(model)
    f_train = _own_loss(twin, F.cross_entropy, batch)
    HV_true = _reference_hvp(f_train, w, V)
    fd = _fd_columns(f_train, w, cols)
    assert _rel(_reference_hvp(f_train, w, E), fd) < FD_RTOL

    with probe_guard(model, "train"):
        bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert bn and all(m.training for m in bn)
        assert not model.head[1].training  # dropout stays off
        assert abs(float(fm.loss(w, batch)) - float(f_train(w))) < 1e-13
        op = fm.hessian_operator(w, batch, route="double_backward")
        HV = op.matmat(V)
        Hv0 = op.matvec(V[:, 0])
        H_cols = op.matmat(E)

    assert _rel(HV, HV_true) < MODEL_RTOL
    assert _rel(Hv0, HV_true[:, 0]) < MODEL_RTOL
    assert _rel(H_cols, fd) < FD_RTOL
    # batch statistics depend on w: a genuinely different Hessian from eval mode
    assert _rel(HV, HV_eval) > 1e-2

    # everything restored exactly: flags, buffers bitwise, .grad objects and values
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: m.track_running_stats for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)} == tracking
    for k, v0 in model.state_dict().items():
        assert v0.dtype == state[k].dtype
        assert v0.numpy().tobytes() == state[k].numpy().tobytes(), k
    for p, g, gv in zip(params, grad_objs, grad_vals):
        assert p.grad is g
        if g is not None:
            assert torch.equal(g, gv)


@pytest.mark.parametrize("kind", ["matvec", "matmat"])
def test_bn_train_mode_fwd_rev_route(kind):
    """fwd_rev in BN train mode: an in-place running-stat update under torch.func.grad would raise
    ("would mutate a captured Tensor"), so the guard must keep BN from updating its running stats
    while still normalising with batch statistics."""
    model = _cnn_with_state()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _data()
    batch = (X[:32], y[:32])
    w = fm.flat_params()
    V = torch.randn(fm.dim, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    HV_true = _reference_hvp(_own_loss(_batch_stats_twin(model), F.cross_entropy, batch), w, V)
    try:
        with probe_guard(model, "train"):
            op = fm.hessian_operator(w, batch, route="fwd_rev")
            if kind == "matvec":
                HV = torch.stack([op.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)
            else:
                HV = op.matmat(V)
    finally:
        for k, v0 in model.state_dict().items():
            assert torch.equal(v0, state[k]), k  # restored even when the probe raised
    assert _rel(HV, HV_true) < MODEL_RTOL


@pytest.mark.parametrize("where", ["user_graph", "operator"])
def test_probe_guard_keeps_autograd_graphs_usable(where):
    """Every BatchNorm forward saves running_mean/running_var for its backward: restoring buffers
    with an unconditional in-place copy_ would bump their version counters and make the user's
    pending graph, or a double-backward operator built inside an earlier guard, unusable."""
    model = _make_model("cnn")
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _data()
    batch = (X[:16], y[:16])
    if where == "user_graph":
        loss = F.cross_entropy(model(X[:16]), y[:16])  # the user's pending step
        with probe_guard(model, "eval"):
            fm.hessian_operator(fm.flat_params(), batch).matvec(torch.ones(fm.dim, dtype=torch.float64))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
    else:
        with probe_guard(model, "eval"):
            op = fm.hessian_operator(fm.flat_params(), batch, route="double_backward")
            first = op.matvec(torch.ones(fm.dim, dtype=torch.float64))
        with probe_guard(model, "eval"):
            again = op.matvec(torch.ones(fm.dim, dtype=torch.float64))
        assert torch.equal(first, again)


# -- 5. invariants ---------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _mlp_ops():
    model = _make_model("mlp")
    fm = FunctionalModel(model, F.cross_entropy)
    X, y = _data()
    w = fm.flat_params()
    with probe_guard(model, "eval"):
        ops = {r: fm.hessian_operator(w, (X[:32], y[:32]), route=r) for r in ROUTES}
    return model, fm.dim, ops


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    a=st.floats(-10, 10, allow_nan=False, allow_infinity=False),
    b=st.floats(-10, 10, allow_nan=False, allow_infinity=False),
    route=st.sampled_from(ROUTES),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_hvp_symmetric_and_linear(seed, a, b, route, scale):
    model, d, ops = _mlp_ops()  # no BN in the MLP: the operator may outlive its guard
    op = ops[route]
    gen = torch.Generator().manual_seed(seed)
    u = scale * torch.randn(d, generator=gen, dtype=torch.float64)
    v = torch.randn(d, generator=gen, dtype=torch.float64)
    with probe_guard(model, "eval"):
        Hu, Hv = op.matvec(u), op.matvec(v)
        Hw = op.matvec(a * u + b * v)
        HU = op.matmat(torch.stack([u, v, a * u + b * v], dim=1))
    # symmetry of the bilinear form
    bound = float(u.norm() * Hv.norm() + v.norm() * Hu.norm())
    assert abs(float(u @ Hv) - float(v @ Hu)) <= 1e-10 * bound
    # linearity
    expected = a * Hu + b * Hv
    tol = 1e-10 * (abs(a) * float(Hu.norm()) + abs(b) * float(Hv.norm())) + 1e-290  # floor: subnormal a, b
    assert float((Hw - expected).norm()) <= tol
    # matmat is the same linear map
    assert float((HU[:, 0] - Hu).norm()) <= 1e-10 * float(Hu.norm())
    assert float((HU[:, 1] - Hv).norm()) <= 1e-10 * float(Hv.norm())
    assert float((HU[:, 2] - expected).norm()) <= tol + 1e-10 * float(HU[:, 2].norm())
