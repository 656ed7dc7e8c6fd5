"""Training trajectories: snapshots inside the compiled run, PCA plane, loss surface on it.

:func:`record_run` replays one run built by :func:`pnjax.make_train_run` (the same update
``persistent_fit`` compiles: same optimizer, penalty, data order) as one ``lax.scan`` that
evaluates ``probe(params)`` every ``every`` steps (full batch) or epochs (mini-batch): the
params themselves for a trajectory, or saturation statistics, or anything jittable.

:func:`project_trajectories` follows Li et al. (2018, Section 7): with an origin ``θ*`` (by
default the last point of the first trajectory), the deltas ``θ_t − θ*`` of every point of every
trajectory, flattened into the rows of a matrix ``D`` ``[N, P]``, are centered and their top
principal directions ``d_1, d_2`` (right singular vectors, orthonormal) span the plane; each
point's coordinates are ``(d_1·(θ_t − θ*), d_2·(θ_t − θ*))``, so the origin sits at (0, 0) and
a trajectory that lies in a plane through the origin is reproduced exactly.
:func:`loss_surface` evaluates ``L(θ* + a d_1 + b d_2)`` on a grid of ``(a, b)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

PyTree = Any


class RunRecord(NamedTuple):
    """What :func:`record_run` returns.

    Attributes:
      params: the run's final params.
      state: the final model state (``None`` for runs without one).
      probes: ``probe`` outputs stacked on a leading axis ``[R, ...]``.
      at: ``[R]`` int32: the step (full batch) or epoch (mini-batch) after which each probe was
        taken; 0 is the initialization.
      metrics: the run's final ``loss``, ``score`` and ``penalty``, as ``persistent_fit``
        reports them.
    """

    params: PyTree
    state: PyTree
    probes: PyTree
    at: np.ndarray
    metrics: dict[str, jax.Array]


def _check_every(every: Any, total: int, unit: str) -> int:
    if not isinstance(every, (int, np.integer)) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}.")
    if every > total:
        raise ValueError(f"every={every} exceeds the run's {total} {unit}; use every <= {total}.")
    return int(every)


@functools.lru_cache(maxsize=8)
def _compiled_record(
    run: Any, every: int, probe: Callable[[PyTree], PyTree], jit: Callable[..., Any]
) -> Callable[..., Any]:
    """The compiled :func:`record_run` program; cached, so replays of one run share it."""
    from pnjax.run import Penalty

    total = _length(run)
    chunks, rest = divmod(total, every)

    def advance(carry, pen, keys, data, start):
        """``len(keys)`` epochs (mini-batch) or steps (full batch) from ``carry``, the first one
        being epoch or step ``start`` of the run (a λ schedule reads the step count)."""
        if run.minibatch:
            return run.epochs(carry, pen, keys, data, first_epoch=start)[0]
        counts = start + jnp.arange(keys.shape[0])
        return jax.lax.scan(lambda c, n: (run.step(c, None, pen, n)[0], None), carry, counts)[0]

    def program(params0, bank, lam, mask, key, state0, data):
        pen = Penalty(bank, lam, mask)
        carry = run.start(params0, state0)
        ekeys = run.epoch_keys(key) if run.minibatch else jnp.zeros((total,))
        first = probe(carry.params)

        def body(c, xs):
            k, i = xs
            c = advance(c, pen, k, data, i * every)
            return c, probe(c.params)

        body_keys = ekeys[: chunks * every].reshape((chunks, every) + ekeys.shape[1:])
        carry, probes = jax.lax.scan(body, carry, (body_keys, jnp.arange(chunks)))
        probes = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, probes)
        if rest:
            carry = advance(carry, pen, ekeys[chunks * every :], data, chunks * every)
            last = probe(carry.params)
            probes = jax.tree_util.tree_map(
                lambda a, b: jnp.concatenate([a, b[None]]), probes, last
            )
        metrics = dict(run.finish(carry, pen, jnp.zeros((0,)), data))
        metrics.pop("curve")
        return carry.params, carry.model_state, probes, metrics

    return jit(program)


def _length(run: Any) -> int:
    """The run's length in epochs (mini-batch) or steps (full batch)."""
    return int(run.iteration.epochs if run.minibatch else run.iteration.steps)


def _identity(params: PyTree) -> PyTree:
    return params


def record_run(
    run: Callable[..., Any],
    params0: PyTree,
    bank: Any,
    lam: float | jax.Array,
    mask: jax.Array | None = None,
    key: jax.Array | None = None,
    *,
    every: int,
    probe: Callable[[PyTree], PyTree] | None = None,
    state0: PyTree = None,
    jit: Callable[..., Any] = jax.jit,
) -> RunRecord:
    """Runs ``run`` (from :func:`pnjax.make_train_run`) and probes the params along the way.

    Full-batch runs are probed at steps ``0, every, 2·every, …`` and at the last step;
    mini-batch runs at epochs ``0, every, …`` and the last epoch (epoch ``e``'s data order is
    ``jax.random.split(key, epochs)[e]``, as in ``persistent_fit`` with ``shuffle='same'``,
    whose run ``n`` is reproduced by passing ``key``, a bank holding its first ``n`` anchors and
    its layer mask). Everything runs as one jitted program.

    Args:
      run: the function returned by :func:`pnjax.make_train_run`.
      params0: the initialization.
      bank: an :class:`pnjax.AnchorBank` (empty for a plain run).
      lam: λ.
      mask: ``[num_layers]`` layer weights; default ``jnp.ones`` (the full model, Eq. 4).
      key: data-order key (mini-batch form; default ``jax.random.key(0)``).
      every: probing period in steps (full batch) or epochs (mini-batch).
      probe: ``probe(params) -> pytree of arrays``; default the params themselves (a
        trajectory).
      state0: initial model state for runs built with ``has_state=True``.
      jit: the compiler (default ``jax.jit``).

    Returns:
      A :class:`RunRecord`.

    Raises:
      ValueError: ``every`` not a positive integer or longer than the run; a ``state0`` that
        does not match ``run.has_state``.
    """
    from pnjax.run import TrainRun

    if not isinstance(run, TrainRun):
        raise ValueError(
            f"run must be what pnjax.make_train_run returns, got {type(run).__name__}."
        )
    if bool(run.has_state) != (state0 is not None):
        raise ValueError(
            "state0 is needed exactly when the run was built with has_state=True "
            f"(has_state={bool(run.has_state)}, state0 {'given' if state0 is not None else 'None'})."
        )
    probe = probe or _identity
    mask = jnp.ones((bank.num_layers,), jnp.float32) if mask is None else mask
    key = jax.random.key(0) if key is None else key
    total, unit = _length(run), "epochs" if run.minibatch else "steps"
    every = _check_every(every, total, unit)
    chunks, rest = divmod(total, every)

    program = _compiled_record(run, every, probe, jit)
    params, state, probes, metrics = program(
        params0, bank, jnp.asarray(lam, jnp.float32), jnp.asarray(mask), key,
        () if state0 is None else state0, run.data,
    )  # fmt: skip
    state = None if state0 is None else state
    at = np.arange(chunks + 1) * every
    if rest:
        at = np.append(at, total)
    return RunRecord(params, state, probes, at.astype(np.int32), metrics)


@dataclasses.dataclass(frozen=True)
class TrajectoryProjection:
    """Trajectories projected onto their top principal directions.

    Attributes:
      origin: the params pytree at coordinates (0, 0).
      directions: ``[k, P]`` orthonormal directions (rows), over the flattened params
        (``jax.flatten_util.ravel_pytree`` order).
      coords: one ``[T_i, k]`` array per trajectory: ``directions @ (θ_t − origin)``.
      explained_variance: ``[k]`` fraction of the centered deltas' variance along each
        direction.
    """

    origin: PyTree
    directions: jax.Array
    coords: tuple[jax.Array, ...]
    explained_variance: jax.Array

    def point(self, coords: jax.Array) -> PyTree:
        """The params at plane coordinates ``coords`` ``[k]``: ``origin + coordsᵀ directions``."""
        flat, unravel = ravel_pytree(self.origin)
        return unravel(flat + jnp.asarray(coords, flat.dtype) @ self.directions)


def project_trajectories(
    trajectories: Sequence[PyTree],
    *,
    origin: PyTree | None = None,
    num_components: int = 2,
) -> TrajectoryProjection:
    """Projects params trajectories onto the top principal directions of their deltas.

    Args:
      trajectories: one or more pytrees of params stacked on a leading time axis ``[T_i, ...]``
        (e.g. ``record_run(...).probes``); all with the same structure.
      origin: params pytree mapped to (0, 0); default the last point of the first trajectory.
      num_components: ``k``, the number of directions.

    Returns:
      A :class:`TrajectoryProjection`.

    Raises:
      ValueError: no trajectories, or ``num_components`` not in ``[1, min(N, P)]`` for ``N``
        points of ``P`` parameters.

    References:
      Li, Xu, Taylor, Studer and Goldstein, *Visualizing the Loss Landscape of Neural Nets*,
      NeurIPS 2018, arXiv:1712.09913, Section 7.
    """
    if not trajectories:
        raise ValueError("trajectories is empty; pass at least one stacked params pytree.")
    flats = [jax.vmap(lambda p: ravel_pytree(p)[0])(t) for t in trajectories]
    if origin is None:
        origin = jax.tree_util.tree_map(lambda a: a[-1], trajectories[0])
    o = ravel_pytree(origin)[0]
    deltas = jnp.concatenate(flats) - o
    n, p = deltas.shape
    if not isinstance(num_components, int) or not 1 <= num_components <= min(n, p):
        raise ValueError(
            f"num_components must be an integer in [1, {min(n, p)}] for {n} points of {p} "
            f"parameters, got {num_components!r}."
        )
    centered = deltas - jnp.mean(deltas, axis=0)
    _, s, vt = jnp.linalg.svd(centered, full_matrices=False)
    directions = vt[:num_components]
    total = jnp.sum(s**2)
    explained = jnp.where(total > 0, s[:num_components] ** 2 / total, 0.0)
    coords = tuple((f - o) @ directions.T for f in flats)
    return TrajectoryProjection(origin, directions, coords, explained)


def loss_surface(
    loss_fn: Callable[[PyTree], jax.Array],
    projection: TrajectoryProjection,
    xs: jax.Array,
    ys: jax.Array,
    *,
    batch_size: int = 64,
) -> jax.Array:
    """``L(origin + x d_1 + y d_2)`` on the grid ``xs × ys`` of the first two directions.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      projection: from :func:`project_trajectories` (at least two directions).
      xs: ``[X]`` coordinates along ``d_1``.
      ys: ``[Y]`` coordinates along ``d_2``.
      batch_size: grid points evaluated at once (``vmap``); the rest in sequence.

    Returns:
      ``[Y, X]`` float32 losses (row ``i`` at ``ys[i]``), ready for ``plt.contour(xs, ys, z)``.

    Raises:
      ValueError: a projection with fewer than two directions.
    """
    if projection.directions.shape[0] < 2:
        raise ValueError("loss_surface needs a projection with num_components >= 2.")
    xs, ys = jnp.asarray(xs, jnp.float32), jnp.asarray(ys, jnp.float32)
    gx, gy = jnp.meshgrid(xs, ys)
    pts = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
    o, unravel = ravel_pytree(projection.origin)
    d = projection.directions[:2]

    @jax.jit
    def evaluate(pts):
        def one(c):
            return jnp.asarray(loss_fn(unravel(o + c.astype(o.dtype) @ d)), jnp.float32)

        return jax.lax.map(one, pts, batch_size=batch_size)

    return evaluate(pts).reshape(gy.shape)
