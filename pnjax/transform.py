"""``persistent_bias``: the Eq. 6 term as an Optax gradient transformation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax
from optax._src import base

from pnjax.anchors import AnchorBank
from pnjax.penalty import Layers, _gradient_unchecked, _selection, check_lam

PyTree = Any


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

    Examples:
      >>> import jax.numpy as jnp, optax, pnjax
      >>> params = {'w': jnp.array([1.0, 0.0])}
      >>> bank = pnjax.AnchorBank.create(params, 4).push({'w': jnp.array([2.0, -2.0])})
      >>> tx = optax.chain(pnjax.persistent_bias(bank, 0.1), optax.sgd(1e-3))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({'w': jnp.zeros(2)}, state, params)

    Args:
      bank: the anchors Θ_k; it is stored in the state at ``init``.
      lam: λ >= 0; a number, an array, or (through ``optax.inject_hyperparams``) a schedule.
      layers: ``None`` for every layer (Eq. 4), a name or names (Eq. 5), or a
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
    mask = _selection(bank, layers)

    def init_fn(params: PyTree) -> PersistentBiasState:
        bank.check_compatible(params)
        return PersistentBiasState(bank=bank, layer_mask=mask)

    def update_fn(
        updates: PyTree, state: PersistentBiasState, params: PyTree | None = None
    ) -> tuple[PyTree, PersistentBiasState]:
        if params is None:
            raise ValueError(base.NO_PARAMS_MSG)
        state.bank.check_compatible(params)
        bias = _gradient_unchecked(params, state.bank, lam, state.layer_mask)
        updates = jax.tree_util.tree_map(lambda u, b: u + b.astype(u.dtype), updates, bias)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)
