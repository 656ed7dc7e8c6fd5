"""ResNet-18 for CIFAR-sized inputs (3x3 stem, no stem pooling), with BatchNorm."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut.

    Attributes:
      features: output channels.
      strides: stride of the first convolution and of the projection shortcut.
    """

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Maps ``[batch, H, W, C_in]`` to ``[batch, H / strides, W / strides, features]``."""
        norm = _batch_norm(train)
        s = (self.strides, self.strides)
        y = nn.Conv(self.features, (3, 3), strides=s, padding=1, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.features, (3, 3), padding=1, use_bias=False)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = nn.Conv(self.features, (1, 1), strides=s, use_bias=False, name="shortcut_conv")(x)
            x = norm(name="shortcut_bn")(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """ResNet-18 in the CIFAR layout (He et al. 2016; the ``kuangliu/pytorch-cifar`` variant).

    conv3x3(64)-BN-relu, then four stages of two :class:`BasicBlock` each with 64, 128, 256
    and 512 channels (strides 1, 2, 2, 2), global average pooling and fc(num_classes).
    BatchNorm follows PyTorch's defaults (momentum 0.1, i.e. Flax ``momentum=0.9``;
    ``epsilon=1e-5``) and keeps its running statistics in the ``batch_stats`` collection.

    Examples:
      Shapes only (``jax.eval_shape`` traces without computing; drop it to run the model):

      >>> import jax, jax.numpy as jnp
      >>> model = ResNet18(num_classes=10)
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
      >>> logits, updates = jax.eval_shape(
      ...     lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]), variables)
      >>> logits.shape, sorted(updates)
      ((2, 10), ['batch_stats'])

    Attributes:
      num_classes: number of output logits.
      stage_sizes: blocks per stage (``(2, 2, 2, 2)`` is ResNet-18).
    """

    num_classes: int = 10
    stage_sizes: Sequence[int] = (2, 2, 2, 2)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Maps images ``[batch, H, W, C]`` to logits ``[batch, num_classes]``.

        Args:
          x: images, ``[batch, H, W, C]`` (``32 x 32 x 3`` for CIFAR).
          train: normalize with the batch's statistics and update ``batch_stats`` (which must
            then be passed as ``mutable=["batch_stats"]``), or use the running statistics.

        Returns:
          Logits of shape ``[batch, num_classes]``.
        """
        x = nn.Conv(64, (3, 3), padding=1, use_bias=False)(x)
        x = nn.relu(_batch_norm(train)()(x))
        for i, n_blocks in enumerate(self.stage_sizes):
            for j in range(n_blocks):
                strides = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(64 * 2**i, strides=strides)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def _batch_norm(train: bool) -> Callable[..., nn.BatchNorm]:
    """BatchNorm with PyTorch's default momentum and epsilon."""
    return functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
    )
