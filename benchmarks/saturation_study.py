"""Neuron saturation of a 7-layer tanh MLP under plain and persistent training (Section 5).

The paper (Min, arXiv 2007.01419, Figures 13-15) trains a 7-layer tanh network with Xavier
initialization on CIFAR-10 by partial persistent training (Eq. 5), 30 epochs per run, and reports
that the 98th percentile of ``|activation|`` per layer (Figure 14) and the activation histograms
(Figure 15) are less saturated for the championship (its 5th iteration) than for the plain run.

CPU protocol here (Fashion-MNIST, read with numpy from the Debian package
``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/*-idx*-ubyte.gz``):
- model: ``Dense(width)`` x 6 with ``tanh``, then ``Dense(10)``; ``xavier_uniform`` kernels (Glorot
  and Bengio's normalized initialization), zero biases; inputs scaled to [0, 1] and centered by
  the training mean;
- data: the first ``train`` training images for training, the next ``val`` for validation (the
  championship score: validation error), the 10,000 test images for the test error;
- ``pnjax.persistent_fit``: Adam(1e-3), batch 128, ``epochs`` epochs per run, ``iterations``
  persistent runs, λ = ``lam``, ``shuffle='same'``, key ``jax.random.key(seed)``; by default the
  full model (Eq. 4, every layer, as the paper's LeNet-5 "full" runs with λ = 0.01): with the
  paper's partial model at λ = 0.001 and these short runs, the persistent runs were numerically
  indistinguishable from the plain run in a smoke test. ``--partial`` penalizes one hidden layer
  drawn per seed with ``numpy.random.default_rng(seed)`` (Eq. 5, passed by name);
- per seed, after every run: 98th percentile of ``|tanh|`` and 50-bin histograms on ``[-1, 1]``
  of each hidden layer on a fixed probe set (``probe`` training images), by
  ``pnjax.diagnostics.saturation_stats``;
- per seed, the plain run and the championship run are replayed by
  ``pnjax.diagnostics.record_run`` (same update, data order, anchors and mask; its final loss is
  checked against ``persistent_fit``'s) with the same statistics after every epoch (Figure 14).

Writes ``benchmarks/results/saturation_study.{json,png}``.

Usage::

    nice python benchmarks/saturation_study.py                # 3 seeds, about 20 min on 2 CPUs
    python benchmarks/saturation_study.py --quick             # 1 seed, tiny, smoke test
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import pnjax
from pnjax.diagnostics import record_run, saturation_stats

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path("/usr/share/datasets/fashion-mnist")
HIDDEN = tuple(f"Dense_{i}" for i in range(6))


def read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train [60000, 784] float32 in [0, 1], y_train, x_test, y_test)``."""
    if not DATA.exists():
        raise SystemExit(
            f"{DATA} not found: apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    xtr = read_idx(DATA / "train-images-idx3-ubyte.gz", 16).reshape(-1, 784) / 255.0
    ytr = read_idx(DATA / "train-labels-idx1-ubyte.gz", 8).astype(np.int32)
    xte = read_idx(DATA / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784) / 255.0
    yte = read_idx(DATA / "t10k-labels-idx1-ubyte.gz", 8).astype(np.int32)
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


class TanhMLP7(nn.Module):
    """Seven Dense layers: six ``tanh`` hidden layers of ``width`` and a 10-way output."""

    width: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for _ in range(6):
            x = jnp.tanh(nn.Dense(self.width, kernel_init=nn.initializers.xavier_uniform())(x))
        return nn.Dense(10, kernel_init=nn.initializers.xavier_uniform())(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--train", type=int, default=10_000)
    ap.add_argument("--val", type=int, default=5_000)
    ap.add_argument("--probe", type=int, default=1_000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--partial", action="store_true", help="Eq. 5 on one hidden layer per seed")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 iterations x 2 epochs")
    ap.add_argument("--out", type=Path, default=RESULTS / "saturation_study.json")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    if args.quick:
        args.seeds, args.iterations, args.epochs, args.train = args.seeds[:1], 2, 2, 2_000
    xtr, ytr, xte, yte = load_fashion_mnist()
    mean = xtr[: args.train].mean(axis=0)
    x = jnp.asarray(xtr[: args.train] - mean)
    y = jnp.asarray(ytr[: args.train])
    xv = jnp.asarray(xtr[args.train : args.train + args.val] - mean)
    yv = jnp.asarray(ytr[args.train : args.train + args.val])
    xt, yt = jnp.asarray(xte - mean), jnp.asarray(yte)
    xp = x[: args.probe]
    model = TanhMLP7(args.width)

    def loss_fn(p, batch):
        xb, yb = batch
        logits = model.apply({"params": p}, xb)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

    def error(p, xs, ys):
        return jnp.mean(jnp.argmax(model.apply({"params": p}, xs), -1) != ys)

    def stats(p):
        return saturation_stats(
            model, {"params": p}, xp, layers=HIDDEN, activation=jnp.tanh, bins=50
        )

    stats_jit = jax.jit(stats)
    test_error = jax.jit(lambda p: error(p, xt, yt))
    opt = optax.adam(args.lr)
    seeds_out = []
    t_all = time.perf_counter()
    for seed in args.seeds:
        t0 = time.perf_counter()
        params0 = model.init(jax.random.key(seed), x[:1])["params"]
        layer = (
            HIDDEN[int(np.random.default_rng(seed).integers(len(HIDDEN)))] if args.partial else None
        )
        rows: list[dict[str, Any]] = []

        def callback(n, info, rows=rows, seed=seed):
            p = info["params"]
            s = jax.device_get(stats_jit(p))
            rows.append(
                {
                    "iteration": n,
                    "val_error": float(info["score"]),
                    "test_error": float(test_error(p)),
                    "loss": float(info["loss"]),
                    "p98": {k: float(v) for k, v in s["percentile"].items()},
                    "histogram": {
                        k: np.asarray(v).round(5).tolist() for k, v in s["histogram"].items()
                    },
                }
            )
            print(
                f"  seed {seed} iteration {n}: val err {rows[-1]['val_error']:.4f}, "
                f"p98 {[round(v, 3) for v in rows[-1]['p98'].values()]}",
                flush=True,
            )

        key = jax.random.key(seed)
        res = pnjax.persistent_fit(
            params0,
            loss_fn,
            opt,
            iterations=args.iterations,
            lam=args.lam,
            layers=layer,  # None: every layer
            score_fn=lambda p: error(p, xv, yv),
            data=(x, y),
            batch_size=args.batch_size,
            epochs=args.epochs,
            key=key,
            loop="scan",
            callback=callback,
        )
        champ = int(res.champion_iteration)
        # replay the plain and the championship runs with per-epoch statistics
        run = pnjax.make_train_run(
            loss_fn, opt, data=(x, y), batch_size=args.batch_size, epochs=args.epochs
        )
        mask = pnjax.layer_mask(params0, None if layer is None else (layer,))
        replays = {}
        for name, n in (("plain", 0), ("champion", champ)):
            bank = pnjax.AnchorBank.create(params0, max(1, args.iterations))
            for k in range(n):
                bank = bank.push(res.bank.get(k))
            rec = record_run(run, params0, bank, args.lam, mask, key, every=1, probe=stats)
            replay_loss = float(rec.metrics["loss"])
            replays[name] = {
                "iteration": n,
                "epochs": rec.at.tolist(),
                "p98": {
                    k: np.asarray(v).round(5).tolist() for k, v in rec.probes["percentile"].items()
                },
                "loss": replay_loss,
                "loss_persistent_fit": float(res.history["loss"][n]),
            }
        seeds_out.append(
            {
                "seed": seed,
                "layer": layer,
                "champion_iteration": champ,
                "seconds": time.perf_counter() - t0,
                "iterations": rows,
                "replay": replays,
                "diverged": res.history["diverged"].tolist(),
            }
        )
        print(f"seed {seed}: champion {champ}, {time.perf_counter() - t0:.0f}s", flush=True)

    def mean_p98(which: str) -> list[float]:
        return [
            float(
                np.mean(
                    [
                        s["iterations"][s[which] if which != "plain" else 0]["p98"][k]
                        for s in seeds_out
                    ]
                )
            )
            for k in HIDDEN
        ]

    for s in seeds_out:
        s["champion"] = s["champion_iteration"]
    summary = {
        "plain_p98_mean_over_seeds": mean_p98("plain"),
        "champion_p98_mean_over_seeds": mean_p98("champion"),
        "champion_iterations": [s["champion_iteration"] for s in seeds_out],
        "plain_val_error": [s["iterations"][0]["val_error"] for s in seeds_out],
        "champion_val_error": [
            s["iterations"][s["champion_iteration"]]["val_error"] for s in seeds_out
        ],
        "plain_test_error": [s["iterations"][0]["test_error"] for s in seeds_out],
        "champion_test_error": [
            s["iterations"][s["champion_iteration"]]["test_error"] for s in seeds_out
        ],
        "champion_less_saturated_layers": [
            sum(
                s["iterations"][s["champion_iteration"]]["p98"][k] < s["iterations"][0]["p98"][k]
                for k in HIDDEN
            )
            for s in seeds_out
        ],
        "seconds": time.perf_counter() - t_all,
    }
    out = {
        "command": " ".join(["python", "benchmarks/saturation_study.py", *sys.argv[1:]]),
        "setup": {
            "model": f"6 x (Dense({args.width}) + tanh) + Dense(10), xavier_uniform, zero biases",
            "data": f"Fashion-MNIST: train[:{args.train}] train, next {args.val} validation, "
            f"10,000 test; probe set train[:{args.probe}]",
            "optimizer": f"optax.adam({args.lr}), batch {args.batch_size}",
            "epochs": args.epochs,
            "iterations": args.iterations,
            "lam": args.lam,
            "penalty": "partial model (Eq. 5), one hidden layer per seed (numpy default_rng(seed))"
            if args.partial
            else "full model (Eq. 4), every layer",
            "championship": "lowest validation error",
            "statistics": "98th percentile of |tanh(Dense output)| over probe set and units; "
            "50-bin histograms on [-1, 1]",
        },
        "summary": summary,
        "seeds": seeds_out,
        "environment": {
            "pnjax": pnjax.__version__,
            "jax": jax.__version__,
            "optax": optax.__version__,
            "device": str(jax.devices()[0]),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(out, png)
    print(json.dumps(summary))
    print(f"wrote {args.out} and {png}")


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = out["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    ax = axes[0]  # Figure 14: per-epoch p98, first seed
    s = seeds[0]
    for i, k in enumerate(HIDDEN):
        ax.plot(
            s["replay"]["plain"]["epochs"],
            s["replay"]["plain"]["p98"][k],
            "-",
            color=f"C{i}",
            label=f"{k} plain",
        )
        ax.plot(
            s["replay"]["champion"]["epochs"],
            s["replay"]["champion"]["p98"][k],
            "--",
            color=f"C{i}",
            label=f"{k} champion",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("98th percentile of |tanh|")
    ax.set_title(
        f"seed {s['seed']}: plain (solid) vs champion iteration {s['champion_iteration']} (dashed)"
    )
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]  # p98 after each iteration, mean over layers, per seed
    for j, s in enumerate(seeds):
        it = [r["iteration"] for r in s["iterations"]]
        ax.plot(
            it,
            [np.mean(list(r["p98"].values())) for r in s["iterations"]],
            "-o",
            ms=3,
            color=f"C{j}",
            label=f"seed {s['seed']} (penalized: {s['layer'] or 'all'})",
        )
        c = s["champion_iteration"]
        ax.plot([c], [np.mean(list(s["iterations"][c]["p98"].values()))], "*", ms=12, color=f"C{j}")
    ax.set_xlabel("persistent iteration (star: champion)")
    ax.set_ylabel("mean over hidden layers of p98 |tanh|")
    ax.legend(fontsize=7)
    ax = axes[2]  # Figure 15: histograms, last hidden layer, first seed
    s = seeds[0]
    edges = np.linspace(-1, 1, 51)
    mid = 0.5 * (edges[1:] + edges[:-1])
    k = HIDDEN[-1]
    last = s["iterations"][-1]["iteration"]
    shown = sorted({0, s["champion_iteration"], last})
    for n in shown:
        tag = "plain" if n == 0 else f"iteration {n}"
        if n == s["champion_iteration"]:
            tag += " (champion)"
        ax.step(mid, s["iterations"][n]["histogram"][k], where="mid", label=tag)
    ax.set_xlabel(f"tanh activation, {k}")
    ax.set_ylabel("fraction of values")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
