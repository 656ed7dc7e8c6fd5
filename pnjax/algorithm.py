"""Algorithm 1 assembled from its pieces, for one chain and for ``C`` chains.

Iteration ``n`` of a chain trains from its initialization against the bank (a driver of
:mod:`pnjax.drivers` runs the :class:`pnjax.run.TrainRun`) and then records the run
(:func:`pnjax.loop.after_run`). One chain is an unbatched program: each run is its own compiled
call and the bookkeeping a second one. ``C`` chains are ``jax.vmap`` of the same pieces (or the
population variant of the bookkeeping), either one compiled program over all iterations (a
``fori_loop`` whose bounds are arguments, so one iteration at a time reuses the compilation) or
a host loop over iterations around a vmapped driver.

Each builder returns a :class:`Plan`: the state template, ``advance`` for one iteration,
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


def one_chain(
    run: TrainRun,
    *,
    loop: str,
    jit: Callable[..., Any],
    record_jit: Callable[..., Any],
    params0: PyTree,
    model_state0: PyTree,
    lam: jax.Array,
    masks: jax.Array,
    key: jax.Array,
    data: PyTree,
    iterations: int,
    capacity: int,
    shuffle: str,
    every: int | None,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None,
    push_diverged: bool,
) -> Plan:
    """One chain: ``loop`` names the driver, compiled with ``jit`` (one call per run with
    ``'scan'``); the bookkeeping is compiled with ``record_jit``."""
    drive = make_driver(run, loop, jit, every=every)
    after = record_jit(
        functools.partial(after_run, anchor_fn=anchor_fn, push_diverged=push_diverged)
    )
    shapes = run.metric_shapes()

    def template(keep_finals: bool) -> LoopState:
        return init_state(
            params0, model_state0, shapes, iterations=iterations, capacity=capacity,
            keep_finals=keep_finals,
        )  # fmt: skip

    def advance(state, n, resume=None, on_chunk=None):
        dkey = data_key(key, n, shuffle)
        (params, ms), metrics = drive(
            params0, state.bank, lam, masks[n], dkey, model_state0, data, resume, on_chunk
        )
        return after(state, n, params, ms, metrics, key)

    return Plan(template, advance, lambda: run.start(params0, model_state0))


def many_chains(
    run: TrainRun,
    *,
    loop: str,
    jit: Callable[..., Any],
    args: tuple[Any, ...],
    iterations: int,
    capacity: int,
    shuffle: str,
    every: int | None,
    population: bool,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None,
    push_diverged: bool,
    constrain: Callable[[PyTree], PyTree],
) -> tuple[Plan, Callable[..., LoopState], Callable[..., LoopState]]:
    """``C`` chains; ``args = (params0, lam, masks, keys, active, model_state0, data)``, every
    one but ``data`` with a leading chain axis.

    Returns:
      ``(plan, init, program)``: ``init(*args)`` is the initial state (unjitted), and
      ``program(state, start, stop, *args)`` runs iterations ``start <= n < stop`` (unjitted).
    """
    bank_axis = None if population else 0
    core = jax.vmap(run.core, in_axes=(0, bank_axis, 0, 0, 0, 0, None))

    def init(params0, lam, masks, keys, active, state0, data, keep_finals=False):
        shapes = run.metric_shapes()
        empty = AnchorBank.create(jax.tree_util.tree_map(lambda x: x[0], params0), capacity)

        def make(p, s):
            return init_state(
                p, s, shapes, iterations=iterations, capacity=capacity,
                keep_finals=keep_finals, bank=() if population else None,
            )  # fmt: skip

        state = constrain(jax.vmap(make)(params0, state0))
        return state.replace(bank=empty) if population else state

    def fold(keys, n):
        return jax.vmap(lambda k: data_key(k, n, shuffle))(keys)

    def train(state, n, params0, lam, masks, keys, active, state0, data):
        dkeys = fold(keys, n)
        masks_n = jax.lax.dynamic_index_in_dim(masks, n, axis=1, keepdims=False)
        return core(params0, state.bank, lam, masks_n, dkeys, state0, data)

    def after(state, n, out, params0, lam, masks, keys, active, state0, data):
        (params, ms), metrics = out
        return after_round(
            state, n, constrain(params), constrain(ms), metrics, keys, active,
            anchor_fn=anchor_fn, push_diverged=push_diverged, population=population,
        )  # fmt: skip

    def program(state, start, stop, *a):
        body = lambda n, st: after(st, n, train(st, n, *a), *a)  # noqa: E731
        return jax.lax.fori_loop(start, stop, body, state)

    inits = {kf: jit(functools.partial(init, keep_finals=kf)) for kf in (False, True)}

    def template(keep_finals: bool) -> LoopState:
        return inits[keep_finals](*args)

    params0, lam, masks, keys, active, state0, data = args
    if loop == "scan":
        program_j = jit(program)

        def advance(state, n, resume=None, on_chunk=None):
            return program_j(state, n, n + 1, *args)

        def fused(state):
            return program_j(state, 0, iterations + 1, *args)

        plan = Plan(template, advance, lambda: None, fused)
        return plan, init, program

    drive = make_driver(run, loop, jit, every=every, chains=True, bank_axis=bank_axis)
    after_j = jit(after)
    fold_j = jit(fold)
    start = jit(jax.vmap(run.start))

    def advance(state, n, resume=None, on_chunk=None):
        out = drive(
            params0, state.bank, lam, masks[:, n], fold_j(keys, n), state0, data, resume, on_chunk
        )
        return after_j(state, n, out, *args)

    return Plan(template, advance, lambda: start(params0, state0)), init, program


def device_data(data: PyTree) -> PyTree:
    """The training data as device arrays, once (each compiled call then takes it as is)."""
    return jax.tree_util.tree_map(jnp.asarray, data)
