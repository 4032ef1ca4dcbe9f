"""Krypton: fast occlusion-based explanations of CNNs by incremental inference (SIGMOD 2019)."""
from .geometry import grid_shape
from .obe import Explainer, Explanation, SpeedupEstimate, estimate_speedup, explain

__all__ = ["Explainer", "Explanation", "SpeedupEstimate", "estimate_speedup", "explain", "grid_shape"]
