"""A matrix product whose weight gradient XLA:CPU's fast dot kernels accept.

For ``y = h @ W`` with ``h: [n, in]`` and ``W: [in, out]``, reverse mode computes the weight
gradient ``∂W = hᵀ @ g`` as a dot that contracts the *first* axis of ``h``. XLA:CPU's YNNPACK dot
fusions (on in pnjax's compile options, see :mod:`pnjax._compile`) do not take a dot with a
transposed left operand, so that one product, a third of a dense layer's training flops, falls
back to Eigen, and for many small vmapped layers (the kink MLP's chains) it runs at about half
the speed of the other two. :func:`matmul` has the same value and derivatives as ``h @ W``, but
its JVP rule writes the ``W`` tangent term with an explicitly materialized ``hᵀ`` (an
``optimization_barrier`` keeps XLA from folding the transpose back into the dot), so the
transposed (reverse-mode) product becomes the plain ``hᵀ @ g``. Forward mode, ``jax.hessian``,
Hessian-vector products and ``vmap`` work as for ``h @ W``.

Measured with ``python benchmarks/compile_options.py`` (see ``docs/cpu_speed.md``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["dot_general", "matmul"]


@jax.custom_jvp
def matmul(h: jax.Array, w: jax.Array) -> jax.Array:
    """``h @ w`` for ``h: [n, in]``, ``w: [in, out]`` -> ``[n, out]``, with a CPU-fast ``∂w``.

    Same values and derivatives (of every order) as ``h @ w``; only the form of the dot that
    reverse mode builds for ``∂w = hᵀ g`` differs (see the module docstring).
    """
    return h @ w


@matmul.defjvp
def _matmul_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[Any, Any]) -> Any:
    h, w = primals
    dh, dw = tangents
    h_t = lax.optimization_barrier(jnp.swapaxes(h, -1, -2))  # [in, n], materialized
    return h @ w, dh @ w + jnp.swapaxes(h_t, -1, -2) @ dw


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.dot_general`` that routes a 2-D ``lhs @ rhs`` through :func:`matmul`.

    A drop-in for ``flax.linen.Dense(..., dot_general=dot_general)``: the plain contraction of a
    2-D ``lhs`` (``[n, in]``, also inside ``vmap``) with ``rhs [in, out]``, at default precision
    and dtype, uses :func:`matmul`; anything else calls ``lax.dot_general`` unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    plain = (
        lhs.ndim == 2
        and rhs.ndim == 2
        and tuple(lc) == (1,)
        and tuple(rc) == (0,)
        and not lb
        and not rb
        and precision is None
        and preferred_element_type is None
        and not kwargs
    )
    if plain:
        return matmul(lhs, rhs)
    return lax.dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
