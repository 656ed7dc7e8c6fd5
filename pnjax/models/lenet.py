"""LeNet-5 for CIFAR-sized inputs, as used in the paper's Section 4 (with ReLU)."""

from __future__ import annotations

import flax.linen as nn
import jax

from pnjax.models.pooling import ConvReLUPool

Initializer = nn.initializers.Initializer


class LeNet5(nn.Module):
    """conv5x5(6)-relu-pool-conv5x5(16)-relu-pool-fc120-relu-fc84-relu-fc(num_classes).

    Convolutions use ``VALID`` padding, so a ``32 x 32`` image becomes ``5 x 5 x 16`` = 400
    features before the dense layers. Max pooling is ``2 x 2`` with stride 2. By default each
    conv-relu-pool is one :class:`pnjax.models.pooling.ConvReLUPool` (space-to-depth
    convolution, cheap pooling gradient: several times faster to train on the CPU); with
    ``fast_pool=False`` the model is the ordinary ``nn.Conv`` + ``nn.max_pool`` formulation.
    Both have the same parameter tree (``Conv_0``, ``Conv_1``, ``Dense_0..2``) and the same
    outputs up to float rounding.

    Attributes:
      num_classes: number of output logits.
      kernel_init: initializer of every kernel (the paper's full-model runs use
        ``nn.initializers.normal(0.2)`` and ``normal(0.05)``).
      bias_init: initializer of every bias.
      fast_pool: use the fast conv-relu-pool (default) instead of ``nn.Conv`` + ``nn.max_pool``.
    """

    num_classes: int = 10
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()
    fast_pool: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps images ``[batch, 32, 32, C]`` to logits ``[batch, num_classes]``."""
        inits = dict(kernel_init=self.kernel_init, bias_init=self.bias_init)
        for i, features in enumerate((6, 16)):
            if self.fast_pool:
                x = ConvReLUPool(features, 5, name=f"Conv_{i}", **inits)(x)
            else:
                x = nn.Conv(features, (5, 5), padding="VALID", name=f"Conv_{i}", **inits)(x)
                x = _flax_pool(nn.relu(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, **inits)(x))
        x = nn.relu(nn.Dense(84, **inits)(x))
        return nn.Dense(self.num_classes, **inits)(x)


def _flax_pool(x: jax.Array) -> jax.Array:
    """``nn.max_pool`` with a 2x2 window and stride 2 (the ordinary Flax formulation)."""
    return nn.max_pool(x, (2, 2), strides=(2, 2))
