"""Other ways out of bad minima, to compare persistent training with at equal compute."""

from pnjax.baselines.restarts import RestartsResult, random_restarts

__all__ = ["RestartsResult", "random_restarts"]
