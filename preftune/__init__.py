"""preftune: change which behaviour a language model chooses, with human preferences and PPO."""

__version__ = "0.1.0"
