"""The probes: one module per family of quantities (DESIGN.md layer 3)."""
from probes.base import Context, Measurement, Probe
from probes.curvature import HessianSpectrum, HessianTrace, PreconditionedSharpness, SpectralDensity
from probes.flatness import Sharpness
from probes.noise import GradientNoise
from probes.secant import RestrictedSecant
from probes.slices import LossProfile, TrajectoryPCA
from probes.valley import GradientOverlap, Interpolation, RiverHill, StepCurvature, ValleyWidth

__all__ = ["Context", "GradientNoise", "GradientOverlap", "HessianSpectrum", "HessianTrace", "Interpolation",
           "LossProfile", "Measurement", "PreconditionedSharpness", "Probe", "RestrictedSecant", "RiverHill", "Sharpness",
           "SpectralDensity", "StepCurvature", "TrajectoryPCA", "ValleyWidth"]
