"""Where the first-layer kinks of the kink experiment lie, before and after persistent escape.

Set-up: the paper's Section 3 kink experiment as in ``pnjax.experiments.kink`` (``KinkMLP``
1-32-32-1 ReLU, He-normal weights, zero biases, ``make_kink_data()`` defaults, full-batch
``optax.sgd(1e-3, momentum=0.9)``, ``steps`` steps, λ = 0.01). For each seed (default seeds 0, 2
and 3, which plain training leaves stuck: ``benchmarks/results/kink/results.json``) it calls
``pnjax.persistent_fit`` with ``iterations`` persistent runs and, after each run, takes
``pnjax.diagnostics.kink_report`` of its final params (kink ``−b/w`` of each of the 32
first-layer units against the data: among the data, in the gap ``(-1.03, 1.03)``, beyond the
data; units zero on every data point) and ``is_stuck``. It reports the plain run (iteration 0)
against the championship, and the counts per iteration; JSON and PNG go to
``benchmarks/results/kink_locations.{json,png}``.

Usage::

    nice python benchmarks/kink_locations.py                 # 3 seeds x 21 runs x 50,000 steps
    python benchmarks/kink_locations.py --quick              # 1 seed, 3 runs x 5,000 steps
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import pnjax
from pnjax.diagnostics import kink_report
from pnjax.experiments import kink

RESULTS = Path(__file__).resolve().parent / "results"


def describe(report: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready counts and locations of a ``kink_report``."""
    loc = np.asarray(report["locations"])
    return {
        "num_in_data": int(report["num_in_data"]),
        "num_in_gap": int(report["num_in_gap"]),
        "num_outside": int(report["num_outside"]),
        "num_dead": int(report["num_dead"]),
        "locations": [None if np.isnan(v) else round(float(v), 4) for v in loc],
    }


def run_seed(prob: dict[str, Any], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []

    def callback(n: int, info: dict[str, Any]) -> None:
        p = info["params"]
        row = {
            "iteration": n,
            "loss": float(info["loss"]),
            "stuck": bool(prob["stuck"](p)),
            **describe(kink_report(p, prob["x"])),
        }
        rows.append(row)
        print(
            f"  seed {seed} iteration {n}: loss {row['loss']:.4f} stuck {row['stuck']} "
            f"kinks in data {row['num_in_data']}, gap {row['num_in_gap']}, "
            f"outside {row['num_outside']}, dead units {row['num_dead']}",
            flush=True,
        )

    t0 = time.perf_counter()
    res = pnjax.persistent_fit(
        kink.init_params(prob, seed),
        prob["loss_fn"],
        kink.optimizer(args.lr),
        iterations=args.iterations,
        lam=args.lam,
        steps=args.steps,
        key=jax.random.key(seed),
        callback=callback,
    )
    init = describe(kink_report(kink.init_params(prob, seed), prob["x"]))
    return {
        "seed": seed,
        "seconds": time.perf_counter() - t0,
        "champion_iteration": int(res.champion_iteration),
        "init": init,
        "plain": rows[0],
        "champion": rows[res.champion_iteration],
        "iterations": rows,
    }


def plot(out: dict[str, Any], x: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = out["seeds"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    ax = axes[0]
    lo, hi = float(x.min()), float(x.max())
    gap = out["gap"]
    for i, s in enumerate(seeds):
        for j, (which, marker) in enumerate((("plain", "o"), ("champion", "^"))):
            locs = np.array([v for v in s[which]["locations"] if v is not None], float)
            yv = np.full(locs.shape, 2 * i + 0.35 * j)
            ax.plot(
                np.clip(locs, lo - 1.5, hi + 1.5),
                yv,
                marker,
                ms=4,
                alpha=0.7,
                color="C0" if which == "plain" else "C3",
                label=which if i == 0 else None,
            )
    ax.axvspan(gap[0], gap[1], color="0.85", label="gap (no data)")
    ax.plot(x, np.full(x.shape, -0.8), "k|", ms=8, label="data x")
    ax.set_yticks([2 * i + 0.17 for i in range(len(seeds))])
    ax.set_yticklabels([f"seed {s['seed']}" for s in seeds])
    ax.set_xlabel("first-layer kink −b/w (clipped to the plot)")
    ax.set_title("kinks: plain run (stuck) vs persistent champion")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    for i, s in enumerate(seeds):
        it = [r["iteration"] for r in s["iterations"]]
        ax.plot(
            it,
            [r["num_in_data"] for r in s["iterations"]],
            "-o",
            ms=3,
            color=f"C{i}",
            label=f"seed {s['seed']}: kinks in data",
        )
        stuck = [r["iteration"] for r in s["iterations"] if r["stuck"]]
        ax.plot(stuck, [0.0] * len(stuck), "x", color=f"C{i}")
    ax.set_xlabel("persistent iteration (x at 0: that run is stuck)")
    ax.set_ylabel("first-layer units with kink among the data (of 32)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 iterations x 5,000 steps")
    ap.add_argument("--out", type=Path, default=RESULTS / "kink_locations.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.iterations, args.steps = args.seeds[:1], 2, 5_000
    prob = kink.kink_problem()
    x = np.asarray(prob["x"])[:, 0]
    gap = np.asarray(kink_report(kink.init_params(prob, 0), prob["x"])["gap"]).tolist()
    seeds = [run_seed(prob, s, args) for s in args.seeds]
    out = {
        "command": " ".join(["python", "benchmarks/kink_locations.py", *sys.argv[1:]]),
        "setup": {
            "model": "KinkMLP features=(32, 32, 1), He-normal weights, zero biases",
            "data": "make_kink_data() defaults (60 points, gap 1.0)",
            "optimizer": f"optax.sgd({args.lr}, momentum=0.9), full batch",
            "steps": args.steps,
            "iterations": args.iterations,
            "lam": args.lam,
            "driver": "pnjax.persistent_fit, championship = lowest training loss",
            "report": "pnjax.diagnostics.kink_report of each run's final params",
        },
        "gap": gap,
        "data_range": [float(x.min()), float(x.max())],
        "seeds": seeds,
        "summary": {
            "plain_kinks_in_data": [s["plain"]["num_in_data"] for s in seeds],
            "champion_kinks_in_data": [s["champion"]["num_in_data"] for s in seeds],
            "plain_stuck": [s["plain"]["stuck"] for s in seeds],
            "champion_stuck": [s["champion"]["stuck"] for s in seeds],
            "plain_loss": [s["plain"]["loss"] for s in seeds],
            "champion_loss": [s["champion"]["loss"] for s in seeds],
        },
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
    plot(out, x, png)
    print(json.dumps(out["summary"]))
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
