"""Krypton: fast occlusion-based explanations of CNNs by incremental inference (SIGMOD 2019)."""
from .approx import refined_mask
from .edits import IncrementalModel
from .errors import ModelError, OptionError
from .geometry import grid_shape
from .obe import Explainer, Explanation, SpeedupEstimate, estimate_speedup, explain
from .rules import Rule
from .tuning import Tuning, heatmap_ssim, load_tuning, tuning_for

__all__ = ["Explainer", "IncrementalModel", "Explanation", "ModelError", "OptionError", "Rule", "SpeedupEstimate", "estimate_speedup",
           "explain", "grid_shape", "refined_mask", "Tuning", "heatmap_ssim", "load_tuning", "tuning_for"]
