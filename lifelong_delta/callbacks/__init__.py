"""Lightning callbacks (layer 3): thin hooks over the pure functions in ``anchors/`` and ``delta/``."""

from lifelong_delta.callbacks.delta_pruning import DeltaPruning

__all__ = ["DeltaPruning"]
