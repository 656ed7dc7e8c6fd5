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


def train_reinit(
    problem: dict[str, Any], seeds: Sequence[int], *, steps: int, lr: float = 1e-3, jit=None
) -> dict[str, np.ndarray]:
    """Plain training of many seeds at once (one ``vmap``); returns losses, stuck flags, params."""
    seeds = np.asarray(seeds)
    params0 = jax.vmap(lambda s: init_params(problem, s))(jnp.asarray(seeds))
    one = jax.tree_util.tree_map(lambda a: a[0], params0)
    bank = AnchorBank.create(one, 1)
    run = make_train_run(problem["loss_fn"], optimizer(lr), steps=steps)
    many = (jit or jax.jit)(jax.vmap(run, in_axes=(0, None, None, None, None)))
    mask = jnp.ones((len(bank.names),), jnp.float32)
    params, metrics = many(params0, bank, jnp.float32(0.0), mask, jax.random.key(0))
    stuck = jax.vmap(problem["stuck"])(params)
    return {
        "seeds": seeds,
        "loss": np.asarray(metrics["loss"]),
        "curve": np.asarray(metrics["curve"]),
        "stuck": np.asarray(stuck),
        "params": params,
    }


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
    for lo in range(0, num_reinit, reinit_chunk):
        seeds = range(lo, min(num_reinit, lo + reinit_chunk))
        chunks.append(train_reinit(prob, seeds, steps=steps, lr=lr, jit=jit))
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
    say(
        f"re-init done in {time.perf_counter() - t0:.0f}s: {int(rein['stuck'].sum())}/{num_reinit} "
        f"stuck, best loss {rein['loss'].min():.4f}; persistent from seeds {stuck_seeds}"
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
            "stuck_fraction": float(rein["stuck"].mean()),
            "best_loss": float(rein["loss"].min()),
            "best_seed": int(rein["seeds"][np.argmin(rein["loss"])]),
            "median_loss": float(np.median(rein["loss"])),
            "losses": rein["loss"].tolist(),
            "stuck": rein["stuck"].tolist(),
        },
        "paper": PAPER,
        "persistent": [],
        "random_anchors": [],
        "scaled_init": [],
    }
    stuck_flags: dict[int, list[bool]] = {}
    arrays: dict[str, Any] = {"x": x_np, "y": y_np, "reinit": rein, "persistent": {}}

    def on_iteration(n: int, info: dict[str, Any], flags: list[bool]) -> None:
        flags.append(bool(prob["stuck"](info["params"])))
        if n % 10 == 9 or n == iterations:
            say(
                f"    iteration {n + 1}/{iterations + 1}: loss {info['loss']:.4f}, "
                f"champion so far: iteration {info['champion_iteration']}"
            )

    def fit(seed: int, anchor_fn=None) -> FitResult:
        flags: list[bool] = []
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
        return {
            "seed": seed,
            "plain_loss": float(losses[0]),
            "champion_loss": float(losses[res.champion_iteration]),
            "champion_iteration": int(res.champion_iteration),
            "best_loss_first_10": float(np.min(np.where(ok, losses, np.inf)[:11])),
            "stuck": flags,
            "fraction_unstuck": float(1 - np.mean(flags)),
            "losses": losses.tolist(),
            "diverged": res.history["diverged"].tolist(),
        }

    for i, seed in enumerate(stuck_seeds):
        t1 = time.perf_counter()
        res = fit(seed)
        summary["persistent"].append(describe(seed, res))
        arrays["persistent"][seed] = res
        say(
            f"persistent seed {seed} ({i + 1}/{len(stuck_seeds)}): plain {res.history['loss'][0]:.4f}"
            f" -> champion {res.history['loss'][res.champion_iteration]:.4f} at iteration "
            f"{res.champion_iteration} ({time.perf_counter() - t1:.0f}s)"
        )
        if controls:
            t1 = time.perf_counter()
            ctrl = fit(seed, anchor_fn=random_direction_anchor)
            summary["random_anchors"].append(describe(seed, ctrl))
            say(
                f"  control random anchors: champion {ctrl.history['loss'][ctrl.champion_iteration]:.4f}"
                f" at iteration {ctrl.champion_iteration} ({time.perf_counter() - t1:.0f}s)"
            )
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
                        "loss": float(sres.history["loss"][0]),
                        "stuck": bool(prob["stuck"](sres.champion)),
                    }
                )
            summary["persistent"][-1]["first_layer_norm"] = {
                "init": first_layer_norm(p0),
                "plain": first_layer_norm(res.bank.get(0)),
                "champion": first_layer_norm(res.champion),
            }
    summary["seconds"] = time.perf_counter() - t0
    pers = summary["persistent"]
    if pers:
        summary["persistent_champion_loss_mean"] = float(
            np.mean([p["champion_loss"] for p in pers])
        )
        summary["persistent_champion_loss_min"] = float(np.min([p["champion_loss"] for p in pers]))
    if summary["random_anchors"]:
        summary["random_anchors_champion_loss_mean"] = float(
            np.mean([p["champion_loss"] for p in summary["random_anchors"]])
        )
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
            p["losses"],
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
            ax.semilogy(p["losses"], "-", lw=1, label=f"random anchors, seed {p['seed']}")
    ax.axhline(summary["reinit"]["best_loss"], color="k", ls="--", label="best re-init")
    ax.set_xlabel("iteration")
    ax.set_title("control: random anchor directions")
    ax.legend(fontsize=7)
    ax = axes[2]
    grid = np.linspace(x.min(), x.max(), 400)[:, None].astype(np.float32)
    ax.plot(x[:, 0], y[:, 0], "k.", ms=6, label="data")
    best = int(np.argmin(rein["loss"]))
    best_params = jax.tree_util.tree_map(lambda a: a[best], rein["params"])
    ax.plot(
        grid,
        prob_model.apply({"params": best_params}, grid),
        "b-",
        label=f"best re-init ({rein['loss'][best]:.3f})",
    )
    if summary["persistent"]:
        pbest = min(summary["persistent"], key=lambda p: p["champion_loss"])
        res = arrays["persistent"][pbest["seed"]]
        ax.plot(
            grid,
            prob_model.apply({"params": res.champion}, grid),
            "r-",
            label=f"persistent champion ({pbest['champion_loss']:.3f})",
        )
        plain = res.bank.get(0)
        ax.plot(
            grid,
            prob_model.apply({"params": plain}, grid),
            "r:",
            label=f"plain run, seed {pbest['seed']} ({pbest['plain_loss']:.3f})",
        )
    ax.set_title("championship predictors")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
