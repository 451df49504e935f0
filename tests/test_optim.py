"""landscape.optim against hand computations in float64 on a quadratic L(w) = 1/2 w^T A w - b^T w
(w split over two parameter tensors, so norms and per-tensor rules are exercised): SAM/ASAM's
closed-form perturbation, SA-SAM's AdGD recurrence, the E adaptor's a_k and adapted gradient,
ALTO (Lamb trust ratio, AdamW limit), basin hopping's Metropolis rule with a replayed generator and
its bitwise restore; then every optimizer through landscape.attach on the digits MLP with the
trajectory bitwise unchanged and the loss recorded."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape
from landscape.models import DigitsMLP
from landscape.optim import ALTO, SAM, SASAM, BasinHopping, GradientAdaptor
from probes import RestrictedSecant
from tests._helpers import assert_same_weights, digits, loader, record

pytestmark = pytest.mark.usefixtures("one_thread")

_rng = np.random.default_rng(0)
_M = _rng.normal(size=(5, 5))
A = _M @ _M.T / 5 + np.diag([0.2, 0.5, 1.0, 2.0, 4.0])  # SPD, condition number ~ 30
B = _rng.normal(size=5)
W0 = _rng.normal(size=5)


def grad(w: np.ndarray) -> np.ndarray:
    return A @ w - B


def loss(w: np.ndarray) -> float:
    return float(0.5 * w @ A @ w - B @ w)


def _problem(w0: np.ndarray = W0) -> tuple[list[torch.nn.Parameter], Callable[[], torch.Tensor]]:
    """The quadratic as two float64 parameters (3 + 2 entries) and its closure."""
    p1 = torch.nn.Parameter(torch.tensor(w0[:3], dtype=torch.float64))
    p2 = torch.nn.Parameter(torch.tensor(w0[3:], dtype=torch.float64))
    At, Bt = torch.tensor(A), torch.tensor(B)

    def closure() -> torch.Tensor:
        for p in (p1, p2):
            p.grad = None
        w = torch.cat([p1, p2])
        value = 0.5 * w @ At @ w - Bt @ w
        value.backward()
        return value

    return [p1, p2], closure


def _w(params: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([p.detach() for p in params]).numpy()


# -- SAM / ASAM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_and_asam_step_equal_the_closed_form(adaptive):
    lr, rho, eta0 = 0.1, 0.3, 0.01
    params, closure = _problem()
    opt = SAM(params, torch.optim.SGD, rho=rho, adaptive=adaptive, eta0=eta0, lr=lr)
    w = W0.copy()
    for _ in range(3):
        g = grad(w)
        if adaptive:
            T = np.abs(w) + eta0
            eps = rho * T**2 * g / np.linalg.norm(T * g)
        else:
            eps = rho * g / np.linalg.norm(g)
        out = opt.step(closure)
        assert float(out.detach()) == pytest.approx(loss(w), rel=1e-14)   # the loss at the unperturbed point
        # .grad holds the gradient that drove the update
        np.testing.assert_allclose(_w([p.grad for p in params]), grad(w + eps), rtol=1e-13, atol=1e-14)
        w = w - lr * grad(w + eps)
        np.testing.assert_allclose(_w(params), w, rtol=1e-13, atol=1e-14)


def test_sam_feeds_the_perturbed_gradient_to_any_base_optimizer():
    """SAM(Adam) = Adam stepping with grad L(w + eps) (ground truth: torch's Adam on a copy)."""
    params, closure = _problem()
    opt = SAM(params, torch.optim.Adam, rho=0.2, lr=0.05, betas=(0.8, 0.9))
    ref = torch.nn.Parameter(torch.tensor(W0))
    ref_opt = torch.optim.Adam([ref], lr=0.05, betas=(0.8, 0.9))
    for _ in range(3):
        w = ref.detach().numpy()
        g = grad(w)
        ref.grad = torch.tensor(grad(w + 0.2 * g / np.linalg.norm(g)))
        ref_opt.step()
        opt.step(closure)
        np.testing.assert_allclose(_w(params), ref.detach().numpy(), rtol=1e-13, atol=1e-15)
    # state and groups are the base optimizer's: probes and schedulers see through the wrapper
    assert opt.state is opt.base_optimizer.state and "exp_avg_sq" in opt.state[params[0]]
    assert opt.param_groups is opt.base_optimizer.param_groups and opt.param_groups[0]["rho"] == 0.2
    sd = opt.state_dict()
    opt2 = SAM(_problem()[0], torch.optim.Adam, rho=0.7, lr=1.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["rho"] == 0.2 and opt2.param_groups is opt2.base_optimizer.param_groups


def test_sam_needs_a_closure_and_valid_arguments():
    params, _ = _problem()
    opt = SAM(params, torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="needs a closure"):
        SASAM(_problem()[0]).step()
    with pytest.raises(TypeError, match="class"):
        SAM(params, torch.optim.SGD(params, lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(params, torch.optim.SGD, rho=-1.0, lr=0.1)
    with pytest.raises(RuntimeError, match="needs a closure"):
        BasinHopping(torch.optim.SGD(params, lr=0.1), local_steps=2, sigma=0.1, temperature=1.0).step()


# -- SA-SAM ---------------------------------------------------------------------------------------
def test_sasam_step_sizes_follow_the_adgd_recurrence():
    eta0, c = 0.02, 0.5
    params, closure = _problem()
    opt = SASAM(params, lr=eta0, rho_scale=c)
    w, w_prev, g_prev, eta_prev, theta_prev = W0.copy(), None, None, eta0, math.inf
    branches = set()
    for k in range(8):
        g = grad(w)
        if k == 0:
            eta = eta0
        else:
            growth = math.sqrt(1 + theta_prev) * eta_prev
            curv = np.linalg.norm(w - w_prev) / (2 * np.linalg.norm(g - g_prev))
            eta = min(growth, curv)
            branches.add("growth" if growth < curv else "curvature")
        theta = eta / eta_prev if k > 0 else math.inf
        rho = c * math.sqrt(eta)
        opt.step(closure)
        assert opt.step_sizes[-1] == pytest.approx(eta, rel=1e-9)
        assert opt.param_groups[0]["rho"] == pytest.approx(rho, rel=1e-9)
        w_prev, g_prev, eta_prev, theta_prev = w, g, eta, theta
        w = w - eta * grad(w + rho * g / np.linalg.norm(g))
        # AdGD divides by small gradient differences: rounding grows to ~1e-12 over the steps
        np.testing.assert_allclose(_w(params), w, rtol=1e-10, atol=1e-12)
    assert branches == {"growth", "curvature"}  # both arms of the min were exercised


# -- the E adaptor and ALTO ------------------------------------------------------------------------
def test_adaptor_recurrence_and_adapted_gradient_over_three_steps():
    lr, alpha, b1 = 0.1, -2.0, 0.7
    params, closure = _problem()
    opt = GradientAdaptor(torch.optim.SGD(params, lr=lr), alpha=alpha, beta1=b1)
    w, a, g_prev = W0.copy(), np.zeros(5), np.zeros(5)
    for _ in range(3):
        closure()
        raw = [p.grad.clone() for p in params]
        g = grad(w)
        a = b1 * a + (1 - b1) * (g - g_prev)
        opt.step()
        w = w - lr * (g + alpha * a)
        g_prev = g
        np.testing.assert_allclose(_w(params), w, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(_w([opt.state[p]["grad_diff_avg"] for p in params]), a, rtol=1e-13, atol=1e-15)
        assert all(torch.equal(p.grad, r) for p, r in zip(params, raw))  # the raw gradient is restored
    assert opt.param_groups is opt.optimizer.param_groups and opt.param_groups[0]["alpha"] == alpha


def test_adaptor_with_alpha_zero_is_the_base_optimizer_bitwise():
    params, closure = _problem()
    ref, ref_closure = _problem()
    opt = GradientAdaptor(torch.optim.Adam(params, lr=0.05), alpha=0.0, beta1=0.9)
    ref_opt = torch.optim.Adam(ref, lr=0.05)
    for _ in range(5):
        closure()
        ref_closure()
        opt.step()
        ref_opt.step()
    for p, q in zip(params, ref):
        assert torch.equal(p, q)
    # the state survives a round trip
    sd = opt.state_dict()
    opt2 = GradientAdaptor(torch.optim.Adam(_problem()[0], lr=1.0), alpha=0.0)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.05 and opt2.param_groups is opt2.optimizer.param_groups


def test_alto_matches_the_hand_recurrence_with_lamb_trust_ratio():
    lr, alpha, b1, (bm, bv), eps, wd = 0.05, -3.0, 0.9, (0.8, 0.95), 1e-6, 0.01
    params, closure = _problem()
    opt = ALTO(params, lr=lr, alpha=alpha, beta1=b1, betas=(bm, bv), eps=eps, weight_decay=wd)
    parts = [slice(0, 3), slice(3, 5)]  # the trust ratio is per parameter tensor
    w = W0.copy()
    a, gp, m, v = (np.zeros(5) for _ in range(4))
    for k in range(1, 4):
        closure()
        g = grad(w)
        a = b1 * a + (1 - b1) * (g - gp)
        u = g + alpha * a
        m = bm * m + (1 - bm) * u
        v = bv * v + (1 - bv) * u**2
        r = (m / (1 - bm**k)) / (np.sqrt(v / (1 - bv**k)) + eps) + wd * w
        new = w.copy()
        for s in parts:
            new[s] = w[s] - lr * np.linalg.norm(w[s]) / np.linalg.norm(r[s]) * r[s]
        opt.step()
        w, gp = new, g
        np.testing.assert_allclose(_w(params), w, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(_w([opt.state[p]["grad_diff_avg"] for p in params]), a, rtol=1e-13, atol=1e-15)


def test_alto_without_trust_ratio_is_the_adapted_adamw():
    kw = dict(alpha=-1.5, beta1=0.6)
    params, closure = _problem()
    ref, ref_closure = _problem()
    opt = ALTO(params, lr=0.03, betas=(0.85, 0.97), eps=1e-7, weight_decay=0.02, trust_ratio=False, **kw)
    ref_opt = GradientAdaptor(torch.optim.AdamW(ref, lr=0.03, betas=(0.85, 0.97), eps=1e-7, weight_decay=0.02), **kw)
    for _ in range(5):
        closure()
        ref_closure()
        opt.step()
        ref_opt.step()
    np.testing.assert_allclose(_w(params), _w(ref), rtol=1e-13)


# -- basin hopping ----------------------------------------------------------------------------------
def _replay_hops(lr: float, K: int, sigma: float, T: float, seed: int, steps: int, w0: np.ndarray = W0):
    """Basin hopping with plain GD, by hand, with the same generator stream."""
    gen = torch.Generator().manual_seed(seed)
    w, anchor, anchor_loss, decisions = w0.copy(), None, None, []
    for s in range(steps):
        if s > 0 and s % K == 0:
            if anchor is None:
                anchor, anchor_loss = w.copy(), loss(w)
            else:
                u = float(torch.rand((), generator=gen, dtype=torch.float64))
                new = loss(w)
                accept = new <= anchor_loss or (T > 0 and u < math.exp(-(new - anchor_loss) / T))
                decisions.append(accept)
                if accept:
                    anchor, anchor_loss = w.copy(), new
            z = np.concatenate([torch.randn(3, generator=gen, dtype=torch.float64).numpy(),
                                torch.randn(2, generator=gen, dtype=torch.float64).numpy()])
            w = anchor + sigma * z
        w = w - lr * grad(w)
    return w, decisions


@pytest.mark.parametrize("T, expected", [(1e300, "all accepted"), (0.5, "mixed")])
def test_basin_hopping_follows_the_metropolis_rule(T, expected):
    lr, K, sigma, seed, steps = 0.05, 3, 0.8, 7, 3 * 12 + 1
    params, closure = _problem()
    opt = BasinHopping(torch.optim.SGD(params, lr=lr), local_steps=K, sigma=sigma, temperature=T, seed=seed)
    for _ in range(steps):
        opt.step(closure)
    w, decisions = _replay_hops(lr, K, sigma, T, seed, steps)
    np.testing.assert_allclose(_w(params), w, rtol=1e-12, atol=1e-14)
    assert [h["accepted"] for h in opt.history] == decisions and opt.hops == len(decisions) == 11
    if expected == "all accepted":
        assert all(decisions)
    else:
        assert 0 < sum(decisions) < len(decisions)
        # some accepted moves went uphill (only Metropolis allows that)
        assert any(h["accepted"] and h["loss_new"] > h["loss_anchor"] for h in opt.history)


def test_basin_hopping_rejects_a_worse_point_and_restores_parameters_and_state():
    w_star = np.linalg.solve(A, B)
    params, closure = _problem(w_star)  # start at the minimum: every hop ends higher
    K = 2
    opt = BasinHopping(torch.optim.SGD(params, lr=0.01, momentum=0.9), local_steps=K, sigma=0.5, temperature=1e-300, seed=3)
    for _ in range(K):
        opt.step(closure)
    anchor = [p.detach().clone() for p in params]
    anchor_state = [opt.optimizer.state[p]["momentum_buffer"].clone() for p in params]
    for _ in range(K):  # the hop: perturbation + K local steps
        opt.step(closure)
    assert not all(torch.equal(p, q) for p, q in zip(params, anchor))
    assert opt.decide(closure) is False
    assert opt.history[-1]["loss_new"] > opt.history[-1]["loss_anchor"]
    for p, q, buf in zip(params, anchor, anchor_state):
        assert torch.equal(p, q)
        assert torch.equal(opt.optimizer.state[p]["momentum_buffer"], buf)
    assert opt.decide(closure) is None  # nothing pending any more
    # temperature 0 is greedy; a checkpoint resumes the same hops
    sd = opt.state_dict()
    for _ in range(3):
        opt.step(closure)
    params2, closure2 = _problem(w_star)
    opt2 = BasinHopping(torch.optim.SGD(params2, lr=0.01, momentum=0.9), local_steps=K, sigma=0.5, temperature=1e-300, seed=99)
    with torch.no_grad():
        for p, q in zip(params2, anchor):
            p.copy_(q)
    opt2.load_state_dict(sd)
    for _ in range(3):
        opt2.step(closure2)
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_basin_hopping_validates_its_arguments():
    params, _ = _problem()
    sgd = torch.optim.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="local_steps"):
        BasinHopping(sgd, local_steps=0, sigma=0.1, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        BasinHopping(sgd, local_steps=2, sigma=0.1, temperature=-1.0)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        BasinHopping(params, local_steps=2, sigma=0.1, temperature=1.0)


# -- through landscape.attach --------------------------------------------------------------------------
OPTIMIZERS = {
    "sam": lambda ps: SAM(ps, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9),
    "asam": lambda ps: SAM(ps, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.1),
    "sasam": lambda ps: SASAM(ps, lr=0.05, rho_scale=0.2),
    "adaptor": lambda ps: GradientAdaptor(torch.optim.SGD(ps, lr=0.1, momentum=0.9), alpha=-1.0, beta1=0.9),
    "alto": lambda ps: ALTO(ps, lr=0.01, weight_decay=1e-4),
    "basin": lambda ps: BasinHopping(torch.optim.Adam(ps, lr=0.01), local_steps=3, sigma=0.01, temperature=0.1, seed=1),
}


def _run(make, attach: bool, steps: int = 8):
    torch.manual_seed(0)
    net = DigitsMLP(hidden=8)
    opt = make(list(net.parameters()))
    rec = None
    if attach:
        (X, y), _ = digits()
        rec = landscape.attach(net, opt, loss_fn=F.cross_entropy, probe_data=(X[:128], y[:128]), probe_batch_size=64,
                               probes=[RestrictedSecant(every=3, samples=2)], seed=0, run={"optimizer": "x", "seed": 0})
    losses, it = [], iter(loader(0, n=512))
    for _ in range(steps):
        xb, yb = next(it)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            value = F.cross_entropy(net(xb), yb)
            value.backward()
            return value

        losses.append(float(opt.step(closure).detach()))
    if rec is not None:
        rec.close()
    return net, losses, rec


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_attach_leaves_the_trajectory_bitwise_unchanged_and_records_the_loss(name):
    plain, plain_losses, _ = _run(OPTIMIZERS[name], attach=False)
    net, losses, rec = _run(OPTIMIZERS[name], attach=True)
    assert_same_weights(plain, net)
    assert losses == plain_losses
    ds = landscape.open_run(rec.path)
    np.testing.assert_array_equal(ds["loss"].values, np.asarray(losses))  # the closure's first value
    assert not rec.probe_errors, rec.probe_errors
    # the probe ran on the due steps (0, 3, 6) and saw the step's geometry
    gn = ds["grad_norm"].values
    assert np.isfinite(gn[[0, 3, 6]]).all() and (gn[[0, 3, 6]] > 0).all() and np.isnan(gn[[1, 2, 4, 5, 7]]).all()


@pytest.mark.parametrize("name", ["adaptor", "alto"])
def test_single_evaluation_optimizers_work_in_the_plain_loop_without_a_closure(name, tmp_path):
    """loss.backward(); opt.step(): the recorder reads the raw .grad before the step and the loss
    from the backward tap; the trajectory is bitwise the same as without it."""
    make = {"adaptor": lambda ps, **kw: GradientAdaptor(torch.optim.SGD(ps, lr=0.1, momentum=0.9), alpha=-1.0, beta1=0.9),
            "alto": lambda ps, **kw: ALTO(ps, lr=0.01)}[name]
    plain, _ = record(None, None, model=lambda: DigitsMLP(hidden=8), steps=6, opt_cls=make)
    net, path = record(tmp_path / "run.zarr", [RestrictedSecant(every=2, samples=2)], model=lambda: DigitsMLP(hidden=8),
                       steps=6, opt_cls=make)
    assert_same_weights(plain, net)
    ds = landscape.open_run(path)
    assert np.isfinite(ds["loss"].values).all() and ds["loss"].values[0] == pytest.approx(math.log(10), rel=0.1)
    assert np.isfinite(ds["grad_norm"].values[[0, 2, 4]]).all()
