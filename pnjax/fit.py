"""Algorithm 1 for one chain: :func:`persistent_fit`, a thin driver over the shared pieces.

One *iteration* is a full training run from ``init_params`` with a fresh optimizer state,
minimizing ``L(θ) + P_n(θ)`` where ``P_n`` is the persistent penalty over the anchors pushed so
far (none for the plain run, iteration 0). Its converged params are pushed into the bank; the
championship is the iteration with the lowest validation score.

The run (:mod:`pnjax.run`) is compiled once for all iterations, the plain run included; its
arguments are the initial params, the bank, λ, the layer mask, a key and the data. The driver
(:mod:`pnjax.drivers`), the bookkeeping (:mod:`pnjax.loop`), the layer schedule
(:mod:`pnjax.schedule`), checkpoints (:mod:`pnjax.resume`) and the result (:mod:`pnjax.results`)
are shared with :func:`pnjax.run_chains` and :func:`pnjax.persistent_search`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax import algorithm, programs
from pnjax._checks import check_driver_args, check_score_fn
from pnjax.anchors import AnchorBank
from pnjax.config import (
    capacity_setting,
    lam_setting,
    make_config,
    schedule_fingerprint,
    schedule_values,
)
from pnjax.drivers import choose_loop, python_loop_run, resolve_loop
from pnjax.drivers import default_jit as _default_jit
from pnjax.layers import layer_names
from pnjax.loop import starting_bank
from pnjax.results import FitResult, fit_result
from pnjax.resume import checkpoint_scope, fingerprint, open_checkpoints, run_loop
from pnjax.run import make_train_run
from pnjax.schedule import layer_schedule

__all__ = [
    "FitResult",
    "checkpoint_scope",
    "choose_loop",
    "make_train_run",
    "persistent_fit",
    "python_loop_run",
]

PyTree = Any
LayerChoice = None | str | Sequence[str] | jax.Array


def persistent_fit(
    init_params: PyTree,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    iterations: int,
    lam: float | Sequence[float] | Callable[[Any], Any],
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
    init_bank: AnchorBank | None = None,
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
      optimizer: any Optax transformation; re-initialized for every run. One whose update
        takes ``value``/``grad``/``value_fn`` (``optax.lbfgs``) gets them for ``L + P``; see
        ``docs/own_loop.md``.
      iterations: N, the number of persistent runs after the plain run.
      lam: λ >= 0: a float; a sequence of ``iterations`` values (``λ_n`` for persistent
        iteration ``n = 1..N``; run 0 takes ``λ_1``) or ``iterations + 1`` (``λ_0..λ_N``); or
        a schedule ``count -> λ`` (e.g. ``optax.linear_schedule(0.0, 0.01, steps)``)
        evaluated at every update inside the compiled run, ``count`` being the update's index
        within the current run (restarting from 0 with every run, like the schedules of the
        optimizer, which is re-initialized for every run). ``history['lam']`` records the λ
        of each run's last update.
      steps: updates per run (full-batch form).
      layers: ``None`` (full model, Eq. 4), a layer name or a set of names (a tuple or list,
        penalized together), or ``'random'`` (partial model, Eq. 5: one layer drawn from
        ``key``). ``history['layer_mask']`` records the penalized layers of every run.
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
      init_bank: an :class:`pnjax.AnchorBank` (e.g. an earlier result's ``bank``) to start
        from: its anchors are in the bank from run 0 on (so run 0 is penalized too), and the
        default capacity grows by their count.

    The compiled programs are kept across calls (:mod:`pnjax.programs`): a second call with
    the same ``loss_fn``, optimizer, ``score_fn``, ``anchor_fn`` and λ schedule *objects* and
    the same settings and argument shapes compiles nothing, whatever its λ, key, init params
    or data (mini-batch form). Pass the same optimizer object; sweep learning rates with
    ``optax.inject_hyperparams``.

    Returns:
      A :class:`FitResult` (``champion_state`` holds the championship run's final state).

    Raises:
      ValueError: bad ``iterations``, ``steps``, ``lam``, ``layers``, ``capacity`` or data, a
        ``checkpoint_dir`` holding a run of a different configuration, or a ``loss_fn`` whose
        output does not fit ``model_state`` (a ``(loss, state)`` pair shaped like
        ``model_state`` with it, a scalar without it).
      TypeError: a ``loss_fn`` that cannot be called as the driver calls it, an optimizer that
        is not a transformation (``optax.adam`` uncalled), a ``jit`` that is not callable.

    References:
      Min, *Persistent Neurons*, arXiv:2007.01419, Algorithm 1.
    """
    check_driver_args(loss_fn, optimizer, data=data, model_state=model_state, jit=jit,
                      params=init_params)  # fmt: skip
    cfg = make_config(
        iterations=iterations, lam=lam, steps=steps, data=data, batch_size=batch_size,
        epochs=epochs, shuffle=shuffle, layer_draw=layer_draw, capacity=capacity,
        push_diverged=push_diverged, checkpoint_dir=checkpoint_dir,
        checkpoint_every_epochs=checkpoint_every_epochs, checkpoint_keep=checkpoint_keep,
        start_count=0 if init_bank is None else _count(init_bank),
    )  # fmt: skip
    names = layer_names(init_params)
    masks, layer_idx = layer_schedule(names, layers, layer_draw, cfg.iterations + 1, key)
    key = jax.random.key(0) if key is None else key
    has_state = model_state is not None
    state0 = jax.tree_util.tree_map(jnp.asarray, model_state) if has_state else ()
    check_score_fn(score_fn, init_params, model_state)
    settings = dict(steps=steps, data=data, batch_size=batch_size, epochs=epochs,
                    log_every=log_every, has_state=has_state)  # fmt: skip
    run = make_train_run(loss_fn, optimizer, score_fn=score_fn, **settings)
    if cfg.lam_schedule is not None:
        schedule_values(cfg.lam_schedule, run.total_steps)
    kind = resolve_loop(loop, loss_fn=loss_fn, template=init_params, data=data,
                        model_state=model_state, every=cfg.every, epochs=epochs)  # fmt: skip
    jit = jit or _default_jit()

    def build():
        weak = programs.weak_run(loss_fn, optimizer, score_fn, cfg.lam_schedule, **settings)
        return weak, algorithm.one_chain_programs(
            weak, loop=kind, jit=jit, record_jit=_default_jit(), every=cfg.every,
            anchor_fn=programs.weak_callable(anchor_fn), push_diverged=cfg.push_diverged,
        )  # fmt: skip

    users = (loss_fn, optimizer.init, optimizer.update, score_fn, anchor_fn, cfg.lam_schedule, jit)
    static = (kind, cfg.every, cfg.push_diverged, programs.run_signature(run))
    weak_run, pieces = programs.cached("fit", users, static, build)
    bank0 = None
    if init_bank is not None:
        bank0 = starting_bank(init_bank, init_params, cfg.capacity)
    plan = algorithm.one_chain(
        weak_run, pieces, params0=init_params, model_state0=state0, lam=cfg.lam, masks=masks,
        key=key, data=algorithm.device_data(data), iterations=cfg.iterations,
        capacity=cfg.capacity, shuffle=shuffle, bank=bank0,
    )  # fmt: skip
    config = {
        "driver": "persistent_fit", "lam": lam_setting(lam),
        "steps": steps, "epochs": epochs, "batch_size": batch_size, "log_every": log_every,
        "layers": None if isinstance(layers, (jax.Array, np.ndarray)) else layers,
        "layer_draw": layer_draw, "capacity": capacity_setting(capacity), "shuffle": shuffle,
        "push_diverged": push_diverged, "anchor_fn": anchor_fn is not None,
        "checkpoint_every_epochs": cfg.every,
    }  # fmt: skip
    checkpoints = open_checkpoints(
        cfg.folder,
        lambda: fingerprint(
            config, init_params=init_params, key=key, data=data,
            model_state=model_state, optimizer=optimizer, params=init_params,
            init_bank=None if init_bank is None else {
                "anchors": init_bank.anchors, "count": init_bank.count
            },
            lam_schedule=schedule_fingerprint(cfg, run.total_steps),
            runs={"lam": cfg.lam, "layer_mask": masks},
        ),
        keep=cfg.keep, every=cfg.every, epochs=epochs, chunked=kind == "chunked", lock=cfg.lock,
        rows=cfg.iterations + 1, capacity=cfg.capacity,
    )  # fmt: skip
    state, resumed = run_loop(
        plan.template, plan.advance, iterations=cfg.iterations, checkpoints=checkpoints,
        callback=callback, has_state=has_state, partial_like=plan.partial_like,
    )  # fmt: skip
    return fit_result(
        state, layer=layer_idx, masks=masks, names=names, resumed_from=resumed,
        has_state=has_state,
    )


def _count(bank: Any) -> int:
    """How many anchors an ``init_bank`` holds (0 for a non-bank: checked later)."""
    count = getattr(bank, "count", 0)
    return int(np.max(np.asarray(count))) if np.size(count) else 0
