"""The probes: one module per family of quantities (DESIGN.md layer 3)."""
from probes.base import Context, Measurement, Probe
from probes.curvature import HessianSpectrum, HessianTrace, PreconditionedSharpness, SpectralDensity
from probes.secant import RestrictedSecant
from probes.valley import GradientOverlap, Interpolation, RiverHill, StepCurvature, ValleyWidth

__all__ = ["Context", "GradientOverlap", "HessianSpectrum", "HessianTrace", "Interpolation", "Measurement",
           "PreconditionedSharpness", "Probe", "RestrictedSecant", "RiverHill", "SpectralDensity", "StepCurvature",
           "ValleyWidth"]
