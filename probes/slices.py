"""Loss slices along training: 1-D profiles along random, trajectory and eigenvector directions,
and the trajectory's principal plane with the loss on the actual path (REFERENCE.md §4; Li et
al. 2018). The numerics live in :mod:`landscape.slices`; these probes feed them the step's
parameters and the recorded trajectory.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import xarray as xr

from landscape.schema import step_value
from landscape.slices import alpha_grid, losses_on_span, pca_dataset, trajectory_pca
from probes.base import Context, Measurement, Probe, positive_int, trajectory_var
from probes.valley import DIRECTION_KINDS, StepDirections


class LossProfile(Probe):
    """1-D loss profiles L(w_t + alpha d) along several directions -> ``profile_loss``
    (step, direction, alpha).

    Directions (labels of the ``direction`` dim; see :class:`probes.valley.StepDirections`):
    ``trajectory`` (the EMA-smoothed displacement, ``beta`` per optimizer step; NaN until there
    is one), ``eigenvector`` (the top Hessian eigenvector, to relative accuracy ``tol``, sign
    fixed), ``random_0``, ``random_1``, ... (Gaussian, drawn per measurement from the probe's
    generator: the same state and seed give the same profile).

    Each direction is normalised by ``normalization``: ``"filter"`` (default; Li et al. 2018:
    each filter rescaled to the norm of the same filter of w_t, 1-D parameters zeroed or
    rescaled per ``bias``) makes alpha a fraction of the weights' scale, so the profile is
    invariant under rescalings that keep the network's function (ReLU: a W1, W2 / a);
    ``"layer"`` the same per parameter tensor; ``"unit"`` makes alpha a Euclidean distance;
    ``"none"`` keeps the raw direction. ``alphas`` (sorted, must include 0) are the positions;
    L(w_t) at alpha = 0 is evaluated once and shared by every direction.

    Cost per measurement: (directions x (len(alphas) - 1) + 1) forward passes over the probe
    batches, batched through vmap where faster, plus a top-1 Lanczos for the eigenvector.
    """

    name = "LossProfile"

    def __init__(self, every: Any = 1, directions: Sequence[str] = DIRECTION_KINDS,
                 alphas: Sequence[float] | np.ndarray = np.linspace(-1, 1, 21), *, random: int = 1,
                 normalization: str = "filter", bias: str = "zero", beta: float = 0.9, samples: int = 1,
                 tol: float = 1e-3, bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, bn_mode=bn_mode, seed=seed)  # type: ignore[arg-type]
        self.alphas = alpha_grid(alphas, need=(0.0,))
        self.samples = positive_int("samples (number of fixed probe batches)", samples)
        self.directions = StepDirections(directions, random, normalization, bias, beta, tol)  # type: ignore[arg-type]
        self.labels = self.directions.labels

    @property
    def samples_needed(self) -> int:
        return self.samples

    def coords(self) -> dict[str, list[Any]]:
        return {"direction": list(self.labels), "alpha": [float(a) for a in self.alphas]}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "directions": list(self.directions.kinds), "random": self.directions.random,
                "alphas": [float(a) for a in self.alphas], **self.directions.settings(), "samples": self.samples}

    def _settings(self) -> dict[str, Any]:
        return {**self.directions.settings(), "samples": self.samples, "bn_mode": self.bn_mode, "seed": self.seed}

    def measure(self, ctx: Context) -> Measurement:
        assert ctx.params is not None
        fm, w = ctx.functional, ctx.params
        batches = ctx.probe_batches[: self.samples]
        dirs = self.directions.at(ctx, self, samples=self.samples)
        a = self.alphas
        nonzero = a != 0
        present = [lab for lab in self.labels if dirs.get(lab) is not None]
        profile = np.full((len(self.labels), a.size), np.nan)
        if present:
            D = torch.stack([dirs[lab] for lab in present], dim=1)  # type: ignore[misc]
            r, m = len(present), int(nonzero.sum())
            C = np.zeros((r * m, r))
            for i in range(r):
                C[i * m:(i + 1) * m, i] = a[nonzero]
            values = losses_on_span(fm, w, D, C, batches)
            with torch.no_grad():
                center = float(fm.loss(w, batches))
            for i, lab in enumerate(present):
                row = self.labels.index(lab)
                profile[row, nonzero] = values[i * m:(i + 1) * m]
                profile[row, ~nonzero] = center
        return Measurement({"profile_loss": step_value("profile_loss", profile, **self._settings())})


class TrajectoryPCA(Probe):
    """The trajectory's principal plane (Li et al. 2018) with the loss on the actual path.

    During training: streams w_t to the store (trajectory vector ``params``) and records
    ``path_loss`` (step) = L(w_t) on the first ``samples`` probe batches, the loss the optimizer
    actually saw along its path. At the end (:meth:`finalize`): PCA of w_t - w_T over the stored
    snapshots (:func:`landscape.slices.trajectory_pca`; w_T the final iterate) ->
    ``pca_explained_variance`` (component), ``path_coordinates`` (step, component),
    ``path_residual`` (step: distance of w_t from the plotted plane), ``plane_loss`` (step: L at
    the snapshot's projection on the plane, what a contour plot shows for step t), and
    ``surface_loss`` (x, y) on a ``grid`` x ``grid`` grid covering the projected path and w_T
    plus ``margin`` of its range on each side (x, y: distances along the unit principal
    directions from w_T; (0, 0) is on the grid). Compare ``path_loss`` with ``plane_loss`` and
    read ``path_residual`` before trusting the contour. Skipped (no result) with fewer than 3
    snapshots; surface and plane_loss need a path spanning two dimensions.

    Stores d float32 numbers per measurement; the PCA costs passes over them at close
    (O(n^2) memory in the number of snapshots n).
    """

    name = "TrajectoryPCA"

    def __init__(self, every: Any = 1, *, grid: int = 21, margin: float = 0.25, components: int = 2, samples: int = 1,
                 bn_mode: str = "eval", seed: int = 0) -> None:
        super().__init__(every, bn_mode=bn_mode, seed=seed)  # type: ignore[arg-type]
        self.grid = positive_int("grid (points per axis of the surface)", grid, 3)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"margin must be a number >= 0 (fraction of the path's range added on each side), got {margin!r}")
        self.margin = float(margin)
        self.components = positive_int("components (principal components reported)", components, 2)
        self.samples = positive_int("samples (number of fixed probe batches)", samples)

    @property
    def samples_needed(self) -> int:
        return self.samples

    def trajectory_vectors(self) -> dict[str, str]:
        return {"params": "param"}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "grid": self.grid, "margin": self.margin, "components": self.components,
                "samples": self.samples}

    def _settings(self) -> dict[str, Any]:
        return {"samples": self.samples, "bn_mode": self.bn_mode}

    def measure(self, ctx: Context) -> Measurement:
        assert ctx.params is not None
        w = ctx.params
        with torch.no_grad():
            loss = float(ctx.functional.loss(w, ctx.probe_batches[: self.samples]))
        snapshot = trajectory_var(w, ("param",), "parameters w_t", self.name)
        return Measurement(values={"path_loss": step_value("path_loss", np.float64(loss), **self._settings())},
                           trajectory={"params": snapshot})

    def finalize(self, ctx: Context) -> xr.Dataset | None:
        assert ctx.final_params is not None and ctx.trajectory is not None
        trajectory = ctx.trajectory
        if sum(len(steps) for steps, _ in trajectory([])) < 3:
            return None

        def factory():  # type: ignore[no-untyped-def]
            for steps, arrs in trajectory(["params"]):
                if "params" in arrs:
                    yield steps, arrs["params"]

        pca = trajectory_pca(factory, ctx.final_params, components=self.components)
        if pca.steps.size < 3:
            return None
        settings = {**self._settings(), "grid": self.grid, "margin": self.margin, "center": "final iterate"}
        return pca_dataset(ctx.functional, pca, ctx.final_params, ctx.probe_batches[: self.samples], self.grid,
                           self.margin, settings)
