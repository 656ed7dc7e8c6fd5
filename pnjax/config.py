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
      lam: λ as float32: a scalar, or ``[C]`` (one per chain).
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
    shuffle: str = "same"
    layer_draw: str = "once"
    mode: str = "independent"
    push_diverged: bool = False
    folder: Path | None = None
    every: int | None = None
    keep: int = 2
    lock: Any = None


def _chain_lam(lam: Any, chains: int | None) -> np.ndarray:
    check_lam(lam)
    arr = np.asarray(lam, np.float32)
    if chains is None:
        if arr.ndim != 0:
            raise ValueError(
                f"lam must be a scalar in persistent_fit, got shape {arr.shape}; use "
                "pnjax.run_chains for one λ per chain."
            )
        return arr
    if arr.ndim == 0:
        return np.full((chains,), arr, np.float32)
    if arr.shape != (chains,):
        raise ValueError(
            f"lam has shape {arr.shape}, but there are {chains} chains; pass a scalar (one λ for "
            f"every chain) or an array of shape ({chains},) (one λ per chain)."
        )
    return arr


def _capacity(capacity: Any, iterations: int, chains: int | None, mode: str) -> int:
    population = mode == "population"
    per_round = chains if population and chains else 1
    if capacity is None:
        return (iterations + 1) * per_round
    if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}.")
    need = iterations * per_round
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
) -> Config:
    """The :class:`Config` of a driver call (``chains``: ``C``, or ``None`` for one chain).

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
    lam_arr = _chain_lam(lam, chains)
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle must be 'same' or 'per_iteration', got {shuffle!r}.")
    check_layer_draw(layer_draw)
    if data is None and (batch_size is not None or epochs is not None):
        raise ValueError("batch_size and epochs need data=...; for full-batch training pass steps.")
    if data is not None and steps is not None:
        raise ValueError("pass either steps (full batch) or data with epochs, not both.")
    cap = _capacity(capacity, iterations, chains, mode)
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
