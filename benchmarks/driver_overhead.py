"""Does the CPU speed of pnjax's models hold when they train through ``persistent_fit``?

    python benchmarks/driver_overhead.py            # writes benchmarks/results/driver_overhead.json
    python benchmarks/driver_overhead.py --models lenet5 --reps 5

For LeNet-5, AlexNet and ResNet-18 (CIFAR sizes, batch 128, Adam), interleaved in one process:

- ``bare``: the step of ``benchmarks/step_time.py`` (``pnjax.models`` compiled with
  ``pnjax._compile.jit``; ResNet-18 updates its batch statistics), called on one batch;
- ``driver``: one step of the persistent run that ``persistent_fit`` executes on a CPU for a
  convolutional loss (``loop='auto'`` picks :func:`pnjax.fit.python_loop_run` around
  :func:`pnjax.make_train_run`, mini-batch form, penalty active with 2 anchors, ResNet-18 with
  ``model_state``): the marginal cost of a step, i.e. (time of a run of ``E2`` epochs - time of a
  run of ``E1`` epochs) / (steps between them), so the run's fixed costs (optimizer init, the
  final loss over the data) do not count;
- ``torch``: the PyTorch reference step of ``step_time.py`` (eager, NCHW, 2 threads).

Timing only: inputs are random CIFAR-shaped arrays (speed does not depend on the values).
Reported: median wall milliseconds per step and the ratios driver / bare and driver / torch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_time import make_jax_step, make_torch_step, pnjax_model  # noqa: E402

import pnjax  # noqa: E402
from pnjax import _compile  # noqa: E402
from pnjax.fit import choose_loop, make_train_run, python_loop_run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 128


def driver_runs(
    name: str, batches_per_epoch: int, epochs: tuple[int, int]
) -> tuple[dict[int, Callable[[], Any]], str]:
    """Compiled persistent runs of ``name`` for each epoch count, and the loop ``auto`` picks."""
    model = pnjax_model(name)
    rng = np.random.RandomState(0)
    n = BATCH * batches_per_epoch
    x = jnp.asarray(rng.randn(n, 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, n))
    has_state = name == "resnet18"
    init_kw = {"train": False} if has_state else {}
    variables = model.init(jax.random.key(0), x[:2], **init_kw)
    params = variables["params"]
    state0 = {"batch_stats": variables["batch_stats"]} if has_state else None

    if has_state:

        def loss_fn(p, s, b):
            logits, upd = model.apply({"params": p, **s}, b[0], train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()
            return loss, {"batch_stats": upd["batch_stats"]}

    else:

        def loss_fn(p, b):
            logits = model.apply({"params": p}, b[0])
            return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    loop = choose_loop(loss_fn, params, (x[:BATCH], y[:BATCH]), model_state=state0)
    bank = pnjax.AnchorBank.create(params, 2)
    bank = bank.push(jax.tree_util.tree_map(lambda a: 0.5 * a, params)).push(params)
    mask = jnp.ones((len(bank.names),), jnp.float32)
    runs = {}
    for e in epochs:
        run = make_train_run(
            loss_fn, optax.adam(1e-3), data=(x, y), batch_size=BATCH, epochs=e, has_state=has_state
        )
        go = python_loop_run(run, _compile.jit) if loop == "python" else _compile.jit(run)
        args = (params, bank, jnp.float32(0.01), mask, jax.random.key(1))
        if has_state:
            args = (*args, state0)
        runs[e] = lambda go=go, args=args: jax.block_until_ready(go(*args))
    return runs, loop


def bench(name: str, reps: int, batches_per_epoch: int, epochs: tuple[int, int]) -> dict:
    bare, _ = make_jax_step(pnjax_model(name), BATCH, _compile.jit)
    torch_step = make_torch_step(name, BATCH)
    runs, loop = driver_runs(name, batches_per_epoch, epochs)
    fns: dict[str, Callable[[], Any]] = {"bare": bare, "torch": torch_step}
    fns.update({f"driver_E{e}": f for e, f in runs.items()})
    for f in fns.values():  # compile and warm up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    e1, e2 = epochs
    steps = (e2 - e1) * batches_per_epoch
    med = {k: statistics.median(v) for k, v in times.items()}
    per_rep = [
        (b - a) / steps for a, b in zip(times[f"driver_E{e1}"], times[f"driver_E{e2}"], strict=True)
    ]
    ms = {
        "bare": 1e3 * med["bare"],
        "torch": 1e3 * med["torch"],
        "driver": 1e3 * statistics.median(per_rep),
    }
    row = {
        "model": name,
        "batch": BATCH,
        "loop_auto_picks": loop,
        "epochs_compared": list(epochs),
        "batches_per_epoch": batches_per_epoch,
        "ms_per_step_median": ms,
        "driver_over_bare": ms["driver"] / ms["bare"],
        "driver_over_torch": ms["driver"] / ms["torch"],
        "bare_over_torch": ms["bare"] / ms["torch"],
        "raw_seconds": times,
    }
    print(
        f"{name}: loop={loop} ms/step bare {ms['bare']:.1f} driver {ms['driver']:.1f} "
        f"torch {ms['torch']:.1f} | driver/bare {row['driver_over_bare']:.2f} "
        f"driver/torch {row['driver_over_torch']:.2f}",
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet5,alexnet,resnet18")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "driver_overhead.json"))
    a = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    plan = {"lenet5": (4, (1, 3)), "alexnet": (2, (1, 3)), "resnet18": (2, (1, 2))}
    out: dict[str, Any] = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "pnjax_compiler_options": _compile.cpu_compiler_options(),
        "load_average_start": os.getloadavg(),
        "rows": [],
    }
    for name in a.models.split(","):
        bpe, epochs = plan[name]
        out["rows"].append(bench(name, a.reps, bpe, epochs))
    out["load_average_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
