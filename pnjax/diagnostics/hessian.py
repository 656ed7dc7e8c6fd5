"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

For a loss ``L(θ)`` with Hessian ``H = ∇²L(θ)`` (``P × P``, never formed), the spectral density
``φ(t) = (1/P) Σ_i δ(t − λ_i)`` is estimated as in Ghorbani, Krishnan and Xiao (2019): for a
random unit probe ``v``, ``order`` steps of Lanczos from ``v`` give a tridiagonal ``T = U Λ Uᵀ``
whose eigenvalues ``λ̃_j`` (Ritz values, the *nodes*) and squared first eigenvector components
``w_j = U_{0j}²`` (the *weights*, summing to 1) form the Gaussian quadrature of the measure
``Σ_i (vᵀq_i)² δ(t − λ_i)``, whose expectation over ``v`` is ``φ``. The smoothed density is

    φ_σ(t) = (1/num_probes) Σ_probes Σ_j w_j · exp(−(t − λ̃_j)² / (2σ²)) / (σ √(2π)).

Each Lanczos step costs one Hessian-vector product, computed forward-over-reverse
(``jvp`` of ``grad``) over the params pytree. The Lanczos vectors are reorthogonalized in full
(``matfree.decomp.tridiag_sym(order, reortho='full')``), so the memory is ``order`` copies of the
params per probe; probes run one after another (``lax.map``) inside one jitted program.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
from matfree import decomp

PyTree = Any


def hessian_vector_product(
    loss_fn: Callable[[PyTree], jax.Array], params: PyTree, vector: PyTree
) -> PyTree:
    """``H v`` with ``H = ∇²loss_fn(params)``, forward-over-reverse; a pytree like ``params``.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the point θ (any pytree of float arrays).
      vector: ``v``, a pytree shaped and typed like ``params``.

    Returns:
      ``∂/∂ε ∇L(θ + εv)`` at ``ε = 0``, i.e. ``H v``, shaped like ``params``.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def _quadrature(t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Nodes, weights and kept steps of the Gaussian quadrature of a Lanczos matrix ``T``.

    When the Krylov space is exhausted after ``k`` steps (an off-diagonal ``β_k`` below
    ``sqrt(eps)·||T||``: the probe lies in an invariant subspace, e.g. when ``H`` has fewer
    distinct eigenvalues than ``order``), the rest of ``T`` is round-off. It is cut off: its
    ``order - k`` nodes are set to ``T_00`` (a Rayleigh quotient, inside the spectrum) with
    weight exactly 0, so they change neither the density nor ``min``/``max``.
    """
    t = t.astype(jnp.float32)
    order = t.shape[0]
    diag, off = jnp.diagonal(t), jnp.diagonal(t, offset=1)
    scale = jnp.max(jnp.abs(diag)) + jnp.max(jnp.abs(off), initial=0.0)
    tol = jnp.sqrt(jnp.finfo(jnp.float32).eps) * scale
    small = off <= tol
    steps = jnp.where(jnp.any(small), jnp.argmax(small) + 1, order)
    keep = jnp.arange(order) < steps
    t = jnp.where(keep[:, None] & keep[None, :], t, 0.0) + jnp.diag(jnp.where(keep, 0.0, diag[0]))
    nodes, vecs = jnp.linalg.eigh(t)
    return nodes, vecs[0] ** 2, steps


@flax.struct.dataclass
class HessianSpectrum:
    """The Gaussian quadratures of one stochastic Lanczos quadrature run.

    Attributes:
      nodes: ``[num_probes, order]`` Ritz values ``λ̃_j`` of each probe, ascending.
      weights: ``[num_probes, order]`` quadrature weights ``w_j = U_{0j}²``; each row sums to 1.
      steps: ``[num_probes]`` Lanczos steps kept per probe: ``order`` unless the Krylov space
        was exhausted earlier (then the remaining nodes carry weight 0).
    """

    nodes: jax.Array
    weights: jax.Array
    steps: jax.Array

    @property
    def min(self) -> jax.Array:
        """The smallest Ritz value over all probes (an upper bound on ``λ_min(H)``)."""
        return jnp.min(self.nodes)

    @property
    def max(self) -> jax.Array:
        """The largest Ritz value over all probes (a lower bound on ``λ_max(H)``)."""
        return jnp.max(self.nodes)

    def density(self, grid: jax.Array, sigma: float) -> jax.Array:
        """The Gaussian-smoothed spectral density ``φ_σ`` on ``grid``.

        Args:
          grid: ``[G]`` points ``t`` at which to evaluate the density.
          sigma: the Gaussian kernel's standard deviation σ > 0 (e.g. a few percent of
            ``max - min``).

        Returns:
          ``[G]`` values of ``φ_σ(t)``; ``∫ φ_σ dt = 1`` when the grid covers the spectrum.

        Raises:
          ValueError: ``sigma`` is not a positive finite number.
        """
        if not (np.ndim(sigma) == 0 and math.isfinite(float(sigma)) and float(sigma) > 0):
            raise ValueError(f"sigma must be a positive number, got {sigma!r}.")
        grid = jnp.asarray(grid, jnp.float32)
        z = (grid[:, None, None] - self.nodes[None]) / sigma
        kernel = jnp.exp(-0.5 * z**2) / (sigma * math.sqrt(2 * math.pi))
        return jnp.sum(kernel * self.weights[None], axis=(1, 2)) / self.nodes.shape[0]


@functools.lru_cache(maxsize=4)
def _compiled_slq(
    loss_fn: Callable[[PyTree], jax.Array],
    treedef: Any,
    avals: tuple[jax.ShapeDtypeStruct, ...],
    order: int,
) -> tuple[Callable[..., Any], list[Any]]:
    """The jitted SLQ program of ``loss_fn`` and the arrays it closes over; cached.

    ``loss_fn`` is traced once to a jaxpr whose closed-over arrays (e.g. a data set) become
    arguments of the compiled program rather than constants of it (XLA would otherwise try to
    constant-fold through them, which can take minutes for a few thousand images). A second
    call at another θ reuses the compilation.
    """
    closed = jax.make_jaxpr(lambda *xs: loss_fn(jax.tree_util.tree_unflatten(treedef, xs)))(*avals)
    jaxpr, consts = closed.jaxpr, list(closed.consts)
    tridiag = decomp.tridiag_sym(order, reortho="full", materialize=True, custom_vjp=False)

    @jax.jit
    def run(
        leaves: list[jax.Array], keys: jax.Array, consts: list[Any]
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        def loss(xs: list[jax.Array]) -> jax.Array:
            return jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, consts))(*xs)[0]

        def matvec(v: list[jax.Array], xs: list[jax.Array]) -> list[jax.Array]:
            return hessian_vector_product(loss, xs, v)

        def one(k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
            ks = jax.random.split(k, len(leaves))
            probe = [
                jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(ks, leaves, strict=True)
            ]
            return _quadrature(tridiag(matvec, probe, leaves).J_small)

        return jax.lax.map(one, keys)

    return run, consts


def hessian_spectrum(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    key: jax.Array,
    num_probes: int = 10,
    order: int = 80,
) -> HessianSpectrum:
    """Hessian eigenvalue density of ``loss_fn`` at ``params`` by stochastic Lanczos quadrature.

    Each probe is a standard normal vector over the params pytree (normalized by the Lanczos
    start); ``order`` Lanczos steps with full reorthogonalization give its quadrature. The
    whole computation is one jitted program: ``num_probes × order`` Hessian-vector products.
    To average the loss over a data set, let ``loss_fn`` loop over batches itself (e.g.
    ``lax.map`` of a batch loss, then a mean: see ``docs/diagnostics.md``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from pnjax.diagnostics import hessian_spectrum
      >>> eig = jnp.array([1.0, 2.0, 3.0, 10.0])
      >>> spec = hessian_spectrum(lambda p: 0.5 * jnp.sum(eig * p["w"] ** 2),
      ...                         {"w": jnp.ones(4)}, key=jax.random.key(0), num_probes=2,
      ...                         order=4)
      >>> round(float(spec.max), 3), round(float(spec.weights.sum(axis=1)[0]), 3)
      (10.0, 1.0)

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, twice differentiable.
      params: the point θ at which the Hessian is taken (any pytree of float arrays).
      key: PRNG key for the probes.
      num_probes: number of random probes (the estimate's variance falls as 1/num_probes).
      order: Lanczos steps per probe (the number of quadrature nodes); at most the number of
        parameters.

    Returns:
      A :class:`HessianSpectrum` with ``nodes`` and ``weights`` ``[num_probes, order]``.

    Raises:
      ValueError: ``num_probes`` or ``order`` not a positive integer, ``order`` larger than the
        number of parameters, or ``params`` without floating-point leaves.

    References:
      Ghorbani, Krishnan and Xiao, *An Investigation into Neural Net Optimization via Hessian
      Eigenvalue Density*, ICML 2019, arXiv:1901.10159. Golub and Meurant, *Matrices, Moments
      and Quadrature with Applications*, 2010.
    """
    for name, value in (("num_probes", num_probes), ("order", order)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves or not all(jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) for x in leaves):
        raise ValueError("params must be a non-empty pytree of floating-point arrays.")
    size = sum(int(np.size(x)) for x in leaves)
    if order > size:
        raise ValueError(
            f"order={order} exceeds the {size} parameters: Lanczos builds at most one node per "
            f"dimension; use order <= {size}."
        )
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [jnp.asarray(x) for x in leaves]
    avals = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves)
    run, consts = _compiled_slq(loss_fn, treedef, avals, int(order))
    nodes, weights, steps = run(leaves, jax.random.split(key, int(num_probes)), consts)
    return HessianSpectrum(nodes=nodes, weights=weights, steps=steps)
