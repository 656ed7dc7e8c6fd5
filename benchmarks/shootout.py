"""Shoot-out at equal gradient-step budgets: persistent training against the other ways out.

Problems:
1. **kink regression** (``pnjax.data.make_kink_data``), 1-32-32-1 ReLU (``KinkMLP``),
   full-batch ``optax.sgd(1e-3, momentum=0.9)``, mean squared error. Several generated data sets
   are screened with 100 plain He-initialized runs of the whole budget ``B = (N + 1) T`` steps;
   the best-of-100 loss and the stuck fraction (``pnjax.data.is_stuck``) of each are recorded,
   and the methods are run from the first ``seeds`` stuck initializations of each data set.
2. **Fashion-MNIST MLP**, 784-64-10 ReLU, Adam 1e-3, batch 128, cross-entropy, on a subset of
   the training images (validation: the next images of the training file; test: the 10,000 test
   images). Score: validation error; reported: the champion's test accuracy.

Every method gets the same budget of gradient steps per seed, ``B = (N + 1) T`` (``T`` steps or
``E`` epochs per run); the wall time is reported beside it:
- ``plain``: one run of ``B`` steps from the seed's initialization;
- ``restarts``: ``N + 1`` fresh random initializations of ``T`` steps, best by score
  (``pnjax.baselines.random_restarts``);
- ``persistent_full`` / ``persistent_partial`` / ``population``: ``pnjax.run_chains`` with
  ``N`` persistent iterations of ``T`` steps from the seed's initialization (all layers; one
  random layer; one shared bank over the seeds' chains), λ = 0.01 (kink) / 0.001 (MNIST);
- ``random_anchors``: ``pnjax.persistent_fit`` with every pushed anchor replaced by a random
  direction of the same per-layer norms (``anchor_fn``), the control for what the anchors carry;
- ``scaled_init``: one run of ``B`` steps from the seed's initialization with its first layer
  multiplied by 0.25;
- ``anls`` (kink only): ANLS sweeps on a 1-64-1 network from He initialization (no gradient
  steps; its wall time is the comparison);
- ``s2d`` / ``s3d``: a network with half the hidden width, trained ``T`` steps per segment;
  after each of the first segments the neurons with the most negative predicted change are
  split (30% of the hidden neurons, the last split taking what is left to reach the full
  width), the optimizer is reset; ``N + 1`` segments in all. The splitting matrices cost one
  pass over the data per split (not counted as steps); their extreme eigenpairs come from
  ``pnjax.baselines.extreme_eigenpairs`` (LOBPCG for the 785 x 785 first-layer matrices of
  Fashion-MNIST, dense ``eigh`` for the small ones).

The kink data sets (``--kink-data``, default ``KINK_CANDIDATES``) were chosen with
``benchmarks/kink_screen.py`` so that their best-of-100 plain loss spans 0.006 to 0.3 with at
least 80% of the seeds stuck (``docs/choosing.md``).

Usage::

    nice python benchmarks/shootout.py            # full protocol, everything in one process
    nice python benchmarks/shootout.py --quick    # smaller budgets, same code (shootout_quick.json)
    # the committed full run: one process per kink data set and one for Fashion-MNIST, merged
    nice python benchmarks/shootout.py --only kink --datasets 1 --kink-data '{}' \
        --out benchmarks/results/shootout_kink_a.json
    nice python benchmarks/shootout.py --only fmnist --out benchmarks/results/shootout_fmnist.json
    python benchmarks/shootout.py --merge benchmarks/results/shootout_kink_{a,b,c}.json \
        benchmarks/results/shootout_fmnist.json --out benchmarks/results/shootout.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pnjax
import pnjax  # noqa: E402
from pnjax.baselines import (  # noqa: E402
    anls,
    hidden_widths,
    mlp_apply,
    random_restarts,
    split_neurons,
    splitting_matrices,
)
from pnjax.data import affine_check_grid, is_stuck, make_kink_data, two_piece_affine_loss  # noqa: E402
from pnjax.experiments.kink import random_direction_anchor, scale_first_layer  # noqa: E402
from pnjax.models import KinkMLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# candidate kink data sets, screened in this order (make_kink_data keyword arguments)
KINK_CANDIDATES: list[dict[str, Any]] = [
    {},
    {"noise": 0.3, "gap": 1.5},
    {"noise": 0.8, "gap": 2.25},
    {"noise": 0.6, "gap": 2.0},
]


def _stack(trees: list[Any]) -> Any:
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def _unstack(tree: Any, i: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _summary(values: list[float]) -> dict[str, Any]:
    """Statistics over the finite values (a diverged run counts in ``nonfinite`` only)."""
    a = np.asarray(values, np.float64)
    v = a[np.isfinite(a)]
    if v.size == 0:
        return {"values": a.tolist(), "nonfinite": int(a.size), "median": None, "mean": None,
                "se": None, "min": None, "max": None}
    return {
        "values": a.tolist(),
        "nonfinite": int(a.size - v.size),
        "median": float(np.median(v)),
        "mean": float(np.mean(v)),
        "se": float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else None,
        "min": float(np.min(v)),
        "max": float(np.max(v)),
    }


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()  # every caller reads results back to NumPy/Python, which waits for the device
    return out, time.perf_counter() - t


def _segment_trainer(loss_fn: Callable[[Any, Any], jax.Array], optimizer):
    """``train(params, batches) -> params``: one optimizer from scratch over a batch stream."""

    @jax.jit
    def step(params, state, batch):
        g = jax.grad(loss_fn)(params, batch)
        u, state = optimizer.update(g, state, params)
        return optax.apply_updates(params, u), state

    def train(params, batches):
        state = optimizer.init(params)
        for b in batches:
            params, state = step(params, state, b)
        return params

    return train


def grow_by_splitting(
    params: Any,
    *,
    scheme: str,
    target: int,
    segments: int,
    train: Callable[[Any, int], Any],
    matrices: Callable[[Any], dict[str, jax.Array]],
    fraction: float = 0.3,
) -> tuple[Any, list[tuple[int, ...]]]:
    """Trains ``segments`` segments, splitting after each of the first ones up to ``target``."""
    widths = [hidden_widths(params)]
    splits_left = segments - 1
    for seg in range(segments):
        params = train(params, seg)
        total = sum(hidden_widths(params))
        if seg < segments - 1 and total < target:
            last = splits_left == 1
            count = target - total if last else min(max(1, round(fraction * total)), target - total)
            res = split_neurons(params, matrices(params), count=count, scheme=scheme)
            params = res.params
            widths.append(hidden_widths(params))
        splits_left -= 1
    return params, widths


# ----------------------------------------------------------------------------- kink


def kink_setup(data_kwargs: dict[str, Any]) -> dict[str, Any]:
    x, y = make_kink_data(**data_kwargs)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = KinkMLP()
    gap = float(data_kwargs.get("gap", 1.0))
    grid = affine_check_grid(np.asarray(x))

    def loss_fn(p):
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    def stuck(p):
        return is_stuck(lambda g: model.apply({"params": p}, g), grid, radius=gap)

    return {"x": x, "y": y, "model": model, "loss_fn": loss_fn, "stuck": stuck}


def kink_screen(setup: dict[str, Any], steps: int, num: int) -> dict[str, Any]:
    """``num`` plain He-initialized runs of ``steps`` steps (seeds 0..num-1), all at once."""
    x = setup["x"]
    inits = jax.vmap(lambda s: setup["model"].init(jax.random.key(s), x)["params"])(
        jnp.arange(num)
    )
    res = pnjax.run_chains(inits, setup["loss_fn"], optax.sgd(1e-3, momentum=0.9),
                           iterations=0, lam=0.0, steps=steps)
    trained = jax.tree_util.tree_map(lambda a: a[:, 0], res.bank.anchors)
    stuck = np.asarray(jax.vmap(setup["stuck"])(trained))
    loss = res.history["loss"][:, 0]
    return {"loss": loss, "stuck": stuck, "inits": inits}


def kink_methods(setup, screen, seeds, cfg, key) -> dict[str, Any]:
    T, N = cfg["steps"], cfg["iterations"]
    B = T * (N + 1)
    x, y, loss_fn, model = setup["x"], setup["y"], setup["loss_fn"], setup["model"]
    opt = optax.sgd(1e-3, momentum=0.9)
    inits = jax.tree_util.tree_map(lambda a: a[np.asarray(seeds)], screen["inits"])
    C = len(seeds)
    out: dict[str, Any] = {}

    out["plain"] = {"loss": [float(screen["loss"][s]) for s in seeds], "wall_s": None,
                    "note": "the screening runs of these seeds (B steps each)"}

    def chains(**kw):
        return pnjax.run_chains(inits, loss_fn, opt, iterations=N, lam=cfg["lam"], steps=T,
                                key=jax.random.split(key, C), **kw)

    for name, kw in (
        ("persistent_full", {}),
        ("persistent_partial", {"layers": "random"}),
        ("population", {"mode": "population"}),
    ):
        res, wall = _timed(lambda kw=kw: chains(**kw))
        h = res.history
        out[name] = {
            "loss": [float(h["score"][c, res.champion_iteration[c]]) for c in range(C)],
            "champion_iteration": res.champion_iteration.tolist(),
            "wall_s": wall,
        }

    def restarts():
        r = random_restarts(lambda k: model.init(k, x)["params"], loss_fn, opt,
                            num_restarts=C * (N + 1), steps=T, key=key)
        return np.asarray(r.scores).reshape(C, N + 1)

    sc, wall = _timed(restarts)
    out["restarts"] = {"loss": np.min(np.where(np.isfinite(sc), sc, np.inf), 1).tolist(),
                       "wall_s": wall}

    def anchors():
        return [
            pnjax.persistent_fit(_unstack(inits, c), loss_fn, opt, iterations=N, lam=cfg["lam"],
                                 steps=T, anchor_fn=random_direction_anchor,
                                 key=jax.random.fold_in(key, c))
            for c in range(C)
        ]

    rs, wall = _timed(anchors)
    out["random_anchors"] = {
        "loss": [float(r.history["score"][r.champion_iteration]) for r in rs], "wall_s": wall}

    scaled = jax.vmap(lambda p: scale_first_layer(p, 0.25))(inits)
    res, wall = _timed(lambda: pnjax.run_chains(scaled, loss_fn, opt, iterations=0, lam=0.0,
                                                steps=B))
    out["scaled_init"] = {"loss": res.history["loss"][:, 0].tolist(), "wall_s": wall,
                          "factor": 0.25}

    one = KinkMLP(features=(64, 1))

    def run_anls():
        return [anls(one.init(jax.random.key(int(s)), x)["params"], x, y,
                     sweeps=cfg["anls_sweeps"]).losses[-1] for s in seeds]

    ls, wall = _timed(run_anls)
    out["anls"] = {"loss": [float(v) for v in ls], "wall_s": wall,
                   "model": "1-64-1 ReLU, He init", "sweeps": cfg["anls_sweeps"]}

    mse = lambda o, t: jnp.mean((o - t) ** 2)  # noqa: E731
    chain_loss = lambda p, _b: mse(mlp_apply(p, x), y)  # noqa: E731
    train_seg = _segment_trainer(chain_loss, opt)
    for scheme, name in (("positive", "s2d"), ("signed", "s3d")):
        def grow(scheme=scheme):
            losses, widths = [], []
            for s in seeds:
                p0 = KinkMLP(features=(16, 16, 1)).init(jax.random.key(int(s)), x)["params"]
                p, w = grow_by_splitting(
                    p0, scheme=scheme, target=64, segments=N + 1,
                    train=lambda p, seg: train_seg(p, [None] * T),
                    matrices=lambda p: splitting_matrices(p, x, y, mse),
                )
                losses.append(float(mse(mlp_apply(p, x), y)))
                widths.append(w)
            return losses, widths

        (ls, ws), wall = _timed(grow)
        out[name] = {"loss": ls, "widths": [[list(v) for v in w] for w in ws], "wall_s": wall,
                     "start": "1-16-16-1, He init of the seed"}
    for v in out.values():
        v["summary"] = _summary(v["loss"])
    return out


def run_kink(cfg: dict[str, Any], log, save) -> dict[str, Any]:
    T, N = cfg["steps"], cfg["iterations"]
    B = T * (N + 1)
    sets = []
    for kw in cfg["data"]:
        if len([s for s in sets if "methods" in s]) >= cfg["datasets"]:
            break
        setup = kink_setup(kw)
        (scr), wall = _timed(lambda setup=setup: kink_screen(setup, B, cfg["screen"]))
        best = float(np.min(scr["loss"]))
        frac = float(np.mean(scr["stuck"]))
        entry = {
            "data_kwargs": kw,
            "two_piece_affine_loss": two_piece_affine_loss(setup["x"], setup["y"]),
            f"best_of_{cfg['screen']}": best,
            "stuck_fraction": frac,
            "screen_wall_s": wall,
        }
        log(f"kink {kw}: best of {cfg['screen']} {best:.4f}, stuck {frac:.2f} ({wall:.0f} s)")
        if frac >= 0.8 and len([s for s in sets if "methods" in s]) < cfg["datasets"]:
            seeds = [int(s) for s in np.flatnonzero(scr["stuck"])[: cfg["seeds"]]]
            entry["seeds"] = seeds
            entry["methods"] = kink_methods(setup, scr, seeds, cfg, jax.random.key(1))
            for m, v in entry["methods"].items():
                log(f"  {m:20s} {v['summary']['mean']:.4f} ± {v['summary']['se']:.4f} "
                    f"median {v['summary']['median']:.4f} "
                    f"[{v['summary']['min']:.4f}, {v['summary']['max']:.4f}] "
                    f"wall {v['wall_s'] if v['wall_s'] is None else round(v['wall_s'], 1)}")
        sets.append(entry)
        save({"datasets": sets})
    return {"budget_steps": B, "steps_per_run": T, "iterations": N, "lam": cfg["lam"],
            "datasets": sets}


# ----------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Reads a gzipped IDX file (magic, dims as big-endian int32, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(tuple(int(d) for d in dims))


def fmnist_data(n_train: int, n_val: int) -> dict[str, np.ndarray]:
    xi = read_idx(FMNIST / "train-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    yi = read_idx(FMNIST / "train-labels-idx1-ubyte.gz").astype(np.int32)
    xt = read_idx(FMNIST / "t10k-images-idx3-ubyte.gz").reshape(-1, 784) / 255.0
    yt = read_idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int32)
    f = np.float32
    return {
        "x": xi[:n_train].astype(f), "y": yi[:n_train],
        "xv": xi[n_train : n_train + n_val].astype(f), "yv": yi[n_train : n_train + n_val],
        "xt": xt.astype(f), "yt": yt,
    }


def run_fmnist(cfg: dict[str, Any], log, save=lambda part: None) -> dict[str, Any]:
    d = fmnist_data(cfg["n_train"], cfg["n_val"])
    x, y = jnp.asarray(d["x"]), jnp.asarray(d["y"])
    xv, yv, xt, yt = (jnp.asarray(d[k]) for k in ("xv", "yv", "xt", "yt"))
    E, N, bs, C = cfg["epochs"], cfg["iterations"], cfg["batch"], cfg["seeds"]
    H = cfg["hidden"]
    model = KinkMLP(features=(H, 10))
    opt = optax.adam(1e-3)
    ce = lambda o, t: optax.softmax_cross_entropy_with_integer_labels(o, t).mean()  # noqa: E731

    def loss_fn(p, batch):
        return ce(mlp_apply(p, batch[0]), batch[1])

    def err(p, xs, ys):
        return jnp.mean(jnp.argmax(mlp_apply(p, xs), -1) != ys)

    score_fn = lambda p: err(p, xv, yv)  # noqa: E731
    steps_per_epoch = x.shape[0] // bs
    inits = _stack([model.init(jax.random.key(s), x[:1])["params"] for s in range(C)])
    key = jax.random.key(1)
    out: dict[str, Any] = {}

    def record(name, champions, wall, **extra):
        acc = [1.0 - float(err(_unstack(champions, c), xt, yt)) for c in range(C)]
        out[name] = {"test_acc": acc, "wall_s": wall, "summary": _summary(acc), **extra}
        sm = out[name]["summary"]
        log(f"  {name:20s} test acc {sm['mean']:.4f} ± {sm['se']:.4f} [{min(acc):.4f}, "
            f"{max(acc):.4f}] wall {wall:.0f} s")
        save({"methods": out})

    def chains(init, **kw):
        return pnjax.run_chains(init, loss_fn, opt, score_fn=score_fn, key=jax.random.split(
            key, C), data=(x, y), batch_size=bs, **kw)

    res, wall = _timed(lambda: chains(inits, iterations=0, lam=0.0, epochs=E * (N + 1)))
    record("plain", res.champion, wall)
    for name, kw in (("persistent_full", {}), ("persistent_partial", {"layers": "random"}),
                     ("population", {"mode": "population"})):
        res, wall = _timed(lambda kw=kw: chains(inits, iterations=N, lam=cfg["lam"], epochs=E,
                                                **kw))
        record(name, res.champion, wall, champion_iteration=res.champion_iteration.tolist())
    scaled = jax.vmap(lambda p: scale_first_layer(p, 0.25))(inits)
    res, wall = _timed(lambda: chains(scaled, iterations=0, lam=0.0, epochs=E * (N + 1)))
    record("scaled_init", res.champion, wall, factor=0.25)

    def restarts():
        r = random_restarts(lambda k: model.init(k, x[:1])["params"], loss_fn, opt,
                            num_restarts=C * (N + 1), score_fn=score_fn, key=key, data=(x, y),
                            batch_size=bs, epochs=E)
        sc = np.asarray(r.scores).reshape(C, N + 1)
        best = np.argmin(sc, 1) + np.arange(C) * (N + 1)
        return jax.tree_util.tree_map(lambda a: a[best], r.params)

    champs, wall = _timed(restarts)
    record("restarts", champs, wall)

    def anchors():
        return _stack([
            pnjax.persistent_fit(_unstack(inits, c), loss_fn, opt, iterations=N, lam=cfg["lam"],
                                 score_fn=score_fn, anchor_fn=random_direction_anchor,
                                 key=jax.random.fold_in(key, c), data=(x, y), batch_size=bs,
                                 epochs=E).champion
            for c in range(C)
        ])

    champs, wall = _timed(anchors)
    record("random_anchors", champs, wall)

    train_seg = _segment_trainer(loss_fn, opt)
    rng = np.random.default_rng(0)

    def batches():
        for _ in range(E):
            perm = rng.permutation(x.shape[0])
            for i in range(steps_per_epoch):
                idx = perm[i * bs : (i + 1) * bs]
                yield (d["x"][idx], d["y"][idx])

    for scheme, name in (("positive", "s2d"), ("signed", "s3d")):
        def grow(scheme=scheme):
            ps, ws = [], []
            for s in range(C):
                p0 = KinkMLP(features=(H // 2, 10)).init(jax.random.key(s), x[:1])["params"]
                p, w = grow_by_splitting(
                    p0, scheme=scheme, target=H, segments=N + 1,
                    train=lambda p, seg: train_seg(p, batches()),
                    matrices=lambda p: splitting_matrices(p, x[: cfg["split_examples"]],
                                                          y[: cfg["split_examples"]], ce,
                                                          batch_size=250),
                )
                ps.append(p)
                ws.append([list(v) for v in w])
            return _stack(ps), ws

        (champs, ws), wall = _timed(grow)
        record(name, champs, wall, widths=ws, start=f"784-{H // 2}-10")
    return {"model": f"784-{H}-10 ReLU", "optimizer": "adam 1e-3", "batch": bs,
            "epochs_per_run": E, "iterations": N, "budget_steps": steps_per_epoch * E * (N + 1),
            "n_train": cfg["n_train"], "n_val": cfg["n_val"], "lam": cfg["lam"],
            "score": "validation error; reported: test accuracy of the champion", "methods": out}


# ----------------------------------------------------------------------------- main


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [s for s in result.get("kink", {}).get("datasets", []) if "methods" in s]
    panels = len(sets) + (1 if "fmnist" in result else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 4.2), squeeze=False)
    for ax, s in zip(axes[0], sets, strict=False):
        names = list(s["methods"])
        for i, n in enumerate(names):
            v = s["methods"][n]["loss"]
            ax.semilogy([i] * len(v), v, "o", alpha=0.6)
            ax.semilogy([i - 0.3, i + 0.3], [np.median(v)] * 2, "k-")
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=8)
        best = [k for k in s if k.startswith("best_of")][0]
        ax.set_title(f"kink {s['data_kwargs'] or 'default'}\nplain {best}: {s[best]:.3g}",
                     fontsize=9)
        ax.set_ylabel("final / champion training loss")
    if "fmnist" in result:
        ax = axes[0][-1]
        m = result["fmnist"]["methods"]
        for i, n in enumerate(m):
            v = m[n]["test_acc"]
            ax.plot([i] * len(v), v, "o", alpha=0.6)
            ax.plot([i - 0.3, i + 0.3], [np.median(v)] * 2, "k-")
        ax.set_xticks(range(len(m)), list(m), rotation=70, fontsize=8)
        ax.set_title("Fashion-MNIST MLP", fontsize=9)
        ax.set_ylabel("test accuracy of the champion")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_tables(result: dict[str, Any]) -> str:
    """The result's tables in Markdown: mean ± standard error [min, max], wall seconds."""

    def cell(sm, fmt):
        if sm["mean"] is None:
            return "all diverged"
        se = "" if sm.get("se") is None else f" ± {sm['se']:{fmt}}"
        bad = f", {sm['nonfinite']} diverged" if sm.get("nonfinite") else ""
        return f"{sm['mean']:{fmt}}{se} [{sm['min']:{fmt}}, {sm['max']:{fmt}}{bad}]"

    def wall(v):
        return "in the screening" if v.get("wall_s") is None else f"{v['wall_s']:.0f}"

    lines = []
    sets = [s for s in result.get("kink", {}).get("datasets", []) if "methods" in s]
    if sets:
        best = [k for k in sets[0] if k.startswith("best_of")][0]
        lines += ["| data set | two-piece loss | " + best.replace("_", " ") + " | stuck |",
                  "|---|---|---|---|"]
        lines += [f"| `{json.dumps(s['data_kwargs'])}` | {s['two_piece_affine_loss']:.3f} | "
                  f"{s[best]:.4f} | {s['stuck_fraction']:.0%} |" for s in sets]
        lines += ["", "| method | " + " | ".join(
            f"`{json.dumps(s['data_kwargs'])}` loss (wall s)" for s in sets) + " |",
            "|---|" + "---|" * len(sets)]
        for m in sets[0]["methods"]:
            lines.append(f"| {m} | " + " | ".join(
                f"{cell(s['methods'][m]['summary'], '.3g')} ({wall(s['methods'][m])})"
                for s in sets) + " |")
    if "fmnist" in result:
        lines += ["", "| method | test accuracy | wall s |", "|---|---|---|"]
        for m, v in result["fmnist"]["methods"].items():
            lines.append(f"| {m} | {cell(v['summary'], '.4f')} | {wall(v)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller budgets (same code)")
    ap.add_argument("--only", choices=["kink", "fmnist"], default=None)
    ap.add_argument("--out", default=None,
                    help="result JSON (default: results/shootout.json, with --quick "
                    "results/shootout_quick.json); the PNG goes beside it")
    ap.add_argument("--kink-data", nargs="+", default=None, metavar="JSON",
                    help="make_kink_data keyword arguments (one JSON object per data set) to "
                    "screen in this order instead of the built-in candidates")
    ap.add_argument("--datasets", type=int, default=3,
                    help="kink data sets to run the methods on (the first that pass screening)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine --only kink / --only fmnist results (kink data sets in the "
                    "order given) into --out (+ PNG)")
    ap.add_argument("--table", default=None, metavar="JSON",
                    help="print the tables of a result file in Markdown and exit")
    args = ap.parse_args()
    default_out = str(RESULTS / ("shootout_quick.json" if args.quick else "shootout.json"))
    args.out = args.out or default_out
    if args.table:
        print(markdown_tables(json.loads(Path(args.table).read_text())))
        return
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged: dict[str, Any] = {"commands": [q["command"] for q in parts],
                                  "total_wall_s": [q.get("total_wall_s") for q in parts],
                                  "environment": parts[-1].get("environment")}
        for q in parts:
            if "kink" in q:
                k = merged.setdefault("kink", {**q["kink"], "datasets": []})
                k["datasets"] += q["kink"]["datasets"]
                merged["kink_config"] = q["kink_config"]
            if "fmnist" in q:
                merged["fmnist"], merged["fmnist_config"] = q["fmnist"], q["fmnist_config"]
        for s in merged.get("kink", {}).get("datasets", []):
            for v in s.get("methods", {}).values():
                v["summary"] = _summary(v["loss"])
        for v in merged.get("fmnist", {}).get("methods", {}).values():
            v["summary"] = _summary(v["test_acc"])
        Path(args.out).write_text(json.dumps(merged, indent=1, default=float))
        plot(merged, Path(args.out).with_suffix(".png"))
        return
    data = [json.loads(t) for t in args.kink_data] if args.kink_data else KINK_CANDIDATES
    kink_cfg = {"steps": 3000, "iterations": 4, "lam": 0.01, "seeds": 5, "screen": 100,
                "data": data, "datasets": args.datasets, "anls_sweeps": 20}
    fm_cfg = {"n_train": 6000, "n_val": 2000, "epochs": 2, "iterations": 2, "batch": 128,
              "seeds": 5, "hidden": 64, "lam": 0.001, "split_examples": 2000}
    if args.quick:
        kink_cfg.update(steps=1000, iterations=2, anls_sweeps=8)
        fm_cfg.update(n_train=3000, n_val=1000, epochs=1, split_examples=250)
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:7.1f} s] {msg}", flush=True)

    result: dict[str, Any] = {
        "command": "python benchmarks/shootout.py" + (" --quick" if args.quick else "")
        + (f" --only {args.only}" if args.only else "")
        + (" --kink-data " + " ".join(f"'{t}'" for t in args.kink_data) if args.kink_data
           else "") + (f" --datasets {args.datasets}" if args.datasets != 3 else "")
        + (f" --out {args.out}" if args.out != default_out else ""),
        "kink_config": kink_cfg,
        "fmnist_config": fm_cfg,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(res):
        out.write_text(json.dumps(res, indent=1, default=float))

    if args.only in (None, "kink"):
        result["kink"] = run_kink(kink_cfg, log, lambda part: save({**result, "kink": part}))
        save(result)
    if args.only in (None, "fmnist"):
        result["fmnist"] = run_fmnist(fm_cfg, log, lambda part: save({**result, "fmnist": part}))
    result["total_wall_s"] = time.time() - t0
    result["environment"] = {
        "pnjax": pnjax.__version__, "jax": jax.__version__, "optax": optax.__version__,
        "device": str(jax.devices()[0]), "platform": platform.platform(),
        "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                time.gmtime()),
    }
    save(result)
    plot(result, out.with_suffix(".png"))
    log(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
