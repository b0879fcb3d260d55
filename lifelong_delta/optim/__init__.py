"""Optimisers built on the parameter anchor (no Lightning imports)."""

from lifelong_delta.optim.adamr import AdamR

__all__ = ["AdamR"]
