"""Max pooling, and convolution followed by max pooling, that are cheap to train on the CPU.

``flax.linen.max_pool`` lowers to ``reduce_window``, whose gradient is XLA's
``select_and_scatter``: on XLA:CPU that single op costs more than the convolutions of a small
network (LeNet-5's training step is several times slower with it). For the common case
of non-overlapping windows (window == stride, ``VALID`` padding) the same pooling is a reshape
followed by a ``max`` over two small axes, whose gradient is an elementwise mask that XLA fuses.

The two formulations give identical forward values. Their gradients differ only where a window
holds several equal maxima: ``select_and_scatter`` sends the whole gradient to the first of them,
``jnp.max`` splits it evenly between them. After a ReLU the usual ties are zeros, and the
ReLU's own gradient (zero at zero, as ``jax.nn.relu`` defines it) removes them, so the gradient
with respect to the layer below is the same.

Convolutions with few channels (LeNet-5's first layer: 3 in, 6 out) run at a few GFLOP/s in
XLA:CPU's Eigen convolution, which is built for wide channel dimensions. :class:`ConvReLUPool`
computes ``max_pool(relu(conv(x) + b))`` for a stride-1 ``VALID`` convolution followed by an
``s x s`` pool as one convolution on a space-to-depth view of the input: ``s x s`` blocks of
pixels become channels (3 -> 12), the kernel is rearranged (with zeros) to a ``ceil((k + s - 1)
/ s)`` kernel producing the ``s x s`` outputs of each block as channels (6 -> 24), and the pool
is a ``max`` over those ``s x s`` channel groups. It does about 1.4x the arithmetic of the
direct convolution but runs several times faster, forward and backward; the stored parameters
are the ordinary ``kernel [k, k, C_in, C_out]`` and ``bias [C_out]`` of ``flax.linen.Conv``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def max_pool(x: jax.Array, window: int = 2) -> jax.Array:
    """Non-overlapping ``window x window`` max pooling of an NHWC array.

    Equivalent to ``nn.max_pool(x, (window, window), strides=(window, window))`` with ``VALID``
    padding: rows and columns that do not fill a whole window are dropped.

    Args:
      x: array of shape ``[..., H, W, C]`` (usually ``[batch, H, W, C]``).
      window: side of the square window, which is also the stride.

    Returns:
      Array of shape ``[..., H // window, W // window, C]`` and the dtype of ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> max_pool(jnp.arange(16.0).reshape(1, 4, 4, 1))[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    if window < 1:
        raise ValueError(f"window must be a positive integer, got {window}")
    if x.ndim < 3:
        raise ValueError(f"max_pool expects [..., H, W, C], got shape {x.shape}")
    *lead, h, w, c = x.shape
    ho, wo = h // window, w // window
    if ho == 0 or wo == 0:
        raise ValueError(f"spatial size {(h, w)} is smaller than the window {window}")
    if window == 1:
        return x
    x = x[..., : ho * window, : wo * window, :]
    x = x.reshape(*lead, ho, window, wo, window, c)
    n = len(lead)
    return x.max(axis=(n + 1, n + 3))


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
    """Moves ``block x block`` pixel blocks into channels.

    Args:
      x: ``[B, H, W, C]`` with ``H`` and ``W`` multiples of ``block``.
      block: block side ``s``.

    Returns:
      ``[B, H / s, W / s, s * s * C]``; channel index ``(di * s + dj) * C + c`` holds
      ``x[b, i * s + di, j * s + dj, c]``.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // block, w // block, block * block * c)


def space_to_depth_kernel(kernel: jax.Array, block: int) -> jax.Array:
    """Rewrites a stride-1 kernel to act on :func:`space_to_depth` inputs.

    Output block ``(a, c)`` of size ``s x s`` at block position ``(i, j)`` reads input rows
    ``s * i + a + dh``; writing ``a + dh = s * p + q`` gives a kernel over block offsets ``p``
    with taps ``kernel[s * p + q - a]`` (zero outside ``[0, k)``).

    Args:
      kernel: ``[kh, kw, C_in, C_out]`` (HWIO).
      block: block side ``s``.

    Returns:
      ``[KH, KW, s * s * C_in, s * s * C_out]`` with ``KH = ceil((kh + s - 1) / s)``; output
      channel ``(a * s + c) * C_out + o`` is output pixel ``(s * i + a, s * j + c)``, channel ``o``.
    """
    kh, kw, ci, co = kernel.shape
    big_h, big_w = -(-(kh + block - 1) // block), -(-(kw + block - 1) // block)
    parts = []
    for a in range(block):
        for c in range(block):
            w = jnp.pad(
                kernel, ((a, big_h * block - kh - a), (c, big_w * block - kw - c), (0, 0), (0, 0))
            )
            w = w.reshape(big_h, block, big_w, block, ci, co).transpose(0, 2, 1, 3, 4, 5)
            parts.append(w.reshape(big_h, big_w, block * block * ci, co))
    return jnp.stack(parts, axis=-2).reshape(big_h, big_w, block * block * ci, block * block * co)


def conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array, window: int = 2) -> jax.Array:
    """``max_pool(relu(conv_valid(x, kernel) + bias), window)`` by a space-to-depth convolution.

    Equal to the direct formulation in value (to float rounding). The gradient is the same as
    well except where a pooling window holds several equal pre-activation maxima, where it is
    split evenly between them (see the module docstring).

    Args:
      x: ``[B, H, W, C_in]``.
      kernel: ``[kh, kw, C_in, C_out]``; stride 1, ``VALID`` padding.
      bias: ``[C_out]``.
      window: pooling window and stride ``s``.

    Returns:
      ``[B, (H - kh + 1) // s, (W - kw + 1) // s, C_out]``.
    """
    bsz, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    ho, wo = (h - kh + 1) // window, (w - kw + 1) // window
    if ho < 1 or wo < 1:
        raise ValueError(f"input {(h, w)} too small for kernel {(kh, kw)} and pool {window}")
    big_h, big_w = -(-(kh + window - 1) // window), -(-(kw + window - 1) // window)
    need_h, need_w = (ho + big_h - 1) * window, (wo + big_w - 1) * window
    x = x[:, :need_h, :need_w, :]
    x = jnp.pad(x, ((0, 0), (0, need_h - x.shape[1]), (0, need_w - x.shape[2]), (0, 0)))
    y = lax.conv_general_dilated(
        space_to_depth(x, window),
        space_to_depth_kernel(kernel.astype(x.dtype), window),
        (1, 1),
        "VALID",
        dimension_numbers=_NHWC,
    )
    y = y.reshape(bsz, ho, wo, window * window, co).max(axis=3)
    return nn.relu(y + bias.astype(y.dtype))


class ConvReLUPool(nn.Module):
    """``Conv(features, kernel_size, padding='VALID')`` -> ReLU -> ``window x window`` max pool.

    Holds exactly the parameters of ``flax.linen.Conv`` (``kernel [k, k, C_in, features]``,
    ``bias [features]``), so a model built from it has the same parameter tree as one built
    from ``nn.Conv`` and ``nn.max_pool``; give it the name the ``nn.Conv`` would have had.

    Attributes:
      features: output channels.
      kernel_size: square kernel side ``k``.
      window: pooling window and stride.
      kernel_init: kernel initializer.
      bias_init: bias initializer.
      space_to_depth: compute with :func:`conv_relu_pool` (default) or with ``lax`` conv and
        :func:`max_pool` (same numbers up to rounding; slower on the CPU).
    """

    features: int
    kernel_size: int = 5
    window: int = 2
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    space_to_depth: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps ``[B, H, W, C_in]`` to ``[B, (H - k + 1) // window, (W - k + 1) // window, features]``."""
        k = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        if self.space_to_depth:
            return conv_relu_pool(x, kernel, bias, self.window)
        y = lax.conv_general_dilated(
            x, kernel.astype(x.dtype), (1, 1), "VALID", dimension_numbers=_NHWC
        )
        return max_pool(nn.relu(y + bias.astype(y.dtype)), self.window)
