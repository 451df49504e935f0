"""The probes: one module per family of quantities (DESIGN.md layer 3)."""
from probes.base import Context, Measurement, Probe
from probes.curvature import HessianSpectrum, HessianTrace, PreconditionedSharpness, SpectralDensity
from probes.secant import RestrictedSecant

__all__ = ["Context", "HessianSpectrum", "HessianTrace", "Measurement", "PreconditionedSharpness", "Probe",
           "RestrictedSecant", "SpectralDensity"]
