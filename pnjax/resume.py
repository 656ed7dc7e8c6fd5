"""Restore, iterate, save: the host side of Algorithm 1, shared by every driver.

The whole :class:`pnjax.loop.LoopState` (for one chain, or with a chain axis) is one pytree:
it is saved after every iteration and restored with itself as the template. A run checkpointed
inside an iteration (``checkpoint_every_epochs``) also saves that iteration's training carry
and loss curve so far. Every checkpoint stores a fingerprint of the configuration, with the
checkpoint :data:`LAYOUT` number: a folder written with another layout or configuration is
refused with a ``ValueError`` saying why, never misread.

The checkpoint files go through :mod:`pnjax.checkpoint`'s public functions only; orbax is
imported only when a folder is given.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from pnjax._checks import check_callback_replay
from pnjax.loop import LoopState

PyTree = Any
#: Version of what a checkpoint holds; a checkpoint of another layout is refused.
#: Layout 1: pnjax 0.1.0's field-by-field dictionaries (bank, champion, history lists, rng);
#: layout 2: the whole loop state as one pytree; layout 3: with ``history['lam']``, and a
#: fingerprint without ``iterations`` (per-run settings as one hash per run), so a finished
#: run can be extended.
LAYOUT = 3

_SCOPE: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "pnjax_checkpoint_scope", default=None
)


@contextlib.contextmanager
def checkpoint_scope(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Checkpoints every driver call inside the block, in call order.

    The k-th call (counting from 0) of :func:`pnjax.persistent_fit`, :func:`pnjax.run_chains`
    or :func:`pnjax.persistent_search` that passes no ``checkpoint_dir`` uses
    ``directory / f"fit-{k:03d}"``, so a deterministic program that calls the drivers several
    times (e.g. :func:`pnjax.experiments.kink.run_kink`) resumes every call when run again in
    the same scope; calls already complete return at once from their checkpoint.

    Args:
      directory: the parent folder.

    Yields:
      The folder as a ``Path``.
    """
    path = Path(directory)
    token = _SCOPE.set([path, 0])
    try:
        yield path
    finally:
        _SCOPE.reset(token)


def checkpoint_folder(checkpoint_dir: Any) -> Path | None:
    """``checkpoint_dir`` as a ``Path``, else the enclosing scope's next folder, else ``None``.

    Raises:
      TypeError: ``checkpoint_dir`` is not a path.
    """
    if checkpoint_dir is None:
        scope = _SCOPE.get()
        if scope is None:
            return None
        path = scope[0] / f"fit-{scope[1]:03d}"
        scope[1] += 1
        return path
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint_dir must be a folder path (str or os.PathLike), got "
            f"{type(checkpoint_dir).__name__}."
        )
    from pnjax import checkpoint as ckpt

    return ckpt._check_dir(checkpoint_dir)  # refuses '' (the current directory), a file


def fingerprint(
    config: dict[str, Any],
    *,
    optimizer: Any = None,
    params: PyTree = None,
    shapes: dict[str, PyTree] | None = None,
    runs: dict[str, Any] | None = None,
    **trees: PyTree,
) -> dict[str, Any]:
    """The configuration's fingerprint (:func:`pnjax.checkpoint.config_fingerprint`) with the
    checkpoint layout number; with ``optimizer`` (and one model's ``params``) that of
    :func:`pnjax.checkpoint.driver_fingerprint`, which also covers the optimizer's state;
    ``shapes`` are described by structure, shapes and dtypes only; ``runs`` are arrays whose
    first axis is the run ``n`` (e.g. λ_n, the layer masks), kept as one hash per run so that a
    run with more iterations can resume (:func:`check_same_run`)."""
    from pnjax import checkpoint as ckpt

    config = {"layout": LAYOUT, **config}
    if optimizer is not None:
        out = ckpt.driver_fingerprint(
            str(config.get("driver")), config, optimizer=optimizer, params=params, **trees
        )
    else:
        out = ckpt.config_fingerprint(config, **trees)
    for name, tree in (shapes or {}).items():
        out[name] = ckpt.tree_fingerprint(tree, values=False)
    if runs:
        out["runs"] = {
            name: [ckpt.tree_fingerprint(np.asarray(row))["sha256"][:16] for row in np.asarray(arr)]
            for name, arr in runs.items()
        }
    return out


def check_same_run(saved: dict[str, Any] | None, current: dict[str, Any], directory: Path) -> None:
    """Raises ``ValueError`` unless the fingerprints agree; the per-run parts need agree only
    on the runs both have (so a run may be continued with more iterations)."""
    from pnjax import checkpoint as ckpt

    saved = dict(saved or {})
    current = dict(current)
    old, new = saved.pop("runs", {}) or {}, current.pop("runs", {}) or {}
    ckpt.check_fingerprint(saved, current, directory)
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name, []), new.get(name, [])
        m = min(len(a), len(b))
        bad = [n for n in range(m) if a[n] != b[n]]
        if bad or (not a) != (not b):
            raise ValueError(
                f"checkpoint folder {str(directory)!r} holds a run with a different "
                f"configuration ({name} of run {bad[0] if bad else 0} differs). Pass the same "
                "settings to resume it, or use an empty checkpoint folder (or delete this one) "
                "to start afresh."
            )


def resize(state: LoopState, rows: int, capacity: int) -> LoopState:
    """``state`` with ``rows`` history rows (runs) and a bank of ``capacity`` slots: cut, or
    padded with zeros (an empty history row, an empty bank slot); a leading chain axis kept."""
    axis = np.ndim(state.done)  # 0 for one chain, 1 with a chain axis
    bank_axis = np.ndim(state.bank.count) if state.bank != () else 0

    def fit(x, ax, n):
        x = np.asarray(jax.device_get(x)) if not isinstance(x, jax.Array) else x
        have = x.shape[ax]
        if have == n:
            return x
        if have > n:
            return jax.lax.slice_in_dim(x, 0, n, axis=ax)
        pad = [(0, 0)] * x.ndim
        pad[ax] = (0, n - have)
        return jax.numpy.pad(x, pad)

    history = {k: fit(v, axis, rows) for k, v in state.history.items()}
    finals = jax.tree_util.tree_map(lambda x: fit(x, axis, rows), state.finals)
    bank = state.bank
    if bank != ():
        bank = bank.replace(
            anchors=jax.tree_util.tree_map(lambda x: fit(x, bank_axis, capacity), bank.anchors),
            sq_norms=fit(bank.sq_norms, bank_axis, capacity),
        )
    return state.replace(history=history, finals=finals, bank=bank)


def _check_layout(saved: dict[str, Any] | None, directory: Path) -> None:
    layout = (saved or {}).get("layout", 1)
    if layout != LAYOUT:
        raise ValueError(
            f"checkpoint folder {str(directory)!r} was written with checkpoint layout {layout} "
            f"(an earlier pnjax); this pnjax reads layout {LAYOUT} only and cannot resume it. "
            "Finish that run with the pnjax that started it, or use an empty checkpoint folder "
            "(or delete this one) to start afresh."
        )


@dataclasses.dataclass
class Checkpoints:
    """One run's checkpoint folder.

    Attributes:
      directory: the folder.
      fingerprint: the configuration (see :func:`fingerprint`).
      keep: how many steps to keep.
      every: epochs between mid-iteration checkpoints, or ``None``.
      chunks: checkpoints per iteration (``ceil(epochs / every)``, else 1): iteration ``n``
        after ``e`` epochs is step ``n * chunks + ceil(e / every)``.
    """

    directory: Path
    fingerprint: dict[str, Any]
    keep: int = 2
    every: int | None = None
    chunks: int = 1
    lock: Any = None  # the folder's write lock (pnjax.checkpoint.FolderLock), held while running
    rows: int | None = None  # runs of this call (iterations + 1): a shorter saved run grows
    capacity: int | None = None  # the bank's capacity in this call

    def restore(
        self,
        template: Callable[[bool], LoopState],
        keep_finals: bool,
        partial_like: Callable[[], PyTree] | None = None,
    ) -> tuple[LoopState, tuple[Any, np.ndarray, int] | None, bool] | None:
        """The newest good checkpoint, or ``None``.

        Args:
          template: ``template(keep_finals) -> LoopState`` (the initial state).
          keep_finals: whether this run keeps every run's final params.
          partial_like: the template of a mid-iteration training carry.

        Returns:
          ``(state, partial, finals_restored)``: ``partial`` is ``(carry, curve, epoch)`` for
          an iteration cut off after ``epoch`` epochs, else ``None``.
        """
        from pnjax import checkpoint as ckpt

        def like(meta: dict[str, Any]) -> PyTree:
            _check_layout(meta.get("fingerprint"), self.directory)
            check_same_run(meta.get("fingerprint"), self.fingerprint, self.directory)
            done = int(meta.get("done", 0))
            if self.rows is not None and done > self.rows:
                raise ValueError(
                    f"checkpoint folder {str(self.directory)!r} holds {done} finished runs "
                    f"(iterations={done - 1}), more than iterations={self.rows - 1} asks for; "
                    f"pass iterations >= {done - 1} (a larger value continues the run), or use an "
                    "empty checkpoint folder to start afresh."
                )
            tree: dict[str, Any] = {"loop": template(bool(meta.get("has_finals")))}
            if meta.get("partial_epochs"):
                tree["partial"] = {"carry": partial_like(), "curve": np.zeros((0,), np.float32)}
            return tree

        found = ckpt.restore_checkpoint(self.directory, like=like)
        if found is None:
            return None
        state: LoopState = found.state["loop"]
        if self.rows is not None and self.capacity is not None:
            state = resize(state, self.rows, self.capacity)
        had = bool(found.metadata.get("has_finals"))
        if had and not keep_finals:
            state = state.replace(finals=())
        elif keep_finals and not had:
            state = state.replace(finals=template(True).finals)
        partial = None
        if "partial" in found.state:
            p = found.state["partial"]
            partial = (p["carry"], np.asarray(p["curve"]), int(found.metadata["partial_epochs"]))
        return state, partial, had

    def save(
        self,
        state: LoopState,
        done: int,
        partial: tuple[Any, np.ndarray, int] | None = None,
    ) -> None:
        """Saves ``state`` after ``done`` iterations (and, mid-iteration, ``partial``)."""
        from pnjax import checkpoint as ckpt

        tree: dict[str, Any] = {"loop": state}
        epoch = 0
        if partial is not None:
            carry, curve, epoch = partial
            tree["partial"] = {"carry": carry, "curve": curve}
        meta = {
            "fingerprint": self.fingerprint,
            "done": int(done),
            "partial_epochs": int(epoch),
            "has_finals": state.finals != (),
            # for a person reading the folder (a resume reads the state, not these)
            "champion_iteration": np.asarray(state.champion_iteration).tolist(),
            "champion_score": _json_scores(state.champion_score),
        }
        step = done * self.chunks + (-(-epoch // self.every) if epoch else 0)
        ckpt.save_checkpoint(self.directory, step, tree, meta, keep=self.keep)


def _json_scores(scores: Any) -> Any:
    """Scores as JSON (a float or a list of them; ``None`` where not finite)."""
    arr = np.asarray(scores, np.float64)
    out = np.where(np.isfinite(arr), arr, np.nan).tolist()
    if isinstance(out, float):
        return out if np.isfinite(out) else None
    return [s if np.isfinite(s) else None for s in out]


def open_checkpoints(
    directory: Path | None,
    fingerprint_fn: Callable[[], dict[str, Any]],
    *,
    keep: int,
    every: int | None,
    epochs: int | None,
    chunked: bool,
    lock: Any = None,
    rows: int | None = None,
    capacity: int | None = None,
) -> Checkpoints | None:
    """:class:`Checkpoints` for ``directory`` (``None`` without one); ``rows`` and ``capacity``
    are this call's runs and bank capacity (a saved run of fewer runs is grown to them)."""
    if directory is None:
        return None
    from pnjax import checkpoint as ckpt

    if lock is None:  # path, ownership, writability, lock: before training
        lock = ckpt.open_checkpoint_dir(directory)
    chunks = -(-int(epochs) // int(every)) if chunked and every and epochs else 1
    return Checkpoints(
        directory, fingerprint_fn(), keep, every if chunked else None, chunks, lock=lock,
        rows=rows, capacity=capacity,
    )  # fmt: skip


def champion_upto(history: dict[str, np.ndarray], n: int) -> np.ndarray:
    """The championship iteration among runs ``0..n`` (``-1``: none), per leading index."""
    scores = np.where(history["diverged"][..., : n + 1], np.inf, history["score"][..., : n + 1])
    best = np.argmin(scores, axis=-1)
    return np.where(np.isfinite(np.min(scores, axis=-1)), best, -1)


def callback_info(
    state: LoopState, n: int, *, has_state: bool, resumed: bool, finals: bool = True
) -> dict[str, Any]:
    """What a callback gets after run ``n`` (one chain: Python scalars; chains: ``[C]`` arrays).

    ``score``, ``loss``, ``diverged``, ``champion_iteration`` (among runs ``0..n``), the run's
    final ``params`` (``None`` when a resumed checkpoint did not keep them) and, with a model
    state, its ``model_state``; ``resumed=True`` when replayed from a checkpoint.
    """
    h = jax.device_get(state.history)
    batched = np.ndim(h["diverged"]) > 1

    def col(x):
        x = np.asarray(x)[..., n]
        return x if batched else x.item()

    info: dict[str, Any] = {"score": col(h["score"])}
    if "loss" in h:
        info["loss"] = col(h["loss"])
    info["diverged"] = col(h["diverged"])
    best = champion_upto(h, n)
    info["champion_iteration"] = best if batched else int(best)
    if resumed:
        info["resumed"] = True

    def final(tree):
        if not finals or state.finals == ():
            return None
        axis = 1 if batched else 0
        return jax.tree_util.tree_map(lambda x: x[(slice(None),) * axis + (n,)], tree)

    info["params"] = final(state.finals["params"]) if state.finals != () else None
    if has_state:
        info["model_state"] = final(state.finals["model_state"]) if state.finals != () else None
    return info


def iterate(
    state: LoopState,
    *,
    iterations: int,
    advance: Callable[..., LoopState],
    checkpoints: Checkpoints | None,
    callback: Callable[[int, dict[str, Any]], None] | None,
    has_state: bool,
    start: int = 0,
    partial: tuple[Any, np.ndarray, int] | None = None,
) -> LoopState:
    """Iterations ``start..N``: ``advance``, save, callback, in that order.

    ``advance(state, n, resume, on_chunk) -> state`` runs iteration ``n`` (``resume``: the cut
    off part of it, ``on_chunk(carry, curve, epoch)``: saves a mid-iteration checkpoint).
    """
    for n in range(start, iterations + 1):
        on_chunk = None
        if checkpoints is not None:

            def on_chunk(carry, curve, epoch, n=n, before=state):
                checkpoints.save(before, n, (carry, curve, epoch))

        state = advance(state, n, partial if n == start else None, on_chunk)
        if checkpoints is not None:
            checkpoints.save(state, n + 1)
        if callback is not None:
            callback(n, callback_info(state, n, has_state=has_state, resumed=False))
    return state


def restore_and_replay(
    checkpoints: Checkpoints | None,
    template: Callable[[bool], LoopState],
    *,
    keep_finals: bool,
    partial_like: Callable[[], PyTree] | None,
    callback: Callable[[int, dict[str, Any]], None] | None,
    has_state: bool,
) -> tuple[LoopState, int, tuple[Any, np.ndarray, int] | None]:
    """The state to start from (restored, or the template's), how many iterations are done,
    and a cut-off iteration; replays ``callback`` over the restored iterations."""
    found = (
        None if checkpoints is None else checkpoints.restore(template, keep_finals, partial_like)
    )
    if found is None:
        return template(keep_finals), 0, None
    state, partial, had_finals = found
    done = int(np.max(np.asarray(state.done)))
    check_callback_replay(
        {"done": done, "has_finals": had_finals}, callback, checkpoints.directory
    )
    if callback is not None:
        for n in range(done):
            callback(
                n,
                callback_info(state, n, has_state=has_state, resumed=True, finals=had_finals),
            )
    return state, done, partial


def run_loop(
    template: Callable[[bool], LoopState],
    advance: Callable[..., LoopState],
    *,
    iterations: int,
    checkpoints: Checkpoints | None,
    callback: Callable[[int, dict[str, Any]], None] | None,
    has_state: bool,
    partial_like: Callable[[], PyTree] | None = None,
    fused: Callable[[LoopState], LoopState] | None = None,
) -> tuple[LoopState, int]:
    """Make the state, restore it, loop, save: returns the final state and how many iterations
    were restored. ``fused(state)`` runs every iteration at once when nothing needs the host
    between iterations (no checkpoints, no callback)."""
    state, done, partial = restore_and_replay(
        checkpoints,
        template,
        keep_finals=callback is not None,
        partial_like=partial_like,
        callback=callback,
        has_state=has_state,
    )
    if fused is not None and checkpoints is None and callback is None:
        return fused(state), done
    if checkpoints is not None and checkpoints.lock is not None and done <= iterations:
        checkpoints.lock.require_writable()  # a read-only folder may only give back a done run
    state = iterate(
        state,
        iterations=iterations,
        advance=advance,
        checkpoints=checkpoints,
        callback=callback,
        has_state=has_state,
        start=done,
        partial=partial,
    )
    return state, done
