"""Algorithm 1 assembled from its pieces, for one chain and for ``C`` chains.

Iteration ``n`` of a chain trains from its initialization against the bank (a driver of
:mod:`pnjax.drivers` runs the :class:`pnjax.run.TrainRun`) and then records the run
(:func:`pnjax.loop.after_run`). One chain is an unbatched program: each run is its own compiled
call and the bookkeeping a second one. ``C`` chains are ``jax.vmap`` of the same pieces (or the
population variant of the bookkeeping), either one compiled program over all iterations (a
``fori_loop`` whose bounds are arguments, so one iteration at a time reuses the compilation) or
a host loop over iterations around a vmapped driver.

The compiled pieces (:func:`one_chain_programs`, :func:`chain_programs`) hold no value of a
call, only the run and static settings, so the drivers keep them across calls
(:mod:`pnjax.programs`). :func:`one_chain` and :func:`many_chains` then make a :class:`Plan`
from the pieces and the call's values: the state template, ``advance`` for one iteration,
optionally ``fused`` for all of them, and the template of a mid-iteration carry, which
:func:`pnjax.resume.run_loop` drives.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pnjax.anchors import AnchorBank
from pnjax.drivers import make_driver
from pnjax.loop import LoopState, after_round, after_run, data_key, init_state
from pnjax.run import TrainRun

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`pnjax.resume.run_loop` needs (see the module docstring)."""

    template: Callable[[bool], LoopState]
    advance: Callable[..., LoopState]
    partial_like: Callable[[], PyTree]
    fused: Callable[[LoopState], LoopState] | None = None


def one_chain_programs(
    run: TrainRun,
    *,
    loop: str,
    jit: Callable[..., Any],
    record_jit: Callable[..., Any],
    every: int | None,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None,
    push_diverged: bool,
) -> tuple[Callable[..., Any], Callable[..., LoopState]]:
    """One chain's compiled pieces ``(drive, after)``: the driver named by ``loop`` compiled
    with ``jit`` (one call per run with ``'scan'``), the bookkeeping with ``record_jit``. They
    depend on no value of a call (params, λ, keys, bank, data are arguments), so a driver may
    keep them across calls (:mod:`pnjax.programs`)."""
    drive = make_driver(run, loop, jit, every=every)
    after = record_jit(
        functools.partial(after_run, anchor_fn=anchor_fn, push_diverged=push_diverged)
    )
    return drive, after


def one_chain(
    run: TrainRun,
    programs: tuple[Callable[..., Any], Callable[..., LoopState]],
    *,
    params0: PyTree,
    model_state0: PyTree,
    lam: np.ndarray,
    masks: np.ndarray,
    key: jax.Array,
    data: PyTree,
    iterations: int,
    capacity: int,
    shuffle: str,
    bank: AnchorBank | None = None,
) -> Plan:
    """One chain with the pieces of :func:`one_chain_programs`; ``lam`` ``[N + 1]`` and
    ``masks`` ``[N + 1, L]`` give run ``n``'s λ and layer mask; ``bank``: the anchors to start
    from (default: an empty bank)."""
    drive, after = programs
    shapes = run.metric_shapes()

    def template(keep_finals: bool) -> LoopState:
        return init_state(
            params0, model_state0, shapes, iterations=iterations, capacity=capacity,
            keep_finals=keep_finals, bank=bank,
        )  # fmt: skip

    def advance(state, n, resume=None, on_chunk=None):
        dkey = data_key(key, n, shuffle)
        (params, ms), metrics = drive(
            params0, state.bank, lam[n], masks[n], dkey, model_state0, data, resume, on_chunk
        )
        return after(state, n, params, ms, metrics, key)

    return Plan(template, advance, lambda: run.start(params0, model_state0))


@dataclasses.dataclass(frozen=True, eq=False)
class ChainPrograms:
    """``C`` chains' compiled pieces (see :func:`chain_programs`); none holds a value of a call.

    Attributes:
      loop: the driver.
      init: ``{keep_finals: init(*args)}``, the initial state, compiled.
      program: ``program(state, start, stop, *args)`` runs iterations ``start <= n < stop``
        (compiled; ``'scan'`` only).
      whole: ``whole(*args)`` is the final state of every iteration (compiled; ``'scan'``).
      drive, after, fold, start: the host-loop pieces (``'python'`` and ``'chunked'``).
    """

    loop: str
    init: dict[bool, Callable[..., LoopState]]
    program: Callable[..., LoopState] | None = None
    whole: Callable[..., LoopState] | None = None
    drive: Callable[..., Any] | None = None
    after: Callable[..., LoopState] | None = None
    fold: Callable[..., jax.Array] | None = None
    start: Callable[..., Any] | None = None


def chain_programs(
    run: TrainRun,
    *,
    loop: str,
    jit: Callable[..., Any],
    iterations: int,
    capacity: int,
    shuffle: str,
    every: int | None,
    population: bool,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None,
    push_diverged: bool,
    constrain: Callable[[PyTree], PyTree],
    start_bank: bool = False,
) -> ChainPrograms:
    """``C`` chains' compiled pieces over ``args = (params0, lam, masks, keys, active,
    model_state0, data, bank0)``: every one but ``data`` (and a population's ``bank0``) with a
    leading chain axis; ``lam`` ``[C, N + 1]``, ``masks`` ``[C, N + 1, L]``; ``bank0`` is
    ``None`` unless ``start_bank`` (the anchors every chain starts from)."""
    bank_axis = None if population else 0
    core = jax.vmap(run.core, in_axes=(0, bank_axis, 0, 0, 0, 0, None))

    def init(params0, lam, masks, keys, active, state0, data, bank0, keep_finals=False):
        shapes = run.metric_shapes()
        if start_bank:
            empty = bank0
        else:
            empty = AnchorBank.create(jax.tree_util.tree_map(lambda x: x[0], params0), capacity)

        def make(p, s, b):
            return init_state(
                p, s, shapes, iterations=iterations, capacity=capacity,
                keep_finals=keep_finals, bank=() if population else b,
            )  # fmt: skip

        own = bank0 if start_bank and not population else None
        if own is None:
            state = constrain(jax.vmap(lambda p, s: make(p, s, None))(params0, state0))
        else:
            state = constrain(jax.vmap(make)(params0, state0, own))
        return state.replace(bank=empty) if population else state

    def fold(keys, n):
        return jax.vmap(lambda k: data_key(k, n, shuffle))(keys)

    def train(state, n, params0, lam, masks, keys, active, state0, data, bank0):
        dkeys = fold(keys, n)
        lam_n = jax.lax.dynamic_index_in_dim(lam, n, axis=1, keepdims=False)
        masks_n = jax.lax.dynamic_index_in_dim(masks, n, axis=1, keepdims=False)
        return core(params0, state.bank, lam_n, masks_n, dkeys, state0, data)

    def after(state, n, out, params0, lam, masks, keys, active, state0, data, bank0):
        (params, ms), metrics = out
        return after_round(
            state, n, constrain(params), constrain(ms), metrics, keys, active,
            anchor_fn=anchor_fn, push_diverged=push_diverged, population=population,
        )  # fmt: skip

    def program(state, start, stop, *a):
        body = lambda n, st: after(st, n, train(st, n, *a), *a)  # noqa: E731
        return jax.lax.fori_loop(start, stop, body, state)

    inits = {kf: jit(functools.partial(init, keep_finals=kf)) for kf in (False, True)}
    if loop == "scan":
        return ChainPrograms(
            loop,
            inits,
            program=jit(program),
            whole=jit(lambda *a: program(init(*a), 0, iterations + 1, *a)),
        )
    return ChainPrograms(
        loop,
        inits,
        drive=make_driver(run, loop, jit, every=every, chains=True, bank_axis=bank_axis),
        after=jit(after),
        fold=jit(fold),
        start=jit(jax.vmap(run.start)),
    )


def many_chains(programs: ChainPrograms, args: tuple[Any, ...], iterations: int) -> Plan:
    """``C`` chains' :class:`Plan` from their pieces and the call's ``args`` (see
    :func:`chain_programs`)."""
    pr = programs

    def template(keep_finals: bool) -> LoopState:
        return pr.init[keep_finals](*args)

    if pr.loop == "scan":

        def advance(state, n, resume=None, on_chunk=None):
            return pr.program(state, n, n + 1, *args)

        def fused(state):
            return pr.program(state, 0, iterations + 1, *args)

        return Plan(template, advance, lambda: None, fused)

    params0, lam, masks, keys, active, state0, data, bank0 = args

    def advance(state, n, resume=None, on_chunk=None):
        out = pr.drive(
            params0, state.bank, lam[:, n], masks[:, n], pr.fold(keys, n), state0, data, resume,
            on_chunk,
        )  # fmt: skip
        return pr.after(state, n, out, *args)

    return Plan(template, advance, lambda: pr.start(params0, state0))


def device_data(data: PyTree) -> PyTree:
    """The training data as device arrays, once (each compiled call then takes it as is)."""
    return jax.tree_util.tree_map(jnp.asarray, data)
