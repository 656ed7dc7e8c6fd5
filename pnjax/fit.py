"""Algorithm 1: persistent training from one initialization, and championship selection.

One *iteration* is a full training run from ``init_params`` with a fresh optimizer state,
minimizing ``L(θ) + P_n(θ)`` where ``P_n`` is the persistent penalty over the anchors pushed so
far (none for the plain run, iteration 0). Its converged params are pushed into the bank; the
championship is the iteration with the lowest validation score.

The training run is one compiled program (``lax.scan`` over steps, or over epochs and
mini-batches) whose arguments are the initial params, the bank, λ, the layer mask and a key,
so all iterations, the plain run included, share one compilation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax

from pnjax import _checks
from pnjax.anchors import AnchorBank
from pnjax.layers import layer_mask, layer_names
from pnjax.penalty import _gradient_unchecked, check_lam, persistent_penalty

PyTree = Any
LayerChoice = None | str | Sequence[str] | jax.Array


_SCOPE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "pnjax_checkpoint_scope", default=None
)


@contextlib.contextmanager
def checkpoint_scope(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Checkpoints every :func:`persistent_fit` call inside the block, in call order.

    The k-th call (counting from 0) that passes no ``checkpoint_dir`` uses
    ``directory / f"fit-{k:03d}"``, so a deterministic driver that calls ``persistent_fit``
    several times (e.g. :func:`pnjax.experiments.kink.run_kink`) resumes every call when run
    again in the same scope; calls already complete return at once from their checkpoint.

    Args:
      directory: the parent folder.

    Yields:
      The folder as a ``Path``.
    """
    path = Path(directory)
    token = _SCOPE.set([path, 0])
    try:
        yield path
    finally:
        _SCOPE.reset(token)


def _next_scoped_dir() -> Path | None:
    scope = _SCOPE.get()
    if scope is None:
        return None
    path = scope[0] / f"fit-{scope[1]:03d}"
    scope[1] += 1
    return path


def _default_jit() -> Callable[..., Any]:
    """``pnjax._compile.jit`` (``jax.jit`` with pnjax's CPU compile options), else ``jax.jit``."""
    try:
        from pnjax import _compile

        return _compile.jit
    except ImportError:  # pragma: no cover - _compile is part of the package
        return jax.jit


def _champion_upto(scores: list[Any], diverged: list[bool], n: int) -> int:
    best, best_i = math.inf, -1
    for i in range(n + 1):
        s = float(scores[i])
        if not diverged[i] and s < best:
            best, best_i = s, i
    return best_i


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`persistent_fit` returns.

    Attributes:
      champion: params of the championship iteration (lowest finite score).
      champion_iteration: its index (0 = plain run), or -1 if every iteration diverged.
      history: per-iteration arrays of length ``iterations + 1``: ``score``, ``loss`` (the
        plain loss at the end of the iteration), ``penalty`` (the persistent penalty there),
        ``layer`` (index of the penalized layer, -1 for all layers), ``diverged`` (bool),
        ``pushed`` (bool), and ``curve`` ``[iterations + 1, points]``: the training loss along
        each run (every ``log_every`` steps, or per epoch in the mini-batch form).
      bank: the anchors pushed (the converged params of each non-diverged iteration).
      layer_names: the names the ``layer`` indices refer to.
      resumed_from: how many iterations were restored from a checkpoint instead of run
        (0: nothing was restored).
      champion_state: the model state (e.g. ``{'batch_stats': ...}``) at the end of the
        championship run, shaped like ``model_state``; the initial ``model_state`` if every
        iteration diverged; ``None`` when no ``model_state`` was given.
    """

    champion: PyTree
    champion_iteration: int
    history: dict[str, np.ndarray]
    bank: AnchorBank
    layer_names: tuple[str, ...] = ()
    resumed_from: int = 0
    champion_state: PyTree = None

    @property
    def diverged_iterations(self) -> tuple[int, ...]:
        """Indices of the iterations whose loss, score or params were not finite."""
        return tuple(int(i) for i in np.flatnonzero(self.history["diverged"]))

    @property
    def summary(self) -> str:
        """One line saying what happened: champion, divergences, resumption."""
        runs = len(self.history["score"])
        text = f"{runs} run(s) (plain + {runs - 1} persistent): "
        if self.champion_iteration >= 0:
            score = float(self.history["score"][self.champion_iteration])
            text += f"champion iteration {self.champion_iteration} (score {score:.6g})"
        else:
            text += "no champion: every iteration diverged (champion = init params)"
        bad = self.diverged_iterations
        if bad:
            pushed = [i for i in bad if self.history["pushed"][i]]
            text += f"; {len(bad)} diverged (iteration(s) {', '.join(map(str, bad))}), never " + (
                "champion, pushed anyway" if pushed else "champion, not pushed"
            )
        else:
            text += "; none diverged"
        if self.resumed_from:
            text += f"; resumed from a checkpoint after {self.resumed_from} iteration(s)"
        return text


@dataclasses.dataclass(frozen=True)
class _RunParts:
    """A mini-batch run split into pieces (``run = start, epochs_chunk..., finish``)."""

    start: Callable[..., Any]
    epochs_chunk: Callable[..., Any]
    finish: Callable[..., dict[str, jax.Array]]
    epochs: int


def _check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}.")
    return int(value)


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
    """``(loss, new_state)`` from a stateful ``loss_fn``'s output, or a ``ValueError`` saying why not.

    The new state must have ``state``'s tree structure and its leaves' shapes and dtypes: it is
    the carry of the training loop (``lax.scan``), and the next step's input.
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
    s_def = jax.tree_util.tree_structure(state)
    n_def = jax.tree_util.tree_structure(new)
    same = s_def == n_def
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


def _finite(tree: PyTree) -> bool:
    """Whether every inexact leaf of ``tree`` is finite (on the host)."""
    return all(
        bool(jnp.all(jnp.isfinite(x)))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    )


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
) -> Callable[..., tuple[PyTree, dict[str, jax.Array]]]:
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

    Args:
      loss_fn: the training loss.
      optimizer: any Optax transformation.
      steps: number of full-batch updates.
      score_fn: ``score_fn(params) -> scalar`` (``score_fn(params, state)`` with
        ``has_state``), lower is better. Defaults to the loss (over the whole ``data`` in the
        mini-batch form).
      data, batch_size, epochs: the mini-batch form.
      log_every: record the training loss every this many steps (full batch; default
        ``max(1, steps // 200)``).
      has_state: the model carries a state, see above.

    Returns:
      The pure function ``run``; jit it with the bank, λ, mask and key (and ``state0``) as
      arguments.

    Raises:
      ValueError: bad ``steps``, ``epochs``, ``batch_size`` or ``data``; when traced, a
        ``loss_fn`` whose output does not fit ``has_state`` (a pair without ``has_state``; not
        a ``(loss, state)`` pair shaped like ``state0`` with it).
    """
    minibatch = data is not None
    form = (
        "loss_fn(params"
        + (", model_state" if has_state else "")
        + (", batch)" if minibatch else ")")
    )
    if minibatch:
        _checks.check_data(data)
        epochs = _check_positive_int("epochs", epochs)
        batch_size = _check_positive_int("batch_size", batch_size)
        leaves = jax.tree_util.tree_leaves(data)
        if not leaves:
            raise ValueError(
                "data has no arrays; pass a pytree of arrays with a leading example axis."
            )
        sizes = {int(np.shape(x)[0]) for x in leaves}
        if len(sizes) != 1:
            raise ValueError(
                f"every array in data needs the same leading (example) axis, got sizes {sorted(sizes)}."
            )
        num_examples = sizes.pop()
        if batch_size > num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {num_examples} examples in data."
            )
        num_batches = num_examples // batch_size
    else:
        steps = _check_positive_int("steps", steps)
        log_every = (
            max(1, steps // 200)
            if log_every is None
            else _check_positive_int("log_every", log_every)
        )

    def loss_and_state(params: PyTree, state: PyTree, batch: PyTree) -> tuple[Any, PyTree]:
        """``(loss, new_state)`` (``new_state`` is ``None`` without ``has_state``)."""
        args = ((state,) if has_state else ()) + (() if batch is None else (batch,))
        out = loss_fn(params, *args)
        if has_state:
            return _check_state_output(out, state, form)
        return _check_plain_output(out, form), None

    def plain_loss(params: PyTree, state: PyTree = None) -> jax.Array:
        if not minibatch:
            return loss_and_state(params, state, None)[0]

        def body(total, b):
            batch = jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, b * batch_size, batch_size), data
            )
            return total + loss_and_state(params, state, batch)[0], None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(num_batches))
        return total / num_batches

    def update(carry, batch, bank, lam, mask):
        """One step; ``carry = (params, opt_state, state)`` (``state`` ``None`` without one)."""
        params, opt_state, state = carry
        (loss, state), grads = jax.value_and_grad(loss_and_state, has_aux=True)(
            params, state, batch
        )
        bias = _gradient_unchecked(params, bank, lam, mask)
        grads = jax.tree_util.tree_map(lambda g, b: g + b.astype(g.dtype), grads, bias)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state, state), loss

    def finish(params, bank, lam, mask, curve, state=None):
        loss = plain_loss(params, state)
        if score_fn is None:
            score = loss
        else:
            score = score_fn(params, state) if has_state else score_fn(params)
        pen = persistent_penalty(params, bank, lam, mask)
        return {
            "loss": jnp.asarray(loss, jnp.float32),
            "score": jnp.asarray(score, jnp.float32),
            "penalty": jnp.asarray(pen, jnp.float32),
            "curve": jnp.asarray(curve, jnp.float32),
        }

    def epoch(c, ekey, bank, lam, mask):
        perm = jax.random.permutation(ekey, num_examples)

        def inner(c2, b):
            idx = jax.lax.dynamic_slice_in_dim(perm, b * batch_size, batch_size)
            batch = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)
            return update(c2, batch, bank, lam, mask)

        c, losses = jax.lax.scan(inner, c, jnp.arange(num_batches))
        return c, jnp.mean(losses)

    def epochs_chunk(carry, bank, lam, mask, epoch_keys):
        """Runs the epochs whose keys are given; ``carry = (params, opt_state, state)``."""
        return jax.lax.scan(lambda c, k: epoch(c, k, bank, lam, mask), carry, epoch_keys)

    def start(params0, state0=None):
        return (params0, optimizer.init(params0), state0)

    def core(params0, bank, lam, mask, key, state0=None):
        """``((params, state), metrics)``; ``state`` is ``None`` without ``has_state``."""
        carry = start(params0, state0)
        if not minibatch:
            carry, losses = jax.lax.scan(
                lambda c, _: update(c, None, bank, lam, mask), carry, None, length=steps
            )
            curve = losses[::log_every]
        else:
            carry, curve = epochs_chunk(carry, bank, lam, mask, jax.random.split(key, epochs))
        params, state = carry[0], carry[2]
        return (params, state), finish(params, bank, lam, mask, curve, state)

    if has_state:

        def run(params0, bank, lam, mask, key, state0):
            return core(params0, bank, lam, mask, key, state0)

    else:

        def run(params0, bank, lam, mask, key):
            (params, _), metrics = core(params0, bank, lam, mask, key)
            return params, metrics

    run.core = core  # type: ignore[attr-defined]
    run.has_state = has_state  # type: ignore[attr-defined]
    run.start = start  # type: ignore[attr-defined]
    run.step = update  # type: ignore[attr-defined]
    run.finish = finish  # type: ignore[attr-defined]
    run.minibatch = minibatch  # type: ignore[attr-defined]
    run.steps, run.log_every = steps, log_every  # type: ignore[attr-defined]
    run.epochs, run.batch_size = epochs, batch_size  # type: ignore[attr-defined]
    run.num_batches = num_batches if minibatch else 0  # type: ignore[attr-defined]
    run.optimizer = optimizer  # type: ignore[attr-defined]
    run.data = data  # type: ignore[attr-defined]
    if minibatch:
        # Pieces of the same computation, for runs checkpointed between chunks of epochs.
        run.parts = _RunParts(  # type: ignore[attr-defined]
            start=start,
            epochs_chunk=epochs_chunk,
            finish=finish,
            epochs=epochs,
        )
    return run


def python_loop_run(
    run: Callable[..., Any],
    jit: Callable[..., Any],
    *,
    chains: bool = False,
    bank_axis: int | None = 0,
) -> Callable[..., Any]:
    """The run of :func:`make_train_run` driven from Python, one compiled step per update.

    Same arguments and results as ``jit(run)``, and the same arithmetic; only the loop over
    steps (and mini-batches) runs in Python around one compiled update. On XLA:CPU a
    convolutional step inside ``lax.scan`` runs several times slower than the same step called
    from Python (see ``docs/cpu_speed.md``); for such models this is the faster driver. Small
    models (the kink MLP) are faster with the default scan, where Python's dispatch overhead
    (tens of microseconds a call) does not count.

    Args:
      run: a function returned by :func:`make_train_run`.
      jit: the compiler of each piece.
      chains: drive ``jax.vmap(run)`` instead: every argument has a leading chain axis ``[C]``
        (the bank too, unless ``bank_axis`` is ``None``: one bank shared by all chains).
      bank_axis: the bank's chain axis with ``chains=True``.

    Returns:
      ``run_python(params0, bank, lam, mask, key) -> (params, metrics)``, or, for a run made
      with ``has_state=True``, ``run_python(params0, bank, lam, mask, key, state0) ->
      ((params, state), metrics)``.
    """
    core = _python_loop_core(run, jit, chains=chains, bank_axis=bank_axis)
    if getattr(run, "has_state", False):
        return core

    def run_python(params0, bank, lam, mask, key):
        (params, _), metrics = core(params0, bank, lam, mask, key)
        return params, metrics

    run_python.core = core  # type: ignore[attr-defined]
    return run_python


def _python_loop_core(
    run: Callable[..., Any],
    jit: Callable[..., Any],
    *,
    chains: bool = False,
    bank_axis: int | None = 0,
) -> Callable[..., Any]:
    """:func:`python_loop_run` in the form of ``run.core``: ``core(params0, bank, lam, mask, key,
    state0=None) -> ((params, state), metrics)`` (``state`` ``None`` without a model state)."""
    r: Any = run
    if chains:

        def vec(f, in_axes):
            return jax.vmap(f, in_axes=in_axes)

        axis = 1
    else:

        def vec(f, in_axes):
            return f

        axis = 0
    init = jit(vec(r.start, (0, 0)))
    finish = jit(vec(r.finish, (0, bank_axis, 0, 0, 0, 0)))
    if not r.minibatch:
        step = jit(
            vec(lambda c, bank, lam, mask: r.step(c, None, bank, lam, mask), (0, bank_axis, 0, 0))
        )

        def run_python(params0, bank, lam, mask, key, state0=None):
            carry = init(params0, state0)
            losses = []
            for _ in range(r.steps):
                carry, loss = step(carry, bank, lam, mask)
                losses.append(loss)
            curve = jnp.stack(losses, axis=axis)[
                (slice(None),) * axis + (slice(None, None, r.log_every),)
            ]
            params, state = carry[0], carry[2]
            return (params, state), finish(params, bank, lam, mask, curve, state)

        return run_python

    bsz, nb, data = r.batch_size, r.num_batches, r.data
    n_examples = int(np.shape(jax.tree_util.tree_leaves(data)[0])[0])

    def batch_step(c, perm, b, bank, lam, mask):
        idx = jax.lax.dynamic_slice_in_dim(perm, b * bsz, bsz)
        batch = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)
        return r.step(c, batch, bank, lam, mask)

    step = jit(vec(batch_step, (0, 0, None, bank_axis, 0, 0)))
    permute = jit(vec(lambda k: jax.random.permutation(k, n_examples), 0))
    epoch_keys = jit(vec(lambda k: jax.random.split(k, r.epochs), 0))

    def run_python(params0, bank, lam, mask, key, state0=None):
        carry = init(params0, state0)
        ekeys = epoch_keys(key)
        curve = []
        for e in range(r.epochs):
            perm = permute(ekeys[:, e] if chains else ekeys[e])
            losses = []
            for b in range(nb):
                carry, loss = step(carry, perm, b, bank, lam, mask)
                losses.append(loss)
            curve.append(jnp.mean(jnp.stack(losses, axis=axis), axis=axis))
        params, state = carry[0], carry[2]
        return (params, state), finish(params, bank, lam, mask, jnp.stack(curve, axis=axis), state)

    return run_python


def _has_convolution(jaxpr: Any) -> bool:
    """Whether a (closed) jaxpr, or any jaxpr nested in it, contains a convolution."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            if _has_convolution(sub):
                return True
    return False


def choose_loop(
    loss_fn: Callable[..., Any],
    init_params: PyTree,
    data: PyTree | None,
    model_state: PyTree = None,
) -> str:
    """``'python'`` on a CPU when the loss contains a convolution, else ``'scan'``.

    On XLA:CPU a convolutional update inside ``lax.scan`` runs many times slower than the same
    compiled update called from Python (LeNet-5, batch 128: about 16x, see
    ``benchmarks/results/driver_loop.json``); small dense models are faster in the scan.
    ``model_state``, when given, is passed to ``loss_fn`` after the params.
    """
    if jax.default_backend() != "cpu":
        return "scan"
    args = () if model_state is None else (model_state,)
    if data is not None:
        args += (jax.tree_util.tree_map(lambda x: x[:1], data),)
    try:
        # a fresh wrapper: make_jaxpr caches traces per function, which would make the number
        # of traces of ``loss_fn`` depend on earlier calls
        jaxpr = jax.make_jaxpr(lambda *a: loss_fn(*a))(init_params, *args)
    except Exception:  # noqa: BLE001 - e.g. a batch of 1 does not fit the model: keep the scan
        return "scan"
    return "python" if _has_convolution(jaxpr) else "scan"


def _stack_or_empty(trees: list[PyTree], like: PyTree) -> PyTree:
    """The trees stacked on a new leading axis, or ``[0, ...]`` arrays shaped like ``like``."""
    if trees:
        return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *trees)
    return jax.tree_util.tree_map(lambda x: np.zeros((0, *np.shape(x)), np.asarray(x).dtype), like)


def _layer_schedule(
    names: tuple[str, ...],
    layers: LayerChoice,
    layer_draw: str,
    iterations: int,
    key: jax.Array | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-iteration layer masks ``[iterations + 1, L]`` and chosen layer indices (-1: all)."""
    L = len(names)
    if isinstance(layers, str) and layers == "random":
        if layer_draw not in ("once", "per_iteration"):
            raise ValueError(f"layer_draw must be 'once' or 'per_iteration', got {layer_draw!r}.")
        if key is None:
            raise ValueError(
                "layers='random' draws the layer from `key`; pass key=jax.random.key(seed)."
            )
        lkey = jax.random.fold_in(key, 0x1A7E)
        if layer_draw == "once":
            idx = np.full(iterations + 1, int(jax.random.randint(lkey, (), 0, L)))
        else:
            idx = np.asarray(jax.random.randint(lkey, (iterations + 1,), 0, L))
        masks = np.eye(L, dtype=np.float32)[idx]
        return masks, idx.astype(np.int32)
    mask = np.asarray(layer_mask(names, layers), np.float32)
    sel = np.flatnonzero(mask)
    idx_value = int(sel[0]) if len(sel) == 1 and L > 1 else -1
    return np.tile(mask, (iterations + 1, 1)), np.full(iterations + 1, idx_value, np.int32)


def persistent_fit(
    init_params: PyTree,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    iterations: int,
    lam: float,
    steps: int | None = None,
    layers: LayerChoice = None,
    score_fn: Callable[[PyTree], jax.Array] | None = None,
    key: jax.Array | None = None,
    layer_draw: str = "once",
    capacity: int | None = None,
    data: PyTree | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    shuffle: str = "same",
    log_every: int | None = None,
    push_diverged: bool = False,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    jit: Callable[..., Any] | None = None,
    loop: str = "auto",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_every_epochs: int | None = None,
    checkpoint_keep: int = 2,
    model_state: PyTree = None,
) -> FitResult:
    """Persistent training (Algorithm 1): a plain run, then ``iterations`` persistent runs.

    Every run starts from ``init_params`` with a fresh optimizer state. Run ``n`` minimizes
    ``L(θ) + λ Σ_{k<n} Σ_l m_l |Θ_k^l · θ^l| / ||Θ_k^l||²`` (Eq. 4, or Eq. 5 with one layer);
    its converged params become Θ_n. The championship is the run with the lowest finite score.

    Models with a state that is not trained by gradient (Flax ``batch_stats``) pass it as
    ``model_state``: every run then restarts from ``init_params`` *and* ``model_state``, the
    state is threaded through the steps by ``loss_fn`` (see :func:`make_train_run`), and the
    penalty and the bank cover the params only.

    Examples:
      >>> import jax.numpy as jnp, optax, pnjax
      >>> from pnjax.experiments.toy2d import toy_loss, TOY_START
      >>> res = pnjax.persistent_fit(TOY_START, toy_loss, optax.sgd(1e-3), iterations=1,
      ...                            lam=0.1, steps=50_000)
      >>> res.champion_iteration
      1

    Args:
      init_params: the shared initialization (any pytree of arrays).
      loss_fn: ``loss_fn(params) -> scalar`` (full batch) or ``loss_fn(params, batch)`` (with
        ``data``); with ``model_state``: ``loss_fn(params, state) -> (loss, new_state)`` or
        ``loss_fn(params, state, batch) -> (loss, new_state)``.
      optimizer: any Optax transformation; re-initialized for every run.
      iterations: N, the number of persistent runs after the plain run.
      lam: λ >= 0.
      steps: updates per run (full-batch form).
      layers: ``None`` (full model, Eq. 4), a layer name or names, or ``'random'`` (partial
        model, Eq. 5: one layer drawn from ``key``).
      score_fn: ``score_fn(params) -> scalar`` (``score_fn(params, state)`` with
        ``model_state``: the state at the end of the run), lower is better (e.g. validation
        error); defaults to the loss (with the final state; the state ``loss_fn`` returns
        there is discarded).
      key: PRNG key for the random layer and the data order.
      layer_draw: with ``layers='random'``: ``'once'`` (one layer for the whole run, default)
        or ``'per_iteration'`` (a new layer each persistent iteration).
      capacity: bank capacity, default ``iterations + 1``; at least ``iterations``.
      data, batch_size, epochs: the mini-batch form (see :func:`make_train_run`).
      shuffle: mini-batch order: ``'same'`` (every run sees the same order, so runs differ
        only by the penalty) or ``'per_iteration'``.
      log_every: training-loss recording period (full batch).
      push_diverged: also push runs whose loss is not finite (default: they are skipped).
      anchor_fn: ``anchor_fn(params, key) -> params`` transforms what is pushed (used by the
        random-direction control); default pushes the converged params.
      callback: called after each run with ``(iteration, info)``; ``info`` holds ``score``,
        ``loss``, ``diverged``, ``champion_iteration`` and the run's final ``params``. On
        resume it is replayed for the restored iterations with ``info['resumed'] = True``
        (the checkpoint then also keeps every iteration's final params). With
        ``model_state``, ``info`` also holds the run's final ``model_state``.
      jit: the function that compiles the run (default ``pnjax._compile.jit``: ``jax.jit``
        with pnjax's CPU compile options, none on GPU/TPU).
      loop: ``'scan'`` (each run is one compiled program, a ``lax.scan`` over steps),
        ``'python'`` (one compiled update called from a Python loop; same results, much faster
        for convolutional models on XLA:CPU, see ``docs/cpu_speed.md``) or ``'auto'``
        (default: ``'python'`` on a CPU when the loss contains a convolution and
        ``checkpoint_every_epochs`` is not used, else ``'scan'``). All compile once for all
        iterations.
      checkpoint_dir: a folder to checkpoint into after every iteration (bank, history,
        championship, RNG state; see ``docs/long_runs.md``). If it already holds a checkpoint
        of the same configuration the run resumes from it; one of a different configuration
        raises ``ValueError``. Default: none, or a subfolder of the enclosing
        :func:`checkpoint_scope`.
      checkpoint_every_epochs: mini-batch form only: also checkpoint params and optimizer
        state every this many epochs inside an iteration (the run is then compiled as chunks
        of epochs instead of one program).
      checkpoint_keep: how many checkpoints to keep (default 2, so a corrupt newest one falls
        back to the previous).
      model_state: the initial model state, any pytree of arrays (e.g. ``{'batch_stats':
        variables['batch_stats']}``), or ``None`` (default: the model has none). A run counts
        as diverged also when its final state is not finite. Checkpoints keep the champion's
        state.

    Returns:
      A :class:`FitResult` (``champion_state`` holds the championship run's final state).

    Raises:
      ValueError: bad ``iterations``, ``steps``, ``lam``, ``layers``, ``capacity`` or data, a
        ``checkpoint_dir`` holding a run of a different configuration, or a ``loss_fn`` whose
        output does not fit ``model_state`` (a ``(loss, state)`` pair shaped like
        ``model_state`` with it, a scalar without it).

    References:
      Min, *Persistent Neurons*, arXiv:2007.01419, Algorithm 1.
    """
    iterations = _check_positive_int("iterations", iterations, allow_zero=True)
    check_lam(lam)
    if np.ndim(lam) != 0:
        raise ValueError(
            f"lam must be a scalar in persistent_fit, got shape {np.shape(lam)}; use "
            "pnjax.run_chains for one λ per chain."
        )
    if shuffle not in ("same", "per_iteration"):
        raise ValueError(f"shuffle must be 'same' or 'per_iteration', got {shuffle!r}.")
    if data is None and (batch_size is not None or epochs is not None):
        raise ValueError("batch_size and epochs need data=...; for full-batch training pass steps.")
    if data is not None and steps is not None:
        raise ValueError("pass either steps (full batch) or data with epochs, not both.")
    push_diverged = _checks.check_bool("push_diverged", push_diverged)
    names = layer_names(init_params)
    capacity = iterations + 1 if capacity is None else capacity
    if isinstance(capacity, (int, np.integer)) and not isinstance(capacity, bool):
        if capacity < iterations:
            raise ValueError(
                f"capacity={capacity} is smaller than iterations={iterations}: run n needs the "
                f"{iterations} anchors of the runs before it; use capacity >= {iterations}."
            )
    bank = AnchorBank.create(init_params, capacity)
    masks, layer_idx = _layer_schedule(names, layers, layer_draw, iterations, key)
    if data is not None and key is None:
        key = jax.random.key(0)
    base_key = jax.random.key(0) if key is None else key
    if checkpoint_dir is None:
        checkpoint_dir = _next_scoped_dir()
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_dir must be a folder path (str or os.PathLike), got "
            f"{type(checkpoint_dir).__name__}."
        )
    every = None
    if checkpoint_every_epochs is not None:
        every = _check_positive_int("checkpoint_every_epochs", checkpoint_every_epochs)
        if data is None:
            raise ValueError(
                "checkpoint_every_epochs needs the mini-batch form (data=..., epochs=...); "
                "full-batch runs are checkpointed after every iteration."
            )
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every_epochs needs checkpoint_dir=... to save into.")
    keep = _check_positive_int("checkpoint_keep", checkpoint_keep)
    if checkpoint_dir is not None:  # path, ownership, writability and lock, before any tracing
        from pnjax import checkpoint as ckpt

        folder_lock = ckpt.open_checkpoint_dir(checkpoint_dir)

    has_state = model_state is not None
    if has_state:
        model_state = jax.tree_util.tree_map(jnp.asarray, model_state)
    _checks.check_score_fn(score_fn, init_params, model_state)
    run = make_train_run(
        loss_fn,
        optimizer,
        steps=steps,
        score_fn=score_fn,
        data=data,
        batch_size=batch_size,
        epochs=epochs,
        log_every=log_every,
        has_state=has_state,
    )
    jit = jit or _default_jit()
    if loop not in ("auto", "scan", "python"):
        raise ValueError(
            f"loop must be 'auto', 'scan' (one compiled program per run) or 'python' (a compiled "
            f"step called from Python: faster for convolutional models on a CPU), got {loop!r}."
        )
    if loop == "auto":
        loop = "scan" if every is not None else choose_loop(loss_fn, init_params, data, model_state)
    compiled = jit(run.core) if loop == "scan" else _python_loop_core(run, jit)
    chunked = every is not None and every < int(epochs or 0)
    if chunked and loop == "python":
        raise ValueError(
            "checkpoint_every_epochs works with loop='scan' only; with loop='python' runs are "
            "checkpointed after every iteration."
        )
    if chunked:
        parts: _RunParts = run.parts  # type: ignore[attr-defined]
        c_start, c_chunk, c_finish = jit(parts.start), jit(parts.epochs_chunk), jit(parts.finish)
        chunks = -(-parts.epochs // every)
    else:
        chunks = 1
    lam_arr = jnp.asarray(lam, jnp.float32)

    rows: dict[str, list[Any]] = {k: [] for k in ("score", "loss", "penalty", "curve")}
    diverged: list[bool] = []
    pushed: list[bool] = []
    finals: list[PyTree] = []
    final_states: list[PyTree] = []
    keep_finals = callback is not None
    champion, champ_it, champ_score = init_params, -1, math.inf
    champion_state = model_state
    start_n, resumed_from = 0, 0
    partial: tuple[Any, list[np.ndarray], int] | None = None

    def history_arrays() -> dict[str, np.ndarray]:
        return {
            "score": np.asarray(rows["score"], np.float32),
            "loss": np.asarray(rows["loss"], np.float32),
            "penalty": np.asarray(rows["penalty"], np.float32),
            "curve": np.stack(rows["curve"]) if rows["curve"] else np.zeros((0,), np.float32),
            "diverged": np.asarray(diverged, bool),
            "pushed": np.asarray(pushed, bool),
        }

    if checkpoint_dir is not None:
        fingerprint = ckpt.driver_fingerprint(
            "persistent_fit",
            {
                "iterations": iterations,
                "lam": float(lam),
                "steps": steps,
                "epochs": epochs,
                "batch_size": batch_size,
                "log_every": log_every,
                "layers": layers if not isinstance(layers, (jax.Array, np.ndarray)) else None,
                "layer_draw": layer_draw,
                "capacity": capacity,
                "shuffle": shuffle,
                "push_diverged": push_diverged,
                "anchor_fn": anchor_fn is not None,
                "checkpoint_every_epochs": every,
            },
            optimizer=optimizer,
            params=init_params,
            init_params=init_params,
            key=base_key,
            data=data,
            layer_mask=np.asarray(masks),
        )
        if has_state:
            # only with a state, so checkpoints written without one still resume
            fingerprint["model_state"] = ckpt.tree_fingerprint(model_state)

        def template(meta: dict[str, Any]) -> PyTree:
            ckpt.check_fingerprint(meta.get("fingerprint"), fingerprint, checkpoint_dir)
            _checks.check_callback_replay(meta, callback, checkpoint_dir)
            empty = np.zeros((0,), np.float32)
            t: dict[str, Any] = {
                "bank": bank,
                "champion": init_params,
                "history": dict.fromkeys(
                    ("score", "loss", "penalty", "curve", "diverged", "pushed"), empty
                ),
                "rng": base_key,
            }
            if has_state:
                t["champion_state"] = model_state
            if meta.get("has_finals"):
                t["finals"] = jax.tree_util.tree_map(np.asarray, init_params)
                if has_state:
                    t["final_states"] = jax.tree_util.tree_map(np.asarray, model_state)
            if meta.get("partial_epochs"):
                t["partial"] = {"carry": parts.start(init_params, model_state), "curve": empty}
            return t

        found = ckpt.restore_checkpoint(checkpoint_dir, like=template)
        if found is not None:
            st, meta = found.state, found.metadata
            bank = st["bank"]
            h = st["history"]
            for k in rows:
                rows[k] = list(h[k])
            diverged = [bool(x) for x in h["diverged"]]
            pushed = [bool(x) for x in h["pushed"]]
            champ_it = int(meta["champion_iteration"])
            champ_score = float(meta["champion_score"])
            champion = st["champion"] if champ_it >= 0 else init_params
            if has_state:
                champion_state = st["champion_state"] if champ_it >= 0 else model_state
            start_n = resumed_from = int(meta["done"])
            if "finals" in st:
                finals = [
                    jax.tree_util.tree_map(lambda a, i=i: a[i], st["finals"])
                    for i in range(start_n)
                ]
            if "final_states" in st:
                final_states = [
                    jax.tree_util.tree_map(lambda a, i=i: a[i], st["final_states"])
                    for i in range(start_n)
                ]
            if "partial" in st:
                p = st["partial"]
                partial = (p["carry"], [np.asarray(p["curve"])], int(meta["partial_epochs"]))
            if callback is not None:
                for n in range(start_n):
                    info = {
                        "score": float(rows["score"][n]),
                        "loss": float(rows["loss"][n]),
                        "diverged": diverged[n],
                        "champion_iteration": _champion_upto(rows["score"], diverged, n),
                        "resumed": True,
                        "params": finals[n] if finals else None,
                    }
                    if has_state:
                        info["model_state"] = final_states[n] if final_states else None
                    callback(n, info)
        if start_n <= iterations:
            folder_lock.require_writable()

    def save(done: int, carry: Any = None, curve: np.ndarray | None = None, ep: int = 0) -> None:
        if checkpoint_dir is None:
            return
        state: dict[str, Any] = {
            "bank": bank,
            "champion": champion,
            "history": history_arrays(),
            "rng": base_key,
        }
        if has_state:
            state["champion_state"] = champion_state
        if keep_finals:
            state["finals"] = _stack_or_empty(finals, init_params)
            if has_state:
                state["final_states"] = _stack_or_empty(final_states, model_state)
        if carry is not None:
            state["partial"] = {"carry": carry, "curve": curve}
        meta = {
            "fingerprint": fingerprint,
            "done": done,
            "partial_epochs": ep,
            "champion_iteration": champ_it,
            "champion_score": champ_score,
            "has_finals": keep_finals,
        }
        step = done * chunks + (-(-ep // every) if ep else 0)
        ckpt.save_checkpoint(checkpoint_dir, step, state, meta, keep=keep)

    for n in range(start_n, iterations + 1):
        data_key = base_key if shuffle == "same" else jax.random.fold_in(base_key, n)
        mask_n = jnp.asarray(masks[n])
        if not chunked:
            (params, mstate), metrics = compiled(
                init_params, bank, lam_arr, mask_n, data_key, model_state
            )
        else:
            epoch_keys = jax.random.split(data_key, parts.epochs)
            if partial is not None:
                carry, curve_parts, e0 = partial
                partial = None
            else:
                carry, curve_parts, e0 = c_start(init_params, model_state), [], 0
            while e0 < parts.epochs:
                e1 = min(e0 + every, parts.epochs)
                carry, piece = c_chunk(carry, bank, lam_arr, mask_n, epoch_keys[e0:e1])
                curve_parts.append(np.asarray(piece))
                e0 = e1
                if e0 < parts.epochs:
                    save(n, carry, np.concatenate(curve_parts), e0)
            params, mstate = carry[0], carry[2]
            curve = jnp.asarray(np.concatenate(curve_parts))
            metrics = c_finish(params, bank, lam_arr, mask_n, curve, mstate)
        metrics = jax.device_get(metrics)
        score, loss = float(metrics["score"]), float(metrics["loss"])
        bad = not (math.isfinite(loss) and math.isfinite(score))
        if not bad:
            bad = not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))
        if not bad and has_state:
            bad = not _finite(mstate)
        for k in rows:
            rows[k].append(np.asarray(metrics[k]))
        diverged.append(bad)
        do_push = (not bad or push_diverged) and int(bank.count) < bank.capacity
        if do_push:
            anchor = (
                params
                if anchor_fn is None
                else anchor_fn(params, jax.random.fold_in(base_key, 1000 + n))
            )
            bank = bank.push(anchor)
        pushed.append(do_push)
        if not bad and score < champ_score:
            champion, champ_it, champ_score = params, n, score
            champion_state = mstate
        if keep_finals:
            finals.append(jax.device_get(params))
            if has_state:
                final_states.append(jax.device_get(mstate))
        save(n + 1)
        if callback is not None:
            info = {"score": score, "loss": loss, "diverged": bad, "champion_iteration": champ_it}
            info["params"] = params
            if has_state:
                info["model_state"] = mstate
            callback(n, info)

    history = history_arrays()
    history["layer"] = layer_idx
    return FitResult(
        champion=champion,
        champion_iteration=champ_it,
        history=history,
        bank=bank,
        layer_names=names,
        resumed_from=resumed_from,
        champion_state=champion_state,
    )
