"""Lightning callbacks (layer 3): thin hooks over the pure functions in ``anchors/`` and ``delta/``."""

from lifelong_delta.callbacks.delta_pruning import DeltaPruning
from lifelong_delta.callbacks.lifelong_deltas import LifelongDeltas
from lifelong_delta.callbacks.progress_lines import ProgressLines

__all__ = ["DeltaPruning", "LifelongDeltas", "ProgressLines"]
