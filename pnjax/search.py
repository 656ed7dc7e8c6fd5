"""Algorithm 1 around a training function of your own: :func:`persistent_search`.

For training scripts that are not ``loss_fn`` + ``optimizer`` (learning-rate schedules, data
augmentation, EMA, a jitted step of their own), the user trains; pnjax keeps the bank, the
championship, divergence, callbacks and checkpoints, with the same code as
:func:`pnjax.persistent_fit` and :func:`pnjax.run_chains`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from pnjax.anchors import AnchorBank
from pnjax.config import make_config
from pnjax.drivers import default_jit
from pnjax.layers import layer_names
from pnjax.loop import after_run, init_state
from pnjax.results import FitResult, fit_result
from pnjax.resume import fingerprint, open_checkpoints, run_loop

PyTree = Any


def persistent_search(
    train_fn: Callable[[PyTree, AnchorBank, int, jax.Array], PyTree],
    init_params: PyTree,
    *,
    iterations: int,
    score_fn: Callable[[PyTree], Any],
    key: jax.Array | None = None,
    capacity: int | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    push_diverged: bool = False,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None = None,
    checkpoint_keep: int = 2,
) -> FitResult:
    """Algorithm 1 with your own training: ``iterations + 1`` calls of ``train_fn``.

    Iteration ``n`` calls ``params_n = train_fn(init_params, bank, n, fold_in(key, n))``, where
    ``bank`` holds the anchors Θ_0 … Θ_{n-1} of the runs before it (empty for the plain run,
    ``n = 0``). ``train_fn`` trains from ``init_params`` as it likes and should repel its
    parameters from the bank, e.g. with ``optax.chain(pnjax.persistent_bias(bank, lam),
    your_optimizer)`` (Eq. 6) or :func:`pnjax.add_persistent_penalty` (Eq. 4). Then
    ``score_fn(params_n)`` (lower is better) decides the championship; a run whose params or
    score are not finite is marked diverged, is never champion and is not pushed.

    Examples:
      >>> import jax.numpy as jnp, optax, pnjax
      >>> def train_fn(params, bank, n, key):
      ...     tx = optax.chain(pnjax.persistent_bias(bank, 0.1), optax.sgd(0.1))
      ...     state = tx.init(params)
      ...     for _ in range(50):
      ...         g = jax.grad(lambda p: jnp.sum((p['w'] ** 2 - 1.0) ** 2))(params)
      ...         u, state = tx.update(g, state, params)
      ...         params = optax.apply_updates(params, u)
      ...     return params
      >>> res = pnjax.persistent_search(train_fn, {'w': jnp.array([0.5, 0.5])}, iterations=2,
      ...                               score_fn=lambda p: jnp.sum(p['w']))
      >>> res.history['score'].shape, int(res.bank.count)
      ((3,), 3)

    Args:
      train_fn: ``train_fn(params0, bank, n, key) -> params``; ``params`` shaped like
        ``params0``. Called from Python: it may jit what it likes.
      init_params: the shared initialization.
      iterations: N, persistent runs after the plain one.
      score_fn: ``score_fn(params) -> scalar``, lower is better (e.g. validation error).
      key: the base key (default ``jax.random.key(0)``); run ``n`` gets ``fold_in(key, n)``.
      capacity: bank capacity, default ``iterations + 1``; at least ``iterations``.
      checkpoint_dir: checkpoint after every iteration and resume from there (a folder of
        another configuration is refused), as :func:`pnjax.persistent_fit` does; default: none
        or a subfolder of the enclosing :func:`pnjax.fit.checkpoint_scope`.
      callback: ``callback(n, info)`` after each run, as in :func:`pnjax.persistent_fit`
        (``score``, ``diverged``, ``champion_iteration``, ``params``), replayed on resume.
      push_diverged: push diverged runs too.
      anchor_fn: ``anchor_fn(params, key) -> params`` transforms what is pushed.
      checkpoint_keep: how many checkpoints to keep.

    Returns:
      A :class:`pnjax.FitResult`; its history holds ``score``, ``diverged`` and ``pushed``.

    Raises:
      ValueError: a bad ``iterations``, ``capacity`` or checkpoint setting; a ``train_fn``
        whose params do not have ``init_params``'s structure, shapes and dtypes.
    """
    cfg = make_config(iterations=iterations, lam=0.0, capacity=capacity,
                      push_diverged=push_diverged, checkpoint_dir=checkpoint_dir,
                      checkpoint_keep=checkpoint_keep)  # fmt: skip
    key = jax.random.key(0) if key is None else key
    after = default_jit()(
        functools.partial(after_run, anchor_fn=anchor_fn, push_diverged=push_diverged)
    )
    shapes = {"score": jax.ShapeDtypeStruct((), jnp.float32)}

    def template(keep_finals: bool):
        return init_state(init_params, (), shapes, iterations=cfg.iterations,
                          capacity=cfg.capacity, keep_finals=keep_finals)  # fmt: skip

    def advance(state, n, resume=None, on_chunk=None):
        params = train_fn(init_params, state.bank, n, jax.random.fold_in(key, n))
        state.bank.check_compatible(params, "the params train_fn returned")
        score = jnp.asarray(score_fn(params), jnp.float32)
        return after(state, n, params, (), {"score": score}, key)

    config = {"driver": "persistent_search", "iterations": cfg.iterations,
              "capacity": cfg.capacity, "push_diverged": push_diverged,
              "anchor_fn": anchor_fn is not None}  # fmt: skip
    checkpoints = open_checkpoints(
        cfg.folder, lambda: fingerprint(config, init_params=init_params, key=key),
        keep=cfg.keep, every=None, epochs=None, chunked=False, lock=cfg.lock,
    )  # fmt: skip
    state, resumed = run_loop(template, advance, iterations=cfg.iterations,
                              checkpoints=checkpoints, callback=callback, has_state=False)  # fmt: skip
    return fit_result(state, layer=None, names=layer_names(init_params), resumed_from=resumed,
                      has_state=False)  # fmt: skip
