"""Whole-CT inference: the predictor, its result and the lesion table."""

from .lesions import find_lesions
from .predictor import FAST_SPACING_FACTOR, Predictor
from .result import Lesion, SegmentationResult

__all__ = ["FAST_SPACING_FACTOR", "Lesion", "Predictor", "SegmentationResult", "find_lesions"]
