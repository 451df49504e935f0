"""Interactive figures of the geometry, built from datasets only (``landscape.open_run`` for one
run, ``landscape.open_runs`` for many: one trace per run, coloured by optimizer) and returned as
``plotly.graph_objects.Figure``, never shown implicitly.

A figure asked of a dataset without its variables raises :class:`MissingVariableError`, which
names the probe that records them.
"""
from landscape.plot._style import MissingVariableError
from landscape.plot.space import interpolation, profiles, slice_2d
from landscape.plot.timeseries import compare, edge_of_stability, eta_star, gamma, over_time, rsi_eb_plane, spectral_density

__all__ = ["MissingVariableError", "compare", "edge_of_stability", "eta_star", "gamma", "interpolation", "over_time",
           "profiles", "rsi_eb_plane", "slice_2d", "spectral_density"]
