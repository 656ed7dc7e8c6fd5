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
        plain loss, without the penalty, at the end of the iteration), ``penalty`` (the
        persistent penalty there, with ``lam``), ``lam`` (the λ of the run's last update: the
        value given for that iteration, times a schedule's value at the last update count),
        ``layer`` (index of the penalized layer; -1: every layer; -2: several layers, see
        ``layer_mask``), ``layer_mask`` ``[iterations + 1, num_layers]`` bool (the penalized
        layers, in ``layer_names`` order), ``diverged`` (bool), ``pushed`` (bool), and
        ``curve`` ``[iterations + 1, points]``: the plain training loss ``L`` along each run,
        **without** the penalty (the loss of the batch each update was computed on, before the
        update; every ``log_every`` steps, or the mean per epoch in the mini-batch form).
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

    def plot(self, ax: Any = None) -> Any:
        """Loss curves of every run and the scores, the champion marked (matplotlib).

        The left axes show ``history['curve']`` (the plain training loss, without the
        penalty) of run ``n`` against its recording points, the champion's curve drawn thick;
        the right axes show ``history['score']`` per iteration, the champion circled and the
        diverged runs crossed. matplotlib is imported here, not with pnjax.

        Args:
          ax: ``None`` (a new figure with two axes), or a sequence of two matplotlib axes.

        Returns:
          ``(figure, (curve_axes, score_axes))``.
        """
        import matplotlib.pyplot as plt

        if ax is None:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        else:
            axes = tuple(ax)
            if len(axes) != 2:
                raise ValueError(f"ax must be None or two matplotlib axes, got {len(axes)}.")
            fig = axes[0].figure
        curves = np.asarray(self.history["curve"])
        champ = self.champion_iteration
        for n, curve in enumerate(curves):
            lw = 2.5 if n == champ else 1.0
            axes[0].plot(curve, lw=lw, label=f"run {n}" + (" (champion)" if n == champ else ""))
        axes[0].set_xlabel("recording point")
        axes[0].set_ylabel("training loss (without penalty)")
        axes[0].legend(fontsize="small")
        scores = np.asarray(self.history["score"])
        its = np.arange(len(scores))
        axes[1].plot(its, scores, "o-", label="score")
        bad = np.asarray(self.history["diverged"])
        if bad.any():
            axes[1].plot(its[bad], np.nan_to_num(scores[bad]), "rx", label="diverged")
        if champ >= 0:
            axes[1].plot([champ], [scores[champ]], "o", ms=14, mfc="none", mec="k",
                         label="champion")  # fmt: skip
        axes[1].set_xlabel("iteration")
        axes[1].set_ylabel("score")
        axes[1].legend(fontsize="small")
        return fig, axes


@dataclasses.dataclass(frozen=True)
class ChainsResult:
    """What :func:`run_chains` returns: :class:`pnjax.FitResult`'s fields with a chain axis.

    Attributes:
      champion: params pytree, every leaf ``[C, ...]``: each chain's championship params (its
        initialization where every iteration diverged).
      champion_iteration: ``[C]`` int, each chain's championship iteration (0 = plain run), -1
        where every iteration diverged.
      history: ``score``, ``loss``, ``penalty``, ``lam`` ``[C, N + 1]`` float32; ``curve``
        ``[C, N + 1, points]``; ``layer`` ``[C, N + 1]`` int (-1: all layers, -2: several);
        ``layer_mask`` ``[C, N + 1, num_layers]`` bool; ``diverged`` and ``pushed``
        ``[C, N + 1]`` bool, with ``N = iterations`` (see :class:`pnjax.FitResult`).
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

    def summary(self) -> str:
        """A short table, one line per chain: its championship iteration, the champion's
        score, the plain run's score (iteration 0) and how many runs diverged."""
        scores = np.asarray(self.history["score"])
        diverged = np.asarray(self.history["diverged"])
        lines = [f"{'chain':>5}  {'champion':>8}  {'best score':>12}  {'plain score':>12}  "
                 f"{'diverged':>8}"]  # fmt: skip
        for c in range(self.num_chains):
            it = int(self.champion_iteration[c])
            best = f"{scores[c, it]:12.6g}" if it >= 0 else f"{'-':>12}"
            lines.append(
                f"{c:>5}  {it:>8}  {best}  {scores[c, 0]:12.6g}  {int(diverged[c].sum()):>8}"
            )
        lines.append(f"best chain: {self.best_chain} ({self.mode} mode)")
        return "\n".join(lines)

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


def _history(
    state: LoopState,
    layer: np.ndarray | None,
    take: Any = slice(None),
    masks: np.ndarray | None = None,
) -> dict:
    h = jax.device_get(state.history)
    out = {}
    for k, v in h.items():
        v = np.asarray(v)[take]
        out[k] = v.astype(bool) if k in ("diverged", "pushed") else v.astype(np.float32)
    if layer is not None:
        out["layer"] = layer
    if masks is not None:
        out["layer_mask"] = np.asarray(masks) != 0
    return out


def fit_result(
    state: LoopState,
    *,
    layer: np.ndarray | None,
    names: tuple[str, ...],
    resumed_from: int,
    has_state: bool,
    masks: np.ndarray | None = None,
) -> FitResult:
    """A :class:`FitResult` from one chain's final loop state."""
    return FitResult(
        champion=state.champion,
        champion_iteration=int(state.champion_iteration),
        history=_history(state, layer, masks=masks),
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
    masks: np.ndarray | None = None,
) -> ChainsResult:
    """A :class:`ChainsResult` from ``C`` (or more: padding) chains' final loop state."""

    def unpad(x):
        return x[:c]

    bank = state.bank if mode == "population" else jax.tree_util.tree_map(unpad, state.bank)
    return ChainsResult(
        champion=jax.tree_util.tree_map(unpad, state.champion),
        champion_iteration=np.asarray(unpad(state.champion_iteration), np.int64),
        history=_history(state, layer, slice(0, c), masks=masks),
        bank=bank,
        layer_names=names,
        mode=mode,
        champion_state=jax.tree_util.tree_map(unpad, state.champion_state) if has_state else None,
    )
