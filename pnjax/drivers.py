"""How the steps of a :class:`pnjax.run.TrainRun` are driven: ``scan``, ``python``, ``chunked``.

Every driver is the same callable::

    drive(params0, bank, lam, mask, key, model_state0, data, resume=None, on_chunk=None)
        -> ((params, model_state), metrics)

- ``'scan'``: the whole run is one compiled program (a ``lax.scan`` over steps).
- ``'python'``: one compiled update called from a Python loop. Same arithmetic; on XLA:CPU a
  convolutional step inside ``lax.scan`` runs several times slower than the same step called
  from Python (see ``docs/cpu_speed.md``), so this is the faster driver for such models.
- ``'chunked'`` (mini-batch form): compiled chunks of ``every`` epochs, with ``on_chunk(carry,
  curve, epoch)`` called between chunks (mid-iteration checkpoints) and ``resume=(carry, curve,
  epoch)`` to continue a run from such a point.

With ``chains=True`` each compiled piece is ``jax.vmap``-ed over a leading chain axis of every
argument (the bank's too unless ``bank_axis=None``: one bank shared by all chains). The data is
always an argument, shared by the chains, never a constant of the program.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from pnjax.run import MiniBatch, Penalty, TrainRun

PyTree = Any
Driver = Callable[..., tuple[tuple[PyTree, PyTree], dict[str, jax.Array]]]
LOOPS = ("auto", "scan", "python")


def default_jit() -> Callable[..., Any]:
    """``pnjax._compile.jit`` (``jax.jit`` with pnjax's CPU compile options), else ``jax.jit``."""
    try:
        from pnjax import _compile

        return _compile.jit
    except ImportError:  # pragma: no cover - _compile is part of the package
        return jax.jit


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
    args = () if model_state is None or model_state == () else (model_state,)
    if data is not None:
        args += (jax.tree_util.tree_map(lambda x: x[:1], data),)
    try:
        # a fresh wrapper: make_jaxpr caches traces per function, which would make the number
        # of traces of ``loss_fn`` depend on earlier calls
        jaxpr = jax.make_jaxpr(lambda *a: loss_fn(*a))(init_params, *args)
    except Exception:  # noqa: BLE001 - e.g. a batch of 1 does not fit the model: keep the scan
        return "scan"
    return "python" if _has_convolution(jaxpr) else "scan"


def resolve_loop(
    loop: str,
    *,
    loss_fn: Callable[..., Any],
    template: PyTree,
    data: PyTree | None,
    model_state: PyTree,
    every: int | None,
    epochs: int | None,
    mesh: Any = None,
) -> str:
    """The one place where ``loop='auto'`` is resolved: ``'scan'``, ``'python'`` or ``'chunked'``.

    ``'auto'`` is ``'scan'`` with a mesh or with ``checkpoint_every_epochs`` (``every``), else
    :func:`choose_loop`. A run checkpointed every ``every < epochs`` epochs is ``'chunked'``.

    Raises:
      ValueError: an unknown ``loop``; ``'python'`` with a mesh or with mid-iteration
        checkpoints.
    """
    if loop not in LOOPS:
        raise ValueError(
            f"loop must be 'auto', 'scan' (one compiled program per run) or 'python' (a compiled "
            f"step called from Python: faster for convolutional models on a CPU), got {loop!r}."
        )
    if loop == "python" and mesh is not None:
        raise ValueError("loop='python' does not shard; with mesh=... use loop='scan' or 'auto'.")
    chunked = every is not None and every < int(epochs or 0)
    if chunked and loop == "python":
        raise ValueError(
            "checkpoint_every_epochs works with loop='scan' only; with loop='python' runs are "
            "checkpointed after every iteration."
        )
    if chunked:
        return "chunked"
    if loop == "auto":
        if mesh is not None or every is not None:
            return "scan"
        return choose_loop(loss_fn, template, data, model_state)
    return loop


def _vectorize(chains: bool) -> Callable[..., Any]:
    if chains:
        return lambda f, in_axes: jax.vmap(f, in_axes=in_axes)
    return lambda f, in_axes: f


def _no_resume(resume: Any, loop: str) -> None:
    """A whole-iteration driver has no chunks: ``on_chunk`` is never called, ``resume`` refused."""
    if resume is not None:
        raise ValueError(f"the {loop!r} driver runs an iteration whole; use the chunked driver.")


def scan_driver(
    run: TrainRun, jit: Callable[..., Any], *, chains: bool = False, bank_axis: int | None = 0
) -> Driver:
    """The run as one compiled program (see the module docstring)."""
    core = jit(_vectorize(chains)(run.core, (0, bank_axis, 0, 0, 0, 0, None)))

    def drive(params0, bank, lam, mask, key, model_state0, data, resume=None, on_chunk=None):
        _no_resume(resume, "scan")
        return core(params0, bank, lam, mask, key, model_state0, data)

    return drive


def _finish(run: TrainRun, vec: Any, jit: Any, bank_axis: int | None) -> Callable[..., Any]:
    return jit(
        vec(
            lambda carry, bank, lam, mask, curve, data: run.finish(
                carry, Penalty(bank, lam, mask), curve, data
            ),
            (0, bank_axis, 0, 0, 0, None),
        )
    )


def python_driver(
    run: TrainRun, jit: Callable[..., Any], *, chains: bool = False, bank_axis: int | None = 0
) -> Driver:
    """One compiled update called from Python (see the module docstring)."""
    vec = _vectorize(chains)
    start = jit(vec(run.start, (0, 0)))
    finish = _finish(run, vec, jit, bank_axis)
    it = run.iteration
    if not isinstance(it, MiniBatch):
        step = jit(
            vec(
                lambda c, bank, lam, mask, t: run.step(c, None, Penalty(bank, lam, mask), t),
                (0, bank_axis, 0, 0, None),
            )
        )

        def drive(params0, bank, lam, mask, key, model_state0, data, resume=None, on_chunk=None):
            _no_resume(resume, "python")
            carry = start(params0, model_state0)
            losses = []
            for t in range(it.steps):
                carry, loss = step(carry, bank, lam, mask, t)
                losses.append(loss)
            curve = jnp.stack(losses, axis=-1)[..., :: it.log_every]
            metrics = finish(carry, bank, lam, mask, curve, data)
            return (carry.params, carry.model_state), metrics

        return drive

    step = jit(
        vec(
            lambda c, perm, b, bank, lam, mask, data, t: run.step(
                c, run.batch(data, perm, b), Penalty(bank, lam, mask), t
            ),
            (0, 0, None, bank_axis, 0, 0, None, None),
        )
    )
    permute = jit(vec(run.permutation, 0))
    epoch_keys = jit(vec(run.epoch_keys, 0))

    def drive(params0, bank, lam, mask, key, model_state0, data, resume=None, on_chunk=None):
        _no_resume(resume, "python")
        carry = start(params0, model_state0)
        ekeys = epoch_keys(key)
        curve = []
        for e in range(it.epochs):
            perm = permute(ekeys[..., e])
            losses = []
            for b in range(it.num_batches):
                carry, loss = step(carry, perm, b, bank, lam, mask, data, e * it.num_batches + b)
                losses.append(loss)
            curve.append(jnp.mean(jnp.stack(losses, axis=-1), axis=-1))
        metrics = finish(carry, bank, lam, mask, jnp.stack(curve, axis=-1), data)
        return (carry.params, carry.model_state), metrics

    return drive


def chunked_driver(
    run: TrainRun,
    jit: Callable[..., Any],
    *,
    every: int,
    chains: bool = False,
    bank_axis: int | None = 0,
) -> Driver:
    """Compiled chunks of ``every`` epochs with a hook between chunks (module docstring)."""
    it = run.iteration
    if not isinstance(it, MiniBatch):
        raise ValueError(
            "checkpoint_every_epochs needs the mini-batch form (data=..., epochs=...); "
            "full-batch runs are checkpointed after every iteration."
        )
    vec = _vectorize(chains)
    start = jit(vec(run.start, (0, 0)))
    chunk = jit(
        vec(
            lambda c, bank, lam, mask, ekeys, data, e0: run.epochs(
                c, Penalty(bank, lam, mask), ekeys, data, e0
            ),
            (0, bank_axis, 0, 0, 0, None, None),
        )
    )
    finish = _finish(run, vec, jit, bank_axis)
    epoch_keys = jit(vec(run.epoch_keys, 0))

    def drive(params0, bank, lam, mask, key, model_state0, data, resume=None, on_chunk=None):
        ekeys = epoch_keys(key)
        if resume is not None:
            carry, curve, e0 = resume
            pieces = [np.asarray(curve)]
        else:
            carry, pieces, e0 = start(params0, model_state0), [], 0
        while e0 < it.epochs:
            e1 = min(e0 + every, it.epochs)
            carry, piece = chunk(carry, bank, lam, mask, ekeys[..., e0:e1], data, e0)
            pieces.append(np.asarray(piece))
            e0 = e1
            if e0 < it.epochs and on_chunk is not None:
                on_chunk(carry, np.concatenate(pieces, axis=-1), e0)
        curve = jnp.asarray(np.concatenate(pieces, axis=-1))
        metrics = finish(carry, bank, lam, mask, curve, data)
        return (carry.params, carry.model_state), metrics

    return drive


def make_driver(
    run: TrainRun,
    loop: str,
    jit: Callable[..., Any],
    *,
    every: int | None = None,
    chains: bool = False,
    bank_axis: int | None = 0,
) -> Driver:
    """The driver named by ``loop`` (``'scan'``, ``'python'`` or ``'chunked'``, already resolved
    by :func:`resolve_loop`)."""
    if loop == "scan":
        return scan_driver(run, jit, chains=chains, bank_axis=bank_axis)
    if loop == "python":
        return python_driver(run, jit, chains=chains, bank_axis=bank_axis)
    if loop == "chunked":
        return chunked_driver(run, jit, every=int(every or 0), chains=chains, bank_axis=bank_axis)
    raise ValueError(f"unknown driver {loop!r}; resolve 'auto' with resolve_loop first.")


def python_loop_run(
    run: TrainRun,
    jit: Callable[..., Any],
    *,
    chains: bool = False,
    bank_axis: int | None = 0,
) -> Callable[..., Any]:
    """The run of :func:`pnjax.make_train_run` driven from Python, one compiled step per update.

    Same arguments and results as ``jit(run)``, and the same arithmetic; only the loop over
    steps (and mini-batches) runs in Python around one compiled update. On XLA:CPU a
    convolutional step inside ``lax.scan`` runs several times slower than the same step called
    from Python (see ``docs/cpu_speed.md``); for such models this is the faster driver. Small
    models (the kink MLP) are faster with the default scan, where Python's dispatch overhead
    (tens of microseconds a call) does not count.

    Args:
      run: a run returned by :func:`pnjax.make_train_run`.
      jit: the compiler of each piece.
      chains: drive ``jax.vmap(run)`` instead: every argument has a leading chain axis ``[C]``
        (the bank too, unless ``bank_axis`` is ``None``: one bank shared by all chains).
      bank_axis: the bank's chain axis with ``chains=True``.

    Returns:
      ``run_python(params0, bank, lam, mask, key) -> (params, metrics)``, or, for a run made
      with ``has_state=True``, ``run_python(params0, bank, lam, mask, key, state0) ->
      ((params, state), metrics)``.
    """
    drive = python_driver(run, jit, chains=chains, bank_axis=bank_axis)

    def run_python(params0, bank, lam, mask, key, *state0):
        if run.has_state:
            return drive(params0, bank, lam, mask, key, state0[0], run.data)
        (params, _), metrics = drive(params0, bank, lam, mask, key, (), run.data)
        return params, metrics

    return run_python
