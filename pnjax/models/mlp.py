"""The 1-32-32-1 ReLU network of the paper's Section 3 (Eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from pnjax.models import dense


class KinkMLP(nn.Module):
    """Fully connected ReLU network ``f(x) = θ3ᵀσ(θ2 σ(θ1 x + b1) + b2) + b3``.

    He-normal weights (``variance_scaling(2, 'fan_in', 'normal')``) and zero biases, as in the
    paper's kink experiment. With the default ``features=(32, 32, 1)`` it is the 1-32-32-1 model.

    Attributes:
      features: widths of the dense layers, the last one being the output width.
      fast_matmul: compute the layers' products with :func:`pnjax.models.dense.dot_general`
        (default): the same values and derivatives as ``nn.Dense``'s, with a weight gradient
        that XLA:CPU's fast dot kernels accept (1.15x faster for 100 vmapped chains, ``benchmarks/compile_options.py``). The
        parameter tree is ``nn.Dense``'s either way.
    """

    features: Sequence[int] = (32, 32, 1)
    fast_matmul: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``x`` of shape ``[batch, in]`` to ``[batch, features[-1]]``."""
        he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        dot = dense.dot_general if self.fast_matmul else None
        for i, width in enumerate(self.features):
            x = nn.Dense(
                width,
                kernel_init=he,
                bias_init=nn.initializers.zeros,
                dot_general=dot,
                name=f"Dense_{i}",
            )(x)
            if i < len(self.features) - 1:
                x = jnp.maximum(x, 0.0)
        return x
