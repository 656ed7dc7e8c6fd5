"""Many persistent chains in one compiled program: ``vmap`` over chains, sharded over devices.

A *chain* is one run of Algorithm 1 (:func:`pnjax.persistent_fit`): a plain run from its
initialization θ⁰_c, then ``iterations`` persistent runs from the same θ⁰_c, each repelled from
the solutions pushed before it. :func:`run_chains` runs ``C`` chains at once. Every leaf of
``init_params`` carries a leading chain axis of length ``C``; chains may differ in their
initialization, their λ, their layer choice (every layer, a fixed layer, or a random layer per
iteration) and their data order (their PRNG key).

The whole computation, all chains and all iterations, is one ``jax.jit`` program: a
``lax.scan`` over iterations whose body is ``vmap`` over chains of one training run (itself a
``lax.scan`` over steps), followed by the push of the new solutions and the championship update.
It is traced and compiled once per call, whatever the number of iterations.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax import _checks, _compile
from pnjax.anchors import AnchorBank
from pnjax.fit import FitResult, _python_loop_core, choose_loop, make_train_run
from pnjax.layers import layer_mask, layer_names
from pnjax.penalty import check_lam

PyTree = Any
MODES = ("independent", "population")
_LAYER_KEY = 0x1A7E  # the fold_in constant persistent_fit draws random layers with


@dataclasses.dataclass(frozen=True)
class ChainsResult:
    """What :func:`run_chains` returns: :class:`pnjax.FitResult`'s fields with a chain axis.

    Attributes:
      champion: params pytree, every leaf ``[C, ...]``: each chain's championship params (its
        initialization where every iteration diverged).
      champion_iteration: ``[C]`` int, each chain's championship iteration (0 = plain run), -1
        where every iteration diverged.
      history: ``score``, ``loss``, ``penalty`` ``[C, N + 1]`` float32; ``curve``
        ``[C, N + 1, points]``; ``layer`` ``[C, N + 1]`` int (-1: all layers); ``diverged`` and
        ``pushed`` ``[C, N + 1]`` bool, with ``N = iterations``.
      bank: mode ``'independent'``: the chains' banks stacked (every leaf of ``anchors`` is
        ``[C, capacity, ...]``, ``count`` is ``[C]``); mode ``'population'``: the one shared bank
        (no chain axis).
      layer_names: the names the ``layer`` indices refer to.
      mode: ``'independent'`` or ``'population'``.
      champion_state: with ``model_state``: each chain's state at the end of its championship
        run, every leaf ``[C, ...]`` (its initial state where every iteration diverged);
        ``None`` without a model state.
      resumed_from: how many iterations (rounds) were restored from a checkpoint instead of
        run (0: nothing was restored).
    """

    champion: PyTree
    champion_iteration: np.ndarray
    history: dict[str, np.ndarray]
    bank: AnchorBank
    layer_names: tuple[str, ...] = ()
    mode: str = "independent"
    champion_state: PyTree = None
    resumed_from: int = 0

    @property
    def num_chains(self) -> int:
        """``C``, the number of chains."""
        return int(self.champion_iteration.shape[0])

    @property
    def best_chain(self) -> int:
        """Index of the chain whose championship has the lowest score (-1 if none finite)."""
        scores = np.where(self.history["diverged"], np.inf, self.history["score"])
        best = scores.min(axis=1)
        return int(np.argmin(best)) if np.isfinite(best).any() else -1

    def chain(self, c: int) -> FitResult:
        """Chain ``c`` as a :class:`pnjax.FitResult` (its own bank, or the shared one)."""
        bank = self.bank
        if self.mode == "independent":
            bank = jax.tree_util.tree_map(lambda x: x[c], self.bank)
        return FitResult(
            champion=jax.tree_util.tree_map(lambda x: x[c], self.champion),
            champion_iteration=int(self.champion_iteration[c]),
            history={k: v[c] for k, v in self.history.items()},
            bank=bank,
            layer_names=self.layer_names,
            champion_state=jax.tree_util.tree_map(lambda x: x[c], self.champion_state),
            resumed_from=self.resumed_from,
        )


# ----------------------------------------------------------------------------- input checks


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


def _chain_lams(lam: Any, c: int) -> np.ndarray:
    check_lam(lam)
    arr = np.asarray(lam, np.float32)
    if arr.ndim == 0:
        return np.full((c,), arr, np.float32)
    if arr.shape != (c,):
        raise ValueError(
            f"lam has shape {arr.shape}, but there are {c} chains; pass a scalar (one λ for "
            f"every chain) or an array of shape ({c},) (one λ per chain)."
        )
    return arr


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


def _random_schedule(L: int, key: jax.Array, layer_draw: str, n: int) -> np.ndarray:
    """Layer indices ``[n]`` drawn as persistent_fit draws them from ``key``."""
    lkey = jax.random.fold_in(key, _LAYER_KEY)
    if layer_draw == "once":
        return np.full(n, int(jax.random.randint(lkey, (), 0, L)), np.int32)
    return np.asarray(jax.random.randint(lkey, (n,), 0, L), np.int32)


def _one_schedule(
    names: tuple[str, ...], choice: Any, layer_draw: str, n: int, key: jax.Array
) -> np.ndarray:
    """Layer indices ``[n]`` (-1 = every layer) of one chain for one ``layers`` choice."""
    L = len(names)
    if isinstance(choice, str) and choice == "random":
        return _random_schedule(L, key, layer_draw, n)
    if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
        if not -1 <= choice < L:
            raise ValueError(
                f"layer index {choice} is out of range for the layers {names}; use -1 (every "
                f"layer) or 0..{L - 1}."
            )
        return np.full(n, int(choice), np.int32)
    mask = np.asarray(layer_mask(names, choice), np.float32)
    sel = np.flatnonzero(mask)
    if len(sel) == 1 and L > 1:
        return np.full(n, int(sel[0]), np.int32)
    if len(sel) == L:
        return np.full(n, -1, np.int32)
    raise ValueError(
        f"run_chains penalizes every layer or one layer per iteration, got layers={choice!r}; "
        "pass None, one layer name, 'random', or one such choice per chain (a list)."
    )


def _layer_schedules(
    names: tuple[str, ...],
    layers: Any,
    layer_draw: str,
    iterations: int,
    keys: jax.Array,
    c: int,
) -> np.ndarray:
    """``[C, N + 1]`` layer indices (-1: every layer)."""
    if layer_draw not in ("once", "per_iteration"):
        raise ValueError(f"layer_draw must be 'once' or 'per_iteration', got {layer_draw!r}.")
    n = iterations + 1
    if isinstance(layers, (np.ndarray, jax.Array)) and np.issubdtype(
        np.asarray(layers).dtype, np.integer
    ):
        idx = np.asarray(layers, np.int32)
        if idx.shape == (c,):
            idx = np.repeat(idx[:, None], n, axis=1)
        if idx.shape != (c, n) or idx.min() < -1 or idx.max() >= len(names):
            raise ValueError(
                f"an integer layers array must have shape ({c},) or ({c}, {n}) with entries in "
                f"-1..{len(names) - 1} (-1: every layer), got shape {idx.shape}."
            )
        return idx
    if isinstance(layers, list):
        if len(layers) != c:
            raise ValueError(
                f"layers is a list of {len(layers)} choices but there are {c} chains; a list "
                "gives one choice per chain (use a tuple for a set of layer names)."
            )
        return np.stack(
            [_one_schedule(names, ch, layer_draw, n, keys[i]) for i, ch in enumerate(layers)]
        )
    return np.stack([_one_schedule(names, layers, layer_draw, n, keys[i]) for i in range(c)])


def _masks(idx: np.ndarray, L: int) -> np.ndarray:
    """``[..., L]`` float masks from layer indices (-1: all ones)."""
    eye = np.concatenate([np.eye(L, dtype=np.float32), np.ones((1, L), np.float32)])
    return eye[np.where(idx < 0, L, idx)]


# ----------------------------------------------------------------------------- the program


def _tree_where(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


def _all_finite(params: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _build_program(
    run: Callable[..., Any],
    *,
    template: PyTree,
    capacity: int,
    iterations: int,
    mode: str,
    shuffle: str,
    push_diverged: bool,
    constrain: Callable[[PyTree], PyTree],
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Pure functions of all chains: ``init_state(*args)`` and ``loop(state, start, stop, *args)``.

    ``args = (params0, lam, masks, keys, active, state0)`` (``state0``: the model state
    ``[C, ...]``, or ``None``). The state holds the bank(s), the champions (and their model
    states) and preallocated history buffers ``[N + 1, C, ...]``; ``loop`` runs iterations
    ``start <= n < stop`` (dynamic bounds, so one compilation serves a whole run or one
    iteration at a time, which is how checkpointed runs resume between iterations).
    """
    core: Any = run.core  # type: ignore[attr-defined]
    many = jax.vmap(core, in_axes=(0, 0 if mode == "independent" else None, 0, 0, 0, 0))

    def init_state(params0, lam, masks, keys, active, state0=None):
        c = lam.shape[0]
        one = AnchorBank.create(template, capacity)
        if mode == "independent":
            bank = jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (c, *x.shape)), one)
            bank = constrain(bank)
        else:
            bank = one
        _, shapes = jax.eval_shape(many, params0, bank, lam, masks[:, 0], keys, state0)
        hist = {k: jnp.zeros((iterations + 1, *v.shape), v.dtype) for k, v in shapes.items()}
        hist["diverged"] = jnp.zeros((iterations + 1, c), bool)
        hist["pushed"] = jnp.zeros((iterations + 1, c), bool)
        return {
            "bank": bank,
            "champion": params0,
            "champion_score": jnp.full((c,), jnp.inf, jnp.float32),
            "champion_iteration": jnp.full((c,), -1, jnp.int32),
            "champion_state": state0,
            "history": hist,
        }

    def train(n, state, params0, lam, masks, keys, state0=None):
        """``((params, model_state), metrics)`` of run ``n`` of every chain."""
        dkeys = keys if shuffle == "same" else jax.vmap(jax.random.fold_in, (0, None))(keys, n)
        masks_n = jax.lax.dynamic_index_in_dim(masks, n, axis=1, keepdims=False)
        return many(params0, state["bank"], lam, masks_n, dkeys, state0)

    def post(n, state, params, metrics, active, mstate=None):
        bank = state["bank"]
        params = constrain(params)
        ok = (
            jnp.isfinite(metrics["loss"])
            & jnp.isfinite(metrics["score"])
            & jax.vmap(_all_finite)(params)
        )
        if mstate is not None:
            mstate = constrain(mstate)
            ok = ok & jax.vmap(_all_finite_inexact)(mstate)
        want = (ok | push_diverged) & active
        if mode == "independent":
            push = want & (bank.count < capacity)
            pushed = jax.vmap(lambda b, p: b.push(p))(bank, params)
            bank = _tree_where_chain(push, pushed, bank)
        else:

            def push_one(b, xs):
                p, w = xs
                do = w & (b.count < capacity)
                return _tree_where(do, b.push(p), b), do

            bank, push = jax.lax.scan(push_one, bank, (params, want))
        better = ok & (metrics["score"] < state["champion_score"])
        out = dict(metrics, diverged=~ok, pushed=push)
        hist = {k: v.at[n].set(out[k]) for k, v in state["history"].items()}
        return {
            "bank": bank,
            "champion": _tree_where_chain(better, params, state["champion"]),
            "champion_score": jnp.where(better, metrics["score"], state["champion_score"]),
            "champion_iteration": jnp.where(better, n, state["champion_iteration"]),
            "champion_state": _tree_where_chain(better, mstate, state["champion_state"]),
            "history": hist,
        }

    def body(n, state, params0, lam, masks, keys, active, state0):
        (params, mstate), metrics = train(n, state, params0, lam, masks, keys, state0)
        return post(n, state, params, metrics, active, mstate)

    def loop(state, start, stop, params0, lam, masks, keys, active, state0=None):
        return jax.lax.fori_loop(
            start,
            stop,
            lambda n, st: body(n, st, params0, lam, masks, keys, active, state0),
            state,
        )

    loop.post = post  # type: ignore[attr-defined]
    return init_state, loop


def _python_chains(
    run: Callable[..., Any],
    *,
    mode: str,
    shuffle: str,
    post: Callable[..., Any],
    compiler: Callable[..., Any],
) -> Callable[..., dict[str, Any]]:
    """``advance(state, start, stop, args)``: iterations ``start <= n < stop`` of all chains with
    the steps looped in Python (:func:`pnjax.fit.python_loop_run` over the chain axis).

    The same updates as the scan inside :func:`_build_program`, with each (vmapped over chains)
    update compiled once and called from Python: on XLA:CPU convolutional steps run many times
    faster this way than inside ``lax.scan`` (see ``docs/cpu_speed.md``).
    """
    train = _python_loop_core(
        run, compiler, chains=True, bank_axis=0 if mode == "independent" else None
    )
    fold_v = compiler(jax.vmap(jax.random.fold_in, (0, None)))
    post_j = compiler(post)

    def advance(state, start, stop, args):
        params0, lam, masks, keys, active, state0 = args
        for n in range(start, stop):
            dkeys = keys if shuffle == "same" else fold_v(keys, n)
            (params, mstate), metrics = train(
                params0, state["bank"], lam, masks[:, n], dkeys, state0
            )
            state = post_j(n, state, params, metrics, active, mstate)
        return state

    return advance


def _outputs(state: dict[str, Any]) -> tuple[Any, ...]:
    """``(champion, champion_iteration, history [C, N + 1, ...], bank, champion_state)`` from a
    loop state."""
    hist = jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1), state["history"])
    champion_state = state.get("champion_state")
    return state["champion"], state["champion_iteration"], hist, state["bank"], champion_state


def _all_finite_inexact(tree: PyTree) -> jax.Array:
    """Whether every inexact (float or complex) leaf is finite; ``True`` for none."""
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _tree_where_chain(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """Per-chain select: ``cond`` ``[C]`` broadcast over each leaf's trailing axes."""

    def sel(x, y):
        return jnp.where(cond.reshape(cond.shape + (1,) * (x.ndim - 1)), x, y)

    return jax.tree_util.tree_map(sel, a, b)


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


def run_chains(
    init_params: PyTree,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    iterations: int,
    lam: float | Sequence[float] | jax.Array,
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
      optimizer: any Optax transformation; re-initialized for every run of every chain.
      iterations: N, persistent runs (rounds, in population mode) after the plain one.
      lam: λ >= 0, a scalar or a ``[C]`` array (one λ per chain).
      steps: updates per run (full-batch form).
      layers: ``None`` (every layer, Eq. 4), a layer name or a tuple of names, ``'random'`` (a
        layer drawn from each chain's key, see ``layer_draw``), a **list** with one such choice
        per chain, or an int array ``[C]`` / ``[C, N + 1]`` of layer indices (-1: every layer).
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

    Returns:
      A :class:`ChainsResult` (``champion_state``: each chain's championship state).

    Raises:
      ValueError: leading axes that disagree, ``lam`` or ``key`` of the wrong length, an unknown
        ``mode``, ``layers``, ``shuffle`` or ``layer_draw``, a bad ``capacity``, steps or data,
        a ``model_state`` without the chain axis, or a ``loss_fn`` whose output does not fit
        ``model_state``.

    References:
      Min, *Persistent Neurons*, arXiv:2007.01419, Algorithm 1.
    """
    if checkpoint_dir is not None:  # path, ownership, writability and lock, before any tracing
        from pnjax import checkpoint as ckpt

        folder_lock = ckpt.open_checkpoint_dir(checkpoint_dir)
    compiled, args, finish, *stages = prepare_chains(
        init_params,
        loss_fn,
        optimizer,
        iterations=iterations,
        lam=lam,
        steps=steps,
        layers=layers,
        score_fn=score_fn,
        key=key,
        mode=mode,
        mesh=mesh,
        chain_axes=chain_axes,
        layer_draw=layer_draw,
        capacity=capacity,
        data=data,
        batch_size=batch_size,
        epochs=epochs,
        shuffle=shuffle,
        log_every=log_every,
        push_diverged=push_diverged,
        jit=jit,
        loop=loop,
        model_state=model_state,
        _stages=checkpoint_dir is not None,
    )
    if checkpoint_dir is None:
        return finish(compiled(*args))
    init_j, advance, masks, cap = stages[0]
    keep = int(checkpoint_keep)
    if keep < 1:
        raise ValueError(f"checkpoint_keep must be an int >= 1, got {checkpoint_keep!r}.")
    has_state = model_state is not None
    extra = {"model_state": args[5]} if has_state else {}  # only with a state: old ones resume
    fingerprint = ckpt.driver_fingerprint(
        "run_chains",
        {
            "iterations": int(iterations),
            "mode": mode,
            "steps": steps,
            "epochs": epochs,
            "batch_size": batch_size,
            "log_every": log_every,
            "capacity": int(cap),
            "shuffle": shuffle,
            "push_diverged": push_diverged,
            "num_args_chains": int(np.shape(args[1])[0]),
        },
        optimizer=optimizer,
        params=jax.tree_util.tree_map(lambda x: x[0], init_params),
        init_params=init_params,
        lam=np.asarray(args[1]),
        keys=np.asarray(jax.random.key_data(args[3])),
        data=data,
        layer_masks=np.asarray(masks),
        **extra,
    )
    state = init_j(*args)

    def like(meta: dict[str, Any]) -> PyTree:
        ckpt.check_fingerprint(meta.get("fingerprint"), fingerprint, checkpoint_dir)
        return state

    done = 0
    found = ckpt.restore_checkpoint(checkpoint_dir, like=like)
    if found is not None:
        state, done = found.state, int(found.metadata["done"])
    if done <= int(iterations):
        folder_lock.require_writable()
    for n in range(done, int(iterations) + 1):
        state = advance(state, n, n + 1, args)
        jax.block_until_ready(state)
        meta = {"fingerprint": fingerprint, "done": n + 1}
        ckpt.save_checkpoint(checkpoint_dir, n + 1, state, meta, keep=keep)
    return dataclasses.replace(finish(_outputs(state)), resumed_from=done)


def prepare_chains(
    init_params: PyTree,
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    iterations: int,
    lam: float | Sequence[float] | jax.Array,
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
    _stages: bool = False,
) -> tuple[Callable[..., Any], tuple[Any, ...], Callable[[Any], ChainsResult]]:
    """:func:`run_chains` split in two: the jitted program, its arguments, and the unpacker.

    ``compiled, args, finish = prepare_chains(...)`` then ``finish(compiled(*args))`` is
    ``run_chains(...)``. Calling ``compiled(*args)`` again reuses the compilation, which is what
    a benchmark or an ahead-of-time compile (``compiled.lower(*args).compile()``) needs.

    Args:
      As :func:`run_chains`.

    Returns:
      ``(compiled, args, finish)``: the jitted program, its (sharded, padded) arguments, and
      ``finish(outputs) -> ChainsResult``.
    """
    if mode not in MODES:
        raise ValueError(
            f"unknown mode {mode!r}; use mode='independent' (one bank per chain, Algorithm 1 "
            "each) or mode='population' (one bank shared by all chains, filled in rounds)."
        )
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}.")
    if iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r}.")
    iterations = int(iterations)
    if shuffle not in ("same", "per_iteration"):
        raise ValueError(f"shuffle must be 'same' or 'per_iteration', got {shuffle!r}.")
    if data is None and (batch_size is not None or epochs is not None):
        raise ValueError("batch_size and epochs need data=...; for full-batch training pass steps.")
    if data is not None and steps is not None:
        raise ValueError("pass either steps (full batch) or data with epochs, not both.")
    c = num_chains(init_params)
    has_state = model_state is not None
    if has_state:
        _check_state_chains(model_state, c)
        model_state = jax.tree_util.tree_map(jnp.asarray, model_state)
    lams = _chain_lams(lam, c)
    keys = _chain_keys(key, c)
    template = jax.tree_util.tree_map(lambda x: jnp.zeros(np.shape(x)[1:], x.dtype), init_params)
    push_diverged = _checks.check_bool("push_diverged", push_diverged)
    _checks.check_score_fn(score_fn, template, jax.tree_util.tree_map(lambda x: x[0], model_state))
    names = layer_names(template)
    idx = _layer_schedules(names, layers, layer_draw, iterations, keys, c)
    masks = _masks(idx, len(names))
    need = iterations if mode == "independent" else iterations * c
    if capacity is None:
        capacity = iterations + 1 if mode == "independent" else (iterations + 1) * c
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}.")
    if capacity < need:
        raise ValueError(
            f"capacity={capacity} is smaller than the {need} anchors the last "
            f"{'iteration' if mode == 'independent' else 'round'} needs; use capacity >= {need}."
        )
    run = make_train_run(
        loss_fn,
        optimizer,
        steps=steps,
        score_fn=score_fn,
        data=data,
        batch_size=batch_size,
        epochs=epochs,
        log_every=log_every,
        has_state=has_state,
    )

    # Padding to a multiple of the device count (sharded runs); padded chains are inactive.
    padded = c
    constrain: Callable[[PyTree], PyTree] = lambda t: t  # noqa: E731
    put: Callable[[Any], Any] = jnp.asarray
    if mesh is not None:
        axes = _mesh_axes(mesh, chain_axes)
        shards = int(np.prod([mesh.shape[a] for a in axes]))
        padded = -(-c // shards) * shards
        spec = jax.sharding.PartitionSpec(axes)
        sharding = jax.sharding.NamedSharding(mesh, spec)

        def put(x):  # noqa: F811 - the sharded version
            return jax.device_put(x, sharding)

        def constrain(t):  # noqa: F811
            return jax.tree_util.tree_map(
                lambda x: jax.lax.with_sharding_constraint(x, sharding), t
            )

    def pad(x):
        x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
        if padded == c:
            return x
        return jnp.concatenate([x, jnp.repeat(x[:1], padded - c, axis=0)], axis=0)

    active = np.arange(padded) < c
    args = (
        jax.tree_util.tree_map(lambda x: put(pad(x)), init_params),
        put(pad(lams)),
        put(pad(masks)),
        put(pad(keys)),
        put(jnp.asarray(active)),
        jax.tree_util.tree_map(lambda x: put(pad(x)), model_state),
    )
    init_state, loop_fn = _build_program(
        run,
        template=template,
        capacity=int(capacity),
        iterations=iterations,
        mode=mode,
        shuffle=shuffle,
        push_diverged=push_diverged,
        constrain=constrain,
    )

    if loop not in ("auto", "scan", "python"):
        raise ValueError(
            f"loop must be 'auto', 'scan' (one compiled program) or 'python' (a compiled, "
            f"vmapped update called from Python: faster for convolutional models on a CPU), "
            f"got {loop!r}."
        )
    if loop == "python" and mesh is not None:
        raise ValueError("loop='python' does not shard; with mesh=... use loop='scan' or 'auto'.")
    if loop == "auto":
        state_template = jax.tree_util.tree_map(lambda x: x[0], model_state)
        loop = "scan" if mesh is not None else choose_loop(loss_fn, template, data, state_template)
    compiler = jit or _compile.jit
    if loop == "scan":
        loop_j = compiler(loop_fn)

        def advance(state, start, stop, a):
            return loop_j(state, start, stop, *a)

        def program(*a):
            return _outputs(loop_fn(init_state(*a), 0, iterations + 1, *a))

        compiled = compiler(program)
    else:
        advance = _python_chains(
            run, mode=mode, shuffle=shuffle, post=loop_fn.post, compiler=compiler
        )
        init_j = compiler(init_state)

        def compiled(*a):
            return _outputs(advance(init_j(*a), 0, iterations + 1, a))

    def finish(outputs: tuple[Any, ...]) -> ChainsResult:
        return _finish(outputs, c=c, padded=padded, idx=idx, names=names, mode=mode)

    if _stages:
        return compiled, args, finish, (compiler(init_state), advance, masks, capacity)
    return compiled, args, finish


def _finish(
    outputs: tuple[Any, ...],
    *,
    c: int,
    padded: int,
    idx: np.ndarray,
    names: tuple[str, ...],
    mode: str,
) -> ChainsResult:
    champ, champ_it, hist, bank, champ_state = outputs

    def unpad(x):
        return x[:c] if padded != c else x

    hist = jax.device_get(hist)
    history = {
        "score": np.asarray(unpad(hist["score"]), np.float32),
        "loss": np.asarray(unpad(hist["loss"]), np.float32),
        "penalty": np.asarray(unpad(hist["penalty"]), np.float32),
        "curve": np.asarray(unpad(hist["curve"]), np.float32),
        "layer": idx,
        "diverged": np.asarray(unpad(hist["diverged"]), bool),
        "pushed": np.asarray(unpad(hist["pushed"]), bool),
    }
    if mode == "independent":
        bank = jax.tree_util.tree_map(unpad, bank)
    return ChainsResult(
        champion=jax.tree_util.tree_map(unpad, champ),
        champion_iteration=np.asarray(unpad(champ_it), np.int64),
        history=history,
        bank=bank,
        layer_names=names,
        mode=mode,
        champion_state=jax.tree_util.tree_map(unpad, champ_state),
    )
