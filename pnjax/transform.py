"""``persistent_bias``: the Eq. 6 term as an Optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax.anchors import AnchorBank
from pnjax.layers import layer_layout
from pnjax.penalty import Layers, _gradient_unchecked, _selection, check_lam, check_scalar_lam

PyTree = Any

#: The error of an ``update`` without ``params``, worded as Optax's own transforms word it.
NO_PARAMS_MSG = (
    "You are using a transformation that requires the current value of parameters, but you "
    "are not passing `params` when calling `update`. persistent_bias needs them: "
    "tx.update(grads, state, params)."
)


class PersistentBiasState(NamedTuple):
    """State of :func:`persistent_bias`.

    The bank and the layer selection live in the state, not in the transform's closure, so a
    jitted training step that takes the optimizer state as an argument sees new anchors without
    recompiling. Swap them with ``optax.tree_utils.tree_set(opt_state, bank=new_bank)``.

    Attributes:
      bank: the anchors Θ_k.
      layer_mask: ``[num_layers]`` float mask of the layers that are penalized.
    """

    bank: AnchorBank
    layer_mask: jax.Array


def persistent_bias(
    bank: AnchorBank, lam: float | jax.Array, layers: Layers = None
) -> optax.GradientTransformation:
    """Adds the persistent-neurons bias of Eq. 6 to the updates.

    ``u^l ← u^l + λ Σ_{k<count} m_l sign(Θ_k^l · θ^l) Θ_k^l / ||Θ_k^l||²``

    computed in closed form from the bank (not by differentiating the penalty). Placed first in
    an ``optax.chain`` before the optimizer, it makes the optimizer minimize the penalized loss
    ``L + P`` of Eq. 4/5 exactly. Placed after an adaptive optimizer's scaling (like the weight
    decay inside ``optax.adamw``) it is a *decoupled* variant: the bias then bypasses Adam's
    normalization and must be followed by a learning-rate scaling, e.g.
    ``optax.chain(optax.scale_by_adam(), persistent_bias(bank, lam), optax.scale(-lr))``.

    Inside ``optax.masked`` or ``optax.partition`` (``multi_transform``) only the leaves the
    wrapper hands over are penalized: a layer masked out entirely contributes nothing, so
    ``optax.masked(persistent_bias(bank, lam), mask)`` gives the same updates as
    ``persistent_bias(bank, lam, layers=...)`` on the layers the mask keeps. A mask that keeps
    only some leaves of a layer (kernels, not biases) penalizes the kept part of that layer:
    ``θ^l`` and ``Θ_k^l`` are then the kept leaves, and ``||Θ_k^l||²`` is their squared norm.

    Examples:
      >>> import jax.numpy as jnp, optax, pnjax
      >>> params = {'w': jnp.array([1.0, 0.0])}
      >>> bank = pnjax.AnchorBank.create(params, 4).push({'w': jnp.array([2.0, -2.0])})
      >>> tx = optax.chain(pnjax.persistent_bias(bank, 0.5), optax.sgd(0.5))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({'w': jnp.zeros(2)}, state, params)
      >>> updates['w']  # -lr λ sign(Θ·θ) Θ / ||Θ||² = -0.5 * 0.5 * (2, -2) / 8
      Array([-0.0625,  0.0625], dtype=float32)

      Within ``optax.masked`` (the same as ``layers=('b',)``):

      >>> params = {'a': {'w': jnp.ones(2)}, 'b': {'w': jnp.ones(2)}}
      >>> bank = pnjax.AnchorBank.create(params, 2).push(params)
      >>> tx = optax.masked(pnjax.persistent_bias(bank, 0.1), {'a': False, 'b': True})
      >>> updates, _ = tx.update(params, tx.init(params), params)
      >>> updates['a']['w'], updates['b']['w']
      (Array([1., 1.], dtype=float32), Array([1.05, 1.05], dtype=float32))

    Args:
      bank: the anchors Θ_k; it is stored in the state at ``init``.
      lam: λ >= 0; a number, an array, or (through ``optax.inject_hyperparams``) a schedule.
      layers: ``None`` for every layer (Eq. 4), a name or names (Eq. 5), a layer index, or a
        ``[num_layers]`` mask.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    Raises:
      ValueError: λ negative or not finite, an unknown layer, ``update`` without ``params``
        or with params that do not match the bank.

    References:
      Min, *Persistent Neurons*, arXiv:2007.01419, Eq. 6.
    """
    if not isinstance(bank, AnchorBank):
        raise TypeError(
            f"bank must be a pnjax.AnchorBank, got {type(bank).__name__}; create one with "
            "pnjax.AnchorBank.create(params, capacity)."
        )
    check_lam(lam)
    check_scalar_lam(lam)
    bank.check_consistent()
    mask = _selection(bank, layers)

    def init_fn(params: PyTree) -> PersistentBiasState:
        if _has_masked(params):
            _unmask(bank, params)  # checks the structure and the kept shapes
        else:
            bank.check_compatible(params)
        return PersistentBiasState(bank=bank, layer_mask=mask)

    def update_fn(
        updates: PyTree, state: PersistentBiasState, params: PyTree | None = None
    ) -> tuple[PyTree, PersistentBiasState]:
        if params is None:
            raise ValueError(NO_PARAMS_MSG)
        state.bank.check_consistent()  # a bank swapped in with tree_set
        if _has_masked(params):
            return _masked_update(updates, state, params, lam), state
        state.bank.check_compatible(params)
        bias = _gradient_unchecked(params, state.bank, lam, state.layer_mask)
        updates = jax.tree_util.tree_map(lambda u, b: u + b.astype(u.dtype), updates, bias)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _has_masked(tree: PyTree) -> bool:
    return any(_is_masked(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_masked))


def _unmask(bank: AnchorBank, params: PyTree) -> tuple[PyTree, list[bool]]:
    """Params with ``optax.MaskedNode`` placeholders → full params (zeros where masked).

    A placeholder may stand for one leaf or a whole subtree (a mask given as a tree prefix).

    Returns:
      The full params, with the bank's structure, and for each leaf whether it is kept.
    """
    def expand(p: Any, a: PyTree) -> PyTree:
        if _is_masked(p):
            return jax.tree_util.tree_map(lambda x: (None, x), a)
        return (p, a)

    try:
        pairs = jax.tree_util.tree_map(expand, params, bank.anchors, is_leaf=_is_masked)
    except ValueError:
        raise ValueError(
            "params do not match the AnchorBank's tree structure (placeholders of optax.masked "
            f"aside).\n  bank:   {jax.tree_util.tree_structure(bank.anchors)}\n  params: "
            f"{jax.tree_util.tree_structure(params, is_leaf=_is_masked)}\nCreate the bank from "
            "the full params (pnjax.AnchorBank.create(params, capacity)), not the masked ones."
        ) from None
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2  # noqa: E731
    flat, treedef = jax.tree_util.tree_flatten(pairs, is_leaf=is_pair)
    kept = [p is not None for p, _ in flat]
    full = jax.tree_util.tree_unflatten(
        treedef,
        [p if p is not None else jnp.zeros(a.shape[1:], a.dtype) for p, a in flat],
    )
    bank.check_compatible(full)
    return full, kept


def _masked_update(
    updates: PyTree, state: PersistentBiasState, params: PyTree, lam: Any
) -> PyTree:
    """The bias over the leaves ``optax.masked`` / ``optax.partition`` hand over."""
    bank = state.bank
    full, kept = _unmask(bank, params)
    layout = layer_layout(full)
    n = layout.num_layers
    any_kept = np.zeros(n, bool)
    all_kept = np.ones(n, bool)
    for k, lid in zip(kept, layout.leaf_layer, strict=True):
        any_kept[lid] |= k
        all_kept[lid] &= k
    sq_norms = None
    partial = any_kept & ~all_kept
    if partial.any():  # norms of the kept part of each partly kept layer
        cols = [bank.sq_norms[:, lid] for lid in range(n)]
        for lid in np.flatnonzero(partial):
            cols[lid] = sum(
                jnp.sum(jnp.square(a.astype(jnp.float32)).reshape(bank.capacity, -1), axis=1)
                for a, k, l in zip(
                    jax.tree_util.tree_leaves(bank.anchors), kept, layout.leaf_layer, strict=True
                )
                if k and l == lid
            )
        sq_norms = jnp.stack(cols, axis=-1)
    mask = state.layer_mask * jnp.asarray(any_kept, state.layer_mask.dtype)
    bias = _gradient_unchecked(full, bank, lam, mask, sq_norms)

    def add(u: Any, b: PyTree) -> Any:
        return u if _is_masked(u) else u + b.astype(u.dtype)

    return jax.tree_util.tree_map(add, updates, bias, is_leaf=_is_masked)
