"""The 1-32-32-1 ReLU network of the paper's Section 3 (Eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class KinkMLP(nn.Module):
    """Fully connected ReLU network ``f(x) = θ3ᵀσ(θ2 σ(θ1 x + b1) + b2) + b3``.

    He-normal weights (``variance_scaling(2, 'fan_in', 'normal')``) and zero biases, as in the
    paper's kink experiment. With the default ``features=(32, 32, 1)`` it is the 1-32-32-1 model.

    Attributes:
      features: widths of the dense layers, the last one being the output width.
    """

    features: Sequence[int] = (32, 32, 1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``x`` of shape ``[batch, in]`` to ``[batch, features[-1]]``."""
        he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
        for i, width in enumerate(self.features):
            x = nn.Dense(width, kernel_init=he, bias_init=nn.initializers.zeros, name=f"Dense_{i}")(
                x
            )
            if i < len(self.features) - 1:
                x = jnp.maximum(x, 0.0)
        return x
