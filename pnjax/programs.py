"""Compiled programs kept across driver calls, keyed on the identity of the user's objects.

A driver call builds its compiled pieces (the training run, the bookkeeping, the chains'
program) from the user's ``loss_fn``, optimizer, ``score_fn``, ``anchor_fn`` and λ schedule
plus static settings (steps, epochs, batch size, capacity, loop, ...). Everything else (init
params, λ values, keys, the bank, the data) is an argument of those programs. So a second call
with the *same objects* and settings reuses the pieces, and ``jax.jit``'s own cache (per
shapes, dtypes and shardings of the arguments) then compiles nothing::

    tx = optax.adam(1e-3)                     # one optimizer object for the whole sweep
    for lam in (0.0, 0.01, 0.1):
        pnjax.persistent_fit(init, loss_fn, tx, lam=lam, ...)     # compiled once

A new optimizer object (``optax.adam(1e-3)`` written inside the loop) is a new program; sweep
learning rates with ``optax.inject_hyperparams`` and one object instead.

The cache holds at most :data:`MAX_ENTRIES` entries (least recently used dropped first). The
programs reach the user's functions through weak references where Python allows them
(functions, bound methods, most callables), so a cached entry does not keep a ``loss_fn``
alive: once the user's object is gone, its entry is dropped at the next lookup.
:func:`clear` drops everything.
"""

from __future__ import annotations

import dataclasses
import threading
import types
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

__all__ = [
    "MAX_ENTRIES",
    "cached",
    "clear",
    "identity",
    "run_signature",
    "size",
    "weak_callable",
    "weak_optimizer",
    "weak_run",
]

#: How many sets of compiled pieces are kept.
MAX_ENTRIES = 32

_LOCK = threading.Lock()
_CACHE: OrderedDict[Hashable, tuple[tuple[Any, ...], Any]] = OrderedDict()


def _ref(obj: Any) -> Callable[[], Any]:
    """A weak reference to ``obj`` when Python allows one, else a strong one."""
    if isinstance(obj, types.MethodType):
        return weakref.WeakMethod(obj)
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


def identity(obj: Any) -> tuple[Hashable, Callable[[], Any] | None]:
    """``(token, ref)``: a hashable token of ``obj``'s identity and a reference that says
    whether it is still alive (``None`` for ``None``). A bound method is identified by its
    object and function, so ``model.apply`` read twice is the same."""
    if obj is None:
        return None, None
    if isinstance(obj, types.MethodType):
        return ("method", id(obj.__self__), id(obj.__func__)), _ref(obj)
    return id(obj), _ref(obj)


def weak_callable(fn: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``fn`` called through a weak reference (``None`` stays ``None``)."""
    if fn is None:
        return None
    ref = _ref(fn)

    def call(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        if target is None:  # pragma: no cover - the driver holds it while tracing
            raise RuntimeError("the function of a cached pnjax program no longer exists.")
        return target(*args, **kwargs)

    return call


def weak_optimizer(tx: Any) -> Any:
    """An Optax transformation of the same type whose ``init`` and ``update`` call ``tx``'s
    through weak references."""
    return tx._replace(init=weak_callable(tx.init), update=weak_callable(tx.update))


def cached(kind: str, objects: tuple[Any, ...], static: Hashable, build: Callable[[], Any]) -> Any:
    """The pieces of ``kind`` for these user ``objects`` and ``static`` settings, built once.

    Args:
      kind: what is cached (e.g. ``'fit'``, ``'chains'``).
      objects: the user's objects, compared by identity (``None`` allowed).
      static: hashable settings the pieces depend on.
      build: makes the pieces; it must reach ``objects`` only through :func:`weak_callable` /
        :func:`weak_optimizer` so the entry does not keep them alive.
    """
    ids = [identity(o) for o in objects]
    key = (kind, tuple(t for t, _ in ids), static)
    with _LOCK:
        _drop_dead()
        hit = _CACHE.get(key)
        if hit is not None:
            _CACHE.move_to_end(key)
            return hit[1]
    value = build()
    with _LOCK:
        _CACHE[key] = (tuple(r for _, r in ids if r is not None), value)
        while len(_CACHE) > MAX_ENTRIES:
            _CACHE.popitem(last=False)
    return value


def _drop_dead() -> None:
    dead = [k for k, (refs, _) in _CACHE.items() if any(r() is None for r in refs)]
    for k in dead:
        del _CACHE[k]


def clear() -> None:
    """Drops every cached program (the next driver call compiles again)."""
    with _LOCK:
        _CACHE.clear()


def size() -> int:
    """How many entries the cache holds."""
    with _LOCK:
        _drop_dead()
        return len(_CACHE)


def weak_run(
    loss_fn: Callable[..., Any],
    optimizer: Any,
    score_fn: Callable[..., Any] | None,
    lam_schedule: Callable[[Any], Any] | None,
    **settings: Any,
) -> Any:
    """:func:`pnjax.make_train_run` over weak references to the user's functions, without the
    data (the drivers pass it as an argument)."""
    from pnjax.run import make_train_run

    run = make_train_run(
        weak_callable(loss_fn), weak_optimizer(optimizer), score_fn=weak_callable(score_fn),
        lam_schedule=weak_callable(lam_schedule), **settings,
    )  # fmt: skip
    return dataclasses.replace(run, data=None)


def run_signature(run: Any) -> Hashable:
    """The static settings of a :class:`pnjax.run.TrainRun`: how it iterates, whether it has a
    model state and a λ schedule."""
    it = run.iteration
    return (type(it).__name__, dataclasses.astuple(it), run.has_state, run.minibatch)
