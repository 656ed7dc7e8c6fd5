"""How a parameter pytree splits into layers.

A *layer* is the set of leaves that share one parent path: the parameters owned directly by one
Flax module (``kernel`` and ``bias`` of a ``Dense``), i.e. the paper's ``θ^l = [θ^l || b^l]``. Its
name is the parent path joined with ``/`` (``'Dense_0'``, ``'encoder/Conv_1'``, ``'layers/0'``).
A leaf that sits at the root of the tree (a bare array, or a top-level ``{'w': array}``) belongs
to the root layer, named ``''``.

Variable wrappers (``flax.nnx.Param`` and friends inside ``nnx.State``) flatten with a trailing
attribute key (``.value``); it is dropped, so a Linen ``params`` dict and the ``nnx.State`` of the
same model give the same layer names up to the module naming of each API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _key_name(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return str(key.name)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _leaf_path(path: tuple[Any, ...]) -> tuple[str, ...]:
    """Path of a leaf as strings, without the trailing ``.value`` of variable wrappers."""
    if (
        path
        and isinstance(path[-1], jax.tree_util.GetAttrKey)
        and path[-1].name
        in (
            "value",
            "raw_value",
        )
    ):
        path = path[:-1]
    return tuple(_key_name(k) for k in path)


class LayerLayout(NamedTuple):
    """Static description of how the leaves of a pytree group into layers.

    Attributes:
      names: layer names, in order of first appearance in the flattened tree.
      leaf_layer: for each leaf (in ``jax.tree_util.tree_leaves`` order) the index of its layer.
    """

    names: tuple[str, ...]
    leaf_layer: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.names)


def layer_layout(params: PyTree) -> LayerLayout:
    """Groups the leaves of ``params`` into layers (see the module docstring).

    Args:
      params: any pytree of arrays (Linen ``params`` dict, ``nnx.State``, nested containers).

    Returns:
      A :class:`LayerLayout`; it depends only on the tree structure, so it is static under
      ``jax.jit``.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    names: list[str] = []
    index: dict[str, int] = {}
    leaf_layer: list[int] = []
    for path, _leaf in flat:
        parts = _leaf_path(path)
        name = "/".join(parts[:-1])
        if name not in index:
            index[name] = len(names)
            names.append(name)
        leaf_layer.append(index[name])
    return LayerLayout(tuple(names), tuple(leaf_layer))


def layer_names(params: PyTree) -> tuple[str, ...]:
    """Names of the layers of ``params``: one per Flax module that owns parameters.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, pnjax
      >>> params = nn.Sequential([nn.Dense(3), nn.Dense(1)]).init(
      ...     jax.random.key(0), jnp.ones((1, 2)))['params']
      >>> pnjax.layer_names(params)
      ('layers_0', 'layers_1')

    Args:
      params: a pytree of arrays.

    Returns:
      A tuple of layer names (``'/'``-joined parent paths), in tree order.
    """
    return layer_layout(params).names


def layer_mask(
    params_or_names: PyTree | Sequence[str],
    layers: None | str | Sequence[str] | jax.Array | np.ndarray,
    *,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """A ``[num_layers]`` 0/1 vector selecting ``layers``.

    Args:
      params_or_names: a params pytree, or the tuple returned by :func:`layer_names`.
      layers: ``None`` (every layer, Eq. 4), one layer name, a sequence of names (Eq. 5 when it
        holds one name), or already a mask/weights array of shape ``[num_layers]`` (returned
        as is, after a shape check), which lets a jitted caller choose the layer at run time.
      dtype: dtype of the returned mask.

    Returns:
      Array of shape ``[num_layers]``.

    Raises:
      ValueError: an unknown layer name, or a mask of the wrong shape.
      TypeError: ``layers`` is none of the above (e.g. an int).
    """
    if isinstance(params_or_names, tuple) and all(isinstance(n, str) for n in params_or_names):
        names = params_or_names
    else:
        names = layer_names(params_or_names)
    if layers is None:
        return jnp.ones((len(names),), dtype)
    if isinstance(layers, (jax.Array, np.ndarray)):
        if layers.shape != (len(names),):
            raise ValueError(
                f"layers mask has shape {layers.shape}, expected ({len(names)},) for the layers "
                f"{names}; pass layer names or a mask with one entry per layer."
            )
        return jnp.asarray(layers, dtype)
    if isinstance(layers, str):
        layers = (layers,)
    if not isinstance(layers, Sequence) and not isinstance(layers, (set, frozenset)):
        raise TypeError(
            f"layers must be None, a layer name, a sequence of names or a [num_layers] mask "
            f"array, got {layers!r} ({type(layers).__name__}); the params have the layers "
            f"{names} (see pnjax.layer_names(params))."
        )
    unknown = [n for n in layers if n not in names]
    if unknown:
        raise ValueError(
            f"unknown layer name(s) {unknown}; the params have the layers {names} "
            "(see pnjax.layer_names(params))."
        )
    if len(layers) == 0:
        raise ValueError(
            "layers=() selects no layer; pass None for every layer or at least one name "
            f"from {names}."
        )
    return jnp.asarray([1.0 if n in layers else 0.0 for n in names], dtype)
