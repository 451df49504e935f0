"""Restricted secant inequality (RSI) and error bound (EB) along a trajectory.

Guille-Escuret et al., "No Wrong Turns", ICML 2024 (REFERENCE.md §1). For a direction g at w and a
reference w* (y = w - w*):

    rsi = <g, y> / |y|^2     eb = |g| / |y|     gamma = rsi / eb = cos(g, y)     eta* = <g, y> / |g|^2

If rsi >= mu and eb <= L everywhere, a step of mu / L^2 contracts |w - w*|^2 by 1 - mu^2 / L^2.
"""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import xarray as xr
from scipy import stats
from torch import Tensor

from landscape.functional import FunctionalModel, flat_point
from landscape.linalg import GaussianSketch
from landscape.schema import UPDATE_FROM_PARAMS, Unwritten, Var, attrs_for, var
from probes.base import Context, Measurement, Probe, float32, trajectory_attrs

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
_FINAL_BLOCK_BYTES = 2**20  # trajectory rows per block at close: about a CPU's L2 cache
VARIANTS = {"": "sample", "_train": "grad", "_wd": "grad_wd", "_update": "update"}


def secant_quantities(dot: np.ndarray, gnorm: np.ndarray, dist: np.ndarray) -> dict[str, np.ndarray]:
    """rsi, eb, gamma, eta_star from <g, y>, |g| and |y| (NaN where |y| = 0 or |g| = 0)."""
    dot, gnorm, dist = (np.asarray(a, dtype=np.float64) for a in (dot, gnorm, dist))
    with np.errstate(divide="ignore", invalid="ignore"):
        ok_y = dist > 0
        ok_g = gnorm > 0
        rsi = np.where(ok_y, dot / np.where(ok_y, dist, 1.0) ** 2, np.nan)
        eb = np.where(ok_y, gnorm / np.where(ok_y, dist, 1.0), np.nan)
        gamma = np.where(ok_y & ok_g, dot / (np.where(ok_g, gnorm, 1.0) * np.where(ok_y, dist, 1.0)), np.nan)
        eta = np.where(ok_g, dot / np.where(ok_g, gnorm, 1.0) ** 2, np.nan)
    return {"rsi": rsi, "eb": eb, "gamma": gamma, "eta_star": eta}


def gamma_null_band(d: int, level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of cos(u, y) for u uniform on the sphere in ``d`` dims.

    (cos + 1) / 2 ~ Beta((d - 1) / 2, (d - 1) / 2); its standard deviation is 1 / sqrt(d).
    """
    if d < 2:
        raise ValueError("the null band needs d >= 2")
    a = (d - 1) / 2
    lo, hi = stats.beta.ppf([(1 - level) / 2, (1 + level) / 2], a, a)
    return float(2 * lo - 1), float(2 * hi - 1)


def summarize(ds: xr.Dataset, *, dim: int, source: str, quantiles: Sequence[float] = QUANTILES, tail: float = 0.1,
              bound_quantile: float = 0.05, null_level: float = 0.95, settings: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Per-step quantiles, uniform-bound estimates and the gamma null band.

    ``source`` is the RSI/EB variant the bounds use ("" for probe batches, "_train", ...). The last
    ``tail`` fraction of the measured steps is left out of the bounds: near the end |w - w*| -> 0
    while |g| does not, and RSI/EB blow up for reasons unrelated to the geometry.
    """
    settings = dict(settings or {})
    # collected first and built at once: every insert into a Dataset re-aligns it (tens of ms at close)
    coords: dict[str, Any] = {"quantile": list(quantiles), "bound": ["extreme", "quantile"], "null": ["lower", "upper"]}
    out: dict[str, tuple[tuple[str, ...], np.ndarray, dict[str, Any]]] = {}
    rsi, eb = ds["rsi" + source], ds["eb" + source]
    if "rsi" in ds and "sample" in ds["rsi"].dims:
        for name in ("rsi", "eb", "gamma"):
            arr = np.asarray(ds[name].transpose("step", "sample").values, dtype=np.float64)
            q = np.full((arr.shape[0], len(quantiles)), np.nan)
            nan = np.isnan(arr)
            whole = ~np.any(nan, axis=1)  # np.quantile is vectorised; nanquantile loops over rows in Python
            if whole.any():
                q[whole] = np.quantile(arr[whole], list(quantiles), axis=1).T
            part = ~whole & ~np.all(nan, axis=1)
            if part.any():
                q[part] = np.nanquantile(arr[part], list(quantiles), axis=1).T
            out[f"{name}_quantiles"] = (("step", "quantile"), q, attrs_for(f"{name}_quantiles", **settings))
        coords["step"] = ds["step"].values
    steps = np.asarray(ds["step"].values)
    measured = ~np.all(np.isnan(np.asarray(rsi.values, dtype=np.float64).reshape(len(steps), -1)), axis=1)
    keep = np.zeros_like(measured)
    if measured.any():
        s = steps[measured]
        cutoff = s.min() + (1.0 - tail) * (s.max() - s.min())
        keep = measured & (steps <= cutoff)
    r = np.asarray(rsi.values, dtype=np.float64).reshape(len(steps), -1)[keep].ravel()
    e = np.asarray(eb.values, dtype=np.float64).reshape(len(steps), -1)[keep].ravel()
    r, e = r[np.isfinite(r)], e[np.isfinite(e)]
    if r.size and e.size:
        mu = np.array([r.min(), np.quantile(r, bound_quantile)])
        L = np.array([e.max(), np.quantile(e, 1 - bound_quantile)])
    else:
        mu = L = np.array([np.nan, np.nan])
    good = mu > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        implied = np.where(good, mu / L**2, np.nan)
        contraction = np.where(good, 1 - mu**2 / L**2, np.nan)
    bound_attrs = dict(settings, source="rsi" + source, tail_excluded=tail, bound_quantile=bound_quantile,
                       points=int(r.size))
    out["mu_hat"] = (("bound",), mu, attrs_for("mu_hat", **bound_attrs))
    out["L_hat"] = (("bound",), L, attrs_for("L_hat", **bound_attrs))
    out["implied_step"] = (("bound",), implied, attrs_for("implied_step", **bound_attrs))
    out["contraction"] = (("bound",), contraction, attrs_for("contraction", **bound_attrs))
    out["has_guarantee"] = (("bound",), good, attrs_for("has_guarantee", **bound_attrs))
    lo, hi = gamma_null_band(dim, null_level)
    out["gamma_null"] = (("null",), np.array([lo, hi]), attrs_for("gamma_null", level=null_level, dimension=dim, **settings))
    if "gamma" in ds and "sample" in ds["gamma"].dims:
        g = np.asarray(ds["gamma"].transpose("step", "sample").values, dtype=np.float64)
        measured = ~np.all(np.isnan(g), axis=1)  # steps without a measurement stay NaN
        frac = np.full(g.shape[0], np.nan)
        above = np.where(np.isnan(g[measured]), np.nan, g[measured] > hi)
        frac[measured] = np.nanmean(above, axis=1) if above.size else frac[measured]
        out["gamma_above_null"] = (("step",), frac, attrs_for("gamma_above_null", level=null_level))
        coords["step"] = ds["step"].values
    return xr.Dataset(out, coords=coords)


class RestrictedSecant(Probe):
    """RSI, EB, gamma and eta* along the trajectory, against the final iterate or a reference.

    Args:
        every: cadence (int, list of steps, or "log").
        samples: number of fixed probe batches whose gradients are measured (0: training
            gradient only).
        reference: None (default) measures against the final iterate w_T at ``close()`` from the
            recorded trajectory; a state_dict, checkpoint path or flat tensor measures online.
        sketch: store k-dimensional Gaussian sketches instead of full vectors (large models);
            see :class:`landscape.linalg.GaussianSketch` for the resulting error.
        weight_decay: lambda for the ``_wd`` variant (default: the optimizer's, per group).
        bn_mode: BN mode for probe-batch gradients; "train" (default) matches the training
            gradient, as in the paper. Dropout is always off.
        quantiles, tail, bound_quantile, null_level: summary settings (see :func:`summarize`).
    """

    name = "RestrictedSecant"

    def __init__(self, every: Any = 1, samples: int = 8, *, reference: Any = None, sketch: int | None = None,
                 weight_decay: float | None = None, bn_mode: str = "train", quantiles: Sequence[float] = QUANTILES,
                 tail: float = 0.1, bound_quantile: float = 0.05, null_level: float = 0.95, seed: int = 0) -> None:
        super().__init__(every, bn_mode=bn_mode, seed=seed)  # type: ignore[arg-type]
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise ValueError(f"samples must be a non-negative int (number of probe batches), got {samples!r}")
        if sketch is not None and (not isinstance(sketch, int) or isinstance(sketch, bool) or sketch < 1):
            raise ValueError(f"sketch must be a positive int (the sketch dimension k) or None, got {sketch!r}")
        if not 0 <= tail < 1:
            raise ValueError(f"tail must be in [0, 1), got {tail}")
        if not 0 < bound_quantile < 0.5:
            raise ValueError(f"bound_quantile must be in (0, 0.5), got {bound_quantile}")
        if not 0 < null_level < 1:
            raise ValueError(f"null_level must be in (0, 1), got {null_level}")
        if any(not 0 <= q <= 1 for q in quantiles):
            raise ValueError("quantiles must lie in [0, 1]")
        self.samples = samples
        self.reference = reference
        self.sketch_k = sketch
        self.weight_decay_override = weight_decay
        self.quantiles = tuple(float(q) for q in quantiles)
        self.tail, self.bound_quantile, self.null_level = float(tail), float(bound_quantile), float(null_level)
        self._ref: Tensor | None = None
        self._sketch: GaussianSketch | None = None
        self._dim = 0
        # built once: measure() runs at every recorded step
        self._step_settings = self._settings()
        self._norm_attrs = attrs_for("grad_norm_train", **self._step_settings)
        self._stream_attrs: dict[str, dict[str, Any]] = {}

    @property
    def samples_needed(self) -> int:
        return self.samples

    @property
    def evaluates_model(self) -> bool:
        return self.samples > 0  # the training-gradient variants only read the step's vectors

    @property
    def finalize_evaluates_model(self) -> bool:
        return False  # RSI/EB against w* are inner products of stored vectors

    @property
    def holds_step_vectors(self) -> bool:
        return False  # reads the step's vectors, or streams them unchanged

    @property
    def reads_only_step(self) -> bool:
        return self.samples == 0  # probe-batch gradients evaluate the model at w_t, now

    def setup(self, functional: FunctionalModel, optimizer: torch.optim.Optimizer) -> None:
        self._dim = functional.dim
        self._stream_attrs = {}
        flag_attrs = {"long_name": "update stored as the next record's params minus these (1) or as is (0)",
                      "units": "1", "probe": self.name}
        self._derived_flag = {d: Var((), np.int8(d), flag_attrs) for d in (False, True)}
        if self.reference is not None:
            self._ref = flat_point(self.reference, functional)
        if self.sketch_k is not None:
            self._sketch = GaussianSketch(self.sketch_k, functional.dim, seed=self.seed, device=functional.device)

    def trajectory_vectors(self) -> dict[str, str]:
        if self.reference is not None:
            return {}
        vec = "sketch" if self.sketch_k is not None else "param"
        names = ["params", "grad", "update"] + (["sample_grad"] if self.samples else [])
        return {**{n: vec for n in names}, **({"grad_wd": vec} if self.sketch_k is not None else {})}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "samples": self.samples,
                "reference": "final iterate" if self.reference is None else (str(self.reference) if isinstance(self.reference, (str, os.PathLike)) else "given"),
                "sketch": self.sketch_k, "weight_decay": self.weight_decay_override, "tail": self.tail,
                "bound_quantile": self.bound_quantile, "null_level": self.null_level}

    def _settings(self) -> dict[str, Any]:
        return {"samples": self.samples, "bn_mode": self.bn_mode, "sketch": self.sketch_k or "none",
                "reference": "final iterate" if self.reference is None else "given"}

    def _lambda(self, ctx: Context) -> Tensor | None:
        if self.weight_decay_override is not None:
            return torch.full_like(ctx.params, float(self.weight_decay_override)) if self.weight_decay_override else None  # type: ignore[arg-type]
        return ctx.weight_decay

    # -- per step -----------------------------------------------------------------------------
    def measure(self, ctx: Context) -> Measurement:
        # ctx.update is read only where it is used: a batched step computes it on first read
        assert ctx.params is not None and ctx.grad is not None
        fm, w = ctx.functional, ctx.params
        out = Measurement()
        settings = self._step_settings
        directions: dict[str, Tensor] = {"grad": ctx.grad}
        lam = self._lambda(ctx)
        online, sk = self._ref is not None, self._sketch
        if lam is not None and (online or sk is not None):  # else computed at close from w_t and g_t
            directions["grad_wd"] = ctx.grad + lam * w
        if self.samples:
            losses, G = fm.losses_and_grads(w, ctx.probe_batches[: self.samples])
            directions["sample"] = G
            out.values["sample_loss"] = var("sample_loss", losses.double(), ("sample",), **settings)
            out.values["grad_norm"] = var("grad_norm", torch.linalg.vector_norm(G.double(), dim=1), ("sample",), **settings)
        gnorm = ctx.grad_norm if math.isfinite(ctx.grad_norm) else float(torch.linalg.vector_norm(ctx.grad, dtype=torch.float64))
        out.values["grad_norm_train"] = Var((), np.float64(gnorm), self._norm_attrs)
        if online:
            directions["update"] = -ctx.update
            y = (w - self._ref).double()
            out.values["dist_to_ref"] = var("dist_to_ref", torch.linalg.vector_norm(y), (), **settings)
            for suffix, key in VARIANTS.items():
                if key not in directions:
                    continue
                D = directions[key].double()
                q = secant_quantities((D @ y).numpy(force=True), torch.linalg.vector_norm(D, dim=-1).numpy(force=True),
                                      np.full(D.shape[:-1], float(torch.linalg.vector_norm(y))))
                dims = ("sample",) if key == "sample" else ()
                for name, value in q.items():
                    out.values[name + suffix] = var(name + suffix, value, dims, **settings, **self._variant_attrs(suffix, lam))
            return out
        # Against the final iterate: stream the vectors; the numbers come at close().
        vec_dim = "sketch" if sk is not None else "param"
        out.trajectory["params"] = self._streamed("params", sk(w) if sk else w, (vec_dim,), "parameters w_t")
        out.trajectory["grad"] = self._streamed("grad", sk(ctx.grad) if sk else ctx.grad, (vec_dim,), "training gradient g_t")
        # the next step's params minus these, when that step is stored next: not stored twice
        # (nor computed: ctx.update is not read)
        derived = sk is None and any(p is self for p in ctx.next_step_due)
        if derived:
            update: Tensor | Unwritten = Unwritten(tuple(w.shape), np.dtype(np.float32))
        else:
            assert ctx.update is not None
            update = sk(ctx.update) if sk else ctx.update
        out.trajectory["update"] = self._streamed("update", update, (vec_dim,), "update w_{t+1} - w_t")
        if sk is None:
            out.trajectory[UPDATE_FROM_PARAMS] = self._derived_flag[derived]
        if sk is not None and lam is not None:
            out.trajectory["grad_wd"] = self._streamed("grad_wd", sk(directions["grad_wd"]), (vec_dim,), "g_t + lambda w_t")
        if self.samples:
            out.trajectory["sample_grad"] = self._streamed("sample_grad", sk(directions["sample"]) if sk else directions["sample"],
                                                           ("sample", vec_dim), "probe-batch gradients")
        return out

    def _streamed(self, name: str, x: Tensor | Unwritten, dims: tuple[str, ...], what: str) -> Var:
        """A trajectory vector; its attrs are built at the first step and shared after (they
        never change, and this runs at every recorded step)."""
        attrs = self._stream_attrs.get(name)
        if attrs is None:
            attrs = self._stream_attrs[name] = trajectory_attrs(what, self.name, self._sketch)
        return Var(dims, x if isinstance(x, Unwritten) else float32(x), attrs)

    def _variant_attrs(self, suffix: str, lam: Tensor | None) -> dict[str, Any]:
        if suffix == "_wd":
            values = sorted({float(v) for v in torch.unique(lam).tolist()}) if lam is not None else [0.0]
            return {"weight_decay": values[0] if len(values) == 1 else values}
        return {}

    # -- at close -------------------------------------------------------------------------------
    def finalize(self, ctx: Context) -> xr.Dataset | None:
        settings = self._settings()
        if self._ref is not None:
            assert ctx.dataset is not None
            ds = ctx.dataset()
            names = [n for n in ("rsi", "eb", "gamma", "rsi_train", "eb_train") if n in ds]
            if not names:
                return None
            data = ds[names].load()
        else:
            data = self._against_final(ctx, settings)
            if data is None:
                return None
        source = "" if self.samples else "_train"
        dim = self.sketch_k or self._dim
        summary = summarize(data, dim=dim, source=source, quantiles=self.quantiles, tail=self.tail,
                            bound_quantile=self.bound_quantile, null_level=self.null_level, settings=settings)
        if self._ref is not None:
            return summary
        return xr.merge([data, summary], compat="override", join="outer")

    def _against_final(self, ctx: Context, settings: dict[str, Any]) -> xr.Dataset | None:
        assert ctx.final_params is not None and ctx.trajectory is not None
        sk = self._sketch
        wT = (sk(ctx.final_params) if sk else ctx.final_params).double().cpu().numpy()
        lam_t = self._lambda(Context(step=0, functional=ctx.functional, model=ctx.model, optimizer=ctx.optimizer,
                                     probe_batches=[], params=ctx.final_params, weight_decay=ctx.weight_decay))
        # in sketch mode the _wd direction was sketched during training; lam is for the attrs
        lam = lam_t.double().cpu().numpy() if lam_t is not None and sk is None else None
        # per variant: <direction, y> and |direction|^2 of each block; the quantities at the end
        sums: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        dists: list[np.ndarray] = []
        all_steps: list[np.ndarray] = []
        buf = np.empty((0, 0))
        # Small blocks, read into the same buffers: they stay in the CPU's cache through the sums
        # below, and no fresh memory is paged in per block.
        for steps, arrs in ctx.trajectory(["params", "grad", "update", "grad_wd", "sample_grad"],
                                          max_bytes=_FINAL_BLOCK_BYTES, reuse=True):
            P, m = arrs["params"], len(steps)
            extra = arrs.get("grad_wd")  # sketch mode: g + lam w, sketched during training
            k = 3 + (extra is not None or lam is not None)
            if buf.shape[0] < m or buf.shape[1] != k:  # the first block is the biggest
                buf = np.empty((m, k, P.shape[1]))
            stack = buf[:m]
            # rows y = w_t - w*, g, u and (lam w or the stored g + lam w), in float64: one batched
            # product gives every inner product among them, accumulated in double
            np.subtract(P, wT, out=stack[:, 0])
            stack[:, 1] = arrs["grad"]
            stack[:, 2] = arrs["update"]
            if extra is not None:
                stack[:, 3] = extra
            elif lam is not None:
                np.multiply(P, lam, out=stack[:, 3])
            # torch's batched matmul: half the time of numpy's here (it uses torch's threads)
            rows = torch.from_numpy(stack)
            gram = torch.bmm(rows, rows.transpose(1, 2)).numpy()  # (m, k, k)
            dists.append(np.sqrt(gram[:, 0, 0]))
            # (dot with y, squared norm) per direction, without materialising the directions
            dirs = {"_train": (gram[:, 1, 0], gram[:, 1, 1]), "_update": (-gram[:, 2, 0], gram[:, 2, 2])}
            if extra is not None:
                dirs["_wd"] = (gram[:, 3, 0], gram[:, 3, 3])
            elif lam is not None:  # g + lam w: <g, y> + <lam w, y>, |g|^2 + 2 <g, lam w> + |lam w|^2
                dirs["_wd"] = (gram[:, 1, 0] + gram[:, 3, 0], gram[:, 1, 1] + 2 * gram[:, 1, 3] + gram[:, 3, 3])
            if "sample_grad" in arrs:
                S, Y = arrs["sample_grad"], stack[:, 0]
                dirs[""] = (np.einsum("mkd,md->mk", S, Y), np.einsum("mkd,mkd->mk", S, S, dtype=np.float64))
            for suffix, (dot, sq) in dirs.items():
                parts = sums.setdefault(suffix, ([], []))
                parts[0].append(dot)
                parts[1].append(sq)
            all_steps.append(steps.copy())  # the next block is read into the same array
        if not all_steps:
            return None
        steps = np.concatenate(all_steps)
        dist = np.concatenate(dists)
        blocks: dict[str, np.ndarray] = {}
        for suffix, (dots, sqs) in sums.items():
            dot = np.concatenate(dots)
            dd = dist[:, None].repeat(dot.shape[1], 1) if dot.ndim == 2 else dist
            for name, value in secant_quantities(dot, np.sqrt(np.maximum(np.concatenate(sqs), 0.0)), dd).items():
                blocks[name + suffix] = value
        blocks["dist_to_ref"] = dist
        lam_attrs = self._variant_attrs("_wd", lam_t) if lam_t is not None else {}
        data_vars = {}
        for name, value in blocks.items():
            dims = ("step", "sample") if value.ndim == 2 else ("step",)
            extra = lam_attrs if name.endswith("_wd") else {}
            data_vars[name] = (dims, value, attrs_for(name, **settings, **extra))
        coords: dict[str, Any] = {"step": steps}
        if any(len(v[0]) == 2 for v in data_vars.values()):
            coords["sample"] = np.arange(next(v[1].shape[1] for v in data_vars.values() if len(v[0]) == 2))
        return xr.Dataset(data_vars, coords=coords)  # built at once: per-variable inserts re-align each time
