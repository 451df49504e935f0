"""Reference optimizers from the flatness / valley literature, as ``torch.optim.Optimizer`` objects.

Each class works with :func:`landscape.attach` (the recorder hooks ``optimizer.step`` and reads
``.grad`` before the step, or wraps the closure when one is passed) and with LR schedulers (the
wrappers share ``param_groups`` with the optimizer they wrap). Nothing here draws from the global
RNG: :class:`BasinHopping` owns a seeded ``torch.Generator``; the others are deterministic.

- :class:`SAM` / ASAM (``adaptive=True``): two gradient evaluations per step, needs a closure.
- :class:`SASAM`: SAM with the AdGD step size and ``rho_k = sqrt(eta_k)``; needs a closure.
- :class:`GradientAdaptor`: the "E" adaptor of ALTO around any torch optimizer.
- :class:`ALTO`: the E-adapted Lamb (``trust_ratio=False``: the E-adapted AdamW).
- :class:`BasinHopping`: perturb, K local steps of a wrapped optimizer, Metropolis acceptance;
  one ``.step(closure)`` is one local step.

The closure convention (as for ``torch.optim.LBFGS``): it zeroes the gradients, computes the loss
on the current batch, calls ``backward()`` and returns the loss::

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        return loss
    opt.step(closure)
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

__all__ = ["ALTO", "BasinHopping", "GradientAdaptor", "SAM", "SASAM"]

Closure = Callable[[], Any]


def _params(groups: Iterable[dict[str, Any]]) -> list[Tensor]:
    return [p for g in groups for p in g["params"]]


def _as_float(value: Any) -> float:
    return float(value.detach()) if isinstance(value, Tensor) else float(value)


def _check_closure(closure: Closure | None, who: str) -> Closure:
    if closure is None:
        raise RuntimeError(
            f"{who}.step needs a closure (it evaluates the gradient more than once per step): "
            "call opt.step(closure) with a closure that zeroes the gradients, computes the loss, "
            "calls loss.backward() and returns the loss")
    if not callable(closure):
        raise TypeError(f"{who}.step(closure): the closure must be callable, got {type(closure).__name__}")
    return closure


def _evaluate(closure: Closure, params: list[Tensor]) -> Any:
    """One gradient evaluation: .grad is zeroed first, so closures that do not zero it work too."""
    for p in params:
        if p.grad is not None:
            p.grad.detach_()
            p.grad.zero_()
    with torch.enable_grad():
        return closure()


def _check_number(name: str, value: Any, *, low: float = 0.0, strict: bool = False, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if (value <= low if strict else value < low) or (high is not None and value >= high):
        bound = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return float(value)


def _share_groups(wrapper: torch.optim.Optimizer, inner: torch.optim.Optimizer) -> None:
    """Make the wrapper and the wrapped optimizer hold the very same param_groups list (LR
    schedulers, the recorder and state_dict see one set of hyperparameters)."""
    wrapper.param_groups = inner.param_groups


# --------------------------------------------------------------------------------------------
# SAM / ASAM
# --------------------------------------------------------------------------------------------
class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimisation (Foret et al., ICLR 2021, arXiv 2010.01412) and adaptive SAM
    (ASAM, Kwon et al., ICML 2021, arXiv 2102.11600) around any torch optimizer.

    One step at the parameters :math:`w` with gradient :math:`g = \nabla L(w)`:

    - SAM: :math:`\epsilon = \rho\, g / \lVert g \rVert`;
    - ASAM (``adaptive=True``): :math:`T = |w| + \eta_0` (element-wise),
      :math:`\epsilon = \rho\, T^2 g / \lVert T g \rVert`;

    then the base optimizer steps from :math:`w` with the gradient :math:`\nabla L(w + \epsilon)`
    (for SGD: :math:`w \leftarrow w - \mathrm{lr}\, \nabla L(w + \epsilon)`). Norms run over all
    parameters of all groups (accumulated in float64); ``rho``, ``adaptive`` and ``eta0`` may differ
    per group. The official ASAM code applies :math:`T` only to parameters named ``weight`` (biases
    get :math:`T = 1`); here it applies to every parameter (an optimizer does not know names).

    ``step(closure)`` is required: the closure is evaluated at :math:`w` (its value is returned,
    and is what :func:`landscape.attach` records as the step's loss) and at :math:`w + \epsilon`.
    ``.grad`` is zeroed before each evaluation. After the step the parameters are the base
    optimizer's update of the exact (bitwise) original :math:`w`, and ``.grad`` holds
    :math:`\nabla L(w + \epsilon)`, the gradient that drove the update.

    ``state``, ``param_groups`` and ``state_dict()`` are those of the base optimizer (the SAM
    hyperparameters live in its groups), so probes and LR schedulers see through the wrapper.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        base_optimizer_cls: the optimizer that takes the step (e.g. ``torch.optim.SGD``).
        rho: the radius of the perturbation (0.05 for SAM; ASAM uses larger ones, e.g. 0.5-2).
        adaptive: ASAM's scale-invariant perturbation.
        eta0: ASAM's offset in :math:`T = |w| + \eta_0`.
        **base_kwargs: passed to ``base_optimizer_cls`` (``lr``, ``momentum``, ...).
    """

    def __init__(self, params: Any, base_optimizer_cls: type[torch.optim.Optimizer] = torch.optim.SGD, rho: float = 0.05,
                 adaptive: bool = False, eta0: float = 0.01, **base_kwargs: Any) -> None:
        if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, torch.optim.Optimizer)):
            raise TypeError("base_optimizer_cls must be a torch.optim.Optimizer class such as torch.optim.SGD "
                            f"(the class, not an instance), got {base_optimizer_cls!r}")
        _check_number("rho", rho)
        _check_number("eta0", eta0)
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be True (ASAM) or False (SAM), got {adaptive!r}")
        super().__init__(params, dict(rho=float(rho), adaptive=adaptive, eta0=float(eta0), **base_kwargs))
        self.base_optimizer = base_optimizer_cls(self.param_groups, **base_kwargs)
        _share_groups(self, self.base_optimizer)
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to this optimizer and to the base optimizer (they share the groups)."""
        if not hasattr(self, "base_optimizer"):
            super().add_param_group(param_group)
            return
        for k in ("rho", "adaptive", "eta0"):
            param_group.setdefault(k, self.defaults[k])
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (its groups carry rho, adaptive and eta0)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`."""
        self.base_optimizer.load_state_dict(state_dict)
        _share_groups(self, self.base_optimizer)
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def perturbation(self) -> list[Tensor | None]:
        """:math:`\\epsilon` per parameter from the current ``.grad`` and parameters (None where a
        parameter has no gradient); the formula is in the class docstring."""
        scaled: list[tuple[Tensor, dict[str, Any], Tensor | None]] = []
        sq = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    scaled.append((p, group, None))
                    continue
                t = p.abs().add_(group["eta0"]) if group["adaptive"] else None
                tg = p.grad * t if t is not None else p.grad
                sq = sq + torch.linalg.vector_norm(tg, dtype=torch.float64).square().cpu()
                scaled.append((p, group, t))
        norm = float(sq.sqrt())
        out: list[Tensor | None] = []
        for p, group, t in scaled:
            if p.grad is None:
                out.append(None)
                continue
            # norm == 0 means g == 0 (up to T > 0), where epsilon = 0 whatever the scale
            scale = group["rho"] / norm if norm > 0 else 0.0
            e = p.grad * scale if t is None else p.grad * t.square() * scale
            out.append(e)
        return out

    def _sam_step(self, closure: Closure) -> Any:
        params = _params(self.param_groups)
        loss = _evaluate(closure, params)
        with torch.no_grad():
            eps = self.perturbation()
            saved = [p.detach().clone() if e is not None else None for p, e in zip(params, eps)]
            for p, e in zip(params, eps):
                if e is not None:
                    p.add_(e)
        _evaluate(closure, params)
        with torch.no_grad():
            for p, w in zip(params, saved):
                if w is not None:
                    p.copy_(w)  # the exact w, not w + eps - eps
        self.base_optimizer.step()
        return loss

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One SAM step; ``closure`` is required. Returns the loss at the unperturbed point."""
        return self._sam_step(_check_closure(closure, type(self).__name__))


class SASAM(SAM):
    r"""SA-SAM: SAM with the AdGD step size and :math:`\rho_k = c \sqrt{\eta_k}` (as listed among
    the optimizers compared over seeds in REFERENCE §6).

    AdGD is "adaptive gradient descent without descent" (Malitsky & Mishchenko, ICML 2020,
    arXiv 1910.09529): with :math:`g_k = \nabla L(w_k)`, an arbitrary :math:`\eta_0` (``lr``) and
    :math:`\theta_0 = +\infty`,

    .. math::
        \eta_k = \min\Big(\sqrt{1 + \theta_{k-1}}\, \eta_{k-1},\;
                 \frac{\lVert w_k - w_{k-1} \rVert}{2 \lVert g_k - g_{k-1} \rVert}\Big), \qquad
        \theta_k = \eta_k / \eta_{k-1}.

    Our reading of SA-SAM, step :math:`k`: evaluate :math:`g_k` at :math:`w_k` (the first closure
    call), take :math:`\eta_k` from the recurrence above (gradients at the iterates, so the ratio is
    AdGD's local inverse-Lipschitz estimate), set :math:`\rho_k = c\sqrt{\eta_k}` (``rho_scale``
    :math:`c = 1` by default), perturb as SAM/ASAM with :math:`\rho_k` and step
    :math:`w_{k+1} = w_k - \eta_k \nabla L(w_k + \epsilon_k)`. Norms run over all parameters
    (float64). When :math:`g_k = g_{k-1}` the curvature term is :math:`+\infty` (no curvature seen)
    and the growth term decides; when both are infinite (step 1 without curvature)
    :math:`\eta_k = \eta_{k-1}`. With mini-batches :math:`g_k - g_{k-1}` mixes two batches, which
    AdGD's deterministic analysis does not cover.

    After each step every group's ``lr`` holds the :math:`\eta_k` just used and ``rho`` the
    :math:`\rho_k` (:attr:`step_sizes` keeps the history), so the recorder's ``lr`` at step
    :math:`k` (read before the step) is :math:`\eta_{k-1}`. The step size is AdGD's: an LR scheduler
    would only rescale :math:`\eta_{k-1}` in the growth term, so do not attach one.

    Args:
        params: parameters or parameter groups (one :math:`\eta_k` is shared by all groups).
        lr: :math:`\eta_0`, the step size of the first step.
        rho_scale: :math:`c` in :math:`\rho_k = c\sqrt{\eta_k}`.
        adaptive, eta0: ASAM's perturbation, as in :class:`SAM`.
    """

    def __init__(self, params: Any, lr: float = 0.1, rho_scale: float = 1.0, adaptive: bool = False,
                 eta0: float = 0.01) -> None:
        _check_number("lr", lr, strict=True)
        _check_number("rho_scale", rho_scale)
        super().__init__(params, torch.optim.SGD, rho=rho_scale * math.sqrt(lr), adaptive=adaptive, eta0=eta0, lr=lr)
        self.rho_scale = float(rho_scale)
        for g in self.param_groups:
            g.setdefault("adgd_theta", math.inf)
            g.setdefault("adgd_step", 0)
        self.step_sizes: list[float] = []

    def _adgd(self, params: list[Tensor]) -> float:
        group0 = self.param_groups[0]
        eta_prev, theta_prev, k = float(group0["lr"]), float(group0["adgd_theta"]), int(group0["adgd_step"])
        if k == 0:
            return eta_prev
        dw = torch.zeros((), dtype=torch.float64)
        dg = torch.zeros((), dtype=torch.float64)
        for p in params:
            st = self.state[p]
            if p.grad is None or "adgd_prev_w" not in st:
                continue
            dw = dw + torch.linalg.vector_norm(p.detach() - st["adgd_prev_w"], dtype=torch.float64).square().cpu()
            dg = dg + torch.linalg.vector_norm(p.grad - st["adgd_prev_g"], dtype=torch.float64).square().cpu()
        dw_n, dg_n = math.sqrt(float(dw)), math.sqrt(float(dg))
        growth = math.sqrt(1.0 + theta_prev) * eta_prev
        curvature = dw_n / (2.0 * dg_n) if dg_n > 0 else math.inf
        eta = min(growth, curvature)
        return eta if math.isfinite(eta) and eta > 0 else eta_prev

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One SA-SAM step; ``closure`` is required. Returns the loss at the unperturbed point."""
        closure = _check_closure(closure, type(self).__name__)
        params = _params(self.param_groups)
        # the first evaluation happens here (g_k is needed for eta_k before the perturbation);
        # the SAM step then reuses it through a closure that returns the cached loss once
        loss = _evaluate(closure, params)
        eta_prev = float(self.param_groups[0]["lr"])
        eta = self._adgd(params)
        theta = eta / eta_prev if self.param_groups[0]["adgd_step"] > 0 else math.inf
        for p in params:
            if p.grad is not None:
                st = self.state[p]
                st["adgd_prev_w"] = p.detach().clone()
                st["adgd_prev_g"] = p.grad.detach().clone()
        k = int(self.param_groups[0]["adgd_step"])
        for g in self.param_groups:  # one eta_k for all groups (also groups added later)
            g["lr"], g["rho"] = eta, self.rho_scale * math.sqrt(eta)
            g["adgd_theta"], g["adgd_step"] = theta, k + 1
        self.step_sizes.append(eta)
        eps = self.perturbation()
        saved = [p.detach().clone() if e is not None else None for p, e in zip(params, eps)]
        for p, e in zip(params, eps):
            if e is not None:
                p.add_(e)
        _evaluate(closure, params)
        for p, w in zip(params, saved):
            if w is not None:
                p.copy_(w)
        self.base_optimizer.step()
        return loss


# --------------------------------------------------------------------------------------------
# The E adaptor and ALTO
# --------------------------------------------------------------------------------------------
def _adapt(state: dict[str, Any], grad: Tensor, beta1: float) -> Tensor:
    """a_k = b1 a_{k-1} + (1 - b1)(g_k - g_{k-1}) with a_0 = 0 and g_0 = 0 (the first difference is
    g_1 itself, as in the public ALTO code); updates ``state`` and returns a_k."""
    if "grad_diff_avg" not in state:
        state["grad_diff_avg"] = torch.zeros_like(grad)
        state["prev_grad"] = torch.zeros_like(grad)
    a = state["grad_diff_avg"]
    a.mul_(beta1).add_(grad - state["prev_grad"], alpha=1.0 - beta1)
    state["prev_grad"].copy_(grad)
    return a


class GradientAdaptor(torch.optim.Optimizer):
    r"""The "E" adaptor of Zhao et al. (NeurIPS 2025, "Exploring landscapes for better minima along
    valleys", arXiv 2510.27153) around any torch optimizer: before the wrapped optimizer steps, each
    parameter's gradient :math:`g_k` is replaced by

    .. math::
        \tilde g_k = g_k + \alpha\, a_k, \qquad a_k = \beta_1 a_{k-1} + (1 - \beta_1)(g_k - g_{k-1}),

    with :math:`a_0 = 0` and :math:`g_0 = 0` (so :math:`a_1 = (1 - \beta_1) g_1`, the convention of
    the public ALTO implementation). :math:`g_k - g_{k-1} \approx H (w_k - w_{k-1})`, so :math:`a`
    is curvature along the recent steps; a negative :math:`\alpha` pushes the iterate on along the
    valley floor (the paper's ALTO uses :math:`\alpha < 0`, e.g. -5). "ESGD", "EAdam", "ELamb" in the
    paper are ``GradientAdaptor(SGD/Adam/Lamb)``. With ``alpha=0`` the wrapped optimizer's
    trajectory is reproduced bitwise (the gradient is not touched).

    ``.grad`` holds :math:`g_k` again after the step (probes and logging see the raw gradient);
    :attr:`last_adapted` is False until a step ran. ``param_groups`` are the wrapped optimizer's
    (with ``alpha`` and ``beta1`` added, per group); ``state`` holds :math:`a` and
    :math:`g_{k-1}`; ``state_dict()`` includes the wrapped optimizer's under ``"wrapped"``.
    A closure, if given, is evaluated once (the wrapped optimizer then steps without it).

    Args:
        optimizer: the torch optimizer to adapt (already built on the parameters).
        alpha: the weight :math:`\alpha` of :math:`a_k` (negative explores along valleys).
        beta1: the EMA coefficient :math:`\beta_1 \in [0, 1)`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, alpha: float = -5.0, beta1: float = 0.99) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (built on the parameters), got {type(optimizer).__name__}")
        _check_number("alpha", alpha, low=-math.inf)
        _check_number("beta1", beta1, high=1.0)
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, dict(alpha=float(alpha), beta1=float(beta1)))
        _share_groups(self, optimizer)
        self.last_adapted = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (the groups are shared)."""
        if not hasattr(self, "last_adapted"):
            super().add_param_group(param_group)
            return
        for k, v in self.defaults.items():
            param_group.setdefault(k, v)
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """This adaptor's state and groups, with the wrapped optimizer's under ``"wrapped"``."""
        sd = super().state_dict()
        sd["wrapped"] = self.optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`."""
        sd = dict(state_dict)
        self.optimizer.load_state_dict(sd.pop("wrapped"))
        super().load_state_dict(sd)
        _share_groups(self, self.optimizer)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """Adapt every gradient, let the wrapped optimizer step, restore the raw gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        raw: list[tuple[Tensor, Tensor]] = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GradientAdaptor does not support sparse gradients")
                a = _adapt(self.state[p], p.grad, group["beta1"])
                if group["alpha"] != 0:
                    raw.append((p, self.state[p]["prev_grad"]))
                    p.grad.add_(a, alpha=group["alpha"])
        self.optimizer.step()
        for p, g in raw:
            p.grad.copy_(g)
        self.last_adapted = True
        return loss


class ALTO(torch.optim.Optimizer):
    r"""ALTO: the E-adapted Lamb of Zhao et al. (NeurIPS 2025, arXiv 2510.27153); with
    ``trust_ratio=False`` the E-adapted AdamW. Per parameter tensor, step :math:`k`:

    .. math::
        a_k &= \beta_1 a_{k-1} + (1 - \beta_1)(g_k - g_{k-1}) \quad (a_0 = 0,\ g_0 = 0) \\
        u_k &= g_k + \alpha\, a_k \\
        m_k &= \beta_m m_{k-1} + (1 - \beta_m) u_k, \quad v_k = \beta_v v_{k-1} + (1 - \beta_v) u_k^2 \\
        r_k &= \frac{m_k / (1 - \beta_m^k)}{\sqrt{v_k / (1 - \beta_v^k)} + \varepsilon} + \lambda w_k \\
        w_{k+1} &= w_k - \mathrm{lr}\; \tau_k\, r_k, \qquad
        \tau_k = \lVert w_k \rVert / \lVert r_k \rVert \ \ (1 \text{ if either norm is } 0)

    with ``betas`` :math:`= (\beta_m, \beta_v)`, ``weight_decay`` :math:`= \lambda` (decoupled, as in
    Lamb and AdamW) and :math:`\tau_k` Lamb's layer-wise trust ratio (You et al., ICLR 2020, with
    :math:`\phi` the identity); ``trust_ratio=False`` sets :math:`\tau_k = 1`, which is AdamW on
    :math:`u_k` (equal to ``GradientAdaptor(torch.optim.AdamW(...), alpha, beta1)`` up to rounding).
    The paper names the adapted Lamb ALTO; the public implementation we read (a torch
    class ``ALTO(params, lr, betas=(b1, b2, b3), alp, eps, weight_decay)``) follows the same
    recurrences, but also clips the global gradient norm to 1 before adapting (clip in your loop
    with ``torch.nn.utils.clip_grad_norm_`` for the same effect) and applies the trust ratio only when
    ``weight_decay != 0``; here it applies whenever ``trust_ratio`` is True. Its defaults
    (``create_ALTO_optimizer``): :math:`\beta_1 = 0.99`, betas (0.9, 0.99), :math:`\alpha = -5`,
    eps 1e-6.

    Args:
        params: parameters or parameter groups.
        lr: the learning rate.
        alpha: the weight of :math:`a_k` (negative explores along valleys).
        beta1: the EMA coefficient of the gradient differences.
        betas: Adam's :math:`(\beta_m, \beta_v)`.
        eps: Adam's :math:`\varepsilon`.
        weight_decay: decoupled weight decay :math:`\lambda`.
        trust_ratio: Lamb's layer-wise trust ratio (True: ALTO; False: E-adapted AdamW).
    """

    def __init__(self, params: Any, lr: float = 1e-3, alpha: float = -5.0, beta1: float = 0.99,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-6, weight_decay: float = 0.0,
                 trust_ratio: bool = True) -> None:
        _check_number("lr", lr)
        _check_number("alpha", alpha, low=-math.inf)
        _check_number("beta1", beta1, high=1.0)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair (beta_m, beta_v) such as (0.9, 0.99), got {betas!r}")
        _check_number("betas[0]", betas[0], high=1.0)
        _check_number("betas[1]", betas[1], high=1.0)
        _check_number("eps", eps)
        _check_number("weight_decay", weight_decay)
        if not isinstance(trust_ratio, bool):
            raise TypeError(f"trust_ratio must be True (Lamb) or False (AdamW), got {trust_ratio!r}")
        super().__init__(params, dict(lr=float(lr), alpha=float(alpha), beta1=float(beta1), betas=tuple(map(float, betas)),
                                      eps=float(eps), weight_decay=float(weight_decay), trust_ratio=trust_ratio))

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One ALTO step (the closure, if given, is evaluated once first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            bm, bv = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ALTO does not support sparse gradients")
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                a = _adapt(st, p.grad, group["beta1"])
                u = p.grad.add(a, alpha=group["alpha"])
                st["step"] += 1
                k = st["step"]
                st["exp_avg"].mul_(bm).add_(u, alpha=1.0 - bm)
                st["exp_avg_sq"].mul_(bv).addcmul_(u, u, value=1.0 - bv)
                r = (st["exp_avg"] / (1.0 - bm ** k)) / ((st["exp_avg_sq"] / (1.0 - bv ** k)).sqrt().add_(group["eps"]))
                if group["weight_decay"] != 0:
                    r.add_(p, alpha=group["weight_decay"])
                tau = 1.0
                if group["trust_ratio"]:
                    w_norm = float(torch.linalg.vector_norm(p, dtype=torch.float64))
                    r_norm = float(torch.linalg.vector_norm(r, dtype=torch.float64))
                    tau = w_norm / r_norm if w_norm > 0 and r_norm > 0 else 1.0
                p.add_(r, alpha=-group["lr"] * tau)
        return loss


# --------------------------------------------------------------------------------------------
# Basin hopping
# --------------------------------------------------------------------------------------------
class BasinHopping(torch.optim.Optimizer):
    r"""Basin hopping (Wales & Doye 1997; as compared with SAM by Inan, Liu, Shehu 2024, arXiv
    2403.00574) around any torch optimizer, one local step per ``.step(closure)``.

    The run is cut into cycles of ``local_steps`` = :math:`K` calls. Cycle 0 is :math:`K` plain
    local steps from the initial point. At the first call of every later cycle the bookkeeping
    happens, then that call's local step:

    1. the closure is evaluated at the current point :math:`w` (the end of the previous cycle); its
       value is returned (and recorded by :func:`landscape.attach` as the step's loss);
    2. the first time, :math:`(w, L(w))` and the wrapped optimizer's per-parameter state become the
       anchor. Later, :math:`w` is the end of a hop from the anchor :math:`(w_a, L_a)`: with
       :math:`u \sim U(0, 1)` from the generator, it is accepted when
       :math:`u < \exp(-(L(w) - L_a)/T)` (always when :math:`L(w) \le L_a`; ``temperature=0``:
       only then; a non-finite loss is rejected) and becomes the anchor; otherwise the parameters
       and the wrapped optimizer's per-parameter state (momentum, Adam moments, step counts) are
       restored to the anchor's, bitwise;
    3. the perturbation :math:`w \leftarrow w_a + \sigma z`, :math:`z \sim N(0, I)` from the
       generator (drawn on the CPU in the parameter dtype, so a seed gives the same hops on any
       device); the closure is evaluated again there and the wrapped optimizer steps.

    Other calls: evaluate the closure, let the wrapped optimizer step. So a hop costs one extra
    gradient evaluation every :math:`K` steps, and the loop stays the user's plain loop
    (``opt.step(closure)`` every iteration); LR schedules continue across hops (groups are never
    restored). The losses compared are the closure's, i.e. mini-batch losses of two different
    batches unless the closure uses a fixed batch. Call :meth:`decide` at the end of training to
    settle the last hop. Module buffers (BatchNorm statistics) are not restored.

    The generator draws :math:`u` at every decision (even when the new point is better) and
    :math:`z` at every perturbation, so a seed fixes the whole sequence of hops. :attr:`history`
    lists one dict per decision (step, loss_anchor, loss_new, accepted).

    Args:
        optimizer: the local optimizer (already built on the parameters).
        local_steps: :math:`K`, local steps per hop.
        sigma: the standard deviation :math:`\sigma` of the perturbation.
        temperature: :math:`T` of the Metropolis rule (0: greedy).
        seed: seeds this wrapper's own ``torch.Generator``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, local_steps: int, sigma: float, temperature: float,
                 seed: int = 0) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (built on the parameters), got {type(optimizer).__name__}")
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise ValueError(f"local_steps must be an integer >= 1 (local steps per hop), got {local_steps!r}")
        _check_number("sigma", sigma)
        _check_number("temperature", temperature)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.optimizer = optimizer
        super().__init__(optimizer.param_groups, {})
        _share_groups(self, optimizer)
        self.defaults = dict(local_steps=local_steps, sigma=float(sigma), temperature=float(temperature), seed=seed)
        self.local_steps, self.sigma, self.temperature, self.seed = local_steps, float(sigma), float(temperature), seed
        self.generator = torch.Generator().manual_seed(seed)
        self.steps_taken = 0
        self.anchor_loss: float | None = None
        self.pending = False  # a hop from the anchor is under way (perturbed, not yet decided)
        self.history: list[dict[str, Any]] = []

    @property
    def hops(self) -> int:
        """Decisions made so far."""
        return len(self.history)

    @property
    def accepted(self) -> int:
        """Hops accepted so far."""
        return sum(h["accepted"] for h in self.history)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (the groups are shared)."""
        if not hasattr(self, "optimizer") or not hasattr(self, "generator"):
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def _params(self) -> list[Tensor]:
        return _params(self.param_groups)

    def _set_anchor(self, loss: float) -> None:
        for p in self._params():
            st = self.state[p]
            st["anchor"] = p.detach().clone()
            st["anchor_state"] = {k: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v))
                                  for k, v in self.optimizer.state.get(p, {}).items()}
        self.anchor_loss = loss

    def _restore_anchor(self) -> None:
        for p in self._params():
            st = self.state[p]
            p.copy_(st["anchor"])
            saved = st["anchor_state"]
            if saved:
                self.optimizer.state[p] = {k: (v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)) for k, v in saved.items()}
            else:
                self.optimizer.state.pop(p, None)

    def _metropolis(self, loss_new: float) -> bool:
        u = float(torch.rand((), generator=self.generator, dtype=torch.float64))
        assert self.anchor_loss is not None
        if not math.isfinite(loss_new):
            return False
        delta = loss_new - self.anchor_loss
        if delta <= 0:
            return True
        if self.temperature == 0:
            return False
        return u < math.exp(-delta / self.temperature)

    @torch.no_grad()
    def decide(self, closure: Closure) -> bool | None:
        """Settle the pending hop now (no perturbation follows): evaluate the closure at the
        current point, accept it or restore the anchor. Returns the decision (None when no hop is
        pending, e.g. in cycle 0 or right after a decision)."""
        closure = _check_closure(closure, type(self).__name__)
        if not self.pending:
            return None
        loss = _as_float(_evaluate(closure, self._params()))
        return self._decide(loss)

    def _decide(self, loss: float) -> bool:
        self.pending = False
        accept = self._metropolis(loss)
        self.history.append({"step": self.steps_taken, "loss_anchor": self.anchor_loss, "loss_new": loss, "accepted": accept})
        if accept:
            self._set_anchor(loss)
        else:
            self._restore_anchor()
        return accept

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Any:  # type: ignore[override]
        """One local step (with the hop bookkeeping at the start of each cycle after the first);
        returns the closure's value at the parameters the step started from."""
        closure = _check_closure(closure, type(self).__name__)
        params = self._params()
        loss = _evaluate(closure, params)
        if self.steps_taken > 0 and self.steps_taken % self.local_steps == 0:
            value = _as_float(loss)
            if self.anchor_loss is None:
                self._set_anchor(value)
            elif self.pending:
                self._decide(value)
            else:  # decide() settled this hop already: hop again from the anchor
                self._restore_anchor()
            for p in params:
                z = torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
                p.copy_(self.state[p]["anchor"]).add_(z, alpha=self.sigma)
            self.pending = True
            _evaluate(closure, params)
        self.optimizer.step()
        self.steps_taken += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The anchor, the wrapped optimizer's state (``"wrapped"``) and the hop bookkeeping
        (``"basin_hopping"``: step count, anchor loss, history, generator state)."""
        sd = super().state_dict()
        sd["wrapped"] = self.optimizer.state_dict()
        sd["basin_hopping"] = {"steps_taken": self.steps_taken, "anchor_loss": self.anchor_loss, "pending": self.pending,
                               "history": copy.deepcopy(self.history), "generator": self.generator.get_state()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`."""
        sd = dict(state_dict)
        self.optimizer.load_state_dict(sd.pop("wrapped"))
        bh = sd.pop("basin_hopping")
        super().load_state_dict(sd)
        _share_groups(self, self.optimizer)
        self.steps_taken, self.anchor_loss, self.pending = int(bh["steps_taken"]), bh["anchor_loss"], bool(bh["pending"])
        self.history = copy.deepcopy(bh["history"])
        self.generator.set_state(bh["generator"])
