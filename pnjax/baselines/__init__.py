"""Other ways out of bad minima, to compare persistent training with at equal compute.

- :func:`random_restarts`: many initializations, keep the best.
- :func:`anls`: Active Neuron Least Squares for one-hidden-layer ReLU regression.
- :func:`splitting_matrices` and :func:`split_neurons`: neuron splitting (S2D, signed S3D) for
  Dense chains, growing the network.
"""

from pnjax.baselines.anls import ANLSResult, anls, anls_sweep, one_hidden_loss
from pnjax.baselines.restarts import RestartsResult, random_restarts
from pnjax.baselines.splitting import (
    SplitResult,
    extreme_eigenpairs,
    hidden_widths,
    mlp_apply,
    softplus_curvature,
    split_neurons,
    splitting_matrices,
)

__all__ = [
    "ANLSResult",
    "RestartsResult",
    "SplitResult",
    "anls",
    "anls_sweep",
    "extreme_eigenpairs",
    "hidden_widths",
    "mlp_apply",
    "one_hidden_loss",
    "random_restarts",
    "softplus_curvature",
    "split_neurons",
    "splitting_matrices",
]
