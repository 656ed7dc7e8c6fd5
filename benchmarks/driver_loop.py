"""One persistent-training run on LeNet-5 and on the kink MLP: loop='scan' vs loop='python'.

    python benchmarks/driver_loop.py            # writes benchmarks/results/driver_loop.json

``persistent_fit(..., loop=...)`` drives each run either as one compiled ``lax.scan`` over
steps (default) or as one compiled update called from Python (:func:`pnjax.fit.python_loop_run`).
This times exactly those two run functions, built by :func:`pnjax.make_train_run` with the
penalty active (a bank of 2 anchors), compiled once and warmed up, then called alternately.
Timing only: the LeNet-5 inputs are random CIFAR-shaped arrays (speed does not depend on the
values).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import pnjax
from pnjax import _compile
from pnjax.experiments import kink
from pnjax.fit import make_train_run, python_loop_run
from pnjax.models import LeNet5


def lenet_case(n: int = 1024, batch: int = 128, epochs: int = 2):
    model = LeNet5()
    x = jax.random.normal(jax.random.key(0), (n, 32, 32, 3))
    y = jnp.arange(n) % 10
    params = model.init(jax.random.key(1), x[:1])["params"]

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    run = make_train_run(loss_fn, optax.adam(1e-3), data=(x, y), batch_size=batch, epochs=epochs)
    return params, run, epochs * (n // batch)


def kink_case(steps: int = 5000):
    prob = kink.kink_problem()
    run = make_train_run(prob["loss_fn"], kink.optimizer(), steps=steps)
    return kink.init_params(prob, 0), run, steps


def chains_case(reps: int, c: int = 4, n: int = 256, batch: int = 64) -> dict:
    """run_chains on LeNet-5, C chains, plain + 1 persistent iteration: scan vs python loop."""
    from pnjax.chains import prepare_chains

    model = LeNet5()
    x = jax.random.normal(jax.random.key(0), (n, 32, 32, 3))
    y = jnp.arange(n) % 10

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b[0])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    inits = jax.vmap(lambda k: model.init(k, x[:1])["params"])(
        jax.random.split(jax.random.key(1), c)
    )
    kw = dict(
        iterations=1, lam=0.01, data=(x, y), batch_size=batch, epochs=1, key=jax.random.key(2)
    )
    steps = c * 2 * (n // batch)  # chain-steps per call
    row: dict = {"case": f"run_chains lenet5, C={c}, batch {batch}", "chain_steps_per_call": steps}
    fns = {}
    for loop in ("scan", "python"):
        compiled, args, _ = prepare_chains(inits, loss_fn, optax.adam(1e-3), loop=loop, **kw)
        jax.block_until_ready(compiled(*args))
        fns[loop] = (compiled, args)
    for _ in range(reps):
        for loop, (compiled, args) in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            row.setdefault(f"{loop}_ms_per_chain_step", []).append(
                1e3 * (time.perf_counter() - t) / steps
            )
    for loop in fns:
        row[f"{loop}_ms_per_chain_step_best"] = min(row[f"{loop}_ms_per_chain_step"])
    row["scan_over_python"] = (
        row["scan_ms_per_chain_step_best"] / row["python_ms_per_chain_step_best"]
    )
    print(
        row["case"],
        {k: round(v, 3) for k, v in row.items() if k.endswith(("best", "python"))},
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/driver_loop.json")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    out = {
        "command": "python benchmarks/driver_loop.py",
        "jax": jax.__version__,
        "load_average_start": os.getloadavg(),
        "cases": [],
    }
    for name, (params, run, steps) in [
        ("lenet5, batch 128", lenet_case()),
        ("kink MLP, 60 points", kink_case()),
    ]:
        bank = pnjax.AnchorBank.create(params, 2).push(params).push(params)
        mask = jnp.ones((len(bank.names),))
        fns = {"scan": _compile.jit(run), "python": python_loop_run(run, _compile.jit)}
        args = (params, bank, jnp.float32(0.01), mask, jax.random.key(0))
        outs = {k: jax.block_until_ready(f(*args)) for k, f in fns.items()}  # compile, warm up
        diff = max(
            float(jnp.max(jnp.abs(u - v)))
            for u, v in zip(
                jax.tree_util.tree_leaves(outs["scan"][0]),
                jax.tree_util.tree_leaves(outs["python"][0]),
                strict=True,
            )
        )
        row: dict = {"case": name, "steps_per_run": steps, "max_param_difference": diff}
        for _ in range(a.reps):
            for k, f in fns.items():
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                row.setdefault(f"{k}_ms_per_step", []).append(
                    1e3 * (time.perf_counter() - t) / steps
                )
        for k in fns:
            row[f"{k}_ms_per_step_best"] = min(row[f"{k}_ms_per_step"])
        row["scan_over_python"] = row["scan_ms_per_step_best"] / row["python_ms_per_step_best"]
        print(
            name,
            {k: round(v, 4) for k, v in row.items() if k.endswith(("best", "python"))},
            f"max |params diff| {diff:.2e}",
            flush=True,
        )
        out["cases"].append(row)
    out["chains"] = chains_case(a.reps)
    out["load_average_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
