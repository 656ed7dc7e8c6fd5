"""The persistent penalty (Eq. 4 / Eq. 5) and its gradient (Eq. 6).

With anchors Θ_k (k < n) held in an :class:`~pnjax.AnchorBank`, layers ``l`` and a layer
selection ``m_l ∈ {0, 1}`` (all ones for the full model, one-hot for the partial model):

    P(θ)      = λ Σ_k Σ_l m_l |Θ_k^l · θ^l| / ||Θ_k^l||²                       (Eq. 4 / 5)
    ∇_{θ^l} P = λ Σ_k m_l sign(Θ_k^l · θ^l) Θ_k^l / ||Θ_k^l||²                 (Eq. 6)

Empty slots of the bank and anchors whose layer norm is zero contribute exactly zero. Dot
products are accumulated in at least float32; results are cast back to the params' dtypes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pnjax._checks import int_layer_mask
from pnjax.anchors import AnchorBank, accumulation_dtype
from pnjax.layers import layer_layout, layer_mask

PyTree = Any
Layers = None | int | str | Sequence[str] | jax.Array


def check_lam(lam: Any) -> None:
    """Raises ``ValueError`` for a concrete λ that is negative or not finite.

    Traced values (λ under ``jax.jit``, ``vmap`` or ``optax.inject_hyperparams``) cannot be
    checked and pass through.
    """
    if isinstance(lam, jax.core.Tracer):
        return
    try:
        arr = np.asarray(lam, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"lam must be a number or an array of numbers, got {lam!r}.") from e
    with np.errstate(over="ignore"):
        in_float32 = arr if jax.config.jax_enable_x64 else arr.astype(np.float32)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or not np.all(np.isfinite(in_float32)):
        raise ValueError(
            f"lam must be finite and >= 0, got {lam!r}; the paper uses 0.1 (2-D toy), 0.01 "
            "(kink MLP, full LeNet-5) and 0.001 (partial models)."
        )


def _selection(bank: AnchorBank, layers: Layers) -> jax.Array:
    index = int_layer_mask(bank.names, layers)  # layers=2 reads as in the drivers
    return layer_mask(bank.names, layers) if index is None else index


def layer_dots(params: PyTree, bank: AnchorBank) -> jax.Array:
    """Per-anchor, per-layer dot products ``Θ_k^l · θ^l``.

    Args:
      params: params with the bank's structure.
      bank: the anchor bank.

    Returns:
      ``[capacity, num_layers]`` array (accumulation dtype, at least float32).
    """
    layout = layer_layout(params)
    a_leaves = jax.tree_util.tree_leaves(bank.anchors)
    p_leaves = jax.tree_util.tree_leaves(params)
    cols = [jnp.zeros((bank.capacity,), jnp.float32) for _ in layout.names]
    for a, p, lid in zip(a_leaves, p_leaves, layout.leaf_layer, strict=True):
        p = jnp.asarray(p)
        acc = accumulation_dtype(p.dtype)
        d = jnp.einsum(
            "kn,n->k",
            a.reshape(bank.capacity, -1),
            p.reshape(-1),
            preferred_element_type=acc,
        )
        cols[lid] = cols[lid] + d
    return jnp.stack(cols, axis=-1)


def _inverse_sq_norms(bank: AnchorBank, sq_norms: jax.Array | None = None) -> jax.Array:
    """``[capacity, num_layers]``: 1/||Θ_k^l||² for stored anchors with nonzero norm, else 0.

    ``sq_norms`` replaces the bank's cached norms (for norms over a subset of the leaves).
    """
    sq = bank.sq_norms if sq_norms is None else sq_norms
    ok = (sq > 0) & bank.valid[:, None]
    return jnp.where(ok, 1.0 / jnp.where(ok, sq, 1.0), 0.0)


def _check(params: PyTree, bank: AnchorBank, lam: Any) -> None:
    if not isinstance(bank, AnchorBank):
        raise TypeError(
            f"bank must be a pnjax.AnchorBank, got {type(bank).__name__}; create one with "
            "pnjax.AnchorBank.create(params, capacity)."
        )
    check_lam(lam)
    check_scalar_lam(lam)
    bank.check_consistent()
    bank.check_compatible(params)


def check_scalar_lam(lam: Any) -> None:
    """Raises ``ValueError`` unless λ is a scalar (a traced scalar under ``vmap`` is one).

    A per-chain ``[C]`` λ belongs under ``jax.vmap`` (or ``optax.inject_hyperparams``); outside
    it would broadcast against the ``[capacity, num_layers]`` dot products and fail inside XLA.
    """
    # not chex.assert_rank (it reads a list as a sequence of inputs), not jnp.ndim (deprecated
    # on lists)
    shape = tuple(lam.shape) if isinstance(lam, jax.Array) else np.shape(lam)
    if shape != ():
        raise ValueError(
            f"lam must be a scalar here, got shape {shape}; for one λ per chain map over "
            "them with jax.vmap (or pass the array to pnjax.run_chains)."
        )


def persistent_penalty(
    params: PyTree, bank: AnchorBank, lam: float | jax.Array, layers: Layers = None
) -> jax.Array:
    """The persistent penalty of Eq. 4 (all layers) or Eq. 5 (selected layers).

    ``P(θ) = λ Σ_{k<count} Σ_l m_l |Θ_k^l · θ^l| / ||Θ_k^l||²``

    Examples:
      >>> import jax.numpy as jnp, pnjax
      >>> theta0 = {'w': jnp.array([2.0, -2.0])}
      >>> bank = pnjax.AnchorBank.create(theta0, capacity=2).push(theta0)
      >>> round(float(pnjax.persistent_penalty({'w': jnp.array([1.0, 0.0])}, bank, 0.1)), 6)
      0.025

    Args:
      params: the current parameters θ, a pytree with the bank's structure.
      bank: the converged solutions Θ_k.
      lam: λ >= 0 (a Python number or a scalar array; traced values are allowed).
      layers: ``None`` for every layer (Eq. 4), a layer name or names (Eq. 5 with one name),
        a layer index (``-1``: every layer) or a ``[num_layers]`` mask array (for a layer
        chosen at run time).

    Returns:
      A scalar in the params' (promoted) dtype; float32 when every leaf is an integer or bool.

    Raises:
      ValueError: the bank does not match the params, an unknown layer, λ negative, not
        finite or not a scalar.

    References:
      Min, *Persistent Neurons*, arXiv:2007.01419, Eqs. 4-5.
    """
    _check(params, bank, lam)
    mask = _selection(bank, layers)
    dots = layer_dots(params, bank)
    terms = jnp.abs(dots) * _inverse_sq_norms(bank).astype(dots.dtype) * mask.astype(dots.dtype)
    out_dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    if not jnp.issubdtype(out_dtype, jnp.inexact):  # integer/bool params: a float penalty
        out_dtype = jnp.float32
    return (jnp.asarray(lam, dots.dtype) * jnp.sum(terms)).astype(out_dtype)


def persistent_gradient(
    params: PyTree, bank: AnchorBank, lam: float | jax.Array, layers: Layers = None
) -> PyTree:
    """The gradient of the persistent penalty in closed form (Eq. 6).

    ``∇_{θ^l} P = λ Σ_{k<count} m_l sign(Θ_k^l · θ^l) Θ_k^l / ||Θ_k^l||²``

    It equals ``jax.grad(persistent_penalty)`` wherever no ``Θ_k^l · θ^l`` is zero (there the
    sign, like JAX's derivative of ``|x|``, is 0), and costs one pass over the anchors for the
    dot products plus one for the weighted sum.

    Args:
      params: the current parameters θ.
      bank: the converged solutions Θ_k.
      lam: λ >= 0.
      layers: as in :func:`persistent_penalty`.

    Returns:
      A pytree shaped and typed like ``params`` (zeros for integer and bool leaves, which have
      no gradient).
    """
    _check(params, bank, lam)
    return _gradient_unchecked(params, bank, lam, _selection(bank, layers))


def _gradient_unchecked(
    params: PyTree,
    bank: AnchorBank,
    lam: Any,
    mask: jax.Array,
    sq_norms: jax.Array | None = None,
) -> PyTree:
    layout = layer_layout(params)
    dots = layer_dots(params, bank)
    coef = (
        jnp.asarray(lam, dots.dtype)
        * jnp.sign(dots)
        * _inverse_sq_norms(bank, sq_norms).astype(dots.dtype)
        * mask.astype(dots.dtype)
    )  # [capacity, num_layers]
    p_leaves, treedef = jax.tree_util.tree_flatten(params)
    a_leaves = jax.tree_util.tree_leaves(bank.anchors)
    out = []
    for a, p, lid in zip(a_leaves, p_leaves, layout.leaf_layer, strict=True):
        p = jnp.asarray(p)
        if not jnp.issubdtype(p.dtype, jnp.inexact):  # integer/bool leaves get no gradient
            out.append(jnp.zeros_like(p))
            continue
        g = jnp.einsum("k,k...->...", coef[:, lid].astype(a.dtype), a)
        out.append(g.astype(p.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def add_persistent_penalty(
    loss_fn: Callable[..., jax.Array],
    bank: AnchorBank,
    lam: float | jax.Array,
    layers: Layers = None,
    *,
    has_aux: bool = False,
) -> Callable[..., Any]:
    """Wraps ``loss_fn(params, *args)`` into ``loss_fn(params, *args) + P(params)``.

    A convenience for closures; inside a jitted step prefer calling
    :func:`persistent_penalty` with the bank as an argument of the step so that a new bank
    does not trigger a recompilation.

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs) -> scalar`` (or ``(scalar, aux)`` with
        ``has_aux=True``).
      bank, lam, layers: as in :func:`persistent_penalty`.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A function with ``loss_fn``'s signature and return convention.
    """
    check_lam(lam)

    def penalized(params, *args, **kwargs):
        out = loss_fn(params, *args, **kwargs)
        pen = persistent_penalty(params, bank, lam, layers)
        if has_aux:
            loss, aux = out
            return loss + pen, aux
        return out + pen

    return penalized
