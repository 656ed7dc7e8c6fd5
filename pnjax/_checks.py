"""Input checks the drivers run before anything is compiled or trained.

Each raises an error naming the value and the fix, where pnjax 0.1.0 failed late (after the
first training run) or obscurely (``IndexError: tuple index out of range``, "only
0-dimensional arrays can be converted").
"""

from __future__ import annotations

import inspect
import warnings
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


# ----------------------------------------------------------------------------- driver arguments


def loss_form(*, has_state: bool, minibatch: bool) -> str:
    """How a driver calls ``loss_fn``: ``'loss_fn(params[, model_state][, batch])'``."""
    return (
        "loss_fn(params"
        + (", model_state" if has_state else "")
        + (", batch)" if minibatch else ")")
    )


def check_loss_signature(loss_fn: Any, *, has_state: bool, minibatch: bool) -> None:
    """Refuses a ``loss_fn`` that cannot be called the way the driver will call it.

    The call is checked against ``inspect.signature`` (which follows ``functools.partial``,
    bound methods and ``*args``) without calling anything; a callable without a readable
    signature is let through.

    Args:
      loss_fn: the training loss.
      has_state: a ``model_state`` was given (it is passed after the params).
      minibatch: ``data`` was given (the batch is passed last).

    Raises:
      TypeError: ``loss_fn`` is not callable, or does not accept the driver's arguments, e.g.
        a full-batch ``loss_fn(params)`` passed together with ``data=``.
    """
    form = loss_form(has_state=has_state, minibatch=minibatch)
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be a function called as {form}, got {loss_fn!r:.60} "
            f"({type(loss_fn).__name__})."
        )
    try:
        sig = inspect.signature(loss_fn)
    except (TypeError, ValueError):  # builtins and C callables without a signature
        return
    n = 1 + has_state + minibatch
    try:
        sig.bind(*([None] * n))
    except TypeError as err:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        if minibatch:
            fix = (
                f"with data=, loss_fn must take (params{', model_state' if has_state else ''}, "
                "batch), the batch being a slice of data along its first axis (e.g. `def "
                "loss_fn(params, batch): x, y = batch; ...`); for full-batch training drop "
                "data=, batch_size= and epochs= and pass steps= instead."
            )
        else:
            fix = (
                f"without data=, loss_fn must take (params{', model_state' if has_state else ''})"
                " (full batch, steps= updates); for mini-batches pass data=, batch_size= and "
                "epochs= and loss_fn(params, batch)."
            )
        raise TypeError(f"loss_fn {name}{sig} cannot be called as {form} ({err}); {fix}") from None


def check_optimizer(optimizer: Any) -> None:
    """Refuses an ``optimizer`` that is not an Optax gradient transformation.

    Anything with callable ``init`` and ``update`` attributes is accepted (Optax's
    ``GradientTransformation`` is such a pair).

    Raises:
      TypeError: e.g. ``optax.adam`` passed uncalled (the factory, not the transformation).
    """
    if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
        return
    name = getattr(optimizer, "__name__", None)
    if callable(optimizer) and name:
        module = getattr(optimizer, "__module__", "") or ""
        qual = f"optax.{name}" if module.split(".")[0] == "optax" else name
        try:
            params = list(inspect.signature(optimizer).parameters)
        except (TypeError, ValueError):
            params = []
        example = f"{qual}(1e-3)" if params[:1] == ["learning_rate"] else f"{qual}(...)"
        raise TypeError(
            f"optimizer={qual} is the factory, not an optax.GradientTransformation; call it: "
            f"optimizer={example}."
        )
    raise TypeError(
        f"optimizer must be an optax.GradientTransformation (an (init, update) pair such as "
        f"optax.adam(1e-3) or optax.chain(...)), got {optimizer!r:.60} "
        f"({type(optimizer).__name__})."
    )


def check_jit(jit: Any) -> None:
    """Refuses a ``jit=`` that is not ``None`` or a callable like ``jax.jit``."""
    if jit is not None and not callable(jit):
        raise TypeError(
            f"jit must be callable like jax.jit (it is called as jit(fn) and returns the "
            f"compiled fn), got {jit!r:.60} ({type(jit).__name__}); pass jax.jit, "
            "functools.partial(jax.jit, ...), or None for pnjax's default."
        )


def check_mesh(mesh: Any) -> None:
    """Refuses a ``mesh=`` that is not ``None`` or a ``jax.sharding.Mesh``."""
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh or None, got {mesh!r:.60} "
            f"({type(mesh).__name__}); make one with jax.make_mesh((jax.device_count(),), "
            "('chains',)), or pass mesh=None to run every chain on one device."
        )


def warn_own_bias(optimizer: Any, params: PyTree) -> None:
    """Warns (``UserWarning``) when ``optimizer``'s state holds a ``PersistentBiasState``.

    The drivers add the persistent penalty themselves; a ``pnjax.persistent_bias`` inside the
    optimizer would add a second one, over a bank the drivers never fill. The state's structure
    comes from ``jax.eval_shape(optimizer.init, params)``: nothing is computed.
    """
    from pnjax.transform import PersistentBiasState

    try:
        state = jax.eval_shape(optimizer.init, params)
    except Exception:  # noqa: BLE001 - the run reports init errors itself
        return
    leaves = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, PersistentBiasState))
    if any(isinstance(x, PersistentBiasState) for x in leaves):
        warnings.warn(
            "the optimizer contains a pnjax.persistent_bias (its state holds a "
            "PersistentBiasState), but the driver adds the persistent penalty itself: the run "
            "would be penalized twice, once over a bank the driver never fills. Pass the plain "
            "optimizer (e.g. optax.sgd(...) without persistent_bias); persistent_bias is for "
            "your own training loop (pnjax.persistent_search).",
            UserWarning,
            stacklevel=3,
        )


def check_driver_args(
    loss_fn: Any,
    optimizer: Any,
    *,
    data: PyTree,
    model_state: PyTree,
    jit: Any,
    params: PyTree,
    mesh: Any = None,
) -> None:
    """The drivers' checks of their callables, run before the checkpoint folder is opened and
    before anything is traced: ``loss_fn``'s signature, ``optimizer``, ``jit`` and ``mesh``;
    then a warning for a ``persistent_bias`` inside ``optimizer``.

    Args:
      params: one model's params (no chain axis), for the optimizer's abstract state.
    """
    check_optimizer(optimizer)
    check_loss_signature(loss_fn, has_state=model_state is not None, minibatch=data is not None)
    check_jit(jit)
    check_mesh(mesh)
    warn_own_bias(optimizer, params)


def int_layer_mask(names: tuple[str, ...], layers: Any) -> jax.Array | None:
    """The ``[num_layers]`` mask of an int layer index (``-1``: every layer), as the drivers
    read ``layers=2``; ``None`` when ``layers`` is not an int (nor a 0-d int array).

    Raises:
      ValueError: an index outside ``-1 .. num_layers - 1``.
    """
    is_int = isinstance(layers, (int, np.integer)) and not isinstance(layers, (bool, np.bool_))
    if isinstance(layers, (np.ndarray, jax.Array)) and np.ndim(layers) == 0:
        is_int = np.issubdtype(np.asarray(layers).dtype, np.integer)
    if not is_int:
        return None
    i, num = int(layers), len(names)
    if not -1 <= i < num:
        raise ValueError(
            f"layer index {i} is out of range for the layers {names}; layers must be a layer "
            f"name, a list/tuple of layer names, a layer index in 0..{num - 1} (-1: every "
            "layer) or a [num_layers] mask."
        )
    if i < 0:
        return jnp.ones((num,), jnp.float32)
    return jnp.zeros((num,), jnp.float32).at[i].set(1.0)
