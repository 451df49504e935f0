"""The data model of a run: the one place where stored names, dims and units are defined.

A run is one zarr v3 store holding one ``xarray.Dataset`` (read it with ``landscape.open_run``):

Dimensions
    step        optimizer steps (0-based; step t is measured at w_t, before update t). Every
                optimizer step has a row; a probe that did not run at a step has NaN there.
    sample      index of a fixed probe batch (drawn once, reused at every measurement).
    quantile    quantile level of a per-step summary over samples.
    bound       how a uniform bound is estimated: ``extreme`` (min/max) or ``quantile``.
    null        lower/upper edge of a null band.
    block       parameter block of a curvature probe (``model`` = all trainable parameters);
                labelled by the probes' ``blocks=`` (name patterns or modules). Curvature
                variables always have it (DESIGN.md's ``eigenvalues (step, eig)`` is
                ``eigenvalues.sel(block="model")`` here), so one run's layout does not depend
                on whether blocks were asked for.
    eig         index of a top eigenvalue (0 = largest); ``eig_bottom`` of a bottom one (0 =
                smallest); ``eig_preconditioned`` of a top eigenvalue of P^-1/2 H P^-1/2.
    node        SLQ quadrature node, flat over (probe vector, Lanczos step).
    kind        which sharpness measure (``average``, ``worst_l2_adaptive``, ``sam``, ...).
    radius      perturbation radius rho of a sharpness measure.
    perturbation  PAC-Bayes perturbation family: ``isotropic`` or ``magnitude``.
    direction   a direction in parameter space (``trajectory``, ``eigenvector``, ``random_0``, ...).
    alpha       position along a 1-D profile or an interpolation segment (numeric, sorted).
    component   principal component of the recorded trajectory; ``x``/``y`` grid coordinates on
                the plane of the first two (distances along unit principal directions).

Trajectory group (``trajectory/``, read with ``landscape.open_trajectory``; dims ``record``,
``param`` or ``sketch``, ``sample``): the raw vectors behind reference-dependent probes, float32.
An ``update`` row whose step's next step is the next record is not stored twice: the int8 column
``update_from_params`` is 1 there, and readers (``open_trajectory``, ``RunWriter.iter_trajectory``)
give ``params`` of the next record minus ``params`` (the same float32 subtraction the recorder
makes, so the same bits; NaN if that record was never committed, e.g. after a kill, or the next
step's recording failed).

Dataset attrs: ``landscape_schema`` (this module's SCHEMA_VERSION), ``run`` (the user's run
metadata: optimizer name, seed, ...), ``optimizer`` (class and hyper-parameters), ``model``
(class, parameter count), ``torch_version``, ``landscape_version``, ``probes`` (configuration of
each probe), ``probe_errors`` (errors caught while measuring; training went on).

Every variable has attrs ``long_name``, ``units`` ("1" for dimensionless), ``probe`` ("recorder"
for the recorder's own), plus the estimator settings that change its value.

A reader accepts stores whose schema has the same major version (``open_run`` checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEMA_VERSION = "2.0"
# 2.0: trajectory ``update`` rows derived from ``params`` (``update_from_params``); 1.x stores
# have none, and read the same.
READABLE_MAJORS = (1, 2)
UPDATE_FROM_PARAMS = "update_from_params"


@dataclass(frozen=True)
class VarSpec:
    dims: tuple[str, ...]
    long_name: str
    units: str
    probe: str
    doc: str


_SECANT_DOC = {
    "rsi": ("RSI", "<g, w - w*> / |w - w*|^2"),
    "eb": ("EB", "|g| / |w - w*|"),
    "gamma": ("gamma = cos(g, w - w*)", "RSI / EB; > 0 means -g points towards w*"),
    "eta_star": ("locally optimal step eta*", "<g, w - w*> / |g|^2 = RSI / EB^2"),
}
_SECANT_VARIANTS = {  # suffix: (dims, short label, what g is)
    "": (("step", "sample"), "probe batch", "gradient on a fixed probe batch"),
    "_train": (("step",), "training gradient", "training minibatch gradient the optimizer received (before momentum/Adam)"),
    "_wd": (("step",), "g + lambda w", "weight-decay-corrected training gradient g + lambda w"),
    "_update": (("step",), "realised update", "realised update direction -(w_{t+1} - w_t); eta*_update is the optimal multiple of the step taken"),
}

VARIABLES: dict[str, VarSpec] = {
    # the recorder's own, every step
    "loss": VarSpec(("step",), "training loss", "1", "recorder",
                    "training minibatch loss at step t: the sum of the scalars .backward() was called on since the last step (or the closure's value, or rec.log(loss=...))"),
    "lr": VarSpec(("step",), "learning rate", "1", "recorder", "learning rate of the first param group used at step t"),
    "lr_group": VarSpec(("step", "param_group"), "learning rate per param group", "1", "recorder", "only when groups differ"),
    "nonfinite": VarSpec(("step",), "non-finite flag", "1", "recorder",
                         "bit flags: 1 the loss was NaN/Inf, 2 the gradient was NaN/Inf (checked where a probe ran)"),
    "probe_failed": VarSpec(("step",), "probe failures", "1", "recorder", "number of probes that raised at this step (see attrs probe_errors)"),
    # RestrictedSecant
    "dist_to_ref": VarSpec(("step",), "|w - w*|", "1", "RestrictedSecant", "distance to the reference point"),
    "grad_norm": VarSpec(("step", "sample"), "|g| on probe batch", "1", "RestrictedSecant", "norm of the probe-batch gradient"),
    "grad_norm_train": VarSpec(("step",), "|g| training", "1", "RestrictedSecant", "norm of the training gradient"),
    "sample_loss": VarSpec(("step", "sample"), "probe-batch loss", "1", "RestrictedSecant", "loss on each fixed probe batch at w_t"),
    "rsi_quantiles": VarSpec(("step", "quantile"), "RSI quantiles over samples", "1", "RestrictedSecant", "per-step quantiles of rsi over the probe batches"),
    "eb_quantiles": VarSpec(("step", "quantile"), "EB quantiles over samples", "1", "RestrictedSecant", "per-step quantiles of eb"),
    "gamma_quantiles": VarSpec(("step", "quantile"), "gamma quantiles over samples", "1", "RestrictedSecant", "per-step quantiles of gamma"),
    "mu_hat": VarSpec(("bound",), "uniform RSI lower bound estimate", "1", "RestrictedSecant",
                      "lowest rsi (extreme) or its low quantile over (step, sample), excluding the tail of training"),
    "L_hat": VarSpec(("bound",), "uniform EB upper bound estimate", "1", "RestrictedSecant",
                     "highest eb (extreme) or its high quantile, excluding the tail of training"),
    "implied_step": VarSpec(("bound",), "implied step mu/L^2", "1", "RestrictedSecant", "the step size of the RSI/EB contraction theorem; NaN when mu_hat <= 0"),
    "contraction": VarSpec(("bound",), "contraction factor 1 - mu^2/L^2", "1", "RestrictedSecant",
                           "per-step factor on |w - w*|^2 at the implied step; NaN when mu_hat <= 0 (no guarantee)"),
    "has_guarantee": VarSpec(("bound",), "mu_hat > 0", "1", "RestrictedSecant", "False: the measured RSI lower bound is not positive, the theorem gives nothing"),
    "gamma_null": VarSpec(("null",), "gamma null band", "1", "RestrictedSecant",
                          "central interval of cos(u, w - w*) for u uniform on the sphere in d dims (widened by the sketch error in sketch mode)"),
    "gamma_above_null": VarSpec(("step",), "fraction of samples with gamma above the null band", "1", "RestrictedSecant", ""),
    # HessianSpectrum (block: parameter block, "model" = all trainable parameters)
    "eigenvalues": VarSpec(("step", "block", "eig"), "top Hessian eigenvalues", "1", "HessianSpectrum",
                           "top-k eigenvalues of the Hessian of the mean probe-batch loss, descending (Lanczos Ritz values)"),
    "lambda_max": VarSpec(("step", "block"), "lambda_max (sharpness)", "1", "HessianSpectrum", "largest Hessian eigenvalue"),
    "eigenvalue_residuals": VarSpec(("step", "block", "eig"), "Ritz residual |Hv - lambda v|", "1", "HessianSpectrum",
                                    "residual norm of each Ritz pair (unit v)"),
    "eigenvalue_error_bounds": VarSpec(("step", "block", "eig"), "eigenvalue error bound", "1", "HessianSpectrum",
                                       "min(r, r^2 / gap): a bound on |lambda_true - lambda| from the residual r and the gap to the next Ritz value"),
    "eigenvalues_converged": VarSpec(("step", "block", "eig"), "eigenvalue converged", "1", "HessianSpectrum",
                                     "error bound <= tol * max(|lambda|, 1e-2 |lambda_max|)"),
    "spectrum_matvecs": VarSpec(("step", "block"), "Hessian-vector products (spectrum)", "1", "HessianSpectrum",
                                "products used by Lanczos at this step (warm starts need fewer)"),
    "eigenvalues_bottom": VarSpec(("step", "block", "eig_bottom"), "bottom Hessian eigenvalues", "1", "HessianSpectrum",
                                  "bottom-k eigenvalues, ascending (only with bottom=k)"),
    "lambda_min": VarSpec(("step", "block"), "lambda_min", "1", "HessianSpectrum", "smallest Hessian eigenvalue (only with bottom=k)"),
    "eigenvalue_residuals_bottom": VarSpec(("step", "block", "eig_bottom"), "Ritz residual (bottom)", "1", "HessianSpectrum", ""),
    "eigenvalues_converged_bottom": VarSpec(("step", "block", "eig_bottom"), "bottom eigenvalue converged", "1", "HessianSpectrum", ""),
    # HessianTrace
    "trace": VarSpec(("step", "block"), "Hessian trace", "1", "HessianTrace", "tr(H) by Hutch++ or Hutchinson (attrs: method, matvecs)"),
    "trace_stderr": VarSpec(("step", "block"), "standard error of the trace", "1", "HessianTrace",
                            "standard error of the stochastic part of the estimate"),
    # SpectralDensity
    "slq_nodes": VarSpec(("step", "block", "node"), "SLQ nodes", "1", "SpectralDensity",
                         "Ritz values of each probe vector's Lanczos tridiagonal, flat over (vector, step); NaN = padding"),
    "slq_weights": VarSpec(("step", "block", "node"), "SLQ weights", "1", "SpectralDensity",
                           "squared first components / number of vectors (sum to 1); smooth with probes.curvature.density_on_grid"),
    # PreconditionedSharpness
    "preconditioned_eigenvalues": VarSpec(("step", "block", "eig_preconditioned"), "top eigenvalues of P^-1/2 H P^-1/2", "1",
                                          "PreconditionedSharpness", "P: the optimizer's diagonal preconditioner (identity for SGD)"),
    "preconditioned_lambda_max": VarSpec(("step", "block"), "preconditioned sharpness", "1", "PreconditionedSharpness",
                                         "lambda_max of P^-1/2 (H + coupled weight decay) P^-1/2"),
    "preconditioned_residual": VarSpec(("step", "block"), "Ritz residual (preconditioned)", "1", "PreconditionedSharpness", ""),
    "preconditioned_converged": VarSpec(("step", "block"), "preconditioned lambda_max converged", "1", "PreconditionedSharpness", ""),
    "preconditioned_matvecs": VarSpec(("step", "block"), "Hessian-vector products (preconditioned)", "1", "PreconditionedSharpness", ""),
    "stability_ratio": VarSpec(("step", "block"), "stability ratio eta lambda / c", "1", "PreconditionedSharpness",
                               "1 = edge of stability (c = 2 for GD, 2 + 2 beta heavy ball, (2 + 2 beta1)/(1 - beta1) Adam)"),
    "eos_threshold": VarSpec(("step",), "edge-of-stability curvature c / eta", "1", "PreconditionedSharpness",
                             "the (preconditioned) lambda_max at which the optimizer is at the edge of stability"),
    # Sharpness (kind: which measure, radius: its rho; REFERENCE.md §3)
    "sharpness": VarSpec(("step", "kind", "radius"), "sharpness L(w + delta) - L(w)", "1", "Sharpness",
                         "loss increase under a perturbation of size radius: average_* = E over Gaussian delta "
                         "(std radius * c), worst_* = max over the l2/linf ball |delta / c| <= radius (Auto-PGD), "
                         "sam / asam = one ascent step, keskar = 100 (max_box - L) / (1 + L); *_adaptive: c = |w| "
                         "(scale-aware), else c = 1; mean over the probe batches"),
    "sharpness_stderr": VarSpec(("step", "kind", "radius"), "standard error of the sharpness", "1", "Sharpness",
                                "Monte-Carlo standard error (average kinds) or spread over probe batches (others)"),
    "sharpness_base_loss": VarSpec(("step",), "loss at w (sharpness batches)", "1", "Sharpness",
                                   "mean loss L(w) over the probe batches the sharpness is measured on"),
    "pac_bayes_sigma": VarSpec(("perturbation",), "PAC-Bayes sigma", "1", "Sharpness",
                               "largest sigma with |E_u m(w + u) - m(w)| <= deviation at the final iterate (bisection; m: accuracy or loss, attrs metric); "
                               "isotropic u ~ N(0, sigma^2), magnitude u_i ~ N(0, sigma^2 w_i^2 + eps^2)"),
    "pac_bayes_flatness": VarSpec(("perturbation",), "PAC-Bayes flatness 1/sigma^2", "1", "Sharpness",
                                  "1 / pac_bayes_sigma^2 (Jiang et al. 2020): larger = sharper"),
    # Valley probes (REFERENCE.md §4)
    "floor_curvature": VarSpec(("step",), "curvature along the step u^T H u", "1", "StepCurvature",
                               "u = (w_{t+1} - w_t) / |w_{t+1} - w_t|, H on the probe batches"),
    "floor_curvature_secant": VarSpec(("step",), "secant curvature along the step", "1", "StepCurvature",
                                      "<g_B(w_{t+1}) - g_B(w_t), dw> / |dw|^2, the same probe batches B at both points"),
    "valley_anisotropy": VarSpec(("step",), "anisotropy lambda_max / floor curvature", "1", "StepCurvature",
                                 "how much sharper the valley's walls are than its floor along the step"),
    "hill_height": VarSpec(("step",), "hill height L(w) - L(w_ema)", "1", "RiverHill",
                           "river/hill split (Wen et al. 2024): loss above the EMA iterate, on the probe batches"),
    "floor_progress": VarSpec(("step",), "floor progress |w_ema(t) - w_ema(t - lag)|", "1", "RiverHill",
                              "distance the EMA iterate moved along the river over the last lag steps"),
    "ema_distance": VarSpec(("step",), "|w - w_ema|", "1", "RiverHill", "distance of the iterate from its EMA"),
    "ema_loss": VarSpec(("step",), "loss at the EMA iterate", "1", "RiverHill", "L(w_ema) on the probe batches"),
    "valley_width": VarSpec(("step", "direction"), "valley width W_tau(d)", "1", "ValleyWidth",
                            "t+ + t-, t+- = sup{t >= 0: L(w +- t d) - L(w) <= tau}; in units of |d| (see attrs normalization)"),
    "valley_width_plus": VarSpec(("step", "direction"), "valley exit t+", "1", "ValleyWidth", "exit distance along +d"),
    "valley_width_minus": VarSpec(("step", "direction"), "valley exit t-", "1", "ValleyWidth", "exit distance along -d"),
    "valley_width_anisotropy": VarSpec(("step",), "anisotropy index W(river) / W(wall)", "1", "ValleyWidth",
                                       "valley width along the trajectory direction over that along the top eigenvector"),
    "gradient_overlap": VarSpec(("step",), "gradient overlap with the top-k eigenspace", "1", "GradientOverlap",
                                "|V^T g|^2 / |g|^2 for the training gradient g (Gur-Ari et al. 2018)"),
    "gradient_overlap_probe": VarSpec(("step",), "probe-gradient overlap with the top-k eigenspace", "1", "GradientOverlap",
                                      "|V^T g|^2 / |g|^2 for the gradient on the probe batches the Hessian is taken on"),
    "interpolation_loss": VarSpec(("step", "alpha"), "loss on the segment from the previous checkpoint", "1", "Interpolation",
                                  "L((1 - a) w_prev + a w_t) on the probe batches; w_prev = the previous measurement"),
    "interpolation_barrier": VarSpec(("step",), "interpolation barrier", "1", "Interpolation",
                                     "max_a L(a) - ((1 - a) L(0) + a L(1)) between the previous checkpoint and w_t"),
    "interpolation_violations": VarSpec(("step",), "monotonicity violations", "1", "Interpolation",
                                        "consecutive rises of L(a) along the segment (0: monotone)"),
    "interpolation_max_rise": VarSpec(("step",), "largest rise along the segment", "1", "Interpolation",
                                      "max_j L(a_j) - min_{i<j} L(a_i)"),
    "mli_loss": VarSpec(("alpha",), "loss from the first checkpoint to the final iterate", "1", "Interpolation",
                        "monotonic linear interpolation (Lucas et al. 2021): L((1 - a) w_first + a w_T)"),
    "mli_barrier": VarSpec((), "barrier first checkpoint -> final", "1", "Interpolation", ""),
    "mli_violations": VarSpec((), "monotonicity violations first checkpoint -> final", "1", "Interpolation", ""),
    "mli_max_rise": VarSpec((), "largest rise first checkpoint -> final", "1", "Interpolation", ""),
    "endpoint_loss": VarSpec(("alpha",), "loss between two end points", "1", "interpolate",
                             "L((1 - a) w_a + a w_b) for two given points (e.g. the final iterates of two runs)"),
    "endpoint_barrier": VarSpec((), "barrier between two end points", "1", "interpolate",
                                "max_a L(a) - ((1 - a) L(0) + a L(1)); about 0: linearly mode-connected"),
    "endpoint_violations": VarSpec((), "monotonicity violations between two end points", "1", "interpolate", ""),
    "endpoint_max_rise": VarSpec((), "largest rise between two end points", "1", "interpolate", ""),
    # Slices and trajectory PCA (REFERENCE.md §4)
    "profile_loss": VarSpec(("step", "direction", "alpha"), "loss profile L(w + alpha d)", "1", "LossProfile",
                            "1-D slice through w_t along each direction (see attrs normalization)"),
    "pca_explained_variance": VarSpec(("component",), "explained variance ratio", "1", "TrajectoryPCA",
                                      "share of the variance of w_t - w_T along each principal direction of the recorded path"),
    "path_coordinates": VarSpec(("step", "component"), "path in the PCA plane", "1", "TrajectoryPCA",
                                "<w_t - w_c, pc_i> with unit principal directions; w_c = w_T (TrajectoryPCA) or the snapshot at attrs center_step (slice_run)"),
    "path_residual": VarSpec(("step",), "off-plane residual", "1", "TrajectoryPCA",
                             "|w_t - w_c - projection on the PCA plane|: how far the path is from the plotted plane"),
    "path_loss": VarSpec(("step",), "loss on the actual path", "1", "TrajectoryPCA",
                         "L(w_t) on the probe batches, measured during training (not read off the plane)"),
    "plane_loss": VarSpec(("step",), "loss at the path's projection on the plane", "1", "TrajectoryPCA",
                          "L(w_c + x pc_1 + y pc_2) at the projected point: what the contour plot shows for step t"),
    "surface_loss": VarSpec(("x", "y"), "loss on the PCA plane", "1", "TrajectoryPCA",
                            "L(w_c + x d_1 + y d_2) on a grid: the PCA plane around w_T (TrajectoryPCA) or any plane around a stored snapshot (slice_run)"),
    # GradientNoise (REFERENCE.md §5)
    "noise_scale": VarSpec(("step", "block"), "gradient noise scale B_simple", "1", "GradientNoise",
                           "tr(Sigma) / |G|^2 (McCandlish et al. 2018), Sigma the per-example gradient covariance; "
                           "+inf where the unbiased |G|^2 <= 0 (noise swamps the signal), NaN where both are 0"),
    "grad_variance": VarSpec(("step", "block"), "tr(Sigma) per example", "1", "GradientNoise",
                             "trace of the per-example gradient covariance (unbiased)"),
    "grad_sqnorm": VarSpec(("step", "block"), "|G|^2 (unbiased)", "1", "GradientNoise",
                           "squared norm of the mean gradient, bias-corrected by tr(Sigma)/n"),
    "grad_snr": VarSpec(("step", "block"), "gradient signal-to-noise ratio (mean)", "1", "GradientNoise",
                        "mean over the block's parameters of m_j^2 / v_j (mean and unbiased variance over the examples; "
                        "v_j = 0 left out; m_j^2 is not bias-corrected, so no signal reads about 1/n)"),
    "grad_snr_median": VarSpec(("step", "block"), "gradient signal-to-noise ratio (median)", "1", "GradientNoise",
                               "median over the block's parameters of E[g_j]^2 / Var[g_j]"),
}
for _suffix, (_dims, _label, _what) in _SECANT_VARIANTS.items():
    for _name, (_long, _formula) in _SECANT_DOC.items():
        VARIABLES[_name + _suffix] = VarSpec(_dims, f"{_long} ({_label})", "1", "RestrictedSecant", f"{_formula}; g = {_what}")


def attrs_for(name: str, **settings: object) -> dict[str, object]:
    """The attrs every stored variable carries: long_name, units, probe, and settings."""
    spec = VARIABLES.get(name)
    if spec is None:
        raise KeyError(f"{name!r} is not in the schema (landscape/schema.py): add it there first")
    return {"long_name": spec.long_name, "units": spec.units, "probe": spec.probe, **settings}


def dims_for(name: str) -> tuple[str, ...]:
    """Documented dims of a stored variable."""
    return VARIABLES[name].dims


def compatible(version: str) -> bool:
    """Whether a store written with schema ``version`` can be read by this code."""
    try:
        return int(str(version).split(".")[0]) in READABLE_MAJORS
    except ValueError:
        return False


def describe() -> str:
    """The variable table, as printed by ``landscape info --schema``."""
    lines = [f"landscape schema {SCHEMA_VERSION}", ""]
    for name, s in VARIABLES.items():
        lines.append(f"{name:20s} ({', '.join(s.dims)})  [{s.probe}]  {s.long_name}: {s.doc}")
    return "\n".join(lines)


@dataclass
class Var:
    """One named array on its way to the store: ``dims`` exclude the row dim (``step`` or
    ``record``) for per-step values, and include it for finalize results."""

    dims: tuple[str, ...]
    data: object
    attrs: dict[str, object]


@dataclass(frozen=True)
class Unwritten:
    """The data of a row value whose bytes the store does not write, because readers derive
    them (a trajectory ``update`` from the next ``params``): its shape and dtype, which create
    the column if it is new."""

    shape: tuple[int, ...]
    dtype: object


def var(name: str, data: object, dims: tuple[str, ...] | None = None, **settings: object) -> Var:
    """A :class:`Var` whose attrs come from the schema entry ``name``."""
    return Var(dims if dims is not None else dims_for(name), data, attrs_for(name, **settings))


def step_value(name: str, data: object, **settings: object) -> Var:
    """A per-step :class:`Var` (one row of ``name``): its dims are the schema's without ``step``."""
    dims = dims_for(name)
    if not dims or dims[0] != "step":
        raise KeyError(f"{name!r} is not a per-step variable (dims {dims})")
    return Var(dims[1:], data, attrs_for(name, **settings))
