"""Max pooling whose gradient is cheap on the CPU.

``flax.linen.max_pool`` lowers to ``reduce_window``, whose gradient is XLA's
``select_and_scatter``: on XLA:CPU that single op costs more than the convolutions of a small
network (LeNet-5's training step goes from about 50 ms to about 200 ms). For the common case
of non-overlapping windows (window == stride, ``VALID`` padding) the same pooling is a reshape
followed by a ``max`` over two small axes, whose gradient is an elementwise mask that XLA fuses.

The two formulations give identical forward values. Their gradients differ only where a window
holds several equal maxima: ``select_and_scatter`` sends the whole gradient to the first of them,
``jnp.max`` splits it evenly between them. After a ReLU the usual ties are zeros, and the
ReLU's own gradient (zero at zero, as ``jax.nn.relu`` defines it) removes them, so the gradient
with respect to the layer below is the same.
"""

from __future__ import annotations

import jax


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
