"""Training jobs for tests/test_distributed.py, run under torch.multiprocessing.spawn (an
importable module: spawned processes import ``tests._ddp_jobs`` by name from the repo root)."""
from __future__ import annotations

import os
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import landscape
from landscape.data import load_digits
from landscape.models import DigitsMLP
from probes import (GradientNoise, GradientOverlap, HessianSpectrum, HessianTrace, Interpolation, LossProfile,
                    PreconditionedSharpness, RestrictedSecant, RiverHill, Sharpness, SpectralDensity, StepCurvature,
                    TrajectoryPCA, ValleyWidth)

STEPS = 12
BATCH = 32


def all_probes() -> list:
    """Every probe family, with small settings (the float64 digits MLP, 682 parameters)."""
    return [
        RestrictedSecant(every=2, samples=2),
        HessianSpectrum(every=4, k=3, samples=2),
        HessianTrace(every=4, matvecs=12),
        SpectralDensity(every=6, steps=12),
        PreconditionedSharpness(every=6, bn_mode="eval"),
        Sharpness(every=6, radius=0.05, kinds=("average", "worst_l2", "sam"), noise_samples=4, apgd_steps=3,
                  pac_bayes=True),
        StepCurvature(every=4),
        RiverHill(every=2),
        ValleyWidth(every=6),
        GradientOverlap(every=6, k=2),
        Interpolation(every=4),
        LossProfile(every=6, alphas=[-0.5, 0.0, 0.5]),
        TrajectoryPCA(every=2, grid=5),
        GradientNoise(every=4, samples=2),
    ]


def train(store: Path | None, *, rank: int = 0, world: int = 1, probes: bool = True) -> torch.nn.Module:
    """SGD with momentum and weight decay on the digits; each of ``world`` ranks takes its slice of
    every training batch, so DDP's averaged gradient is the full batch's."""
    torch.manual_seed(0)
    net = DigitsMLP(hidden=8).double()
    model: torch.nn.Module = DDP(net) if world > 1 else net
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    X, y = load_digits(torch.float64)
    rec = None
    if probes:
        rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(X[:512], y[:512]), probe_batch_size=64,
                               probes=all_probes(), store=store, run={"optimizer": "sgd", "seed": 0}, commit_delay=0)
    per = BATCH // world
    for t in range(STEPS):
        lo = t * BATCH + rank * per
        xb, yb = X[lo:lo + per], y[lo:lo + per]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    if rec is not None:
        rec.close()
    return net


def ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: record with every probe (rank 0 writes ``out_dir/ddp.zarr``), train again
    without probes, then check that a bad store is refused on every rank; results as files."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        net = train(out / "ddp.zarr", rank=rank, world=world)
        torch.save(net.state_dict(), out / f"probed-{rank}.pt")
        dist.barrier()
        if rank == 0:
            (out / "after-recording.txt").write_text("\n".join(sorted(os.listdir(out))))
        net = train(None, rank=rank, world=world, probes=False)
        torch.save(net.state_dict(), out / f"plain-{rank}.pt")
        # the store exists: rank 0 refuses it, and so must every rank, before training starts
        m = DDP(DigitsMLP(hidden=8).double())
        try:
            landscape.attach(m, torch.optim.SGD(m.parameters(), lr=0.1), loss_fn=F.cross_entropy,
                             probes=[RestrictedSecant(every=1, samples=0)], store=out / "ddp.zarr")
            (out / f"refused-{rank}.txt").write_text("not refused")
        except Exception as exc:
            (out / f"refused-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")
        dist.barrier()
    except Exception:
        (out / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
