"""Small shared pieces for the tests: digits data and a training loop."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

import landscape
from landscape.data import load_digits, split
from landscape.models import DigitsCNN, DigitsMLP, TinyTransformer

# small versions of the reference models: an MLP, a CNN with BatchNorm, a transformer (LayerNorm, attention)
SMALL_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "mlp": lambda: DigitsMLP(hidden=8),
    "cnn": lambda: DigitsCNN(channels=3),
    "transformer": lambda: TinyTransformer(width=8, heads=2),
}


@lru_cache(maxsize=1)
def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    X, y = load_digits()
    return split(X, y, 0.8, seed=0)


def loader(seed: int = 0, batch_size: int = 64, n: int | None = None) -> torch.utils.data.DataLoader:
    (X, y), _ = digits()
    if n is not None:
        X, y = X[:n], y[:n]
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(seed))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, *, seed: int = 0,
          on_step: Callable[[int, torch.Tensor], None] | None = None, clip: float | None = None,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, n: int | None = None) -> list[float]:
    """The user's plain loop; returns the training losses."""
    losses: list[float] = []
    step = 0
    while step < steps:
        for xb, yb in loader(seed + step, n=n):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.item())
            if on_step is not None:
                on_step(step, loss)
            step += 1
            if step == steps:
                break
    return losses


def record(store: Path | None, probes: list | None, *, model: Callable[[], torch.nn.Module], steps: int, seed: int = 0,
           opt_cls: type[torch.optim.Optimizer] = torch.optim.SGD, run: dict[str, Any] | None = None,
           **opt_kw: Any) -> tuple[torch.nn.Module, Path | None]:
    """Train ``model()`` (seeded) with the user's loop and ``probes`` attached, recording to ``store``
    (probe data: the digits train split in batches of 64; ``run``: the run's metadata, e.g.
    {"optimizer": "sgd", "seed": 0}); ``probes=None`` trains without a recorder. Returns the trained model and the store path (None without a recorder)."""
    torch.manual_seed(seed)
    net = model()
    opt = opt_cls(net.parameters(), **(opt_kw or {"lr": 0.1, "momentum": 0.9}))
    (X, y), _ = digits()
    rec = None
    if probes is not None:
        rec = landscape.attach(net, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64, probes=probes,
                               store=store, seed=0, run=run)
    train(net, opt, steps, seed=seed)
    if rec is not None:
        rec.close()
    return net, (rec.path if rec is not None else None)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Bitwise equal parameters and buffers: attaching probes must not change the trajectory."""
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def own_loss(model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], batch: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean loss as a function of a flat vector, written without the library: the vector is
    split in ``named_parameters`` order (the layout ``FunctionalModel`` documents)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    x, y = batch

    def f(w: torch.Tensor) -> torch.Tensor:
        params, pos = {}, 0
        for n, p in named:
            params[n] = w[pos:pos + p.numel()].reshape(p.shape)
            pos += p.numel()
        assert pos == w.numel()
        return loss_fn(functional_call(model, params, (x,)), y)

    return f
