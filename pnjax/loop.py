"""Algorithm 1's bookkeeping for one chain: the loop state and ``record``.

After run ``n`` of a chain ends in ``(θ_n, s_n)`` with metrics ``m_n``:

- it *diverged* unless its loss, score, params and model state are all finite;
- its anchor (``θ_n``, or ``anchor_fn(θ_n, key)``) is pushed into the bank unless it diverged
  (``push_diverged`` pushes anyway) or the bank is full;
- it becomes the champion when it did not diverge and ``score_n < score_champion`` (the first
  of equal scores stays);
- its metrics, ``diverged`` and ``pushed`` are written into row ``n`` of the history.

:func:`record` does all of this for one chain as a pure function of a :class:`LoopState`;
``jax.vmap(record)`` does it for independent chains, and :func:`record_population` for chains
that share one bank (all of a round's anchors pushed in chain order).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from pnjax.anchors import AnchorBank

PyTree = Any
#: The ``fold_in`` offset of the key ``anchor_fn`` gets in iteration ``n``: ``1000 + n``.
ANCHOR_KEY = 1000
SHUFFLES = ("same", "per_iteration")


@flax.struct.dataclass
class LoopState:
    """Everything Algorithm 1 carries from one iteration to the next, for one chain.

    Attributes:
      bank: the anchors pushed so far.
      champion: the championship params so far (the initial params before any).
      champion_state: its model state (``()`` without one).
      champion_score: its score (``inf`` before any).
      champion_iteration: its iteration (``-1`` before any).
      history: ``[N + 1, ...]`` arrays: each metric, ``diverged`` and ``pushed``.
      finals: ``()``, or ``{'params': [N + 1, ...], 'model_state': [N + 1, ...]}``: every run's
        final params and state (kept when a callback must be replayed on resume).
      done: how many iterations are recorded.
    """

    bank: AnchorBank
    champion: PyTree
    champion_state: PyTree
    champion_score: jax.Array
    champion_iteration: jax.Array
    history: dict[str, jax.Array]
    finals: PyTree
    done: jax.Array


def init_state(
    params0: PyTree,
    model_state0: PyTree,
    metrics: dict[str, Any],
    *,
    iterations: int,
    capacity: int,
    keep_finals: bool,
    bank: AnchorBank | None = None,
) -> LoopState:
    """The state before iteration 0.

    Args:
      params0, model_state0: the chain's initialization.
      metrics: shapes (``jax.ShapeDtypeStruct`` or arrays) of one run's metrics.
      iterations: N; the history has ``N + 1`` rows.
      capacity: the bank's capacity.
      keep_finals: keep every run's final params and state.
      bank: a bank to use instead of an empty one (e.g. one shared by a population).
    """
    rows = iterations + 1

    def buffer(x):
        return jnp.zeros((rows, *jnp.shape(x)), x.dtype)

    history = {k: buffer(v) for k, v in metrics.items()}
    history["diverged"] = jnp.zeros((rows,), bool)
    history["pushed"] = jnp.zeros((rows,), bool)
    finals: PyTree = ()
    if keep_finals:
        finals = jax.tree_util.tree_map(buffer, {"params": params0, "model_state": model_state0})
    return LoopState(
        bank=AnchorBank.create(params0, capacity) if bank is None else bank,
        champion=params0,
        champion_state=model_state0,
        champion_score=jnp.asarray(jnp.inf, jnp.float32),
        champion_iteration=jnp.asarray(-1, jnp.int32),
        history=history,
        finals=finals,
        done=jnp.asarray(0, jnp.int32),
    )


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every inexact (float or complex) leaf is finite; ``True`` for none."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def judge(params: PyTree, model_state: PyTree, metrics: dict[str, Any]) -> jax.Array:
    """Whether a run ended well: finite loss and score (those present), params and state."""
    ok = all_finite(params) & all_finite(model_state)
    for k in ("loss", "score"):
        if k in metrics:
            ok = ok & jnp.isfinite(metrics[k])
    return ok


def _where(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


def push(bank: AnchorBank, anchor: PyTree, want: jax.Array) -> tuple[AnchorBank, jax.Array]:
    """``anchor`` pushed when ``want`` and the bank is not full; returns ``(bank, pushed)``."""
    do = want & (bank.count < bank.capacity)
    return _where(do, bank.push(anchor), bank), do


def crown(
    state: LoopState,
    n: Any,
    params: PyTree,
    model_state: PyTree,
    metrics: dict[str, Any],
    ok: jax.Array,
    pushed: jax.Array,
) -> LoopState:
    """Championship, history row ``n``, finals and ``done`` (every field but the bank)."""
    better = ok & (metrics["score"] < state.champion_score)
    row = dict(metrics, diverged=~ok, pushed=pushed)
    history = {k: v.at[n].set(jnp.asarray(row[k], v.dtype)) for k, v in state.history.items()}
    finals = state.finals
    if finals != ():
        finals = jax.tree_util.tree_map(
            lambda buf, x: buf.at[n].set(x), finals, {"params": params, "model_state": model_state}
        )
    return state.replace(
        champion=_where(better, params, state.champion),
        champion_state=_where(better, model_state, state.champion_state),
        champion_score=jnp.where(better, metrics["score"], state.champion_score),
        champion_iteration=jnp.where(better, jnp.asarray(n, jnp.int32), state.champion_iteration),
        history=history,
        finals=finals,
        done=jnp.maximum(state.done, jnp.asarray(n, jnp.int32) + 1),
    )


def record(
    state: LoopState,
    n: Any,
    params: PyTree,
    model_state: PyTree,
    metrics: dict[str, Any],
    anchor: PyTree,
    active: Any = True,
    *,
    push_diverged: bool = False,
) -> LoopState:
    """Run ``n`` of one chain recorded: push, championship, history (module docstring).

    Args:
      state: the loop state before run ``n``.
      n: the iteration (traced or static).
      params, model_state: where run ``n`` ended.
      metrics: its scalar ``loss``/``score``/``penalty`` and array ``curve`` (any subset with
        ``score``).
      anchor: what to push (the params, or ``anchor_fn``'s transform of them).
      active: ``False`` for a padding chain: never pushed.
      push_diverged: push runs that diverged too.
    """
    ok = judge(params, model_state, metrics)
    bank, pushed = push(state.bank, anchor, (ok | push_diverged) & active)
    return crown(state.replace(bank=bank), n, params, model_state, metrics, ok, pushed)


def record_population(
    state: LoopState,
    n: Any,
    params: PyTree,
    model_state: PyTree,
    metrics: dict[str, Any],
    anchors: PyTree,
    active: jax.Array,
    *,
    push_diverged: bool = False,
) -> LoopState:
    """Round ``n`` of ``C`` chains that share one bank: every field but ``bank`` has a leading
    chain axis; the chains' anchors are pushed in chain order."""
    ok = jax.vmap(judge)(params, model_state, metrics)

    def push_one(bank, xs):
        anchor, want = xs
        return push(bank, anchor, want)

    bank, pushed = jax.lax.scan(push_one, state.bank, (anchors, (ok | push_diverged) & active))
    rest = jax.vmap(crown, in_axes=(0, None, 0, 0, 0, 0, 0))(
        state.replace(bank=()), n, params, model_state, metrics, ok, pushed
    )
    return rest.replace(bank=bank)


def data_key(key: jax.Array, n: Any, shuffle: str) -> jax.Array:
    """The key of run ``n``'s data order: the chain's key (``'same'``) or ``fold_in(key, n)``."""
    return key if shuffle == "same" else jax.random.fold_in(key, n)


def anchor_of(
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None,
    params: PyTree,
    key: jax.Array,
    n: Any,
) -> PyTree:
    """What run ``n`` pushes: ``params``, or ``anchor_fn(params, fold_in(key, 1000 + n))``."""
    if anchor_fn is None:
        return params
    return anchor_fn(params, jax.random.fold_in(key, ANCHOR_KEY + n))


def after_run(
    state: LoopState,
    n: Any,
    params: PyTree,
    model_state: PyTree,
    metrics: dict[str, Any],
    key: jax.Array,
    active: Any = True,
    *,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None = None,
    push_diverged: bool = False,
) -> LoopState:
    """One chain's step of Algorithm 1 after its run ``n``: the anchor, then :func:`record`."""
    anchor = anchor_of(anchor_fn, params, key, n)
    return record(
        state, n, params, model_state, metrics, anchor, active, push_diverged=push_diverged
    )


def after_round(
    state: LoopState,
    n: Any,
    params: PyTree,
    model_state: PyTree,
    metrics: dict[str, Any],
    keys: jax.Array,
    active: jax.Array,
    *,
    anchor_fn: Callable[[PyTree, jax.Array], PyTree] | None = None,
    push_diverged: bool = False,
    population: bool = False,
) -> LoopState:
    """:func:`after_run` for ``C`` chains: ``jax.vmap`` of it, or the population variant."""
    if not population:
        return jax.vmap(
            lambda s, p, ms, m, k, a: after_run(
                s, n, p, ms, m, k, a, anchor_fn=anchor_fn, push_diverged=push_diverged
            )
        )(state, params, model_state, metrics, keys, active)
    anchors = jax.vmap(lambda p, k: anchor_of(anchor_fn, p, k, n))(params, keys)
    return record_population(
        state, n, params, model_state, metrics, anchors, active, push_diverged=push_diverged
    )


def starting_bank(bank: Any, params: PyTree, capacity: int, what: str = "init_bank") -> AnchorBank:
    """A user's bank of earlier anchors, checked against ``params`` and resized (its empty
    slots cut or zero-padded) to ``capacity`` slots, its anchors kept in order.

    Raises:
      ValueError: not an :class:`AnchorBank`, a bank shaped unlike ``params``, or one holding
        more anchors than ``capacity``.
    """
    if not isinstance(bank, AnchorBank):
        raise ValueError(
            f"{what} must be a pnjax.AnchorBank (e.g. an earlier result's .bank), got "
            f"{type(bank).__name__}."
        )
    bank.check_consistent()
    bank.check_compatible(params, what="init_params")
    count = int(bank.count)
    if count > capacity:
        raise ValueError(
            f"{what} holds {count} anchors but the bank's capacity is {capacity}; pass "
            f"capacity >= {count} + iterations (the default)."
        )

    def fit(x):
        x = jnp.asarray(x)
        if x.shape[0] >= capacity:
            return x[:capacity]
        pad = jnp.zeros((capacity - x.shape[0], *x.shape[1:]), x.dtype)
        return jnp.concatenate([x, pad], axis=0)

    return bank.replace(
        anchors=jax.tree_util.tree_map(fit, bank.anchors),
        sq_norms=fit(bank.sq_norms),
        count=jnp.asarray(count, jnp.int32),
    )
