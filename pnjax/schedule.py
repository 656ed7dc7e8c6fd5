"""Which layers each persistent iteration penalizes: one schedule of masks per chain.

Iteration ``n`` of a chain weights layer ``l`` of the penalty by ``m_{n,l}`` (Eq. 4 when every
``m_{n,l} = 1``, Eq. 5 when one layer is selected):

    P_n(θ) = λ Σ_k Σ_l m_{n,l} |Θ_k^l · θ^l| / ||Θ_k^l||².

A schedule is the array of masks ``[N + 1, L]`` plus, for the history, the index of the one
penalized layer per iteration: ``-1`` when every layer is penalized, :data:`SUBSET` (``-2``)
when several but not all are (the drivers record the masks themselves as
``history['layer_mask']``). Random layers are
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
#: ``history['layer']`` of an iteration that penalizes several layers but not all.
SUBSET = -2


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
    """The one selected layer of a mask, ``-1`` (every layer) or :data:`SUBSET` (several)."""
    sel = np.flatnonzero(mask)
    if len(sel) == len(mask):
        return -1
    return int(sel[0]) if len(sel) == 1 else SUBSET


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


def _refuse_per_chain(names: tuple[str, ...], layers: Any, n: int, c: int) -> None:
    """A ``ValueError`` pointing to ``chain_layers=`` for a ``layers=`` that reads as one
    choice per chain (a list holding ``None``, ``'random'``, a tuple or an unknown name; an int
    array ``[C]`` or ``[C, N + 1]``); ``layers=`` means what it means in ``persistent_fit``."""
    fix = (
        f"layers= is one choice for every chain, as in persistent_fit (a set of layer names "
        f"{names} penalized together); for one choice per chain pass chain_layers=[...] (a list "
        f"of {c} choices) or chain_layers=<int array [{c}] or [{c}, {n}]>."
    )
    if isinstance(layers, (list, tuple)) and not all(
        isinstance(x, str) and x in names for x in layers
    ):
        raise ValueError(f"layers={layers!r} is not a set of layer names; {fix}")
    if isinstance(layers, (np.ndarray, jax.Array)) and np.issubdtype(
        np.asarray(layers).dtype, np.integer
    ):
        shape = np.shape(layers)
        if len(shape) > 1 or (len(shape) == 1 and shape[0] != n):
            raise ValueError(f"an integer layers array of shape {shape}; {fix}")


def chain_schedules(
    names: tuple[str, ...],
    layers: Any,
    layer_draw: str,
    n: int,
    keys: jax.Array,
    c: int,
    chain_layers: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``C`` chains' schedules: masks ``[C, n, L]`` and indices ``[C, n]``.

    ``layers`` is one choice for every chain (see :func:`layer_schedule`). ``chain_layers``
    instead gives one per chain: a list of ``C`` choices, or an int array ``[C]`` / ``[C, n]``
    of layer indices.

    Raises:
      ValueError: both given; ``chain_layers`` of the wrong length; a ``layers`` that reads as
        one choice per chain (the message names ``chain_layers=``).
    """
    if chain_layers is None:
        _refuse_per_chain(names, layers, n, c)
        choices = [layers] * c
    elif layers is not None:
        raise ValueError(
            "pass layers= (one choice for every chain) or chain_layers= (one per chain), not both."
        )
    elif isinstance(chain_layers, (np.ndarray, jax.Array)) and np.issubdtype(
        np.asarray(chain_layers).dtype, np.integer
    ):
        idx = np.asarray(chain_layers, np.int32)
        if idx.shape == (c,):
            idx = np.repeat(idx[:, None], n, axis=1)
        if idx.shape != (c, n) or idx.min() < -1 or idx.max() >= len(names):
            raise ValueError(
                f"an integer chain_layers array must have shape ({c},) or ({c}, {n}) with "
                f"entries in -1..{len(names) - 1} (-1: every layer), got shape {idx.shape}."
            )
        return masks_from_indices(idx, len(names)), idx
    elif isinstance(chain_layers, (list, tuple)):
        if len(chain_layers) != c:
            raise ValueError(
                f"chain_layers has {len(chain_layers)} choices but there are {c} chains; give "
                "one choice per chain (None, a layer name, a tuple of names, 'random')."
            )
        choices = list(chain_layers)
    else:
        raise ValueError(
            f"chain_layers must be a list of {c} layer choices or an int array [{c}] / [{c}, "
            f"{n}], got {type(chain_layers).__name__}; for one choice for every chain use "
            "layers=."
        )
    out = [layer_schedule(names, ch, layer_draw, n, keys[i]) for i, ch in enumerate(choices)]
    return np.stack([m for m, _ in out]), np.stack([i for _, i in out])
