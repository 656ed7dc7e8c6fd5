"""Which layers each persistent iteration penalizes: one schedule of masks per chain.

Iteration ``n`` of a chain weights layer ``l`` of the penalty by ``m_{n,l}`` (Eq. 4 when every
``m_{n,l} = 1``, Eq. 5 when one layer is selected):

    P_n(θ) = λ Σ_k Σ_l m_{n,l} |Θ_k^l · θ^l| / ||Θ_k^l||².

A schedule is the array of masks ``[N + 1, L]`` plus, for the history, the index of the one
penalized layer per iteration (``-1`` when the mask is not a single layer). Random layers are
drawn from the chain's key folded with :data:`LAYER_KEY`, the same for one chain
(:func:`pnjax.persistent_fit`) and for chain ``c`` of :func:`pnjax.run_chains`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from pnjax.layers import layer_mask

#: The ``fold_in`` constant random layers are drawn with.
LAYER_KEY = 0x1A7E
LAYER_DRAWS = ("once", "per_iteration")


def check_layer_draw(layer_draw: Any) -> str:
    """``layer_draw`` itself, or a ``ValueError`` naming the two choices."""
    if layer_draw not in LAYER_DRAWS:
        raise ValueError(f"layer_draw must be 'once' or 'per_iteration', got {layer_draw!r}.")
    return layer_draw


def masks_from_indices(idx: np.ndarray, num_layers: int) -> np.ndarray:
    """``[..., L]`` float32 masks from layer indices ``[...]`` (``-1``: every layer)."""
    eye = np.concatenate(
        [np.eye(num_layers, dtype=np.float32), np.ones((1, num_layers), np.float32)]
    )
    return eye[np.where(np.asarray(idx) < 0, num_layers, idx)]


def _index_of(mask: np.ndarray) -> int:
    """The one selected layer of a mask, or ``-1`` (every layer, or several)."""
    sel = np.flatnonzero(mask)
    return int(sel[0]) if len(sel) == 1 and len(mask) > 1 else -1


def layer_schedule(
    names: tuple[str, ...],
    choice: Any,
    layer_draw: str,
    n: int,
    key: jax.Array | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One chain's schedule: masks ``[n, L]`` float32 and layer indices ``[n]`` int32.

    Args:
      names: the layer names.
      choice: ``None`` (every layer), a name or a tuple of names, a mask ``[L]``, an int layer
        index (``-1``: every layer), an int array ``[n]`` of indices, or ``'random'``.
      layer_draw: with ``'random'``: one layer for all iterations (``'once'``) or a new one
        per iteration (``'per_iteration'``).
      n: the number of runs, ``iterations + 1``.
      key: the chain's key (needed for ``'random'``).

    Raises:
      ValueError: an unknown name, an index out of range, or ``'random'`` without a key.
    """
    num = len(names)
    if isinstance(choice, str) and choice == "random":
        if key is None:
            raise ValueError(
                "layers='random' draws the layer from `key`; pass key=jax.random.key(seed)."
            )
        lkey = jax.random.fold_in(key, LAYER_KEY)
        if layer_draw == "once":
            idx = np.full(n, int(jax.random.randint(lkey, (), 0, num)), np.int32)
        else:
            idx = np.asarray(jax.random.randint(lkey, (n,), 0, num), np.int32)
        return masks_from_indices(idx, num), idx
    is_int_array = isinstance(choice, (np.ndarray, jax.Array)) and np.issubdtype(
        np.asarray(choice).dtype, np.integer
    )
    if (isinstance(choice, (int, np.integer)) and not isinstance(choice, bool)) or is_int_array:
        idx = np.broadcast_to(np.asarray(choice, np.int32), (n,)).copy()
        if idx.min() < -1 or idx.max() >= num:
            raise ValueError(
                f"layer index {int(idx.min() if idx.min() < -1 else idx.max())} is out of range "
                f"for the layers {names}; use -1 (every layer) or 0..{num - 1}."
            )
        return masks_from_indices(idx, num), idx
    mask = np.asarray(layer_mask(names, choice), np.float32)
    return np.tile(mask, (n, 1)), np.full(n, _index_of(mask), np.int32)


def chain_schedules(
    names: tuple[str, ...],
    layers: Any,
    layer_draw: str,
    n: int,
    keys: jax.Array,
    c: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``C`` chains' schedules: masks ``[C, n, L]`` and indices ``[C, n]``.

    ``layers`` is one choice for every chain (see :func:`layer_schedule`), a **list** of ``C``
    choices, or an int array ``[C]`` / ``[C, n]`` of layer indices.
    """
    if isinstance(layers, (np.ndarray, jax.Array)) and np.issubdtype(
        np.asarray(layers).dtype, np.integer
    ):
        idx = np.asarray(layers, np.int32)
        if idx.shape == (c,):
            idx = np.repeat(idx[:, None], n, axis=1)
        if idx.shape != (c, n) or idx.min() < -1 or idx.max() >= len(names):
            raise ValueError(
                f"an integer layers array must have shape ({c},) or ({c}, {n}) with entries in "
                f"-1..{len(names) - 1} (-1: every layer), got shape {idx.shape}."
            )
        return masks_from_indices(idx, len(names)), idx
    if isinstance(layers, list):
        if len(layers) != c:
            raise ValueError(
                f"layers is a list of {len(layers)} choices but there are {c} chains; a list "
                "gives one choice per chain (use a tuple for a set of layer names)."
            )
        choices = layers
    else:
        choices = [layers] * c
    out = [layer_schedule(names, ch, layer_draw, n, keys[i]) for i, ch in enumerate(choices)]
    return np.stack([m for m, _ in out]), np.stack([i for _, i in out])
