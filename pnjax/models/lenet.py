"""LeNet-5 for CIFAR-sized inputs, as used in the paper's Section 4 (with ReLU)."""

from __future__ import annotations

import flax.linen as nn
import jax

from pnjax.models.pooling import max_pool

Initializer = nn.initializers.Initializer


class LeNet5(nn.Module):
    """conv5x5(6)-relu-pool-conv5x5(16)-relu-pool-fc120-relu-fc84-relu-fc(num_classes).

    Convolutions use ``VALID`` padding, so a ``32 x 32`` image becomes ``5 x 5 x 16`` = 400
    features before the dense layers. Max pooling is ``2 x 2`` with stride 2, computed by
    :func:`pnjax.models.pooling.max_pool` (cheap gradient on the CPU) unless
    ``fast_pool=False``, which uses ``flax.linen.max_pool`` (same forward values).

    Attributes:
      num_classes: number of output logits.
      kernel_init: initializer of every kernel (the paper's full-model runs use
        ``nn.initializers.normal(0.2)`` and ``normal(0.05)``).
      bias_init: initializer of every bias.
      fast_pool: use the reshape-and-max pooling (default) instead of ``nn.max_pool``.
    """

    num_classes: int = 10
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    fast_pool: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps images ``[batch, 32, 32, C]`` to logits ``[batch, num_classes]``."""
        pool = max_pool if self.fast_pool else _flax_pool
        inits = dict(kernel_init=self.kernel_init, bias_init=self.bias_init)
        x = pool(nn.relu(nn.Conv(6, (5, 5), padding="VALID", **inits)(x)))
        x = pool(nn.relu(nn.Conv(16, (5, 5), padding="VALID", **inits)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, **inits)(x))
        x = nn.relu(nn.Dense(84, **inits)(x))
        return nn.Dense(self.num_classes, **inits)(x)


def _flax_pool(x: jax.Array) -> jax.Array:
    """``nn.max_pool`` with a 2x2 window and stride 2 (the ordinary Flax formulation)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))
