"""landscape: the geometry of the loss landscape along real PyTorch training runs.

    rec = landscape.attach(model, optimizer, loss_fn=F.cross_entropy, probe_data=batches,
                           probes=[RestrictedSecant(every=10, samples=8)], store="runs/sgd-0.zarr",
                           run={"optimizer": "sgd", "seed": 0})
    ... the training loop, unchanged ...
    rec.close()
    ds = landscape.open_run("runs/sgd-0.zarr")
"""
__version__ = "0.1.0"

from landscape.recorder import Recorder, attach
from landscape.schedule import Schedule
from landscape.slices import interpolate, slice_run
from landscape.sweeps import sweep
from landscape.store import StoreError, open_run, open_runs, open_trajectory, stack_runs, to_netcdf

__all__ = ["Recorder", "Schedule", "StoreError", "attach", "interpolate", "open_run", "open_runs", "open_trajectory", "slice_run", "stack_runs",
           "sweep", "to_netcdf", "__version__"]
