"""AlexNet adapted to CIFAR-sized inputs (the common ``pytorch-classification`` variant)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pnjax.models.pooling import max_pool

Initializer = nn.initializers.Initializer


def conv_im2col(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 convolution as one matrix product over explicitly gathered patches.

    For the tiny feature maps of a CIFAR AlexNet (``4 x 4`` and ``2 x 2`` with hundreds of
    channels) XLA:CPU's Eigen convolution runs at 2-9 GFLOP/s; gathering the ``k * k`` shifted
    views into one ``[B * H * W, k * k * C_in]`` matrix and multiplying runs at about 50
    GFLOP/s, forward and backward (the gradient of the gather is pad-and-add).

    Args:
      x: ``[B, H, W, C_in]``.
      kernel: ``[k, k, C_in, C_out]`` (HWIO).
      padding: zero padding on every side.

    Returns:
      ``[B, H + 2 * padding - k + 1, W + 2 * padding - k + 1, C_out]``, equal to
      ``lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2)``.
    """
    b, h, w, c = x.shape
    k = kernel.shape[0]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    cols = [xp[:, i : i + ho, j : j + wo, :] for i in range(k) for j in range(k)]
    patches = jnp.concatenate(cols, axis=-1).reshape(b * ho * wo, k * k * c)
    y = patches @ kernel.astype(x.dtype).reshape(k * k * c, -1)
    return y.reshape(b, ho, wo, -1)


class Im2ColConv(nn.Module):
    """Drop-in for ``nn.Conv(features, (k, k), padding=p)`` computed by :func:`conv_im2col`.

    Same parameters (``kernel [k, k, C_in, features]``, ``bias [features]``), initializers and
    outputs (to float rounding) as ``flax.linen.Conv``.

    Attributes:
      features: output channels.
      kernel_size: square kernel side ``k``.
      padding: zero padding on every side.
      kernel_init: kernel initializer.
      bias_init: bias initializer.
    """

    features: int
    kernel_size: int
    padding: int
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, H, W, C_in]`` to ``[B, H + 2p - k + 1, W + 2p - k + 1, features]``."""
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        return conv_im2col(x, kernel, self.padding) + bias.astype(x.dtype)


class AlexNet(nn.Module):
    """AlexNet for ``32 x 32`` images.

    The layout is the CIFAR AlexNet of ``bearpaw/pytorch-classification`` (the paper does not
    print its variant): conv11x11/4(64, pad 5)-relu-pool, conv5x5(192, pad 2)-relu-pool,
    conv3x3(384)-relu, conv3x3(256)-relu, conv3x3(256)-relu-pool, fc(num_classes). On a
    ``32 x 32`` input the spatial size goes 8 -> 4 -> 2 -> 2 -> 1, so the classifier sees 256
    features (2.47 M parameters in all).

    By default (``fast_pool=True``) pooling is :func:`pnjax.models.pooling.max_pool` and the
    four convolutions after the first are :class:`Im2ColConv` (several times faster on the CPU
    for these tiny feature maps); ``fast_pool=False`` gives the ordinary ``nn.Conv`` +
    ``nn.max_pool`` formulation. Both have the same parameter tree (``Conv_0..4``,
    ``Dense_0``) and the same outputs up to float rounding.

    Attributes:
      num_classes: number of output logits.
      fast_pool: use the CPU-fast formulation (default) instead of ``nn.Conv`` + ``nn.max_pool``.
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

        def conv(i: int, features: int, k: int, p: int, y: jax.Array) -> jax.Array:
            if self.fast_pool:
                return Im2ColConv(features, k, p, name=f"Conv_{i}")(y)
            return nn.Conv(features, (k, k), padding=p, name=f"Conv_{i}")(y)

        x = pool(nn.relu(nn.Conv(64, (11, 11), strides=(4, 4), padding=5, name="Conv_0")(x)))
        x = pool(nn.relu(conv(1, 192, 5, 2, x)))
        x = nn.relu(conv(2, 384, 3, 1, x))
        x = nn.relu(conv(3, 256, 3, 1, x))
        x = pool(nn.relu(conv(4, 256, 3, 1, x)))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes)(x)
