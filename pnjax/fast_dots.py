"""Fast dense-layer gradients on the CPU for a model written with plain ``nn.Dense``.

:func:`fast_dots` is a function transformation: ``fast_dots(fn)`` computes exactly what ``fn``
computes, with every matrix product ``lax.dot_general`` of the layer form

    y[b..., n, out] = Σ_i h[b..., n, i] W[b..., i, out]      (or ``W[b..., out, i]``)

(``b...`` optional leading batch axes shared by both operands, ``n`` any number of free axes of
``h``) replaced by :func:`pnjax.models.dense.matmul`, whose reverse-mode weight gradient
``∂W = hᵀ g`` is a dot that XLA:CPU's YNNPACK kernels accept (see that module). Values and
derivatives of every order are those of ``fn``; only the form of the gradient's dots changes.
So a loss written with ``flax.linen.Dense`` gets the speed of
``pnjax.models.KinkMLP(fast_matmul=True)`` without rewriting the model::

    loss_fn = pnjax.fast_dots(loss_fn)           # loss_fn(params) -> scalar, as before
    res = pnjax.run_chains(inits, loss_fn, optax.sgd(1e-3, momentum=0.9), ...)

How: ``fn`` is traced to a jaxpr (``jax.make_jaxpr``) on the shapes of the arguments it is
called with, and the jaxpr is evaluated again, equation by equation, with the layer-form
``dot_general`` equations swapped. Nested jaxprs (``jax.jit`` inside ``fn``, ``lax.scan``,
``lax.cond``, ``jax.checkpoint``) are rewritten the same way; the bodies of ``custom_jvp`` and
``custom_vjp`` functions are left alone, so their own derivative rules keep holding (``jax.nn.relu``
is one). Other dots (different contraction, explicit ``precision`` or ``preferred_element_type``,
integer operands) are kept as they are. Works under ``jax.jit``, ``jax.vmap``, ``jax.grad`` and
any nesting of them, in both orders.

On GPU and TPU the swap changes nothing measurable (cuBLAS and the TPU take any operand layout);
it costs one extra transpose of each layer input in the forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
from jax import lax

from pnjax.models import dense

__all__ = ["fast_dots"]

F = TypeVar("F", bound=Callable[..., Any])

# Primitives whose bodies carry their own derivative rules: evaluated unchanged.
_KEEP = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"})


def fast_dots(fn: F) -> F:
    """``fn`` with its dense-layer products computed by :func:`pnjax.models.dense.matmul`.

    Args:
      fn: a function of arrays (pytrees of arrays, positional or keyword) returning a pytree of
        arrays; e.g. a loss ``loss_fn(params) -> scalar`` that applies a Flax model. Arguments
        that must stay Python values (sizes, flags) should be bound first with
        ``functools.partial``: every argument leaf is traced.

    Returns:
      A function with ``fn``'s signature, values and derivatives (first and higher order, forward
      and reverse mode), whose layer-form ``dot_general``\\ s (see the module docstring) have a
      reverse-mode weight gradient XLA:CPU's fast dot kernels accept.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> model = nn.Dense(3)
      >>> x = jnp.ones((5, 2))
      >>> params = model.init(jax.random.key(0), x)
      >>> loss = lambda p: jnp.sum(model.apply(p, x) ** 2)
      >>> fast = fast_dots(loss)
      >>> bool(jnp.allclose(fast(params), loss(params)))
      True
      >>> g, g_fast = jax.grad(loss)(params), jax.grad(fast)(params)
      >>> bool(jnp.allclose(g["params"]["kernel"], g_fast["params"]["kernel"]))
      True
    """
    if not callable(fn):
        raise TypeError(f"fast_dots expects a function, got {fn!r} of type {type(fn).__name__}")

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, in_tree = jax.tree_util.tree_flatten((args, kwargs))

        def flat_fn(*flat: Any) -> Any:
            a, k = jax.tree_util.tree_unflatten(in_tree, flat)
            return fn(*a, **k)

        try:
            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*leaves)
        except TypeError as e:
            raise TypeError(
                "fast_dots traces every argument of the function it wraps; bind arguments that "
                "must stay Python values with functools.partial before wrapping "
                f"(tracing failed with: {e})"
            ) from e
        out = _eval_jaxpr(closed.jaxpr, closed.consts, leaves)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return wrapped  # type: ignore[return-value]


def _eval_jaxpr(jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """Evaluates ``jaxpr`` like ``jax.core.eval_jaxpr``, swapping layer-form dots."""
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def write(v: Any, x: Any) -> None:
        if not isinstance(v, jcore.DropVar):
            env[v] = x

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        write(v, x)
    for v, x in zip(jaxpr.invars, args, strict=True):
        write(v, x)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        with eqn.ctx.manager:
            if eqn.primitive is lax.dot_general_p:
                outs = [_dot_general(*invals, **eqn.params)]
            else:
                keep = eqn.primitive.name in _KEEP
                params = eqn.params if keep else _rewrite_params(eqn.params)
                ans = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
                outs = ans if eqn.primitive.multiple_results else [ans]
        for v, x in zip(eqn.outvars, outs, strict=True):
            write(v, x)
    return [read(v) for v in jaxpr.outvars]


def _rewrite_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with every (closed) jaxpr in them rewritten by :func:`_rewrite_closed`."""

    def one(v: Any) -> Any:
        if isinstance(v, jcore.ClosedJaxpr):
            return _rewrite_closed(v)
        if isinstance(v, jcore.Jaxpr) and not v.constvars:
            new = _rewrite_closed(jcore.ClosedJaxpr(v, ()))
            return v if new.consts else new.jaxpr
        return v

    out = {}
    for k, v in params.items():
        out[k] = tuple(one(x) for x in v) if isinstance(v, tuple) else one(v)
    return out


def _rewrite_closed(closed: jcore.ClosedJaxpr) -> jcore.ClosedJaxpr:
    """The same computation as ``closed`` (same input and output types), dots swapped.

    Falls back to ``closed`` itself when the rewrite would add constants the primitive holding
    it might not accept, or change the output types.
    """
    avals = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False))
        for a in closed.in_avals
    ]
    try:
        new = jax.make_jaxpr(lambda *a: _eval_jaxpr(closed.jaxpr, closed.consts, a))(*avals)
    except Exception:  # noqa: BLE001 - an input type make_jaxpr cannot express: keep as is
        return closed
    if (len(new.consts) and not len(closed.consts)) or new.out_avals != closed.out_avals:
        return closed
    return new


def _dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    *,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **params: Any,
) -> jax.Array:
    """``lax.dot_general`` with the layer form routed through :func:`dense.matmul`.

    Layer form: batch axes ``0..nb-1`` of both operands, ``lhs`` contracted on its last axis,
    ``rhs`` of rank ``nb + 2`` contracted on axis ``nb`` (``[in, out]``) or ``nb + 1``
    (``[out, in]``), float operands of one dtype, default precision, the natural result dtype.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    nb = len(lb)
    dtype = jnp.result_type(lhs, rhs)
    layer_form = (
        tuple(lb) == tuple(range(nb))
        and tuple(rb) == tuple(range(nb))
        and len(lc) == 1
        and len(rc) == 1
        and lc[0] == lhs.ndim - 1
        and lhs.ndim >= nb + 1
        and rhs.ndim == nb + 2
        and rc[0] in (nb, nb + 1)
        and lhs.dtype == rhs.dtype
        and jnp.issubdtype(dtype, jnp.floating)
        and precision is None
        and (preferred_element_type is None or preferred_element_type == dtype)
        and params.get("out_sharding") is None
    )
    if not layer_form:
        return lax.dot_general_p.bind(
            lhs,
            rhs,
            dimension_numbers=dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **params,
        )
    w = rhs if rc[0] == nb else jnp.swapaxes(rhs, -1, -2)  # [b..., in, out]
    batch = lhs.shape[:nb]
    free = lhs.shape[nb:-1]
    h = lhs.reshape(batch + (-1 if free else 1, lhs.shape[-1]))  # [b..., n, in]
    mm = dense.matmul
    for _ in range(nb):
        mm = jax.vmap(mm)
    y = mm(h, w)  # [b..., n, out]
    return y.reshape(batch + free + (w.shape[-1],))
