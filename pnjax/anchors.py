"""The anchor bank: converged solutions Θ_k in a fixed-capacity buffer.

The bank is a pytree whose array leaves never change shape as it fills: every leaf of the
anchors has a leading axis of length ``capacity`` and a ``count`` says how many slots hold a
solution. A jitted function that takes the bank as an argument therefore compiles once, however
many anchors it holds; empty slots are masked out and contribute exactly zero.
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from pnjax.layers import layer_layout

PyTree = Any


def accumulation_dtype(dtype: Any) -> Any:
    """The dtype dot products and norms are accumulated in: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def layer_sq_norms(params: PyTree) -> jax.Array:
    """Squared Euclidean norm of each layer, ``||θ^l||²``.

    Args:
      params: a pytree of arrays.

    Returns:
      Array of shape ``[num_layers]`` (layers as in :func:`pnjax.layer_names`), accumulated in at
      least float32.
    """
    layout = layer_layout(params)
    leaves = jax.tree_util.tree_leaves(params)
    sums = [jnp.zeros((), jnp.float32) for _ in layout.names]
    for leaf, lid in zip(leaves, layout.leaf_layer, strict=True):
        leaf = jnp.asarray(leaf)
        acc = accumulation_dtype(leaf.dtype)
        sums[lid] = sums[lid] + jnp.sum(jnp.square(leaf.astype(acc)))
    return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.float32)


def _describe(tree: PyTree) -> str:
    shapes = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), tree)
    return str(shapes)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


@flax.struct.dataclass
class AnchorBank:
    """Converged parameters of earlier persistent iterations, in a fixed-capacity buffer.

    Attributes:
      anchors: a pytree shaped like the params with a leading axis of length ``capacity`` on
        every leaf; slot ``k`` holds Θ_k once ``k < count``, zeros otherwise.
      sq_norms: ``[capacity, num_layers]`` squared norms ``||Θ_k^l||²`` of each stored anchor
        and layer, cached at push time (zero for empty slots).
      count: int32 scalar, the number of anchors stored.
      names: the layer names (static), as :func:`pnjax.layer_names` gives them.

    Examples:
      >>> import jax.numpy as jnp, pnjax
      >>> params = {'Dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros(3)}}
      >>> bank = pnjax.AnchorBank.create(params, capacity=4)
      >>> bank = bank.push(params)
      >>> int(bank.count), bank.capacity
      (1, 4)
    """

    anchors: PyTree
    sq_norms: jax.Array
    count: jax.Array
    names: tuple[str, ...] = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, params: PyTree, capacity: int) -> AnchorBank:
        """An empty bank shaped like ``params`` with room for ``capacity`` anchors.

        Args:
          params: a pytree of arrays (only shapes and dtypes are used).
          capacity: the most anchors the bank can hold, a positive int. Algorithm 1 with N
            persistent iterations needs ``N`` anchors for training (``N + 1`` to also keep the
            last solution).

        Returns:
          An :class:`AnchorBank` with ``count == 0``.

        Raises:
          ValueError: ``capacity`` is not a positive integer, or ``params`` has no array leaves.
        """
        if (
            isinstance(capacity, bool)
            or not isinstance(capacity, (int, np.integer))
            or capacity < 1
        ):
            raise ValueError(
                f"capacity must be a positive int, got {capacity!r}; pass the number of anchors "
                "to keep, e.g. capacity=iterations + 1."
            )
        capacity = int(capacity)
        layout = layer_layout(params)
        if not layout.names:
            raise ValueError(
                "params has no array leaves; an AnchorBank needs at least one parameter array."
            )
        anchors = jax.tree_util.tree_map(
            lambda x: jnp.zeros((capacity, *np.shape(x)), jnp.asarray(x).dtype), params
        )
        return cls(
            anchors=anchors,
            sq_norms=jnp.zeros((capacity, layout.num_layers), jnp.float32),
            count=jnp.zeros((), jnp.int32),
            names=layout.names,
        )

    @property
    def capacity(self) -> int:
        """The most anchors the bank can hold (static)."""
        return int(self.sq_norms.shape[-2])

    @property
    def num_layers(self) -> int:
        return len(self.names)

    @property
    def valid(self) -> jax.Array:
        """``[capacity]`` bool mask of the slots that hold an anchor."""
        return jnp.arange(self.capacity) < self.count

    def check_compatible(self, params: PyTree, what: str = "params") -> None:
        """Raises ``ValueError`` unless ``params`` has the bank's tree structure and shapes."""
        bank_def = jax.tree_util.tree_structure(self.anchors)
        params_def = jax.tree_util.tree_structure(params)
        if bank_def != params_def:
            raise ValueError(
                f"{what} do not match the AnchorBank's tree structure.\n  bank:   {bank_def}\n"
                f"  {what}: {params_def}\nCreate the bank from the same params "
                "(pnjax.AnchorBank.create(params, capacity))."
            )
        for a, p in zip(
            jax.tree_util.tree_leaves(self.anchors), jax.tree_util.tree_leaves(params), strict=True
        ):
            if tuple(np.shape(a))[1:] != tuple(np.shape(p)):
                raise ValueError(
                    f"{what} leaf shapes do not match the AnchorBank: bank leaves (without the "
                    f"capacity axis) {_describe(jax.tree_util.tree_map(lambda x: x[0], self.anchors))}"
                    f", {what} {_describe(params)}. Create the bank from the same params."
                )

    def push(self, params: PyTree) -> AnchorBank:
        """Stores ``params`` as the next anchor; functional, returns a new bank.

        Squared layer norms are computed once here and cached. Pushed leaves are cast to the
        bank's dtypes.

        Args:
          params: converged params with the bank's structure and shapes.

        Returns:
          A new bank with ``count + 1``.

        Raises:
          ValueError: structure or shapes differ from the bank's, the bank is stacked over
            chains (see :meth:`check_consistent`), or the bank is full. Under
            ``jax.jit`` (traced ``count``) fullness cannot be checked: a push into a full bank
            then leaves it unchanged; check ``bank.count < bank.capacity`` before tracing.
        """
        self.check_consistent()
        self.check_compatible(params)
        if _is_concrete(self.count) and int(np.max(np.asarray(self.count))) >= self.capacity:
            raise ValueError(
                f"the AnchorBank is full (count={int(np.max(np.asarray(self.count)))}, "
                f"capacity={self.capacity}); create it with a larger capacity, e.g. "
                "AnchorBank.create(params, capacity=iterations + 1)."
            )
        # One compiled program per bank layout (cached by jax.jit) instead of one small dispatch
        # per leaf; under an outer jit it is traced into the caller's program.
        if not _is_concrete(self.count) or any(
            not _is_concrete(x) for x in jax.tree_util.tree_leaves(params)
        ):
            return _push(self, params)
        return _eager_push()(self, params)

    def check_consistent(self) -> None:
        """Raises ``ValueError`` unless the bank's arrays agree with each other.

        ``anchors`` leaves must share the leading ``capacity`` axis, ``sq_norms`` must be
        ``[capacity, num_layers]`` and ``count`` a scalar. A bank stacked over chains (as
        :func:`pnjax.run_chains` keeps them, with an extra leading axis) fails this check: take
        one chain's bank with ``jax.tree.map(lambda x: x[c], bank)`` or work under ``jax.vmap``.
        """
        try:
            chex.assert_rank(self.count, 0)
            chex.assert_shape(self.sq_norms, (None, self.num_layers))
            chex.assert_tree_shape_prefix(self.anchors, (self.capacity,))
        except AssertionError as e:
            raise ValueError(
                f"inconsistent AnchorBank (count shape {np.shape(self.count)}, sq_norms shape "
                f"{np.shape(self.sq_norms)}, {self.num_layers} layers): {e}. A bank stacked over "
                "chains has an extra leading axis: index one chain (jax.tree.map(lambda x: x[c], "
                "bank)) or call under jax.vmap."
            ) from None

    def get(self, k: int) -> PyTree:
        """The anchor Θ_k stored in slot ``k`` (a params-shaped pytree).

        Args:
          k: a slot index with ``-count <= k < count``; negative values count from the newest
            anchor (``get(-1)`` is the last one pushed). Under ``jax.jit`` (traced ``k`` or
            ``count``) the index is not checked.

        Returns:
          A pytree shaped like the params the bank was created from.

        Raises:
          IndexError: slot ``k`` is empty or outside the bank.
          ValueError: the bank is stacked over chains (``count`` is not a scalar).

        Examples:
          >>> import jax.numpy as jnp, pnjax
          >>> bank = pnjax.AnchorBank.create({'w': jnp.zeros(2)}, capacity=3)
          >>> bank = bank.push({'w': jnp.array([1.0, 2.0])})
          >>> bank.get(0)['w']
          Array([1., 2.], dtype=float32)
          >>> bank.get(1)
          Traceback (most recent call last):
          ...
          IndexError: AnchorBank.get(1): slot 1 is empty (count=1, capacity=3); ...
        """
        if np.ndim(self.count) != 0:
            raise ValueError(
                f"AnchorBank.get: this bank is stacked (count has shape {np.shape(self.count)}); "
                "index one chain first: jax.tree.map(lambda x: x[c], bank).get(k)."
            )
        if _is_concrete(self.count) and _is_concrete(k):
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) and np.ndim(k) != 0:
                raise IndexError(f"AnchorBank.get: k must be an int, got {k!r}.")
            count, kk = int(self.count), int(k)
            if kk < 0:
                kk += count
            if not 0 <= kk < count:
                state = "is empty" if 0 <= int(k) < self.capacity else "is outside the bank"
                raise IndexError(
                    f"AnchorBank.get({k!r}): slot {k!r} {state} (count={count}, "
                    f"capacity={self.capacity}); valid slots are 0..{count - 1} "
                    f"(or -{count}..-1 from the newest)."
                    if count
                    else f"AnchorBank.get({k!r}): the bank is empty (count=0, "
                    f"capacity={self.capacity}); push an anchor first."
                )
            k = kk
        return jax.tree_util.tree_map(lambda a: a[k], self.anchors)


@functools.cache
def _eager_push() -> Any:
    """``_push`` compiled for eager calls: on the CPU at XLA optimization level 0.

    The push only moves memory, and the optimizing LLVM passes are most of its compile time
    (0.3 s instead of 0.6 s of CPU time for the kink MLP's bank, ``benchmarks/push_time.py``).
    """
    if jax.default_backend() == "cpu":
        return jax.jit(_push_impl, compiler_options={"xla_backend_optimization_level": 0})
    return _push


def _push_impl(bank: AnchorBank, params: PyTree) -> AnchorBank:
    # A full bank (possible only under an outer jit, where count is traced) is left unchanged:
    # the last slot is rewritten with its own content. dynamic_update_slice, not a scatter.
    full = bank.count >= bank.capacity
    slot = jnp.minimum(bank.count, bank.capacity - 1)

    def write(buf: jax.Array, new: jax.Array) -> jax.Array:
        new = jnp.where(full, jax.lax.dynamic_index_in_dim(buf, slot, 0, False), new)
        return jax.lax.dynamic_update_index_in_dim(buf, new.astype(buf.dtype), slot, 0)

    anchors = jax.tree_util.tree_map(
        lambda a, p: write(a, jnp.asarray(p, a.dtype)), bank.anchors, params
    )
    sq_norms = write(bank.sq_norms, layer_sq_norms(params))
    count = jnp.minimum(bank.count + 1, bank.capacity).astype(jnp.int32)
    return bank.replace(anchors=anchors, sq_norms=sq_norms, count=count)


_push = jax.jit(_push_impl)
