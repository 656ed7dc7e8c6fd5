"""One persistent training run of one chain, as pure functions over named pytrees.

A run trains from ``params0`` (and the model state ``s0``) with a fresh optimizer state on

    L(θ) + P(θ),   P(θ) = λ Σ_k Σ_l m_l |Θ_k^l · θ^l| / ||Θ_k^l||²,

adding the Eq. 6 term ``∇P`` to the gradient in closed form. Each step is

    (L(θ_t, s_t), s_{t+1}), g = value_and_grad(loss, has_aux=True)(θ_t, s_t, batch_t),
    θ_{t+1} = θ_t + optimizer(g + ∇P(θ_t)).

The pieces (:class:`TrainRun`'s ``start``, ``step``, ``finish`` and ``scan``) take the training
data as an **argument**, so a compiled piece never embeds the data as a constant: compile time
and memory do not grow with the data set. Drivers (:mod:`pnjax.drivers`) decide how the steps
are looped; :func:`make_train_run` is the public front door.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax._checks import check_data, check_loss_signature, check_optimizer
from pnjax.anchors import AnchorBank
from pnjax.penalty import _gradient_unchecked, persistent_penalty

PyTree = Any


class Penalty(NamedTuple):
    """The persistent penalty's arguments: ``bank`` (the anchors), ``lam`` (λ), ``mask`` ``[L]``."""

    bank: AnchorBank
    lam: jax.Array
    mask: jax.Array


class TrainCarry(NamedTuple):
    """The state a run threads through its steps; ``model_state`` is ``()`` for a model without
    one (so no branch is needed)."""

    params: PyTree
    opt_state: PyTree
    model_state: PyTree


def check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    """``value`` as an int, or a ``ValueError`` naming ``name`` and the bound."""
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True, eq=False)
class FullBatch:
    """``steps`` updates on the whole loss; the curve keeps every ``log_every``-th loss."""

    steps: int
    log_every: int


@dataclasses.dataclass(frozen=True, eq=False)
class MiniBatch:
    """``epochs`` passes over ``num_examples`` examples in shuffled batches of ``batch_size``
    (the remainder dropped); the curve keeps each epoch's mean loss."""

    epochs: int
    batch_size: int
    num_examples: int

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        return self.num_examples // self.batch_size


def data_size(data: PyTree) -> int:
    """The common leading (example) axis of ``data``, or a ``ValueError`` saying what is wrong."""
    check_data(data)
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("data has no arrays; pass a pytree of arrays with a leading example axis.")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else 0 for x in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"every array in data needs the same leading (example) axis, got sizes {sorted(sizes)}."
        )
    return sizes.pop()


def make_iteration(
    *,
    steps: int | None,
    data: PyTree | None,
    batch_size: int | None,
    epochs: int | None,
    log_every: int | None,
) -> FullBatch | MiniBatch:
    """:class:`FullBatch` (``steps``) or :class:`MiniBatch` (``data``), with every check."""
    if data is None:
        steps = check_positive_int("steps", steps)
        log_every = (
            max(1, steps // 200)
            if log_every is None
            else check_positive_int("log_every", log_every)
        )
        return FullBatch(steps, log_every)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    n = data_size(data)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is larger than the {n} examples in data.")
    return MiniBatch(epochs, batch_size, n)


# ----------------------------------------------------------------------------- the loss form


def _describe(tree: PyTree) -> str:
    """A short description of a pytree: its structure and leaf shapes/dtypes."""
    try:
        leaves, treedef = jax.tree_util.tree_flatten(tree)
    except Exception:  # noqa: BLE001 - only used in error messages
        return repr(type(tree).__name__)
    shapes = ", ".join(f"{jnp.result_type(x).name}{list(np.shape(x))}" for x in leaves[:6]) + (
        ", ..." if len(leaves) > 6 else ""
    )
    text = str(treedef)
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{text} with leaves [{shapes}]"


def _check_state_output(out: Any, state: PyTree, form: str) -> tuple[Any, PyTree]:
    """``(loss, new_state)`` from a stateful ``loss_fn``'s output, or a ``ValueError`` saying why.

    The new state must have ``state``'s tree structure and its leaves' shapes and dtypes: it is
    the carry of the training loop, and the next step's input.
    """
    fix = (
        f"with model_state=..., loss_fn must be {form} -> (loss, new_model_state), the new "
        "state shaped like model_state (for Flax: `logits, updates = model.apply({'params': "
        "params, **model_state}, x, train=True, mutable=list(model_state))` then "
        "`return loss, updates`)."
    )
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        what = (
            f"a {type(out).__name__} of length {len(out)}"
            if isinstance(out, (tuple, list))
            else f"a single array of shape {list(np.shape(out))} (the loss alone?)"
            if hasattr(out, "shape")
            else f"a {type(out).__name__}"
        )
        raise ValueError(f"loss_fn returned {what}, not a (loss, new_model_state) pair; {fix}")
    loss, new = out
    same = jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(new)
    if same:
        for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(new),
                        strict=True):  # fmt: skip
            if np.shape(a) != np.shape(b) or jnp.result_type(a) != jnp.result_type(b):
                same = False
                break
    if not same:
        raise ValueError(
            f"loss_fn returned a new model state {_describe(new)}, but model_state is "
            f"{_describe(state)}; the state returned must have the same tree structure, shapes "
            f"and dtypes (mind dict vs FrozenDict, and returning the whole `updates` dict vs "
            f"`updates['batch_stats']`); {fix}"
        )
    return loss, new


def _check_plain_output(out: Any, form: str) -> Any:
    """The loss from a stateless ``loss_fn``'s output; a ``ValueError`` for a returned pair."""
    if isinstance(out, (tuple, list)):
        raise ValueError(
            f"loss_fn returned a {type(out).__name__} of length {len(out)}, but no model_state "
            f"was given, so loss_fn must be {form} -> scalar loss. For a model with state (e.g. "
            "Flax batch_stats) pass model_state=... (has_state=True to make_train_run) and "
            "write loss_fn(params, model_state[, batch]) -> (loss, new_model_state); otherwise "
            "return the loss alone."
        )
    return out


def internal_loss(
    loss_fn: Callable[..., Any], *, has_state: bool, minibatch: bool
) -> Callable[[PyTree, PyTree, PyTree], tuple[Any, PyTree]]:
    """The one internal form ``(params, model_state, batch) -> (loss, model_state)`` of the four
    public forms of ``loss_fn`` (with or without a state, full batch or mini-batch)."""
    form = (
        "loss_fn(params"
        + (", model_state" if has_state else "")
        + (", batch)" if minibatch else ")")
    )

    def loss(params: PyTree, model_state: PyTree, batch: PyTree) -> tuple[Any, PyTree]:
        args = ((model_state,) if has_state else ()) + ((batch,) if minibatch else ())
        out = loss_fn(params, *args)
        if has_state:
            return _check_state_output(out, model_state, form)
        return _check_plain_output(out, form), model_state

    return loss


# ----------------------------------------------------------------------------- one run


def _no_float0(grad: Any, param: Any) -> Any:
    """A zero gradient in the param's dtype for an integer or bool leaf (``float0`` from
    ``jax.grad(..., allow_int=True)``)."""
    if grad.dtype == jax.dtypes.float0:
        return jnp.zeros_like(param)
    return grad


def _trained(
    optimizer: optax.GradientTransformation, params: PyTree
) -> optax.GradientTransformation:
    """``optimizer`` itself, or ``optax.masked`` to the floating leaves when some leaves of
    ``params`` are integers or bools (a step counter in the param tree): those pass through
    with their zero gradient, so they keep their value."""
    trained = jax.tree_util.tree_map(
        lambda p: bool(jnp.issubdtype(jnp.result_type(p), jnp.inexact)), params
    )
    if all(jax.tree_util.tree_leaves(trained)):
        return optimizer
    return optax.masked(optimizer, trained, mask_compatible_extra_args=True)


def _unmasked(p: PyTree, params: PyTree) -> PyTree:
    """``p`` with the leaves ``optax.masked`` left out (``MaskedNode``) taken from ``params``."""
    return jax.tree_util.tree_map(
        lambda new, old: old if isinstance(new, optax.MaskedNode) else new,
        p,
        params,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class TrainRun:
    """One training run of one chain (see the module docstring), as pure pieces.

    ``eq=False`` keeps the identity hash, so ``jax.jit(run)`` and ``jax.jit(run.core)`` work.
    Calling the run is the public form of :func:`make_train_run`: ``run(params0, bank, lam,
    mask, key) -> (params, metrics)``, or with ``has_state`` ``run(params0, bank, lam, mask,
    key, state0) -> ((params, state), metrics)``; it uses the ``data`` it was made with.

    Attributes:
      loss: ``(params, model_state, batch) -> (loss, model_state)`` (:func:`internal_loss`).
      optimizer: the Optax transformation, re-initialized by ``start``.
      iteration: :class:`FullBatch` or :class:`MiniBatch`.
      score_fn: the public ``score_fn`` or ``None`` (the loss).
      has_state: whether ``score_fn`` and the public call take a model state.
      data: the training data of the public call (mini-batch form), else ``None``.
      lam_schedule: ``None`` (λ constant within a run), or ``schedule(count) -> factor``: update
        ``count`` (``0, 1, ...``, counted from the start of this run) uses ``λ · factor``.
    """

    loss: Callable[[PyTree, PyTree, PyTree], tuple[Any, PyTree]]
    optimizer: optax.GradientTransformation
    iteration: FullBatch | MiniBatch
    score_fn: Callable[..., jax.Array] | None = None
    has_state: bool = False
    data: PyTree = None
    lam_schedule: Callable[[Any], Any] | None = None

    @property
    def minibatch(self) -> bool:
        """Whether the run iterates over mini-batches of ``data``."""
        return isinstance(self.iteration, MiniBatch)

    @property
    def total_steps(self) -> int:
        """Updates per run: ``steps``, or ``epochs · num_batches``."""
        it = self.iteration
        return it.steps if isinstance(it, FullBatch) else it.epochs * it.num_batches

    def lam_at(self, lam: jax.Array, count: Any) -> jax.Array:
        """λ of update ``count`` of the run: ``lam``, or ``lam · lam_schedule(count)``."""
        if self.lam_schedule is None:
            return lam
        return lam * jnp.asarray(self.lam_schedule(count), jnp.float32)

    # the pieces ------------------------------------------------------------------------

    def start(self, params0: PyTree, model_state0: PyTree = ()) -> TrainCarry:
        """The carry at step 0: a fresh optimizer state."""
        return TrainCarry(params0, _trained(self.optimizer, params0).init(params0), model_state0)

    def step(
        self, carry: TrainCarry, batch: PyTree, pen: Penalty, count: Any = 0
    ) -> tuple[TrainCarry, Any]:
        """Update ``count`` on ``L + P``; returns the new carry and the loss before the update.

        ``count`` (the update's index within the run) sets λ when λ has a schedule. Integer and
        bool leaves of the params are not trained (zero gradient, left out of the optimizer with
        ``optax.masked``). An optimizer whose ``update`` takes extra arguments
        (``optax.GradientTransformationExtraArgs``: ``optax.lbfgs``,
        ``optax.contrib.reduce_on_plateau``) gets ``value=L + P`` at the params, ``grad=`` the
        gradient of ``L + P`` and ``value_fn=`` ``θ ↦ L(θ) + P(θ)`` on the same batch and state.
        """
        params, opt_state, model_state = carry
        (loss, new_state), grads = jax.value_and_grad(self.loss, has_aux=True, allow_int=True)(
            params, model_state, batch
        )
        grads = jax.tree_util.tree_map(_no_float0, grads, params)
        lam = self.lam_at(pen.lam, count)
        bias = _gradient_unchecked(params, pen.bank, lam, pen.mask)
        grads = jax.tree_util.tree_map(lambda g, b: g + b.astype(g.dtype), grads, bias)
        tx = _trained(self.optimizer, params)
        extra: dict[str, Any] = {}
        if isinstance(tx, optax.GradientTransformationExtraArgs):
            # unused by most optimizers, and then removed by XLA as dead code

            def objective(p: PyTree) -> jax.Array:
                p = _unmasked(p, params)  # integer leaves, left out by optax.masked
                value = self.loss(p, model_state, batch)[0]
                return jnp.asarray(value, jnp.float32) + persistent_penalty(
                    p, pen.bank, lam, pen.mask
                )

            value = jnp.asarray(loss, jnp.float32) + persistent_penalty(
                params, pen.bank, lam, pen.mask
            )
            extra = {"value": value, "grad": grads, "value_fn": objective}
        updates, opt_state = tx.update(grads, opt_state, params, **extra)
        return TrainCarry(optax.apply_updates(params, updates), opt_state, new_state), loss

    def batch(self, data: PyTree, perm: jax.Array, b: Any) -> PyTree:
        """Batch ``b`` of an epoch whose example order is ``perm`` (the gather, written once)."""
        bsz = self.iteration.batch_size  # type: ignore[union-attr]
        idx = jax.lax.dynamic_slice_in_dim(perm, b * bsz, bsz)
        return jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)

    def permutation(self, key: jax.Array) -> jax.Array:
        """An epoch's example order."""
        return jax.random.permutation(key, self.iteration.num_examples)  # type: ignore[union-attr]

    def epoch_keys(self, key: jax.Array) -> jax.Array:
        """``[epochs]`` keys, one per epoch, from the run's data key."""
        return jax.random.split(key, self.iteration.epochs)  # type: ignore[union-attr]

    def epochs(
        self,
        carry: TrainCarry,
        pen: Penalty,
        epoch_keys: jax.Array,
        data: PyTree,
        first_epoch: Any = 0,
    ) -> tuple[TrainCarry, jax.Array]:
        """The epochs whose keys are given (the first one is epoch ``first_epoch`` of the run);
        returns the carry and each epoch's mean loss."""
        nb = self.iteration.num_batches  # type: ignore[union-attr]

        def epoch(c, xs):
            ekey, e = xs
            perm = self.permutation(ekey)
            c, losses = jax.lax.scan(
                lambda c2, b: self.step(c2, self.batch(data, perm, b), pen, e * nb + b),
                c,
                jnp.arange(nb),
            )
            return c, jnp.mean(losses)

        epochs = first_epoch + jnp.arange(epoch_keys.shape[0])
        return jax.lax.scan(epoch, carry, (epoch_keys, epochs))

    def scan(
        self, carry: TrainCarry, pen: Penalty, key: jax.Array, data: PyTree = None
    ) -> tuple[TrainCarry, jax.Array]:
        """Every step as one ``lax.scan``; returns the final carry and the loss curve."""
        it = self.iteration
        if isinstance(it, FullBatch):
            counts = None if self.lam_schedule is None else jnp.arange(it.steps)
            carry, losses = jax.lax.scan(
                lambda c, t: self.step(c, None, pen, 0 if t is None else t),
                carry,
                counts,
                length=it.steps,
            )
            return carry, losses[:: it.log_every]
        return self.epochs(carry, pen, self.epoch_keys(key), data)

    def plain_loss(self, params: PyTree, model_state: PyTree, data: PyTree = None) -> jax.Array:
        """``L`` at the end of a run: the full-batch loss, or the mean over the data's batches in
        order, evaluated one batch at a time (never the whole data set at once)."""
        it = self.iteration
        if isinstance(it, FullBatch):
            return self.loss(params, model_state, None)[0]

        def body(total, b):
            batch = jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, b * it.batch_size, it.batch_size), data
            )
            return total + self.loss(params, model_state, batch)[0], None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(it.num_batches))
        return total / it.num_batches

    def finish(
        self, carry: TrainCarry, pen: Penalty, curve: jax.Array, data: PyTree = None
    ) -> dict[str, jax.Array]:
        """The run's metrics: ``loss`` (plain, without the penalty), ``score``, ``penalty``
        (with the λ of the last update), ``lam`` (that λ) and ``curve`` (the plain loss along
        the run)."""
        params, model_state = carry.params, carry.model_state
        lam = self.lam_at(pen.lam, self.total_steps - 1)
        loss = self.plain_loss(params, model_state, data)
        if self.score_fn is None:
            score = loss
        elif self.has_state:
            score = self.score_fn(params, model_state)
        else:
            score = self.score_fn(params)
        return {
            "loss": jnp.asarray(loss, jnp.float32),
            "score": jnp.asarray(score, jnp.float32),
            "penalty": jnp.asarray(
                persistent_penalty(params, pen.bank, lam, pen.mask), jnp.float32
            ),
            "lam": jnp.asarray(lam, jnp.float32),
            "curve": jnp.asarray(curve, jnp.float32),
        }

    def metric_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of :meth:`finish`'s metrics, known without tracing the run."""
        it = self.iteration
        points = -(-it.steps // it.log_every) if isinstance(it, FullBatch) else it.epochs
        scalar = jax.ShapeDtypeStruct((), jnp.float32)
        return {
            "loss": scalar,
            "score": scalar,
            "penalty": scalar,
            "lam": scalar,
            "curve": jax.ShapeDtypeStruct((points,), jnp.float32),
        }

    def core(
        self,
        params0: PyTree,
        bank: AnchorBank,
        lam: jax.Array,
        mask: jax.Array,
        key: jax.Array,
        model_state0: PyTree = (),
        data: PyTree = None,
    ) -> tuple[tuple[PyTree, PyTree], dict[str, jax.Array]]:
        """The whole run: ``((params, model_state), metrics)``, the data an argument."""
        pen = Penalty(bank, lam, mask)
        carry, curve = self.scan(self.start(params0, model_state0), pen, key, data)
        return (carry.params, carry.model_state), self.finish(carry, pen, curve, data)

    def __call__(self, params0, bank, lam, mask, key, *state0):
        """The public form (see the class docstring)."""
        if self.has_state:
            if len(state0) != 1:
                raise TypeError("a run made with has_state=True takes state0 after the key.")
            return self.core(params0, bank, lam, mask, key, state0[0], self.data)
        if state0:
            raise TypeError("a run made without has_state takes no model state.")
        (params, _), metrics = self.core(params0, bank, lam, mask, key, (), self.data)
        return params, metrics


def make_train_run(
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    steps: int | None = None,
    score_fn: Callable[[PyTree], jax.Array] | None = None,
    data: PyTree | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    log_every: int | None = None,
    has_state: bool = False,
    lam_schedule: Callable[[Any], Any] | None = None,
) -> TrainRun:
    """Builds one persistent training run as a pure function (not yet jitted).

    The returned ``run(params0, bank, lam, mask, key) -> (params, metrics)`` trains from
    ``params0`` with a fresh optimizer state on ``L + P`` (P over the bank's anchors, layers
    weighted by ``mask`` ``[num_layers]``), adding the Eq. 6 term to the gradient in closed form.
    ``metrics`` holds scalars ``loss``, ``score``, ``penalty`` and the array ``curve``.

    Full-batch form: ``loss_fn(params)``, ``steps`` updates. Mini-batch form: ``loss_fn(params,
    batch)``, ``data`` a pytree of arrays with a leading example axis, ``epochs`` passes over it in
    shuffled batches of ``batch_size`` (the remainder is dropped; order from ``key``).

    With ``has_state=True`` the model also carries a state ``s`` that is not trained by
    gradient (e.g. Flax ``batch_stats``): ``loss_fn(params, s) -> (loss, s')`` (full batch) or
    ``loss_fn(params, s, batch) -> (loss, s')``, and the run is
    ``run(params0, bank, lam, mask, key, state0) -> ((params, state), metrics)``. Each step is

        (L(θ_t, s_t), s_{t+1}), g = value_and_grad(loss_fn, has_aux=True)(θ_t, s_t),
        θ_{t+1} = θ_t + optimizer(g + ∇P(θ_t)),

    so the state is threaded through the steps, never differentiated and never penalized. The
    final ``loss`` and ``score`` use the final state (the state ``loss_fn`` returns there is
    discarded), and ``score_fn(params, state) -> scalar``.

    The run is a :class:`TrainRun`: its pieces (``start``, ``step``, ``scan``, ``finish``,
    ``core``) take the data as an argument, which the drivers use so that a compiled program
    never holds the data set as a constant.

    Args:
      loss_fn: the training loss.
      optimizer: any Optax transformation (see :meth:`TrainRun.step` for extra arguments).
      steps: number of full-batch updates.
      score_fn: ``score_fn(params) -> scalar`` (``score_fn(params, state)`` with
        ``has_state``), lower is better. Defaults to the loss (over the whole ``data`` in the
        mini-batch form, evaluated batch by batch).
      data, batch_size, epochs: the mini-batch form.
      log_every: record the training loss every this many steps (full batch; default
        ``max(1, steps // 200)``).
      has_state: the model carries a state, see above.
      lam_schedule: ``schedule(count) -> factor`` (e.g. an Optax schedule): update ``count``
        of the run (from 0, restarting with every run) penalizes with ``λ · factor``.

    Returns:
      The run; jit it with the bank, λ, mask and key (and ``state0``) as arguments.

    Raises:
      ValueError: bad ``steps``, ``epochs``, ``batch_size`` or ``data``; when traced, a
        ``loss_fn`` whose output does not fit ``has_state`` (a pair without ``has_state``; not
        a ``(loss, state)`` pair shaped like ``state0`` with it).
    """
    check_optimizer(optimizer)
    check_loss_signature(loss_fn, has_state=has_state, minibatch=data is not None)
    iteration = make_iteration(
        steps=steps, data=data, batch_size=batch_size, epochs=epochs, log_every=log_every
    )
    loss = internal_loss(loss_fn, has_state=has_state, minibatch=data is not None)
    return TrainRun(loss, optimizer, iteration, score_fn, has_state, data, lam_schedule)
