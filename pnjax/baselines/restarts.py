"""Random restarts: the baseline persistent training must beat at equal compute.

``R`` initializations ``θ⁰_r = init_fn(key_r)`` are trained plainly (no penalty), all at once in
one compiled program (the ``vmap`` path of :func:`pnjax.run_chains` with ``iterations=0``), and
the best by validation score is kept:

    r* = argmin_r score(θ_r),   θ_r = train(θ⁰_r, steps).

``C`` persistent chains of ``N`` iterations cost ``C (N + 1)`` training runs, so the comparison
at equal compute is ``num_restarts = C (N + 1)`` (the penalty's own cost, two passes over the
anchors per step, comes on top for the persistent side).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from pnjax.chains import run_chains

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RestartsResult:
    """What :func:`random_restarts` returns.

    Attributes:
      champion: params of the restart with the lowest finite score (the first init if none).
      champion_index: its index ``r*``, -1 if every restart diverged.
      scores: ``[R]`` float32 validation scores (the loss without ``score_fn``).
      losses: ``[R]`` float32 training losses at the end of each run.
      diverged: ``[R]`` bool.
      curves: ``[R, points]`` training-loss curves.
      params: the trained params of every restart, every leaf ``[R, ...]``.
      init_params: the initializations, every leaf ``[R, ...]``.
      champion_state: with ``stateful=True``, the champion's model state after training (its
        initial state if every restart diverged); ``None`` otherwise.
    """

    champion: PyTree
    champion_index: int
    scores: np.ndarray
    losses: np.ndarray
    diverged: np.ndarray
    curves: np.ndarray
    params: PyTree
    init_params: PyTree
    champion_state: PyTree = None


def random_restarts(
    init_fn: Callable[[jax.Array], PyTree],
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    num_restarts: int,
    steps: int | None = None,
    score_fn: Callable[[PyTree], jax.Array] | None = None,
    key: jax.Array,
    data: PyTree | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    log_every: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    jit: Callable[..., Any] | None = None,
    stateful: bool = False,
) -> RestartsResult:
    """Trains ``num_restarts`` random initializations at once and keeps the best by score.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from pnjax.baselines import random_restarts
      >>> loss = lambda p: jnp.sum((p['w'] - 3.0) ** 2)
      >>> res = random_restarts(lambda k: {'w': jax.random.normal(k, (2,))}, loss,
      ...                       optax.sgd(0.1), num_restarts=4, steps=100,
      ...                       key=jax.random.key(0))
      >>> res.scores.shape, bool(res.scores[res.champion_index] < 1e-6)
      ((4,), True)

    Args:
      init_fn: ``init_fn(key) -> params`` for one restart (vmapped over ``R`` keys); with
        ``stateful=True``, ``init_fn(key) -> (params, model_state)``.
      loss_fn: ``loss_fn(params)`` (full batch) or ``loss_fn(params, batch)`` (with ``data``);
        with ``stateful=True`` ``loss_fn(params, model_state[, batch]) -> (loss, model_state)``
        and ``score_fn(params, model_state)``, as in :func:`pnjax.persistent_fit`.
      optimizer: any Optax transformation, fresh for every restart.
      num_restarts: ``R >= 1``.
      steps: updates per restart (full batch).
      score_fn: ``score_fn(params) -> scalar``, lower is better; default: the training loss.
      key: PRNG key; restart ``r`` is initialized from ``jax.random.split(key, R)[r]`` and
        draws its mini-batch order from the same key.
      data, batch_size, epochs: the mini-batch form, as in :func:`pnjax.make_train_run`.
      log_every: training-loss recording period (full batch).
      mesh: split the restarts over a device mesh, as in :func:`pnjax.run_chains`.
      jit: the compiler (default :func:`pnjax._compile.jit`).
      stateful: models with state (Flax ``batch_stats``): see ``init_fn`` and ``loss_fn``.

    Returns:
      A :class:`RestartsResult`.

    Raises:
      ValueError: ``num_restarts`` not a positive int, or bad steps/data (from run_chains).
    """
    if (
        isinstance(num_restarts, bool)
        or not isinstance(num_restarts, (int, np.integer))
        or num_restarts < 1
    ):
        raise ValueError(
            f"num_restarts must be an int >= 1, got {num_restarts!r}; for a comparison at equal "
            "compute with C persistent chains of N iterations use num_restarts = C * (N + 1)."
        )
    keys = jax.random.split(key, int(num_restarts))
    inits = jax.vmap(init_fn)(keys)
    states = None
    if stateful:
        if not (isinstance(inits, tuple) and len(inits) == 2):
            raise ValueError(
                "with stateful=True init_fn(key) must return (params, model_state), got "
                f"{type(inits).__name__}; return both, or pass stateful=False."
            )
        inits, states = inits
    res = run_chains(
        inits,
        loss_fn,
        optimizer,
        iterations=0,
        lam=0.0,
        steps=steps,
        score_fn=score_fn,
        key=keys,
        data=data,
        batch_size=batch_size,
        epochs=epochs,
        log_every=log_every,
        mesh=mesh,
        push_diverged=True,
        jit=jit,
        model_state=states,
    )
    h = res.history
    scores, diverged = h["score"][:, 0], h["diverged"][:, 0]
    finite = np.where(diverged, np.inf, scores)
    best = int(np.argmin(finite)) if np.isfinite(finite).any() else -1
    trained = jax.tree_util.tree_map(lambda a: a[:, 0], res.bank.anchors)
    # push_diverged=True: slot 0 of each bank holds that restart's trained params, finite or not
    return RestartsResult(
        champion=jax.tree_util.tree_map(lambda a: a[max(best, 0)], res.champion),
        champion_index=best,
        scores=scores,
        losses=h["loss"][:, 0],
        diverged=diverged,
        curves=h["curve"][:, 0],
        params=trained,
        init_params=inits,
        champion_state=None
        if states is None
        else jax.tree_util.tree_map(lambda a: a[max(best, 0)], res.champion_state),
    )
