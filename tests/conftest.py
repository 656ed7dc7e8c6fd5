"""Shared fixtures: small Linen / NNX models and a NumPy reference of Eq. 4 and Eq. 6."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


class TwoDense(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.tanh(nn.Dense(4)(x)))


@pytest.fixture
def linen_params():
    return TwoDense().init(jax.random.key(0), jnp.ones((1, 3)))["params"]


def numpy_layers(params):
    """Reference grouping: flatten each dict-of-dicts layer in key order."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]
        if keys and keys[-1] == "value":
            keys = keys[:-1]
        out.setdefault("/".join(map(str, keys[:-1])), []).append(
            np.asarray(leaf, np.float64).ravel()
        )
    return {k: np.concatenate(v) for k, v in out.items()}


def numpy_penalty(params, anchors, lam, layers=None):
    """Eq. 4/5 in float64 NumPy: λ Σ_k Σ_l |Θ_k^l·θ^l| / ||Θ_k^l||²."""
    p = numpy_layers(params)
    total = 0.0
    for a in anchors:
        al = numpy_layers(a)
        for name, vec in p.items():
            if layers is not None and name not in layers:
                continue
            sq = al[name] @ al[name]
            if sq > 0:
                total += abs(al[name] @ vec) / sq
    return lam * total


def numpy_gradient(params, anchors, lam, layers=None):
    """Eq. 6 in float64 NumPy, as flat per-layer vectors."""
    p = numpy_layers(params)
    g = {k: np.zeros_like(v) for k, v in p.items()}
    for a in anchors:
        al = numpy_layers(a)
        for name, vec in p.items():
            if layers is not None and name not in layers:
                continue
            sq = al[name] @ al[name]
            if sq > 0:
                g[name] += lam * np.sign(al[name] @ vec) * al[name] / sq
    return g


def random_like(params, seed):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )
