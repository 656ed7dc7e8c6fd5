"""Population mode vs independent chains vs random restarts on the kink problem, equal compute.

Set-up (the paper's kink experiment, Section 3): 1-32-32-1 ReLU MLP, He-normal weights, zero
biases, mean squared error on the 60-point kink data (``pnjax.experiments.kink``), full-batch GD
with momentum 0.9, lr 1e-3, λ = 0.01, every layer penalized (Eq. 4). ``C`` chains start from
seeds whose plain run gets stuck at "two affine pieces" (seeds 0, 2, 3, 4 by
``benchmarks/results/kink_stuck_rate.json``; the stuck flag is re-checked here).

Three methods, each ``C · (N + 1)`` training runs of ``steps`` updates:

- ``independent``: ``run_chains(mode='independent')``: C chains of Algorithm 1, N iterations;
- ``population``: ``run_chains(mode='population')``: N + 1 rounds, one bank shared by all chains;
- ``restarts``: ``random_restarts`` with ``C · (N + 1)`` fresh He-initializations.

The figure of merit is the championship: the lowest final training loss over all runs (the
paper's criterion), plus the fraction of runs that are not stuck.

Run::

    python benchmarks/population_kink.py            # C=4, N=7, 25,000 steps (about 4 minutes)
    python benchmarks/population_kink.py --quick    # C=4, N=4, 10,000 steps
    python benchmarks/population_kink.py --seeds 0 2 3 4 5 --iterations 19 --steps 50000

Writes ``benchmarks/results/population_kink.json``.
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
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pnjax  # noqa: E402
from pnjax.experiments.kink import init_params, kink_problem, optimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def summarize(losses: np.ndarray, diverged: np.ndarray, stuck: np.ndarray) -> dict[str, Any]:
    """Championship figures of a ``[chains, runs]`` (or ``[runs]``) set of final losses."""
    ok = np.where(diverged, np.inf, losses)
    return {
        "champion_loss": float(ok.min()),
        "champion_loss_per_chain": ok.min(axis=-1).tolist() if ok.ndim == 2 else None,
        "median_loss": float(np.median(losses[~diverged])) if (~diverged).any() else None,
        "fraction_unstuck": float(1.0 - stuck.mean()),
        "num_runs": int(losses.size),
        "num_diverged": int(diverged.sum()),
        "losses": losses.tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 2, 3, 4])
    ap.add_argument("--iterations", type=int, default=7)
    ap.add_argument("--steps", type=int, default=25_000)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--restart-seed", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="N=4, 10,000 steps")
    ap.add_argument("--out", default=str(RESULTS / "population_kink.json"))
    a = ap.parse_args()
    if a.quick:
        a.iterations, a.steps = 4, 10_000
    prob = kink_problem()
    C, N = len(a.seeds), a.iterations
    inits = jax.vmap(lambda s: init_params(prob, s))(jnp.asarray(a.seeds))
    stuck_fn = jax.jit(jax.vmap(jax.vmap(prob["stuck"])))

    def stuck_of(params_cr):  # params with leaves [C, R, ...] -> [C, R] bool
        return np.asarray(stuck_fn(params_cr))

    out: dict[str, Any] = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "config": {
            "seeds": a.seeds,
            "chains": C,
            "iterations": N,
            "runs_per_method": C * (N + 1),
            "steps_per_run": a.steps,
            "lam": a.lam,
            "optimizer": "optax.sgd(1e-3, momentum=0.9), full batch",
            "layers": "all (Eq. 4)",
            "num_points": int(prob["x"].shape[0]),
        },
        "environment": {
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "platform": platform.platform(),
        },
    }
    for mode in ("independent", "population"):
        t = time.perf_counter()
        res = pnjax.run_chains(
            inits,
            prob["loss_fn"],
            optimizer(),
            iterations=N,
            lam=a.lam,
            steps=a.steps,
            mode=mode,
            key=jax.random.key(0),
        )
        secs = time.perf_counter() - t
        if mode == "independent":
            solutions = jax.tree_util.tree_map(lambda x: x[:, : N + 1], res.bank.anchors)
        else:  # shared bank slot r * C + c holds chain c's solution of round r
            solutions = jax.tree_util.tree_map(
                lambda x: jnp.swapaxes(x.reshape(N + 1, C, *x.shape[1:]), 0, 1), res.bank.anchors
            )
        stuck = stuck_of(solutions)
        pushed = res.history["pushed"]
        s = summarize(res.history["loss"], res.history["diverged"], stuck[pushed])
        s["seconds"] = secs
        s["plain_run_stuck"] = stuck[:, 0].tolist()
        s["champion_iteration"] = res.champion_iteration.tolist()
        out[mode] = s
        print(
            f"{mode:12s} champion {s['champion_loss']:.4f}  per chain "
            f"{[round(v, 4) for v in s['champion_loss_per_chain']]}  unstuck "
            f"{s['fraction_unstuck']:.2f}  ({secs:.0f}s)",
            flush=True,
        )
    t = time.perf_counter()
    rr = pnjax.random_restarts(
        lambda k: prob["model"].init(k, prob["x"])["params"],
        prob["loss_fn"],
        optimizer(),
        num_restarts=C * (N + 1),
        steps=a.steps,
        key=jax.random.key(a.restart_seed),
    )
    secs = time.perf_counter() - t
    stuck = np.asarray(jax.jit(jax.vmap(prob["stuck"]))(rr.params))
    s = summarize(rr.losses, rr.diverged, stuck[~rr.diverged])
    s["seconds"] = secs
    out["restarts"] = s
    print(
        f"{'restarts':12s} champion {s['champion_loss']:.4f}  unstuck {s['fraction_unstuck']:.2f}"
        f"  ({secs:.0f}s)"
    )
    ind, pop, rst = (out[m]["champion_loss"] for m in ("independent", "population", "restarts"))
    out["finding"] = (
        f"population championship {pop:.4f} vs independent {ind:.4f} vs random restarts "
        f"{rst:.4f} (lower is better; C={C}, N={N}, {a.steps} steps, one run each). Population "
        + ("beats" if pop < ind else "does not beat")
        + " independent chains at equal compute in this run."
    )
    print(out["finding"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
