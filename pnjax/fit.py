"""Algorithm 1: persistent training from one initialization, and championship selection.

One *iteration* is a full training run from ``init_params`` with a fresh optimizer state,
minimizing ``L(θ) + P_n(θ)`` where ``P_n`` is the persistent penalty over the anchors pushed so
far (none for the plain run, iteration 0). Its converged params are pushed into the bank; the
championship is the iteration with the lowest validation score.

The training run is one compiled program (``lax.scan`` over steps, or over epochs and
mini-batches) whose arguments are the initial params, the bank, λ, the layer mask and a key,
so all iterations, the plain run included, share one compilation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax.anchors import AnchorBank
from pnjax.layers import layer_mask, layer_names
from pnjax.penalty import _gradient_unchecked, check_lam, persistent_penalty

PyTree = Any
LayerChoice = None | str | Sequence[str] | jax.Array


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`persistent_fit` returns.

    Attributes:
      champion: params of the championship iteration (lowest finite score).
      champion_iteration: its index (0 = plain run), or -1 if every iteration diverged.
      history: per-iteration arrays of length ``iterations + 1``: ``score``, ``loss`` (the
        plain loss at the end of the iteration), ``penalty`` (the persistent penalty there),
        ``layer`` (index of the penalized layer, -1 for all layers), ``diverged`` (bool),
        ``pushed`` (bool), and ``curve`` ``[iterations + 1, points]``: the training loss along
        each run (every ``log_every`` steps, or per epoch in the mini-batch form).
      bank: the anchors pushed (the converged params of each non-diverged iteration).
      layer_names: the names the ``layer`` indices refer to.
    """

    champion: PyTree
    champion_iteration: int
    history: dict[str, np.ndarray]
    bank: AnchorBank
    layer_names: tuple[str, ...] = ()


def _check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> int:
    lo = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}.")
    return int(value)


def make_train_run(
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    steps: int | None = None,
    score_fn: Callable[[PyTree], jax.Array] | None = None,
    data: PyTree | None = None,
    batch_size: int | None = None,
    epochs: int | None = None,
    log_every: int | None = None,
) -> Callable[..., tuple[PyTree, dict[str, jax.Array]]]:
    """Builds one persistent training run as a pure function (not yet jitted).

    The returned ``run(params0, bank, lam, mask, key) -> (params, metrics)`` trains from
    ``params0`` with a fresh optimizer state on ``L + P`` (P over the bank's anchors, layers
    weighted by ``mask`` ``[num_layers]``), adding the Eq. 6 term to the gradient in closed form.
    ``metrics`` holds scalars ``loss``, ``score``, ``penalty`` and the array ``curve``.

    Full-batch form: ``loss_fn(params)``, ``steps`` updates. Mini-batch form: ``loss_fn(params,
    batch)``, ``data`` a pytree of arrays with a leading example axis, ``epochs`` passes over it in
    shuffled batches of ``batch_size`` (the remainder is dropped; order from ``key``).

    Args:
      loss_fn: the training loss.
      optimizer: any Optax transformation.
      steps: number of full-batch updates.
      score_fn: ``score_fn(params) -> scalar``, lower is better. Defaults to the loss (over the
        whole ``data`` in the mini-batch form).
      data, batch_size, epochs: the mini-batch form.
      log_every: record the training loss every this many steps (full batch; default
        ``max(1, steps // 200)``).

    Returns:
      The pure function ``run``; jit it with the bank, λ, mask and key as arguments.
    """
    minibatch = data is not None
    if minibatch:
        epochs = _check_positive_int("epochs", epochs)
        batch_size = _check_positive_int("batch_size", batch_size)
        leaves = jax.tree_util.tree_leaves(data)
        if not leaves:
            raise ValueError(
                "data has no arrays; pass a pytree of arrays with a leading example axis."
            )
        sizes = {int(np.shape(x)[0]) for x in leaves}
        if len(sizes) != 1:
            raise ValueError(
                f"every array in data needs the same leading (example) axis, got sizes {sorted(sizes)}."
            )
        num_examples = sizes.pop()
        if batch_size > num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the {num_examples} examples in data."
            )
        num_batches = num_examples // batch_size
    else:
        steps = _check_positive_int("steps", steps)
        log_every = (
            max(1, steps // 200)
            if log_every is None
            else _check_positive_int("log_every", log_every)
        )

    def plain_loss(params: PyTree) -> jax.Array:
        if not minibatch:
            return loss_fn(params)

        def body(total, b):
            batch = jax.tree_util.tree_map(
                lambda x: jax.lax.dynamic_slice_in_dim(x, b * batch_size, batch_size), data
            )
            return total + loss_fn(params, batch), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(num_batches))
        return total / num_batches

    def update(carry, batch, bank, lam, mask):
        params, opt_state = carry
        args = () if batch is None else (batch,)
        loss, grads = jax.value_and_grad(loss_fn)(params, *args)
        bias = _gradient_unchecked(params, bank, lam, mask)
        grads = jax.tree_util.tree_map(lambda g, b: g + b.astype(g.dtype), grads, bias)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), loss

    def run(params0, bank, lam, mask, key):
        opt_state = optimizer.init(params0)
        carry = (params0, opt_state)
        if not minibatch:
            carry, losses = jax.lax.scan(
                lambda c, _: update(c, None, bank, lam, mask), carry, None, length=steps
            )
            curve = losses[::log_every]
        else:

            def epoch(c, ekey):
                perm = jax.random.permutation(ekey, num_examples)

                def inner(c2, b):
                    idx = jax.lax.dynamic_slice_in_dim(perm, b * batch_size, batch_size)
                    batch = jax.tree_util.tree_map(lambda x: jnp.take(x, idx, axis=0), data)
                    return update(c2, batch, bank, lam, mask)

                c, losses = jax.lax.scan(inner, c, jnp.arange(num_batches))
                return c, jnp.mean(losses)

            carry, curve = jax.lax.scan(epoch, carry, jax.random.split(key, epochs))
        params = carry[0]
        loss = plain_loss(params)
        score = loss if score_fn is None else score_fn(params)
        pen = persistent_penalty(params, bank, lam, mask)
        metrics = {
            "loss": jnp.asarray(loss, jnp.float32),
            "score": jnp.asarray(score, jnp.float32),
            "penalty": jnp.asarray(pen, jnp.float32),
            "curve": jnp.asarray(curve, jnp.float32),
        }
        return params, metrics

    return run


def _layer_schedule(
    names: tuple[str, ...],
    layers: LayerChoice,
    layer_draw: str,
    iterations: int,
    key: jax.Array | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-iteration layer masks ``[iterations + 1, L]`` and chosen layer indices (-1: all)."""
    L = len(names)
    if isinstance(layers, str) and layers == "random":
        if layer_draw not in ("once", "per_iteration"):
            raise ValueError(f"layer_draw must be 'once' or 'per_iteration', got {layer_draw!r}.")
        if key is None:
            raise ValueError(
                "layers='random' draws the layer from `key`; pass key=jax.random.key(seed)."
            )
        lkey = jax.random.fold_in(key, 0x1A7E)
        if layer_draw == "once":
            idx = np.full(iterations + 1, int(jax.random.randint(lkey, (), 0, L)))
        else:
            idx = np.asarray(jax.random.randint(lkey, (iterations + 1,), 0, L))
        masks = np.eye(L, dtype=np.float32)[idx]
        return masks, idx.astype(np.int32)
    mask = np.asarray(layer_mask(names, layers), np.float32)
    sel = np.flatnonzero(mask)
    idx_value = int(sel[0]) if len(sel) == 1 and L > 1 else -1
    return np.tile(mask, (iterations + 1, 1)), np.full(iterations + 1, idx_value, np.int32)


def persistent_fit(
    init_params: PyTree,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    iterations: int,
    lam: float,
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
) -> FitResult:
    """Persistent training (Algorithm 1): a plain run, then ``iterations`` persistent runs.

    Every run starts from ``init_params`` with a fresh optimizer state. Run ``n`` minimizes
    ``L(θ) + λ Σ_{k<n} Σ_l m_l |Θ_k^l · θ^l| / ||Θ_k^l||²`` (Eq. 4, or Eq. 5 with one layer);
    its converged params become Θ_n. The championship is the run with the lowest finite score.

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
        ``data``).
      optimizer: any Optax transformation; re-initialized for every run.
      iterations: N, the number of persistent runs after the plain run.
      lam: λ >= 0.
      steps: updates per run (full-batch form).
      layers: ``None`` (full model, Eq. 4), a layer name or names, or ``'random'`` (partial
        model, Eq. 5: one layer drawn from ``key``).
      score_fn: ``score_fn(params) -> scalar``, lower is better (e.g. validation error);
        defaults to the loss.
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
        ``loss``, ``diverged``, ``champion_iteration`` and the run's final ``params``.
      jit: the function that compiles the run (default ``jax.jit``).

    Returns:
      A :class:`FitResult`.

    Raises:
      ValueError: bad ``iterations``, ``steps``, ``lam``, ``layers``, ``capacity`` or data.

    References:
      Min, *Persistent Neurons*, arXiv:2007.01419, Algorithm 1.
    """
    iterations = _check_positive_int("iterations", iterations, allow_zero=True)
    check_lam(lam)
    if np.ndim(lam) != 0:
        raise ValueError(
            f"lam must be a scalar in persistent_fit, got shape {np.shape(lam)}; use "
            "pnjax.run_chains for one λ per chain."
        )
    if shuffle not in ("same", "per_iteration"):
        raise ValueError(f"shuffle must be 'same' or 'per_iteration', got {shuffle!r}.")
    if data is None and (batch_size is not None or epochs is not None):
        raise ValueError("batch_size and epochs need data=...; for full-batch training pass steps.")
    if data is not None and steps is not None:
        raise ValueError("pass either steps (full batch) or data with epochs, not both.")
    names = layer_names(init_params)
    capacity = iterations + 1 if capacity is None else capacity
    if isinstance(capacity, (int, np.integer)) and not isinstance(capacity, bool):
        if capacity < iterations:
            raise ValueError(
                f"capacity={capacity} is smaller than iterations={iterations}: run n needs the "
                f"{iterations} anchors of the runs before it; use capacity >= {iterations}."
            )
    bank = AnchorBank.create(init_params, capacity)
    masks, layer_idx = _layer_schedule(names, layers, layer_draw, iterations, key)
    if data is not None and key is None:
        key = jax.random.key(0)
    base_key = jax.random.key(0) if key is None else key

    run = make_train_run(
        loss_fn,
        optimizer,
        steps=steps,
        score_fn=score_fn,
        data=data,
        batch_size=batch_size,
        epochs=epochs,
        log_every=log_every,
    )
    compiled = (jit or jax.jit)(run)
    lam_arr = jnp.asarray(lam, jnp.float32)

    rows: dict[str, list[Any]] = {k: [] for k in ("score", "loss", "penalty", "curve")}
    diverged: list[bool] = []
    pushed: list[bool] = []
    champion, champ_it, champ_score = init_params, -1, math.inf
    for n in range(iterations + 1):
        data_key = base_key if shuffle == "same" else jax.random.fold_in(base_key, n)
        params, metrics = compiled(init_params, bank, lam_arr, jnp.asarray(masks[n]), data_key)
        metrics = jax.device_get(metrics)
        score, loss = float(metrics["score"]), float(metrics["loss"])
        bad = not (math.isfinite(loss) and math.isfinite(score))
        if not bad:
            bad = not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params))
        for k in rows:
            rows[k].append(np.asarray(metrics[k]))
        diverged.append(bad)
        do_push = (not bad or push_diverged) and int(bank.count) < bank.capacity
        if do_push:
            anchor = (
                params
                if anchor_fn is None
                else anchor_fn(params, jax.random.fold_in(base_key, 1000 + n))
            )
            bank = bank.push(anchor)
        pushed.append(do_push)
        if not bad and score < champ_score:
            champion, champ_it, champ_score = params, n, score
        if callback is not None:
            info = {"score": score, "loss": loss, "diverged": bad, "champion_iteration": champ_it}
            callback(n, info | {"params": params})

    history = {
        "score": np.asarray(rows["score"], np.float32),
        "loss": np.asarray(rows["loss"], np.float32),
        "penalty": np.asarray(rows["penalty"], np.float32),
        "curve": np.stack(rows["curve"]),
        "layer": layer_idx,
        "diverged": np.asarray(diverged),
        "pushed": np.asarray(pushed),
    }
    return FitResult(
        champion=champion,
        champion_iteration=champ_it,
        history=history,
        bank=bank,
        layer_names=names,
    )
