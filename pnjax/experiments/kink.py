"""The 1-D "kink" regression of the paper's Section 3: re-initialization vs persistent training.

Set-up (paper): 1-32-32-1 ReLU MLP, He-normal weights and zero biases, mean squared error,
full-batch GD with momentum 0.9, lr 1e-3, 50,000 steps, λ = 0.01. The paper's data is not
published; :func:`pnjax.data.make_kink_data` builds data on which this set-up gets stuck at
"two affine pieces kinked near 0" for most seeds.

Protocol here:
1. ``reinit``: train ``num_reinit`` He-initialized seeds plainly (one ``vmap``); the stuck
   ones are those whose predictor is affine on each side of the data's gap.
2. ``persistent``: from each of the first ``num_stuck`` stuck seeds, 1 plain + ``iterations``
   persistent runs (Algorithm 1); the championship is the lowest training loss, as in the paper.
3. Two controls that tell what the anchors themselves contribute:
   ``random_anchors``: the same penalty, but each pushed anchor replaced by a random direction
   with the same per-layer norms; ``scaled_init``: plain runs whose first-layer initialization
   is scaled down (the penalty shrinks that layer, which alone might explain an escape).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax.anchors import AnchorBank
from pnjax.data.kink import affine_check_grid, is_stuck, make_kink_data, two_piece_affine_loss
from pnjax.fit import FitResult, make_train_run, persistent_fit
from pnjax.layers import layer_layout
from pnjax.models.mlp import KinkMLP

PAPER = {"best_reinit_loss": 0.33, "persistent_champion_loss": 0.10, "stuck_loss": 4.2}


def kink_problem(**data_kwargs: Any) -> dict[str, Any]:
    """Data, model, loss and the stuck criterion of the kink experiment."""
    x, y = make_kink_data(**data_kwargs)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = KinkMLP()
    gap = float(data_kwargs.get("gap", 1.0))
    grid = affine_check_grid(np.asarray(x))

    def loss_fn(params):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    def stuck(params) -> jax.Array:
        return is_stuck(lambda g: model.apply({"params": params}, g), grid, radius=gap)

    return {"x": x, "y": y, "model": model, "loss_fn": loss_fn, "stuck": stuck, "gap": gap}


def init_params(problem: dict[str, Any], seed: int | jax.Array) -> Any:
    """He-normal/zero-bias params of seed ``seed`` (``KinkMLP().init(jax.random.key(seed), x)``)."""
    return problem["model"].init(jax.random.key(seed), problem["x"])["params"]


def optimizer(lr: float = 1e-3) -> optax.GradientTransformation:
    """GD with momentum 0.9, as in the paper."""
    return optax.sgd(lr, momentum=0.9)


def reinit_trainer(
    problem: dict[str, Any], *, steps: int, lr: float = 1e-3, jit=None
) -> Callable[[Sequence[int]], dict[str, np.ndarray]]:
    """``train(seeds)``: :func:`train_reinit` with one compilation shared by every call.

    Calls with the same number of seeds reuse one compiled program (a new ``jax.jit`` per chunk
    of seeds compiled again for every chunk, and kept every executable).
    """
    one = init_params(problem, 0)
    bank = AnchorBank.create(one, 1)
    run = make_train_run(problem["loss_fn"], optimizer(lr), steps=steps)
    many = (jit or jax.jit)(jax.vmap(run, in_axes=(0, None, None, None, None)))
    stuck_many = jax.jit(jax.vmap(problem["stuck"]))
    mask = jnp.ones((len(bank.names),), jnp.float32)

    def train(seeds: Sequence[int]) -> dict[str, np.ndarray]:
        seeds = np.asarray(seeds)
        params0 = jax.vmap(lambda s: init_params(problem, s))(jnp.asarray(seeds))
        params, metrics = many(params0, bank, jnp.float32(0.0), mask, jax.random.key(0))
        loss = np.asarray(metrics["loss"])
        finite = np.isfinite(loss) & np.asarray(jax.vmap(_all_finite)(params))
        return {
            "seeds": seeds,
            "loss": loss,
            "curve": np.asarray(metrics["curve"]),
            # a diverged run (NaN or inf) is neither stuck nor unstuck: see ``diverged``
            "stuck": np.asarray(stuck_many(params)) & finite,
            "diverged": ~finite,
            "params": params,
        }

    return train


def _all_finite(params: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]))


def train_reinit(
    problem: dict[str, Any], seeds: Sequence[int], *, steps: int, lr: float = 1e-3, jit=None
) -> dict[str, np.ndarray]:
    """Plain training of many seeds at once (one ``vmap``); returns losses, stuck flags, params.

    ``diverged[i]`` marks a seed whose loss or params are not finite; such a seed has
    ``stuck[i] = False`` and must not be counted as unstuck either.
    """
    return reinit_trainer(problem, steps=steps, lr=lr, jit=jit)(seeds)


def _finite_or_none(x: Any) -> float | None:
    """A JSON-ready float: ``None`` for NaN or inf (diverged), as strict JSON has no NaN."""
    x = float(x)
    return x if math.isfinite(x) else None


def _fraction(flags: Sequence[bool | None], value: bool) -> float | None:
    """The fraction of the non-``None`` flags equal to ``value``; ``None`` when there are none."""
    known = [f for f in flags if f is not None]
    return float(np.mean([f == value for f in known])) if known else None


def random_direction_anchor(params: Any, key: jax.Array) -> Any:
    """A random direction with the same per-layer norms as ``params`` (control anchors)."""
    layout = layer_layout(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    for lid in range(layout.num_layers):
        idx = [i for i, l in enumerate(layout.leaf_layer) if l == lid]
        target = jnp.sqrt(sum(jnp.sum(leaves[i] ** 2) for i in idx))
        have = jnp.sqrt(sum(jnp.sum(noise[i] ** 2) for i in idx))
        for i in idx:
            noise[i] = noise[i] * (target / have)
    return jax.tree_util.tree_unflatten(treedef, noise)


def first_layer_norm(params: Any) -> float:
    """Euclidean norm of the first Dense layer (kernel and bias together)."""
    first = params[next(iter(params))]
    return float(jnp.sqrt(sum(jnp.sum(a**2) for a in jax.tree_util.tree_leaves(first))))


def scale_first_layer(params: Any, factor: float) -> Any:
    """``params`` with the first Dense layer's kernel and bias multiplied by ``factor``."""
    first = next(iter(params))
    return {**params, first: jax.tree_util.tree_map(lambda a: a * factor, params[first])}


def run_kink(
    *,
    num_reinit: int = 100,
    num_stuck: int = 5,
    iterations: int = 99,
    lam: float = 0.01,
    steps: int = 50_000,
    lr: float = 1e-3,
    controls: bool = True,
    scale_factors: Sequence[float] = (0.5, 0.25, 0.1),
    data_kwargs: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    reinit_chunk: int = 25,
    jit=None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the whole protocol; returns ``(summary, arrays)``: JSON-ready figures and raw arrays."""
    say = progress or (lambda s: None)
    data_kwargs = dict(data_kwargs or {})
    prob = kink_problem(**data_kwargs)
    t0 = time.perf_counter()
    say(f"re-init: training {num_reinit} seeds x {steps} steps (one vmap)")
    chunks = []
    train = reinit_trainer(prob, steps=steps, lr=lr, jit=jit)
    for lo in range(0, num_reinit, reinit_chunk):
        seeds = range(lo, min(num_reinit, lo + reinit_chunk))
        chunks.append(train(seeds))
        say(f"  re-init seeds {seeds.start}-{seeds.stop - 1} done")
    rein = {
        k: (
            jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *[c[k] for c in chunks])
            if k == "params"
            else np.concatenate([c[k] for c in chunks])
        )
        for k in chunks[0]
    }
    stuck_seeds = [int(s) for s in rein["seeds"][rein["stuck"]][:num_stuck]]
    ok = ~rein["diverged"]
    ok_loss = np.where(ok, rein["loss"], np.inf)
    say(
        f"re-init done in {time.perf_counter() - t0:.0f}s: {int(rein['stuck'].sum())}/{num_reinit} "
        f"stuck, {int(rein['diverged'].sum())} diverged, best loss "
        f"{ok_loss.min() if ok.any() else float('nan'):.4f}; persistent from seeds {stuck_seeds}"
    )
    x_np, y_np = np.asarray(prob["x"]), np.asarray(prob["y"])
    summary: dict[str, Any] = {
        "config": {
            "num_reinit": num_reinit,
            "num_stuck": num_stuck,
            "iterations": iterations,
            "lam": lam,
            "steps": steps,
            "lr": lr,
            "momentum": 0.9,
            "data": data_kwargs,
            "num_points": int(x_np.shape[0]),
        },
        "two_piece_affine_loss": float(two_piece_affine_loss(x_np, y_np)),
        "reinit": {
            # over the runs that did not diverge (None when every run diverged)
            "stuck_fraction": float(rein["stuck"][ok].mean()) if ok.any() else None,
            "diverged": int(rein["diverged"].sum()),
            "best_loss": _finite_or_none(ok_loss.min()),
            "best_seed": int(rein["seeds"][np.argmin(ok_loss)]) if ok.any() else None,
            "median_loss": float(np.median(rein["loss"][ok])) if ok.any() else None,
            "losses": [_finite_or_none(v) for v in rein["loss"]],
            "stuck": [bool(s) if g else None for s, g in zip(rein["stuck"], ok, strict=True)],
        },
        "paper": PAPER,
        "persistent": [],
        "random_anchors": [],
        "scaled_init": [],
    }
    stuck_flags: dict[int, list[bool]] = {}
    arrays: dict[str, Any] = {"x": x_np, "y": y_np, "reinit": rein, "persistent": {}}

    def on_iteration(n: int, info: dict[str, Any], flags: list[bool | None]) -> None:
        flags.append(None if info["diverged"] else bool(prob["stuck"](info["params"])))
        if n % 10 == 9 or n == iterations:
            say(
                f"    iteration {n + 1}/{iterations + 1}: loss {info['loss']:.4f}, "
                f"champion so far: iteration {info['champion_iteration']}"
            )

    def fit(seed: int, anchor_fn=None) -> FitResult:
        flags: list[bool | None] = []
        res = persistent_fit(
            init_params(prob, seed),
            prob["loss_fn"],
            optimizer(lr),
            iterations=iterations,
            lam=lam,
            steps=steps,
            anchor_fn=anchor_fn,
            key=jax.random.key(seed),
            callback=lambda n, info: on_iteration(n, info, flags),
            jit=jit,
        )
        stuck_flags[id(res)] = flags
        return res

    def describe(seed: int, res: FitResult) -> dict[str, Any]:
        losses = res.history["loss"]
        ok = ~res.history["diverged"]
        flags = stuck_flags[id(res)]
        champ = res.champion_iteration
        return {
            "seed": seed,
            "plain_loss": _finite_or_none(losses[0]) if ok[0] else None,
            "champion_loss": float(losses[champ]) if champ >= 0 else None,
            "champion_iteration": int(champ),
            "best_loss_first_10": _finite_or_none(np.min(np.where(ok, losses, np.inf)[:11])),
            "stuck": flags,
            # over the iterations that did not diverge (None when all did)
            "fraction_unstuck": _fraction(flags, False),
            "losses": [_finite_or_none(v) if g else None for v, g in zip(losses, ok, strict=True)],
            "diverged": res.history["diverged"].tolist(),
        }

    for i, seed in enumerate(stuck_seeds):
        t1 = time.perf_counter()
        res = fit(seed)
        summary["persistent"].append(describe(seed, res))
        arrays["persistent"][seed] = res
        say(
            f"persistent seed {seed} ({i + 1}/{len(stuck_seeds)}): {res.summary} "
            f"({time.perf_counter() - t1:.0f}s)"
        )
        if controls:
            t1 = time.perf_counter()
            ctrl = fit(seed, anchor_fn=random_direction_anchor)
            summary["random_anchors"].append(describe(seed, ctrl))
            say(f"  control random anchors: {ctrl.summary} ({time.perf_counter() - t1:.0f}s)")
            p0 = init_params(prob, seed)
            for f in scale_factors:
                scaled = scale_first_layer(p0, f)
                sres = persistent_fit(
                    scaled,
                    prob["loss_fn"],
                    optimizer(lr),
                    iterations=0,
                    lam=0.0,
                    steps=steps,
                    jit=jit,
                )
                summary["scaled_init"].append(
                    {
                        "seed": seed,
                        "factor": f,
                        "loss": _finite_or_none(sres.history["loss"][0]),
                        "stuck": (
                            None
                            if sres.history["diverged"][0]
                            else bool(prob["stuck"](sres.champion))
                        ),
                    }
                )
            summary["persistent"][-1]["first_layer_norm"] = {
                "init": first_layer_norm(p0),
                "plain": first_layer_norm(res.bank.get(0)) if res.history["pushed"][0] else None,
                "champion": first_layer_norm(res.champion),
            }
    summary["seconds"] = time.perf_counter() - t0
    champs = [p["champion_loss"] for p in summary["persistent"] if p["champion_loss"] is not None]
    if champs:
        summary["persistent_champion_loss_mean"] = float(np.mean(champs))
        summary["persistent_champion_loss_min"] = float(np.min(champs))
    ctrl = [p["champion_loss"] for p in summary["random_anchors"] if p["champion_loss"] is not None]
    if ctrl:
        summary["random_anchors_champion_loss_mean"] = float(np.mean(ctrl))
    return summary, arrays


def plot_kink(summary: dict[str, Any], arrays: dict[str, Any], path_png: str) -> None:
    """Three panels: re-init losses, persistent loss histories, championship predictors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prob_model = KinkMLP()
    x, y = arrays["x"], arrays["y"]
    rein = arrays["reinit"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    ax.semilogy(rein["seeds"], rein["loss"], "o", ms=4, label="re-initializations")
    for p in summary["persistent"]:
        ax.semilogy(
            np.arange(len(p["losses"])),
            np.array(p["losses"], dtype=float),
            "-",
            lw=1,
            label=f"persistent, seed {p['seed']}",
        )
    ax.set_xlabel("seed (re-init) / iteration (persistent)")
    ax.set_ylabel("final training loss (MSE)")
    ax.set_title("re-initialization vs persistent iterations")
    ax.legend(fontsize=7)
    ax = axes[1]
    if summary["random_anchors"]:
        for p in summary["random_anchors"]:
            ax.semilogy(
                np.array(p["losses"], dtype=float),
                "-",
                lw=1,
                label=f"random anchors, seed {p['seed']}",
            )
    if summary["reinit"]["best_loss"] is not None:
        ax.axhline(summary["reinit"]["best_loss"], color="k", ls="--", label="best re-init")
    ax.set_xlabel("iteration")
    ax.set_title("control: random anchor directions")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax = axes[2]
    grid = np.linspace(x.min(), x.max(), 400)[:, None].astype(np.float32)
    ax.plot(x[:, 0], y[:, 0], "k.", ms=6, label="data")
    if summary["reinit"]["best_seed"] is not None:
        best = int(np.argmin(np.where(rein["diverged"], np.inf, rein["loss"])))
        best_params = jax.tree_util.tree_map(lambda a: a[best], rein["params"])
        ax.plot(
            grid,
            prob_model.apply({"params": best_params}, grid),
            "b-",
            label=f"best re-init ({rein['loss'][best]:.3f})",
        )
    done = [p for p in summary["persistent"] if p["champion_loss"] is not None]
    if done:
        pbest = min(done, key=lambda p: p["champion_loss"])
        res = arrays["persistent"][pbest["seed"]]
        ax.plot(
            grid,
            prob_model.apply({"params": res.champion}, grid),
            "r-",
            label=f"persistent champion ({pbest['champion_loss']:.3f})",
        )
        if pbest["plain_loss"] is not None and res.history["pushed"][0]:
            ax.plot(
                grid,
                prob_model.apply({"params": res.bank.get(0)}, grid),
                "r:",
                label=f"plain run, seed {pbest['seed']} ({pbest['plain_loss']:.3f})",
            )
    ax.set_title("championship predictors")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
