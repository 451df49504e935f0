"""Lightning and Hugging Face callbacks: real (small) Trainer runs on CPU."""
from __future__ import annotations

import importlib
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape
from landscape.models import DigitsMLP
from probes import HessianSpectrum, RestrictedSecant
from tests._helpers import assert_same_weights, digits

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


def _dense_lambda_max(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Largest eigenvalue of the dense float64 Hessian of the mean cross-entropy (torch.func)."""
    from torch.func import functional_call, hessian

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    model64 = model.double()
    w = torch.cat([p.detach().reshape(-1) for p in model64.parameters()])

    def loss(flat):
        params = {n: t.reshape(s) for n, t, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model64, params, (x.double(),)), y)

    H = hessian(loss)(w)
    return float(torch.linalg.eigvalsh(H)[-1])


def test_integrations_import_without_the_libraries(monkeypatch):
    """`landscape.integrations` imports without Lightning/transformers; using a class names the extra."""
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("landscape.integrations.lightning", "landscape.integrations.huggingface"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    integrations = importlib.import_module("landscape.integrations")
    with pytest.raises(ImportError, match=r"pip install lightning .*landscape\[lightning\]"):
        integrations.LandscapeCallback
    with pytest.raises(ImportError, match=r"landscape\[huggingface\]"):
        integrations.LandscapeTrainerCallback
    with pytest.raises(AttributeError):
        integrations.Nothing


# -- Lightning --------------------------------------------------------------------------------

try:
    import lightning.pytorch as L
except ImportError:  # the Hugging Face part below still runs
    L = None
needs_lightning = pytest.mark.skipif(L is None, reason="needs lightning (pip install 'landscape[lightning]')")
GAMMA, STEP_SIZE, LR = 0.5, 3, 0.1


class DigitsModule(L.LightningModule if L is not None else torch.nn.Module):  # type: ignore[misc]
    """DigitsMLP(hidden=8) with SGD and a per-step StepLR; collects its training_step losses."""

    def __init__(self, manual: bool = False, fail_at: int | None = None, two_optimizers: bool = False) -> None:
        super().__init__()
        self.net = DigitsMLP(hidden=8)
        self.losses: list[float] = []
        self.automatic_optimization = not manual
        self.fail_at, self.two_optimizers = fail_at, two_optimizers

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and len(self.losses) == self.fail_at:
            raise RuntimeError("boom in training_step")
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        if self.automatic_optimization:
            return loss
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opts[0].zero_grad()
        self.manual_backward(loss)
        for opt in opts:  # two optimizers: the second takes another step along the same gradient
            opt.step()
        sched = self.lr_schedulers()
        (sched[0] if isinstance(sched, list) else sched).step()
        return None

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, STEP_SIZE, GAMMA)
        if self.two_optimizers:
            return [opt, torch.optim.SGD(self.parameters(), lr=LR)], [sched]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loader() -> torch.utils.data.DataLoader:
    (X, y), _ = digits()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def _fit(callback=None, steps=9, accumulate=1, logger=False, loader=None, **module_kw):
    torch.manual_seed(0)
    module = DigitsModule(**module_kw)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                        callbacks=[callback] if callback is not None else [])
    trainer.fit(module, loader if loader is not None else _loader())
    return module, trainer


def _scheduled_lr(steps: int) -> np.ndarray:
    return LR * GAMMA ** (np.arange(steps) // STEP_SIZE)


@needs_lightning
def test_lightning_callback_records_the_trainers_run(tmp_path):
    from landscape.integrations import LandscapeCallback

    steps = 9
    plain, _ = _fit(steps=steps)
    cb = LandscapeCallback(probes=[HessianSpectrum(every=3, samples=1, k=2), RestrictedSecant(every=2, samples=2)],
                           loss_fn=F.cross_entropy, store=tmp_path / "run.zarr", run={"optimizer": "sgd", "seed": 0},
                           log_to_trainer=True)
    logger = L.loggers.CSVLogger(tmp_path / "csv", name="", version="")
    module, trainer = _fit(cb, steps=steps, logger=logger)
    ds = landscape.open_run(tmp_path / "run.zarr")
    assert ds.attrs["closed"] and ds.attrs["run"] == {"optimizer": "sgd", "seed": 0} and ds.attrs["probe_errors"] == {}
    assert ds.sizes["step"] == trainer.global_step == steps
    np.testing.assert_allclose(ds.lr.values, _scheduled_lr(steps), rtol=1e-15)
    np.testing.assert_allclose(ds.loss.values, module.losses, rtol=1e-12)
    np.testing.assert_array_equal(ds.epoch.values, 0)  # 9 batches of 32 < one epoch of the 1437 digits
    assert_same_weights(plain, module)  # the callback does not change the trajectory
    # geometry: finite, and lambda_max at step 0 equals the dense Hessian's at the initial weights
    # on the probe batch, drawn by default from the trainer's train dataloader
    lam = ds.lambda_max.sel(block="model").values
    assert np.isfinite(lam[::3]).all() and np.isnan(lam[1::3]).all()
    assert np.isfinite(ds.rsi.values[::2]).all()
    x0, y0 = cb.recorder.probe_batches[0]
    (X, Y), _ = digits()
    match = (torch.cdist(x0.flatten(1), X.flatten(1)) == 0).float().argmax(dim=1)
    assert x0.shape[0] == 32 and torch.equal(X[match], x0) and torch.equal(Y[match], y0)
    np.testing.assert_allclose(lam[0], _dense_lambda_max(_initial_net(), x0, y0), rtol=1e-6)
    # log_to_trainer: the geometry sits in the trainer's CSV beside its own metrics
    import csv

    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    logged = {int(r["step"]): float(r["landscape/lambda_max/block=model"]) for r in rows
              if r.get("landscape/lambda_max/block=model")}
    assert sorted(logged) == [0, 3, 6]
    np.testing.assert_allclose([logged[s] for s in (0, 3, 6)], lam[::3], rtol=1e-12)


def _initial_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return DigitsModule().net


@needs_lightning
def test_lightning_accumulation_records_the_unscaled_mean_loss(tmp_path):
    from landscape.integrations import LandscapeCallback

    plain, _ = _fit(steps=3, accumulate=2)
    cb = LandscapeCallback(probes=[], loss_fn=F.cross_entropy, store=tmp_path / "run.zarr")
    module, trainer = _fit(cb, steps=3, accumulate=2)
    ds = landscape.open_run(tmp_path / "run.zarr")
    assert ds.sizes["step"] == trainer.global_step == 3 and len(module.losses) == 6
    # Lightning back-propagates loss / 2 per micro-batch; the recorded loss is the mean the user sees
    np.testing.assert_allclose(ds.loss.values, np.asarray(module.losses).reshape(3, 2).mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(ds.lr.values, _scheduled_lr(3), rtol=1e-15)
    assert_same_weights(plain, module)


@needs_lightning
def test_lightning_manual_optimisation(tmp_path):
    from landscape.integrations import LandscapeCallback

    plain, _ = _fit(steps=5, manual=True)
    train_loader = _loader()
    # probe_data may be the training loader itself: drawing from it leaves its shuffling unchanged
    cb = LandscapeCallback(probes=[HessianSpectrum(every=4, samples=1, k=1)], loss_fn=F.cross_entropy,
                           probe_data=train_loader, store=tmp_path / "run.zarr", module=lambda m: m.net)
    module, trainer = _fit(cb, steps=5, manual=True, loader=train_loader)
    assert cb.recorder.model is module.net
    ds = landscape.open_run(tmp_path / "run.zarr")
    assert ds.sizes["step"] == trainer.global_step == 5
    np.testing.assert_allclose(ds.loss.values, module.losses, rtol=1e-12)
    np.testing.assert_allclose(ds.lr.values, _scheduled_lr(5), rtol=1e-15)
    assert np.isfinite(ds.lambda_max.values[[0, 4]]).all()
    assert_same_weights(plain, module)


@needs_lightning
def test_lightning_exception_keeps_the_store(tmp_path):
    from landscape.integrations import LandscapeCallback

    cb = LandscapeCallback(probes=[HessianSpectrum(every=2, samples=1, k=1)], loss_fn=F.cross_entropy,
                           store=tmp_path / "run.zarr")
    torch.manual_seed(0)
    module = DigitsModule(fail_at=5)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer.fit(module, _loader())
    ds = landscape.open_run(tmp_path / "run.zarr")
    assert ds.attrs["closed"]  # on_exception closed it
    assert ds.sizes["step"] == 5
    np.testing.assert_allclose(ds.loss.values, module.losses, rtol=1e-12)
    assert np.isfinite(ds.lambda_max.values[[0, 2, 4]]).all()
    assert not getattr(torch.autograd.backward, "__landscape_tap__", False)  # detached from autograd


@needs_lightning
def test_lightning_bad_arguments(tmp_path):
    from landscape.integrations import LandscapeCallback

    with pytest.raises(TypeError, match="loss_fn"):
        LandscapeCallback(probes=[])
    with pytest.raises(ValueError, match="optimizer_index"):
        LandscapeCallback(loss_fn=F.cross_entropy, optimizer_index=-1)
    with pytest.raises(TypeError, match="takes the optimizer from the trainer"):
        LandscapeCallback(loss_fn=F.cross_entropy, optimizer=None)
    cb = LandscapeCallback(probes=[], loss_fn=F.cross_entropy, store=tmp_path / "a.zarr")
    with pytest.raises(ValueError, match=r"2 optimizers: choose .* optimizer_index=i"):
        _fit(cb, steps=2, manual=True, two_optimizers=True)
    cb = LandscapeCallback(probes=[], loss_fn=F.cross_entropy, store=tmp_path / "b.zarr", optimizer_index=1)
    module, trainer = _fit(cb, steps=8, manual=True, two_optimizers=True)
    ds = landscape.open_run(tmp_path / "b.zarr")
    # global_step counts both optimizers' steps; the second one has no scheduler, so its lr
    # stays (the first one's halves after 3 steps)
    assert ds.sizes["step"] == len(module.losses) == trainer.global_step // 2 == 4
    np.testing.assert_array_equal(ds.lr.values, LR)
    np.testing.assert_allclose(ds.loss.values, module.losses, rtol=1e-12)


# -- Hugging Face -----------------------------------------------------------------------------


def _hf_run(callback=None, steps=6, accumulate=1, tmp=None):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(64):
        ids = torch.randint(0, 40, (12,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40,
                                                                 n_positions=32))
    args = transformers.TrainingArguments(output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=4,
                                          use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, seed=0,
                                          gradient_accumulation_steps=accumulate, disable_tqdm=True,
                                          learning_rate=1e-3, warmup_steps=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[callback] if callback is not None else [])
    trainer.train()
    return model, trainer, data


def _top_eigenvalue(model: torch.nn.Module, batch: dict) -> float:
    """lambda_max of the Hessian of model(**batch).loss by scipy's eigsh on double-backward HVPs."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernel has no double backward
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, params, create_graph=True)
    n = sum(p.numel() for p in params)

    def hvp(v):
        vs = torch.as_tensor(np.asarray(v, dtype=np.float32).ravel()).split([p.numel() for p in params])
        dot = sum((g * u.view_as(g)).sum() for g, u in zip(grads, vs))
        hv = torch.autograd.grad(dot, params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).double().numpy()

    vals = eigsh(LinearOperator((n, n), matvec=hvp, dtype=np.float64), k=1, which="LA", tol=1e-8,
                 v0=np.ones(n), return_eigenvectors=False)
    return float(vals[0])


def test_huggingface_callback_records_the_trainers_run(tmp_path):
    pytest.importorskip("transformers")
    from landscape.integrations import LandscapeTrainerCallback

    plain, _, _ = _hf_run(tmp=tmp_path / "plain")
    cb = LandscapeTrainerCallback(probes=[HessianSpectrum(every=2, samples=1, k=1)], store=tmp_path / "run.zarr",
                                  log_to_trainer=True)
    model, trainer, data = _hf_run(cb, tmp=tmp_path / "out")
    ds = landscape.open_run(tmp_path / "run.zarr")
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert ds.attrs["closed"] and ds.attrs["probe_errors"] == {}
    assert ds.sizes["step"] == trainer.state.global_step == len(history) == 6
    np.testing.assert_allclose(ds.loss.values, [h["loss"] for h in history], rtol=1e-6)
    np.testing.assert_allclose(ds.lr.values, [h["learning_rate"] for h in history], rtol=1e-12)
    assert ds.lr.values[0] == 0.0 and ds.lr.values[2] == pytest.approx(1e-3)  # warm-up then linear decay
    np.testing.assert_allclose(ds.epoch.values, np.arange(6) * 4 / 64)  # the epoch before each step
    assert_same_weights(plain, model)  # dropout's RNG and the data order untouched
    lam = ds.lambda_max.sel(block="model").values
    assert np.isfinite(lam[::2]).all() and np.isnan(lam[1::2]).all()
    # default probe data: the first collated training batch, as (inputs, labels)
    inputs, target = cb.recorder.probe_batches[0]
    assert torch.equal(inputs["labels"], target) and inputs["input_ids"].shape == (4, 12)
    rows = {tuple(d["input_ids"].tolist()) for d in data}
    assert all(tuple(r.tolist()) in rows for r in inputs["input_ids"])
    torch.manual_seed(0)
    import transformers

    init = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40,
                                                                n_positions=32))
    np.testing.assert_allclose(lam[0], _top_eigenvalue(init, dict(inputs)), rtol=1e-4)
    # log_to_trainer: the geometry in the Trainer's log records of the same steps
    logged = [h.get("landscape/lambda_max/block=model") for h in history]
    np.testing.assert_allclose([v for v in logged[::2]], lam[::2], rtol=1e-12)
    assert all(v is None for v in logged[1::2])


def test_huggingface_accumulation_loss_matches_the_logged_loss(tmp_path):
    pytest.importorskip("transformers")
    from landscape.integrations import LandscapeTrainerCallback

    cb = LandscapeTrainerCallback(probes=[], store=tmp_path / "run.zarr")
    _, trainer, _ = _hf_run(cb, steps=3, accumulate=2, tmp=tmp_path / "out")
    ds = landscape.open_run(tmp_path / "run.zarr")
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert ds.sizes["step"] == trainer.state.global_step == 3
    np.testing.assert_allclose(ds.loss.values, [h["loss"] for h in history], rtol=1e-6)
    assert math.isclose(ds.epoch.values[1], 8 / 64)
