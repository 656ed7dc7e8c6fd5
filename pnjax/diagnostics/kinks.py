"""Kink locations of a ReLU MLP on 1-D input, against where the data lies.

A first-layer unit ``relu(w x + b)`` of a network on scalar input is affine except at
``x = −b/w``, its kink; it is active for ``x > −b/w`` when ``w > 0`` and for ``x < −b/w`` when
``w < 0``. The network's predictor can bend only at those points (and where a deeper unit's
input crosses zero, which this module does not track). With the zero biases of He
initialization every kink sits at 0; on the kink data (``pnjax.data.make_kink_data``) no point
lies near 0, and as long as every kink stays in that empty interval or beyond the data, the
predictor is affine on each side of it (the "stuck" fit). Counting kinks inside the data shows
whether a run escaped.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pnjax.layers import layer_names

PyTree = Any


def first_layer(params: PyTree, layer: str | None = None) -> tuple[jax.Array, jax.Array]:
    """``(w, b)`` ``[units]`` of a Dense layer on scalar input (default the first layer).

    Args:
      params: a Linen params dict whose layer has a ``kernel`` ``[1, units]`` and ``bias``.
      layer: the layer's name (``pnjax.layer_names`` spelling, e.g. ``'Dense_0'``).

    Raises:
      ValueError: an unknown layer, or a kernel whose input width is not 1.
    """
    names = layer_names(params)
    name = names[0] if layer is None else layer
    if name not in names:
        raise ValueError(f"unknown layer {name!r}; layers: {names}.")
    sub = params
    for part in name.split("/"):
        sub = sub[part]
    kernel = jnp.asarray(sub["kernel"])
    if kernel.ndim != 2 or kernel.shape[0] != 1:
        raise ValueError(
            f"layer {name!r} has a kernel of shape {kernel.shape}; kink locations need a Dense "
            "layer on 1-D input (kernel [1, units])."
        )
    bias = jnp.asarray(sub["bias"]) if "bias" in sub else jnp.zeros(kernel.shape[1], kernel.dtype)
    return kernel[0], bias


def relu_kinks(params: PyTree, layer: str | None = None) -> jax.Array:
    """``−b/w`` of each first-layer unit: ``[units]``, NaN where ``w = 0`` (no kink)."""
    w, b = first_layer(params, layer)
    safe = jnp.where(w == 0, 1.0, w)
    return jnp.where(w == 0, jnp.nan, -b / safe + 0.0)  # + 0.0: no -0.0


def kink_report(params: PyTree, x: jax.Array, layer: str | None = None) -> dict[str, jax.Array]:
    """Where the first-layer kinks lie relative to the 1-D data ``x``.

    The *gap* is the widest empty interval between two consecutive sorted data points.

    Examples:
      >>> import jax.numpy as jnp
      >>> from pnjax.diagnostics import kink_report
      >>> params = {"Dense_0": {"kernel": jnp.array([[1.0, -2.0, 1.0, 0.0]]),
      ...                       "bias": jnp.array([0.0, 5.0, -0.5, 1.0])}}
      >>> x = jnp.array([-2.0, -1.0, 1.0, 2.0])
      >>> r = kink_report(params, x)
      >>> r["locations"].tolist()[:3], int(r["num_in_gap"]), int(r["num_in_data"])
      ([0.0, 2.5, 0.5], 2, 0)

    Args:
      params: Linen params of an MLP on scalar input.
      x: ``[N]`` or ``[N, 1]`` data inputs.
      layer: the Dense layer to read (default the first).

    Returns:
      A dict of arrays: ``locations`` ``[units]`` (NaN: no kink), ``in_data`` (strictly
      between the data's min and max and not in the gap), ``in_gap``, ``outside`` (beyond the
      data or no kink), ``dead`` (the unit is zero at every data point), the counts
      ``num_in_data``, ``num_in_gap``, ``num_outside``, ``num_dead``, and ``gap`` ``[2]``.
    """
    w, b = first_layer(params, layer)
    x = jnp.sort(jnp.ravel(jnp.asarray(x, w.dtype)))
    loc = relu_kinks(params, layer)
    widths = jnp.diff(x)
    i = jnp.argmax(widths)
    gap = jnp.stack([x[i], x[i + 1]])
    has = ~jnp.isnan(loc)
    inside = has & (loc > x[0]) & (loc < x[-1])
    in_gap = has & (loc > gap[0]) & (loc < gap[1])
    in_data = inside & ~in_gap
    dead = jnp.all(w[:, None] * x[None, :] + b[:, None] <= 0, axis=1)
    return {
        "locations": loc,
        "in_data": in_data,
        "in_gap": in_gap,
        "outside": ~inside,
        "dead": dead,
        "num_in_data": jnp.sum(in_data),
        "num_in_gap": jnp.sum(in_gap),
        "num_outside": jnp.sum(~inside),
        "num_dead": jnp.sum(dead),
        "gap": gap,
    }
