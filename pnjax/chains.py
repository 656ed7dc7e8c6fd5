"""Many persistent chains: ``jax.vmap`` of Algorithm 1's pieces, sharded over devices.

A *chain* is one run of Algorithm 1 (:func:`pnjax.persistent_fit`): a plain run from its
initialization θ⁰_c, then ``iterations`` persistent runs from the same θ⁰_c, each repelled from
the solutions pushed before it. :func:`run_chains` runs ``C`` chains at once. Every leaf of
``init_params`` carries a leading chain axis of length ``C``; chains may differ in their
initialization, their λ, their layer choice (every layer, a set of layers, or a random layer
per iteration) and their data order (their PRNG key).

The pieces are those of :func:`pnjax.persistent_fit` (the run, the drivers, the bookkeeping,
the layer schedule, checkpoints), vmapped over chains. With the ``'scan'`` driver all chains
and all iterations are one ``jax.jit`` program, a ``fori_loop`` over iterations whose body is
``vmap`` over chains of one training run (itself a ``lax.scan`` over steps) followed by the push
of the new solutions and the championship update; it is compiled once per call, whatever the
number of iterations, and runs one iteration per call when checkpoints or a callback need the
host between iterations.

Two modes:

- ``'independent'``: chain ``c`` has its own bank; it computes exactly what
  ``persistent_fit(init_params[c], ..., lam=lam[c], key=keys[c])`` computes (up to float
  rounding).
- ``'population'``: iterations become *rounds*; in round ``r`` every chain trains from its own
  θ⁰_c against ONE shared bank holding every non-diverged solution any chain reached in rounds
  ``< r``, i.e. it minimizes

      L(θ) + λ_c Σ_{r'<r} Σ_{c'} Σ_l m_l |Θ_{r',c'}^l · θ^l| / ||Θ_{r',c'}^l||²,

  and all ``C`` new solutions are pushed at the end of the round (after ``r`` rounds the bank
  holds ``r · C`` anchors when nothing diverged).

With a ``jax.sharding.Mesh`` the chain axis is split over the mesh's devices
(``NamedSharding(mesh, PartitionSpec(axes))``); the program is the same, XLA partitions it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax import algorithm, programs
from pnjax._checks import check_driver_args, check_score_fn
from pnjax.anchors import AnchorBank
from pnjax.config import (
    MODES,
    Config,
    capacity_setting,
    lam_setting,
    make_config,
    schedule_fingerprint,
    schedule_values,
)
from pnjax.drivers import default_jit, resolve_loop
from pnjax.layers import layer_names
from pnjax.loop import starting_bank
from pnjax.results import ChainsResult, chains_result
from pnjax.resume import Checkpoints, fingerprint, open_checkpoints, run_loop
from pnjax.run import make_train_run
from pnjax.schedule import chain_schedules

__all__ = ["MODES", "ChainsResult", "PreparedChains", "num_chains", "prepare_chains", "run_chains"]

PyTree = Any


class PreparedChains(NamedTuple):
    """What :func:`prepare_chains` returns: ``compiled(*args)`` then ``finish(outputs)``."""

    compiled: Callable[..., Any]
    args: tuple[Any, ...]
    finish: Callable[[Any], ChainsResult]


# ----------------------------------------------------------------------------- input checks


def num_chains(init_params: PyTree) -> int:
    """The common leading (chain) axis length of every leaf of ``init_params``.

    Raises:
      ValueError: no leaves, a scalar leaf, or leading axes that disagree.
    """
    leaves = jax.tree_util.tree_leaves(init_params)
    if not leaves:
        raise ValueError("init_params has no array leaves; pass a pytree of [C, ...] arrays.")
    shapes = [tuple(np.shape(x)) for x in leaves]
    if any(len(s) == 0 for s in shapes):
        raise ValueError(
            "every leaf of init_params needs a leading chain axis, but some are scalars; stack "
            "the chains' params, e.g. jax.tree_util.tree_map(lambda *x: jnp.stack(x), *inits), "
            "or broadcast one init with jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, "
            "(C, *x.shape)), params)."
        )
    lead = sorted({s[0] for s in shapes})
    if len(lead) != 1:
        raise ValueError(
            f"the leaves of init_params have different leading (chain) axes {lead} (shapes "
            f"{shapes}); every leaf needs the same number of chains C as its first axis."
        )
    return lead[0]


def _check_state_chains(model_state: PyTree, c: int) -> None:
    """Every leaf of ``model_state`` needs the leading chain axis ``[C, ...]`` of the params."""
    shapes = [tuple(np.shape(x)) for x in jax.tree_util.tree_leaves(model_state)]
    bad = [s for s in shapes if len(s) == 0 or s[0] != c]
    if bad:
        raise ValueError(
            f"every leaf of model_state needs the leading chain axis of init_params ({c} "
            f"chains), got leaf shapes {shapes}; stack the chains' states like their params, or "
            f"broadcast one with jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, ({c}, "
            "*x.shape)), state)."
        )


def _chain_keys(key: Any, c: int) -> jax.Array:
    """``[C]`` typed keys: a given per-chain batch, or ``split(key, C)`` of one key."""
    if key is None:
        key = jax.random.key(0)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not typed:
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, c)
    if key.shape != (c,):
        raise ValueError(
            f"key has batch shape {key.shape}, but there are {c} chains; pass one key (it is "
            f"split into {c}) or a batch of {c} keys, e.g. jax.random.split(key, {c})."
        )
    return key


def _mesh_axes(mesh: jax.sharding.Mesh, chain_axes: str | Sequence[str] | None) -> tuple:
    if chain_axes is None:
        return tuple(mesh.axis_names)
    axes = (chain_axes,) if isinstance(chain_axes, str) else tuple(chain_axes)
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
        raise ValueError(
            f"chain_axes {unknown} are not axes of the mesh {tuple(mesh.axis_names)}; pass "
            "some of the mesh's axis names (default: all of them)."
        )
    return axes


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class _Chains:
    """Everything :func:`run_chains` and :func:`prepare_chains` share."""

    plan: algorithm.Plan
    compiled: Callable[..., Any]
    args: tuple[Any, ...]
    finish: Callable[[Any], ChainsResult]
    config: Config
    checkpoints: Checkpoints | None
    has_state: bool
    c: int


def _prepare(init_params, loss_fn, optimizer, *, iterations, lam, steps=None, layers=None,
             score_fn=None, key=None, mode="independent", mesh=None, chain_axes=None,
             layer_draw="once", capacity=None, data=None, batch_size=None, epochs=None,
             shuffle="same", log_every=None, push_diverged=False, jit=None, loop="auto",
             model_state=None, anchor_fn=None, checkpoint_dir=None, checkpoint_keep=2,
             checkpoint_every_epochs=None, chain_layers=None,
             init_bank=None) -> _Chains:  # fmt: skip
    """Checks the arguments and builds the chains' program (see :func:`run_chains`)."""
    c = num_chains(init_params)
    one = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], jnp.result_type(x)), init_params
    )
    check_driver_args(loss_fn, optimizer, data=data, model_state=model_state, jit=jit,
                      params=one, mesh=mesh)  # fmt: skip
    cfg = make_config(
        iterations=iterations, lam=lam, steps=steps, data=data, batch_size=batch_size,
        epochs=epochs, shuffle=shuffle, layer_draw=layer_draw, capacity=capacity, mode=mode,
        push_diverged=push_diverged, checkpoint_dir=checkpoint_dir,
        checkpoint_every_epochs=checkpoint_every_epochs, checkpoint_keep=checkpoint_keep,
        chains=c, start_count=_bank_count(init_bank),
    )  # fmt: skip
    has_state = model_state is not None
    if has_state:
        _check_state_chains(model_state, c)
    state0 = jax.tree_util.tree_map(jnp.asarray, model_state) if has_state else ()
    keys = _chain_keys(key, c)
    template = jax.tree_util.tree_map(lambda x: jnp.zeros(np.shape(x)[1:], x.dtype), init_params)
    names = layer_names(template)
    check_score_fn(score_fn, template, jax.tree_util.tree_map(lambda x: x[0], model_state))
    masks, idx = chain_schedules(
        names, layers, layer_draw, cfg.iterations + 1, keys, c, chain_layers=chain_layers
    )
    settings = dict(steps=steps, data=data, batch_size=batch_size, epochs=epochs,
                    log_every=log_every, has_state=has_state)  # fmt: skip
    run = make_train_run(loss_fn, optimizer, score_fn=score_fn, **settings)
    if cfg.lam_schedule is not None:
        schedule_values(cfg.lam_schedule, run.total_steps)
    kind = resolve_loop(
        loop, loss_fn=loss_fn, template=template, data=data, every=cfg.every, epochs=epochs,
        model_state=jax.tree_util.tree_map(lambda x: x[0], model_state), mesh=mesh,
    )  # fmt: skip
    padded, put, constrain = _placement(mesh, chain_axes, c)
    population = mode == "population"

    def pad(x):
        x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
        if padded == c:
            return x
        return jnp.concatenate([x, jnp.repeat(x[:1], padded - c, axis=0)], axis=0)

    bank0 = None
    if init_bank is not None:
        bank0 = starting_bank(init_bank, template, cfg.capacity)
        if not population:  # every chain starts from the same anchors
            bank0 = jax.tree_util.tree_map(
                lambda x: put(jnp.broadcast_to(x, (padded, *jnp.shape(x)))), bank0
            )
    chained = (init_params, cfg.lam, masks, keys)
    args = tuple(jax.tree_util.tree_map(lambda x: put(pad(x)), chained))
    active = put(jnp.asarray(np.arange(padded) < c))  # padding chains never push
    args += (active, jax.tree_util.tree_map(lambda x: put(pad(x)), state0))
    args += (algorithm.device_data(data), bank0)
    compiler = jit or default_jit()

    def build():
        weak = programs.weak_run(loss_fn, optimizer, score_fn, cfg.lam_schedule, **settings)
        return algorithm.chain_programs(
            weak, loop=kind, jit=compiler, iterations=cfg.iterations, capacity=cfg.capacity,
            shuffle=shuffle, every=cfg.every, population=population,
            anchor_fn=programs.weak_callable(anchor_fn), push_diverged=cfg.push_diverged,
            constrain=constrain, start_bank=bank0 is not None,
        )  # fmt: skip

    users = (loss_fn, optimizer.init, optimizer.update, score_fn, anchor_fn, cfg.lam_schedule,
             compiler)  # fmt: skip
    static = (kind, cfg.iterations, cfg.capacity, shuffle, cfg.every, population,
              cfg.push_diverged, mesh, _axes_key(chain_axes), bank0 is not None,
              programs.run_signature(run))  # fmt: skip
    pieces = programs.cached("chains", users, static, build)
    plan = algorithm.many_chains(pieces, args, cfg.iterations)
    if kind == "scan":
        compiled = pieces.whole
    else:

        def compiled(*a):
            return run_loop(plan.template, plan.advance, iterations=cfg.iterations,
                            checkpoints=None, callback=None, has_state=has_state)[0]  # fmt: skip

    def finish(state) -> ChainsResult:
        return chains_result(state, c=c, layer=idx, names=names, mode=mode, has_state=has_state,
                             masks=masks)  # fmt: skip

    config = {
        "driver": "run_chains", "lam": lam_setting(lam), "mode": mode, "steps": steps,
        "epochs": epochs, "batch_size": batch_size, "log_every": log_every,
        "capacity": capacity_setting(capacity), "shuffle": shuffle, "push_diverged": push_diverged,
        "num_args_chains": c, "anchor_fn": anchor_fn is not None,
        "checkpoint_every_epochs": cfg.every,
    }  # fmt: skip
    checkpoints = open_checkpoints(
        cfg.folder,
        lambda: fingerprint(
            config, init_params=init_params,
            keys=np.asarray(jax.random.key_data(keys)), data=data,
            model_state=model_state, optimizer=optimizer, params=template,
            init_bank=None if init_bank is None else {
                "anchors": init_bank.anchors, "count": init_bank.count
            },
            lam_schedule=schedule_fingerprint(cfg, run.total_steps),
            runs={"lam": np.swapaxes(cfg.lam, 0, 1), "layer_masks": np.swapaxes(masks, 0, 1)},
        ),
        keep=cfg.keep, every=cfg.every, epochs=epochs, chunked=kind == "chunked", lock=cfg.lock,
        rows=cfg.iterations + 1, capacity=cfg.capacity,
    )  # fmt: skip
    return _Chains(plan, compiled, args, finish, cfg, checkpoints, has_state, c)


def _bank_count(bank: Any) -> int:
    """How many anchors an ``init_bank`` holds (0 for ``None`` or a non-bank: checked later)."""
    count = getattr(bank, "count", 0)
    return int(np.max(np.asarray(count))) if np.size(count) else 0


def _axes_key(chain_axes: Any) -> Any:
    return tuple(chain_axes) if isinstance(chain_axes, (list, tuple)) else chain_axes


def _placement(mesh, chain_axes, c):
    """``(padded C, put, constrain)``: the chain axis padded to a multiple of the mesh's device
    count and split over it (identity without a mesh)."""
    if mesh is None:
        return c, jnp.asarray, lambda t: t
    axes = _mesh_axes(mesh, chain_axes)
    shards = int(np.prod([mesh.shape[a] for a in axes]))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))

    def constrain(t):
        return jax.tree_util.tree_map(lambda x: jax.lax.with_sharding_constraint(x, sharding), t)

    return -(-c // shards) * shards, lambda x: jax.device_put(x, sharding), constrain


def _chain_callback(callback, c):
    """The callback with every per-chain entry cut to the ``C`` real chains (no padding)."""
    if callback is None:
        return None

    def call(n, info):
        cut = {k: v if k == "resumed" else jax.tree_util.tree_map(lambda x: x[:c], v)
               for k, v in info.items()}  # fmt: skip
        return callback(n, cut)

    return call


# ----------------------------------------------------------------------------- the drivers


def run_chains(
    init_params: PyTree,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    iterations: int,
    lam: float | Sequence[float] | jax.Array | Callable[[Any], Any],
    steps: int | None = None,
    layers: Any = None,
    score_fn: Callable[[PyTree], jax.Array] | None = None,
    key: jax.Array | None = None,
    mode: str = "independent",
    mesh: jax.sharding.Mesh | None = None,
    chain_axes: str | Sequence[str] | None = None,
    layer_draw: str = "once",
    capacity: int | None = None,
    data: PyTree | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    shuffle: str = "same",
    log_every: int | None = None,
    push_diverged: bool = False,
    jit: Callable[..., Any] | None = None,
    loop: str = "auto",
    checkpoint_dir: str | os.PathLike[str] | None = None,
    checkpoint_keep: int = 2,
    model_state: PyTree = None,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None = None,
    callback: Callable[[int, dict[str, Any]], None] | None = None,
    checkpoint_every_epochs: int | None = None,
    chain_layers: Any = None,
    init_bank: AnchorBank | None = None,
) -> ChainsResult:
    """Runs ``C`` persistent chains (Algorithm 1 each, or a population) in one compiled program.

    Chain ``c`` starts every run from θ⁰_c = ``init_params[c]``; its run ``n`` minimizes

        L(θ) + λ_c Σ_{k ∈ bank} Σ_l m_{c,n,l} |Θ_k^l · θ^l| / ||Θ_k^l||²

    where the bank is the chain's own solutions of runs ``< n`` (``mode='independent'``, Eq. 4 /
    Eq. 5 as in :func:`pnjax.persistent_fit`) or every chain's solutions of rounds ``< n``
    (``mode='population'``), and ``m_{c,n}`` selects the penalized layers.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, pnjax
      >>> from pnjax.experiments.toy2d import toy_loss, TOY_START
      >>> starts = jnp.stack([TOY_START, TOY_START + 0.1])            # C = 2 chains, [2, 2]
      >>> res = pnjax.run_chains(starts, toy_loss, optax.sgd(1e-3), iterations=1,
      ...                        lam=jnp.array([0.1, 0.0]), steps=50_000)
      >>> res.champion_iteration.tolist()   # λ = 0 never escapes (the rerun ties, not better)
      [1, 0]

    Args:
      init_params: params pytree whose every leaf has a leading chain axis ``[C, ...]``.
      loss_fn: ``loss_fn(params) -> scalar`` for one chain's params (full batch), or
        ``loss_fn(params, batch)`` with ``data``; with ``model_state``: ``loss_fn(params,
        state) -> (loss, new_state)`` or ``loss_fn(params, state, batch) -> (loss,
        new_state)`` for one chain's params and state.
      optimizer: any Optax transformation; re-initialized for every run of every chain
        (``value``/``grad``/``value_fn`` for ``L + P`` as in :func:`pnjax.persistent_fit`).
      iterations: N, persistent runs (rounds, in population mode) after the plain one.
      lam: λ >= 0: a scalar; a ``[C]`` array (one λ per chain); a ``[C, N]`` or ``[1, N]``
        array (λ per chain and persistent iteration ``1..N``; ``N + 1`` columns give run 0's
        too, else run 0 takes iteration 1's); or a schedule ``count -> λ`` (e.g.
        ``optax.linear_schedule(0.0, 0.01, steps)``) shared by every chain and evaluated at
        every update inside the compiled run, ``count`` restarting from 0 with every run (as
        the re-initialized optimizer's own schedules do). ``history['lam']`` records the λ of
        each run's last update.
      steps: updates per run (full-batch form).
      layers: one choice for every chain, meaning what it means in
        :func:`pnjax.persistent_fit`: ``None`` (every layer, Eq. 4), a layer name or a set of
        names (a tuple or list: penalized together), ``'random'`` (a layer drawn from each
        chain's key, see ``layer_draw``), an int index or an int array ``[N + 1]``.
      chain_layers: one choice per chain instead: a list of ``C`` such choices, or an int
        array ``[C]`` / ``[C, N + 1]`` of layer indices (-1: every layer).
      score_fn: ``score_fn(params) -> scalar`` (``score_fn(params, state)`` with
        ``model_state``), lower is better (validation); default: the loss (with the run's
        final state).
      key: one PRNG key (split into ``C`` chain keys) or a batch ``[C]`` of keys; chain ``c``'s
        key draws its random layers and its mini-batch order exactly as ``persistent_fit(...,
        key=keys[c])`` does.
      mode: ``'independent'`` or ``'population'``.
      mesh: a ``jax.sharding.Mesh``; the chain axis is split over ``chain_axes`` (default: all
        mesh axes). ``C`` is padded with inactive copies up to a multiple of the device count.
      chain_axes: mesh axis name(s) the chain axis is split over.
      layer_draw: with random layers: ``'once'`` (one layer per chain) or ``'per_iteration'``.
      capacity: bank capacity; default ``N + 1`` (independent) or ``(N + 1) · C`` (population).
      data, batch_size, epochs: the mini-batch form (``data`` is shared by all chains; each
        chain's key sets its order), as in :func:`pnjax.make_train_run`.
      shuffle: ``'same'`` (a chain sees one order in every run) or ``'per_iteration'``.
      log_every: training-loss recording period (full batch).
      push_diverged: also push runs whose loss or params are not finite (default: never).
      jit: the compiler (default :func:`pnjax._compile.jit`, ``jax.jit`` plus CPU options).
      loop: ``'scan'`` (all chains and iterations as one compiled program), ``'python'``
        (a compiled update, vmapped over chains, called from Python: same results, much
        faster for convolutional models on XLA:CPU) or ``'auto'`` (default: ``'python'`` on a
        CPU when the loss contains a convolution and no ``mesh`` is given, else ``'scan'``).
      checkpoint_dir: a folder to checkpoint into after every iteration (round); a folder
        holding a checkpoint of the same configuration is resumed from, one of another
        configuration is refused (``ValueError``). The same compiled loop then runs one
        iteration per call, so a resumed run equals an uninterrupted one bit for bit on CPU.
      checkpoint_keep: how many checkpoints to keep (default 2).
      model_state: the chains' initial model states (e.g. Flax ``batch_stats``), every leaf
        ``[C, ...]`` like ``init_params``, or ``None`` (no state). Every run of chain ``c``
        restarts from ``init_params[c]`` and ``model_state[c]``; the state is threaded
        through the steps by ``loss_fn`` and never penalized or pushed (see
        :func:`pnjax.persistent_fit`).
      anchor_fn: ``anchor_fn(params, key) -> params`` (traceable, for one chain) transforms
        what chain ``c`` pushes after run ``n``; its key is ``fold_in(keys[c], 1000 + n)``, as
        in :func:`pnjax.persistent_fit`. Default: the converged params.
      callback: called after each iteration (round) with ``(iteration, info)``; ``info`` holds
        ``[C]`` arrays ``score``, ``loss``, ``diverged``, ``champion_iteration`` and the
        chains' final ``params`` (and ``model_state``), every leaf ``[C, ...]``. On resume it
        is replayed for the restored iterations with ``info['resumed'] = True``. The
        iterations then run one compiled call each (the same compilation).
      checkpoint_every_epochs: mini-batch form only: also checkpoint the chains' training
        state every this many epochs inside an iteration (compiled as chunks of epochs).
      init_bank: an :class:`pnjax.AnchorBank` of one model's params (e.g. an earlier
        result's ``chain(c).bank``) to start from: every chain's bank (the shared bank in
        population mode) starts with its anchors, so run 0 is penalized too. The default
        capacity grows by its count.

    The compiled programs are kept across calls (:mod:`pnjax.programs`): a call with the same
    ``loss_fn``, optimizer, ``score_fn``, ``anchor_fn`` and λ schedule *objects* and the same
    settings and argument shapes compiles nothing, whatever its λ values, keys, init params or
    data. Pass the same optimizer object; sweep learning rates with
    ``optax.inject_hyperparams``.

    Returns:
      A :class:`ChainsResult` (``champion_state``: each chain's championship state).

    Raises:
      ValueError: leading axes that disagree, ``lam`` or ``key`` of the wrong length, an unknown
        ``mode``, ``layers``, ``shuffle`` or ``layer_draw``, a ``layers`` list or int array
        that reads as one choice per chain (use ``chain_layers``), a bad ``capacity``, steps
        or data,
        a ``model_state`` without the chain axis, or a ``loss_fn`` whose output does not fit
        ``model_state``.
      TypeError: as :func:`pnjax.persistent_fit`, and a ``mesh`` that is not a
        ``jax.sharding.Mesh``.

    References:
      Min, *Persistent Neurons*, arXiv:2007.01419, Algorithm 1.
    """
    p = _prepare(
        init_params, loss_fn, optimizer, iterations=iterations, lam=lam, steps=steps,
        layers=layers, score_fn=score_fn, key=key, mode=mode, mesh=mesh, chain_axes=chain_axes,
        layer_draw=layer_draw, capacity=capacity, data=data, batch_size=batch_size,
        epochs=epochs, shuffle=shuffle, log_every=log_every, push_diverged=push_diverged,
        jit=jit, loop=loop, model_state=model_state, anchor_fn=anchor_fn,
        checkpoint_dir=checkpoint_dir, checkpoint_keep=checkpoint_keep,
        checkpoint_every_epochs=checkpoint_every_epochs, chain_layers=chain_layers,
        init_bank=init_bank,
    )  # fmt: skip
    state, resumed = run_loop(
        p.plan.template, p.plan.advance, iterations=p.config.iterations,
        checkpoints=p.checkpoints, callback=_chain_callback(callback, p.c),
        has_state=p.has_state, partial_like=p.plan.partial_like, fused=p.plan.fused,
    )  # fmt: skip
    return dataclasses.replace(p.finish(state), resumed_from=resumed)


def prepare_chains(
    init_params: PyTree,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    iterations: int,
    lam: float | Sequence[float] | jax.Array | Callable[[Any], Any],
    steps: int | None = None,
    layers: Any = None,
    score_fn: Callable[[PyTree], jax.Array] | None = None,
    key: jax.Array | None = None,
    mode: str = "independent",
    mesh: jax.sharding.Mesh | None = None,
    chain_axes: str | Sequence[str] | None = None,
    layer_draw: str = "once",
    capacity: int | None = None,
    data: PyTree | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    shuffle: str = "same",
    log_every: int | None = None,
    push_diverged: bool = False,
    jit: Callable[..., Any] | None = None,
    loop: str = "auto",
    model_state: PyTree = None,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None = None,
    chain_layers: Any = None,
    init_bank: AnchorBank | None = None,
) -> PreparedChains:
    """:func:`run_chains` split in two: the jitted program, its arguments, and the unpacker.

    ``compiled, args, finish = prepare_chains(...)`` then ``finish(compiled(*args))`` is
    ``run_chains(...)``. Calling ``compiled(*args)`` again reuses the compilation, which is what
    a benchmark or an ahead-of-time compile (``compiled.lower(*args).compile()``) needs.

    Args:
      As :func:`run_chains`.

    Returns:
      A :class:`PreparedChains` ``(compiled, args, finish)``: the jitted program, its
      (sharded, padded) arguments, the data and the starting bank (``None`` without
      ``init_bank``) last, and ``finish(outputs) -> ChainsResult``.
    """
    p = _prepare(
        init_params, loss_fn, optimizer, iterations=iterations, lam=lam, steps=steps,
        layers=layers, score_fn=score_fn, key=key, mode=mode, mesh=mesh, chain_axes=chain_axes,
        layer_draw=layer_draw, capacity=capacity, data=data, batch_size=batch_size,
        epochs=epochs, shuffle=shuffle, log_every=log_every, push_diverged=push_diverged,
        jit=jit, loop=loop, model_state=model_state, anchor_fn=anchor_fn,
        chain_layers=chain_layers, init_bank=init_bank,
    )  # fmt: skip
    # the cached program reaches the user's functions weakly; what is handed out holds them
    keep = (loss_fn, optimizer, score_fn, anchor_fn, lam, jit)
    return PreparedChains(_Holding(p.compiled, keep), p.args, p.finish)


class _Holding:
    """A compiled program that keeps the user's objects it was built from alive.

    ``prepare_chains(..., optax.sgd(1e-3), ...)`` with the optimizer written inline must still
    run when called later; calls and attributes (``lower``, ``trace``, ``eval_shape``) go to
    the program.
    """

    def __init__(self, program: Callable[..., Any], keep: tuple[Any, ...]):
        self._program = program
        self._keep = keep

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._program(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._program, name)
