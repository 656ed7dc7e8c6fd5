"""The drivers' settings: one object made from their keywords, every check and message here."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from pnjax._checks import check_bool
from pnjax.loop import SHUFFLES
from pnjax.penalty import check_lam
from pnjax.resume import checkpoint_folder
from pnjax.run import check_positive_int
from pnjax.schedule import check_layer_draw

MODES = ("independent", "population")


@dataclasses.dataclass(frozen=True)
class Config:
    """Checked settings of one driver call.

    Attributes:
      iterations: N, persistent runs after the plain one.
      lam: λ of every run as float32: ``[N + 1]``, or ``[C, N + 1]`` (chains).
      lam_schedule: ``None``, or ``schedule(count) -> factor`` applied within every run.
      capacity: the bank's capacity.
      shuffle, layer_draw, mode, push_diverged: as the drivers document them.
      folder: the checkpoint folder (given, or from the enclosing ``checkpoint_scope``).
      every: epochs between mid-iteration checkpoints, or ``None``.
      keep: checkpoints kept.
      lock: the checkpoint folder's write lock (:func:`pnjax.checkpoint.open_checkpoint_dir`),
        taken once every other argument is checked and before anything is traced or trained:
        a bad, foreign, unwritable or busy folder is refused before any work; ``None`` without
        a folder.
    """

    iterations: int
    lam: np.ndarray
    capacity: int
    lam_schedule: Any = None
    shuffle: str = "same"
    layer_draw: str = "once"
    mode: str = "independent"
    push_diverged: bool = False
    folder: Path | None = None
    every: int | None = None
    keep: int = 2
    lock: Any = None


def _per_iteration(arr: np.ndarray, iterations: int, what: str) -> np.ndarray:
    """``[..., N + 1]`` from a last axis of ``N`` (λ_1..λ_N; run 0 takes λ_1) or ``N + 1``."""
    n = arr.shape[-1]
    if n == iterations + 1:
        return arr
    if n == iterations and n > 0:
        return np.concatenate([arr[..., :1], arr], axis=-1)
    raise ValueError(
        f"{what} has {n} λ values per chain, but there are {iterations} persistent iterations; "
        f"give {iterations} (λ_1..λ_N, run 0 takes λ_1) or {iterations + 1} (λ_0..λ_N) values."
    )


def lam_values(lam: Any, chains: int | None, iterations: int) -> tuple[np.ndarray, Any]:
    """``(values, schedule)``: λ of every run as float32 ``[N + 1]`` (one chain) or
    ``[C, N + 1]`` (``chains = C``), and the schedule (a callable ``lam``) or ``None``.

    ``lam`` is a float; a callable ``schedule(count) -> λ`` (values then all 1, the schedule
    multiplies them); a per-iteration sequence of ``N`` or ``N + 1`` values (one chain), or
    for chains a ``[C]`` array (one λ per chain) or a ``[C | 1, N | N + 1]`` array.
    """
    rows = iterations + 1
    if callable(lam) and not isinstance(lam, (np.ndarray, np.generic)) and not hasattr(
        lam, "shape"
    ):
        shape = (rows,) if chains is None else (chains, rows)
        return np.ones(shape, np.float32), lam
    check_lam(lam)
    arr = np.asarray(lam, np.float32)
    if chains is None:
        if arr.ndim == 0:
            return np.full((rows,), arr, np.float32), None
        if arr.ndim == 1:
            return _per_iteration(arr, iterations, "lam"), None
        raise ValueError(
            f"lam must be a scalar, a schedule or one λ per iteration in persistent_fit, got "
            f"shape {arr.shape}; use pnjax.run_chains for one λ per chain."
        )
    if arr.ndim == 0:
        return np.full((chains, rows), arr, np.float32), None
    if arr.ndim == 1 and arr.shape == (chains,):
        return np.repeat(arr[:, None], rows, axis=1), None
    if arr.ndim == 2 and arr.shape[0] in (1, chains):
        per = _per_iteration(arr, iterations, f"lam of shape {arr.shape}")
        return np.ascontiguousarray(np.broadcast_to(per, (chains, rows))), None
    raise ValueError(
        f"lam has shape {arr.shape}, but there are {chains} chains; pass a scalar (one λ for "
        f"every chain), an array of shape ({chains},) (one λ per chain), an array of shape "
        f"({chains}, {iterations}) or (1, {iterations}) (one λ per chain and persistent "
        "iteration; one more column for run 0), or a schedule count -> λ."
    )


def schedule_values(schedule: Any, total_steps: int) -> np.ndarray:
    """A λ schedule's values at update counts ``0..total_steps - 1``, float32 ``[T]``.

    Raises:
      ValueError: a value that is negative or not finite, or a schedule that does not map an
        int count to a scalar.
    """
    import jax
    import jax.numpy as jnp

    try:
        vals = np.asarray(jax.vmap(schedule)(jnp.arange(total_steps)), np.float32)
    except Exception as e:  # noqa: BLE001 - any failure: say what a schedule must be
        raise ValueError(
            f"lam={schedule!r} is callable, so it is taken as a schedule count -> λ (e.g. "
            f"optax.linear_schedule(0.0, 0.01, 1000)), but calling it failed: {e}"
        ) from e
    if vals.shape != (total_steps,):
        raise ValueError(
            f"the λ schedule must map an update count to a scalar, got shape {vals.shape[1:]}."
        )
    if not np.all(np.isfinite(vals)) or np.any(vals < 0):
        bad = int(np.flatnonzero(~np.isfinite(vals) | (vals < 0))[0])
        raise ValueError(
            f"the λ schedule gives {vals[bad]} at count {bad}; λ must be finite and >= 0."
        )
    return vals


def lam_setting(lam: Any) -> Any:
    """λ as a checkpoint's fingerprint names it: the number for a constant λ (so a change reads
    ``lam: 0.1 in the checkpoint, 0.2 now``), else what kind of λ it is (the values are then
    covered per run and by the schedule's values)."""
    if callable(lam) and not hasattr(lam, "shape"):
        return "schedule"
    arr = np.asarray(lam, np.float64)
    return float(arr) if arr.ndim == 0 else f"array of shape {list(arr.shape)}"


def capacity_setting(capacity: Any) -> Any:
    """The capacity as given, or ``'default'`` (it then grows with ``iterations``)."""
    return "default" if capacity is None else capacity


def schedule_fingerprint(cfg: Config, total_steps: int) -> np.ndarray | None:
    """What identifies a λ schedule in a checkpoint's fingerprint: its values at every update
    count ``0..total_steps - 1`` (``None`` without a schedule)."""
    if cfg.lam_schedule is None:
        return None
    return schedule_values(cfg.lam_schedule, total_steps)


def _capacity(
    capacity: Any, iterations: int, chains: int | None, mode: str, start: int = 0
) -> int:
    population = mode == "population"
    per_round = chains if population and chains else 1
    if capacity is None:
        return start + (iterations + 1) * per_round
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}.")
    need = start + iterations * per_round
    if start and capacity < need:
        raise ValueError(
            f"capacity={capacity} cannot hold the {start} anchors of init_bank and the "
            f"{need - start} the runs push before the last one; use capacity >= {need}."
        )
    if capacity < need:
        if chains is None:
            raise ValueError(
                f"capacity={capacity} is smaller than iterations={iterations}: run n needs the "
                f"{iterations} anchors of the runs before it; use capacity >= {iterations}."
            )
        raise ValueError(
            f"capacity={capacity} is smaller than the {need} anchors the last "
            f"{'round' if population else 'iteration'} needs; use capacity >= {need}."
        )
    return int(capacity)


def make_config(
    *,
    iterations: Any,
    lam: Any,
    steps: Any = None,
    data: Any = None,
    batch_size: Any = None,
    epochs: Any = None,
    shuffle: Any = "same",
    layer_draw: Any = "once",
    capacity: Any = None,
    mode: Any = "independent",
    push_diverged: bool = False,
    checkpoint_dir: Any = None,
    checkpoint_every_epochs: Any = None,
    checkpoint_keep: Any = 2,
    chains: int | None = None,
    start_count: int = 0,
) -> Config:
    """The :class:`Config` of a driver call (``chains``: ``C``, or ``None`` for one chain;
    ``start_count``: anchors already in the bank a run starts from).

    Raises:
      ValueError: a bad ``iterations``, ``lam``, ``mode``, ``shuffle``, ``layer_draw``,
        ``capacity``, ``checkpoint_every_epochs`` or ``checkpoint_keep``; ``batch_size`` or
        ``epochs`` without ``data``; ``steps`` with ``data``.
      TypeError: a ``checkpoint_dir`` that is not a path.
    """
    if mode not in MODES:
        raise ValueError(
            f"unknown mode {mode!r}; use mode='independent' (one bank per chain, Algorithm 1 "
            "each) or mode='population' (one bank shared by all chains, filled in rounds)."
        )
    iterations = check_positive_int("iterations", iterations, allow_zero=True)
    lam_arr, schedule = lam_values(lam, chains, iterations)
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be 'same' or 'per_iteration', got {shuffle!r}.")
    check_layer_draw(layer_draw)
    if data is None and (batch_size is not None or epochs is not None):
        raise ValueError("batch_size and epochs need data=...; for full-batch training pass steps.")
    if data is not None and steps is not None:
        raise ValueError("pass either steps (full batch) or data with epochs, not both.")
    cap = _capacity(capacity, iterations, chains, mode, start_count)
    folder = checkpoint_folder(checkpoint_dir)
    every = None
    if checkpoint_every_epochs is not None:
        every = check_positive_int("checkpoint_every_epochs", checkpoint_every_epochs)
        if data is None:
            raise ValueError(
                "checkpoint_every_epochs needs the mini-batch form (data=..., epochs=...); "
                "full-batch runs are checkpointed after every iteration."
            )
        if folder is None:
            raise ValueError("checkpoint_every_epochs needs checkpoint_dir=... to save into.")
    keep = check_positive_int("checkpoint_keep", checkpoint_keep)
    return Config(
        iterations=iterations,
        lam=lam_arr,
        capacity=cap,
        lam_schedule=schedule,
        shuffle=shuffle,
        layer_draw=layer_draw,
        mode=mode,
        push_diverged=check_bool("push_diverged", push_diverged),
        folder=folder,
        every=every,
        keep=keep,
        lock=_open_folder(folder),
    )


def _open_folder(folder: Path | None) -> Any:
    if folder is None:
        return None
    from pnjax import checkpoint as ckpt

    return ckpt.open_checkpoint_dir(folder)
