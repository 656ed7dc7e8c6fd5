"""Input checks the drivers run before anything is compiled or trained.

Each raises an error naming the value and the fix, where pnjax 0.1.0 failed late (after the
first training run) or obscurely (``IndexError: tuple index out of range``, "only
0-dimensional arrays can be converted").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a ``bool``; ``TypeError`` unless it is ``True`` or ``False`` (NumPy's too).

    A string such as ``'no'`` is truthy in Python; an option that takes a flag must not
    silently read it as ``True``.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")


def _describe_leaf(leaf: Any) -> str:
    if isinstance(leaf, (np.ndarray, jax.Array, np.generic)):
        return f"an array of shape {tuple(np.shape(leaf))} and dtype {np.asarray(leaf).dtype}"
    return f"a {type(leaf).__name__} ({leaf!r:.40})"


def check_data(data: PyTree) -> None:
    """Refuses ``data`` that is not a pytree of numeric arrays with a leading example axis.

    Python lists of numbers are pytrees whose leaves are scalars, a string is one opaque leaf:
    both used to fail deep inside with ``IndexError``.

    Args:
      data: the mini-batch form's data, e.g. ``(x [N, ...], y [N, ...])``.

    Raises:
      ValueError: naming the first bad leaf and saying how to fix it.
    """
    flat = jax.tree_util.tree_flatten_with_path(data)[0]
    for path, leaf in flat:
        where = jax.tree_util.keystr(path) or "data"
        ok = isinstance(leaf, (np.ndarray, jax.Array)) and np.ndim(leaf) >= 1
        if ok:
            dtype = np.asarray(leaf).dtype if isinstance(leaf, np.ndarray) else leaf.dtype
            ok = dtype.kind in "biufc" or dtype == jnp.bfloat16
        if not ok:
            raise ValueError(
                f"data must be a pytree of arrays with a leading example axis [N, ...], but "
                f"the leaf at {where} is {_describe_leaf(leaf)}; convert it, e.g. data=("
                "jnp.asarray(x), jnp.asarray(y)) with x of shape [N, ...] (a list of numbers is "
                "a pytree of scalars to JAX, not an array)."
            )


def check_score_fn(
    score_fn: Callable[..., Any] | None, params: PyTree, model_state: PyTree = None
) -> None:
    """Refuses a ``score_fn`` whose output is not one real number, from its abstract value.

    ``jax.eval_shape`` traces ``score_fn(params)`` (``score_fn(params, model_state)`` with a
    state) without computing anything, before the first run is compiled.

    Args:
      score_fn: the validation score, or ``None`` (the loss is used).
      params: one model's params (no chain axis).
      model_state: one model's state, or ``None``.

    Raises:
      ValueError: the output is not a scalar (e.g. shape ``(1,)``) or not a real number.
    """
    if score_fn is None:
        return
    args = (params,) if model_state is None else (params, model_state)
    out = jax.eval_shape(score_fn, *args)
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    real = dtype is not None and any(
        jnp.issubdtype(dtype, kind) for kind in (jnp.floating, jnp.integer, jnp.bool_)
    )
    if shape != () or not real:
        what = (
            f"shape {tuple(shape)} and dtype {dtype}"
            if shape is not None
            else f"a {type(out).__name__}"
        )
        raise ValueError(
            f"score_fn returned {what}; it must return a scalar (one real number per model, "
            "lower is better), e.g. `return jnp.mean(errors)` or `return values[0]` instead of "
            "an array of shape (1,)."
        )


def check_callback_replay(
    metadata: Mapping[str, Any], callback: Callable[..., Any] | None, directory: Any
) -> None:
    """Refuses to replay ``callback`` over restored iterations whose params were not kept.

    A checkpoint keeps every finished iteration's final params only when the run that wrote it
    had a callback; a callback added on resume would otherwise get ``params=None``.

    Raises:
      ValueError: the checkpoint has finished iterations but no kept params.
    """
    done = int(metadata.get("done", 0))
    if callback is None or done == 0 or metadata.get("has_finals"):
        return
    raise ValueError(
        f"the checkpoint in {str(directory)!r} was written without a callback, so the final "
        f"params of the {done} restored iterations were not kept and the callback cannot be "
        "replayed with them. Resume without callback= (and call it on the result), or start "
        "afresh in an empty folder with the callback from the first iteration on."
    )
