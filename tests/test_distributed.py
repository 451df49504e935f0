"""Probes under torch.distributed (DDP, gloo, 2 processes on the CPU): every number equals the
single-process run on the same data; only rank 0 writes; the trajectory is unchanged."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import landscape
from landscape.functional import Shard, batch_size, local_size
from landscape.recorder import _shard
from tests import _ddp_jobs as jobs

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(jobs.ddp_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    torch.set_num_threads(1)
    jobs.train(out / "single.zarr")
    return out


def test_every_number_equals_the_single_process_run(runs: Path) -> None:
    ddp = landscape.open_run(runs / "ddp.zarr").load()
    one = landscape.open_run(runs / "single.zarr").load()
    assert ddp.attrs["probe_errors"] == {} and one.attrs["probe_errors"] == {}
    assert ddp.attrs["distributed"]["world_size"] == 2
    assert set(ddp.data_vars) == set(one.data_vars)
    # every probe family recorded something
    for name in ("rsi", "eigenvalues", "trace", "slq_nodes", "preconditioned_lambda_max", "sharpness",
                 "pac_bayes_sigma", "floor_curvature", "hill_height", "valley_width", "gradient_overlap",
                 "interpolation_loss", "mli_loss", "profile_loss", "surface_loss", "noise_scale"):
        assert name in one and np.isfinite(one[name].values).any(), name
    assert (ddp["probe_failed"].values == 0).all()
    for name in one.data_vars:
        a, b = ddp[name].values, one[name].values
        if a.dtype.kind in "fc":
            scale = np.nanmax(np.abs(b)) if np.isfinite(b).any() else 1.0
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10 * max(scale, 1e-300), err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_only_rank_0_writes_and_the_trajectory_is_unchanged(runs: Path) -> None:
    files = (runs / "after-recording.txt").read_text().split()
    assert [f for f in files if f.endswith(".zarr")] == ["ddp.zarr"]  # rank 1 wrote no store
    assert not list(runs.glob("error-*.txt"))
    probed = [torch.load(runs / f"probed-{r}.pt") for r in (0, 1)]
    plain = [torch.load(runs / f"plain-{r}.pt") for r in (0, 1)]
    for k in probed[0]:
        assert torch.equal(probed[0][k], probed[1][k]), k  # DDP keeps the replicas equal
        assert torch.equal(probed[0][k], plain[0][k]), k  # bitwise: probes changed nothing
    single = jobs.train(None, probes=False).state_dict()
    for k in single:  # the same data in one process: equal up to the order of the sums
        torch.testing.assert_close(probed[0][k], single[k], rtol=1e-12, atol=1e-12)


def test_a_store_error_is_raised_on_every_rank(runs: Path) -> None:
    for r in (0, 1):
        msg = (runs / f"refused-{r}.txt").read_text()
        assert "already exists" in msg, (r, msg)
    assert "rank 0 could not open the store" in (runs / "refused-1.txt").read_text()


def test_shards_split_every_batch_and_keep_its_weight() -> None:
    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    parts = [_shard((x, y), r, 2) for r in range(2)]
    assert all(isinstance(p, Shard) and batch_size(p) == 5 for p in parts)
    assert [local_size(p) for p in parts] == [2, 3] or [local_size(p) for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    kw = _shard(({"a": x}, y), 1, 2)
    assert torch.equal(kw[0]["a"], parts[1][0])
    with pytest.raises(ValueError, match="at least 3 examples"):
        _shard((x[:2], y[:2]), 0, 3)
    assert math.isclose(sum(local_size(p) for p in parts), 5)
