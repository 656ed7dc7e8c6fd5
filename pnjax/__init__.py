"""pnjax: persistent neurons (Min, arXiv 2007.01419) in JAX, Flax and Optax.

Train, remember where training converged, retrain from the same initialization with a penalty
that repels the parameters from every earlier solution, and keep the best model.
"""

from pnjax.anchors import AnchorBank, layer_sq_norms
from pnjax.baselines import random_restarts
from pnjax.chains import ChainsResult, run_chains
from pnjax.fast_dots import fast_dots
from pnjax.fit import FitResult, make_train_run, persistent_fit
from pnjax.layers import layer_layout, layer_mask, layer_names
from pnjax.penalty import (
    add_persistent_penalty,
    layer_dots,
    persistent_gradient,
    persistent_penalty,
)
from pnjax.search import persistent_search
from pnjax.transform import PersistentBiasState, persistent_bias

__version__ = "0.1.0"

__all__ = [
    "AnchorBank",
    "ChainsResult",
    "FitResult",
    "PersistentBiasState",
    "add_persistent_penalty",
    "fast_dots",
    "layer_dots",
    "layer_layout",
    "layer_mask",
    "layer_names",
    "layer_sq_norms",
    "make_train_run",
    "persistent_bias",
    "persistent_fit",
    "persistent_gradient",
    "persistent_penalty",
    "persistent_search",
    "random_restarts",
    "run_chains",
]
