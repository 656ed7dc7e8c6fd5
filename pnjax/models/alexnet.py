"""AlexNet adapted to CIFAR-sized inputs (the common ``pytorch-classification`` variant)."""

from __future__ import annotations

import flax.linen as nn
import jax

from pnjax.models.pooling import max_pool


class AlexNet(nn.Module):
    """AlexNet for ``32 x 32`` images.

    The layout is the CIFAR AlexNet of ``bearpaw/pytorch-classification`` (the paper does not
    print its variant): conv11x11/4(64, pad 5)-relu-pool, conv5x5(192, pad 2)-relu-pool,
    conv3x3(384)-relu, conv3x3(256)-relu, conv3x3(256)-relu-pool, fc(num_classes). On a
    ``32 x 32`` input the spatial size goes 8 -> 4 -> 2 -> 2 -> 1, so the classifier sees 256
    features. Pooling is 2x2/2 via :func:`pnjax.models.pooling.max_pool` unless
    ``fast_pool=False``.

    Attributes:
      num_classes: number of output logits.
      fast_pool: use the reshape-and-max pooling (default) instead of ``nn.max_pool``.
    """

    num_classes: int = 10
    fast_pool: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps images ``[batch, 32, 32, C]`` to logits ``[batch, num_classes]``."""

        def pool(y: jax.Array) -> jax.Array:
            if self.fast_pool:
                return max_pool(y)
            return nn.max_pool(y, (2, 2), strides=(2, 2))

        x = pool(nn.relu(nn.Conv(64, (11, 11), strides=(4, 4), padding=5)(x)))
        x = pool(nn.relu(nn.Conv(192, (5, 5), padding=2)(x)))
        x = nn.relu(nn.Conv(384, (3, 3), padding=1)(x))
        x = nn.relu(nn.Conv(256, (3, 3), padding=1)(x))
        x = pool(nn.relu(nn.Conv(256, (3, 3), padding=1)(x)))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)
