"""lifelong_delta: rehearsal-free continual learning and delta-parameter pruning, joined by the parameter anchor."""

__version__ = "0.1.0"
