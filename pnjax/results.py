"""What the drivers return, built from the final :class:`pnjax.loop.LoopState`."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from pnjax.anchors import AnchorBank
from pnjax.loop import LoopState

PyTree = Any


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
      resumed_from: how many iterations were restored from a checkpoint instead of run
        (0: nothing was restored).
      champion_state: the model state (e.g. ``{'batch_stats': ...}``) at the end of the
        championship run, shaped like ``model_state``; the initial ``model_state`` if every
        iteration diverged; ``None`` when no ``model_state`` was given.
    """

    champion: PyTree
    champion_iteration: int
    history: dict[str, np.ndarray]
    bank: AnchorBank
    layer_names: tuple[str, ...] = ()
    resumed_from: int = 0
    champion_state: PyTree = None

    @property
    def diverged_iterations(self) -> tuple[int, ...]:
        """Indices of the iterations whose loss, score or params were not finite."""
        return tuple(int(i) for i in np.flatnonzero(self.history["diverged"]))

    @property
    def summary(self) -> str:
        """One line saying what happened: champion, divergences, resumption."""
        runs = len(self.history["score"])
        text = f"{runs} run(s) (plain + {runs - 1} persistent): "
        if self.champion_iteration >= 0:
            score = float(self.history["score"][self.champion_iteration])
            text += f"champion iteration {self.champion_iteration} (score {score:.6g})"
        else:
            text += "no champion: every iteration diverged (champion = init params)"
        bad = self.diverged_iterations
        if bad:
            pushed = [i for i in bad if self.history["pushed"][i]]
            text += f"; {len(bad)} diverged (iteration(s) {', '.join(map(str, bad))}), never " + (
                "champion, pushed anyway" if pushed else "champion, not pushed"
            )
        else:
            text += "; none diverged"
        if self.resumed_from:
            text += f"; resumed from a checkpoint after {self.resumed_from} iteration(s)"
        return text


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


def _history(state: LoopState, layer: np.ndarray | None, take: Any = slice(None)) -> dict:
    h = jax.device_get(state.history)
    out = {}
    for k, v in h.items():
        v = np.asarray(v)[take]
        out[k] = v.astype(bool) if k in ("diverged", "pushed") else v.astype(np.float32)
    if layer is not None:
        out["layer"] = layer
    return out


def fit_result(
    state: LoopState,
    *,
    layer: np.ndarray | None,
    names: tuple[str, ...],
    resumed_from: int,
    has_state: bool,
) -> FitResult:
    """A :class:`FitResult` from one chain's final loop state."""
    return FitResult(
        champion=state.champion,
        champion_iteration=int(state.champion_iteration),
        history=_history(state, layer),
        bank=state.bank,
        layer_names=names,
        resumed_from=resumed_from,
        champion_state=state.champion_state if has_state else None,
    )


def chains_result(
    state: LoopState,
    *,
    c: int,
    layer: np.ndarray,
    names: tuple[str, ...],
    mode: str,
    has_state: bool,
) -> ChainsResult:
    """A :class:`ChainsResult` from ``C`` (or more: padding) chains' final loop state."""

    def unpad(x):
        return x[:c]

    bank = state.bank if mode == "population" else jax.tree_util.tree_map(unpad, state.bank)
    return ChainsResult(
        champion=jax.tree_util.tree_map(unpad, state.champion),
        champion_iteration=np.asarray(unpad(state.champion_iteration), np.int64),
        history=_history(state, layer, slice(0, c)),
        bank=bank,
        layer_names=names,
        mode=mode,
        champion_state=jax.tree_util.tree_map(unpad, state.champion_state) if has_state else None,
    )
