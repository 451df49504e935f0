"""Training functions the sweep tests send to dask workers (an importable module: the workers
import ``tests._sweep_jobs`` by name, from the repository root, which they inherit as cwd and
sys.path from the test process)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import landscape
from landscape.data import load_digits, split
from landscape.models import DigitsMLP
from probes import RestrictedSecant

OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}


def _log(config: dict, name: str, seed: int) -> None:
    """One JSON line per call in ``<log_dir>/<name>-<seed>.jsonl``: who ran it, with how many threads and
    which MALLOC_TRIM_THRESHOLD_."""
    if config.get("log_dir"):
        with open(Path(config["log_dir"]) / f"{name}-{seed}.jsonl", "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "threads": torch.get_num_threads(),
                                "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_")}) + "\n")


def tiny_train(name: str, config: dict, seed: int, store_path: Path) -> None:
    """DigitsMLP(hidden=8) for ``config['steps']`` steps on 256 digits, RestrictedSecant on the
    training gradient. ``fail``: raise after a few recorded steps; ``fail_once``: a marker file:
    raise (for seed ``fail_seed``) if it does not exist yet, and create it; ``unclosed``: return
    without closing the store (what a killed job leaves); ``no_store``: write nothing; ``log_dir``: see _log."""
    _log(config, name, seed)
    if config.get("no_store"):
        return
    opt_name = config.get("opt", name)
    (X, y), _ = split(*load_digits(), 0.8, seed=0)
    X, y = X[:256], y[:256]
    torch.manual_seed(seed)
    model = DigitsMLP(hidden=8)
    opt = OPTIMIZERS[opt_name](model.parameters())
    rec = landscape.attach(model, opt, loss_fn=F.cross_entropy, probe_data=(X, y), probe_batch_size=64,
                           probes=[RestrictedSecant(every=2, samples=0)], store=store_path,
                           run={"optimizer": name, "seed": seed, **{k: v for k, v in config.items() if k != "log_dir"}},
                           commit_delay=0)
    gen = torch.Generator().manual_seed(seed)
    marker = config.get("fail_once")
    for step in range(int(config.get("steps", 6))):
        idx = torch.randint(0, len(X), (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        if step == 2 and config.get("unclosed"):
            rec.flush()
            return  # the job forgot rec.close(): its store stays open
        if step == 2 and (config.get("fail") or marker and seed == config.get("fail_seed", seed) and not Path(marker).exists()):
            if marker:
                Path(marker).touch()
            rec.close()  # as `with landscape.attach(...)` would on the way out of the exception
            raise RuntimeError(f"boom in {name}-{seed}")
    rec.close()

