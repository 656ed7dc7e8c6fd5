"""Which XLA:CPU compile options should pnjax use? An interleaved A/B of the YNNPACK settings.

    python benchmarks/compile_options.py       # writes benchmarks/results/compile_options.json
    python benchmarks/compile_options.py --cases kink_chains,lenet5 --reps 9

Cases (one process, every repetition times every (case, option set) once in turn):

- ``kink_chains``: 100 kink-MLP chains (1-32-32-1, 60 points), one vmapped persistent run of
  100 SGD-momentum steps each (:func:`pnjax.make_train_run`, one anchor per chain), with
  ``KinkMLP``'s default products (:func:`pnjax.models.dense.matmul`);
- ``kink_chains_nn_dense``: the same with ``KinkMLP(fast_matmul=False)`` (``nn.Dense``'s own
  ``lax.dot_general``);
- ``lenet5``, ``alexnet``: one Adam step at batch 128 (the step of ``benchmarks/step_time.py``);
- ``resnet18``: one Adam step at batch 64, batch statistics updated.

Option sets: ``jax_default`` (no option), ``ynn_off`` (``xla_cpu_experimental_ynn_fusion_type``
empty: every YNNPACK fusion off, pnjax's default until commit 9121469) and ``ynn_dot``
(``LIBRARY_FUSION_TYPE_DOT``: YNNPACK for dot fusions only, pnjax's default now). Reports the
minimum and median wall time per call and each set's median relative to ``ynn_off``; the
parameters each set produces are compared with ``ynn_off``'s (max abs difference).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_time import make_jax_step, pnjax_model  # noqa: E402

import pnjax  # noqa: E402
from pnjax.experiments.kink import kink_problem  # noqa: E402
from pnjax.models import KinkMLP  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPTION_SETS: dict[str, dict[str, Any]] = {
    "jax_default": {},
    "ynn_off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "ynn_dot": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
}


def kink_chains(
    options: dict[str, Any], c: int = 100, steps: int = 100, fast_matmul: bool = True
) -> Callable[[], Any]:
    prob = kink_problem()
    x, y = prob["x"], prob["y"]
    model = KinkMLP(fast_matmul=fast_matmul)
    params = jax.vmap(lambda k: model.init(k, x)["params"])(jax.random.split(jax.random.key(0), c))
    one = jax.tree_util.tree_map(lambda a: a[0], params)
    bank = pnjax.AnchorBank.create(one, 2).push(jax.tree_util.tree_map(lambda a: a[1], params))
    banks = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (c, *a.shape)), bank)

    def loss_fn(p: Any) -> jax.Array:
        return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    run = pnjax.make_train_run(loss_fn, optax.sgd(1e-3, momentum=0.9), steps=steps)
    f = jax.jit(jax.vmap(run, in_axes=(0, 0, None, None, None)), compiler_options=options)
    args = (params, banks, jnp.float32(0.01), jnp.ones((3,)), jax.random.key(0))
    return lambda: jax.block_until_ready(f(*args)[0])


def model_step(name: str, batch: int, options: dict[str, Any]) -> Callable[[], Any]:
    run, _ = make_jax_step(
        pnjax_model(name), batch, functools.partial(jax.jit, compiler_options=options)
    )
    return lambda: run()[0]


CASES: dict[str, Callable[[dict[str, Any]], Callable[[], Any]]] = {
    "kink_chains": kink_chains,
    "kink_chains_nn_dense": functools.partial(kink_chains, fast_matmul=False),
    "lenet5": functools.partial(model_step, "lenet5", 128),
    "alexnet": functools.partial(model_step, "alexnet", 128),
    "resnet18": functools.partial(model_step, "resnet18", 64),
}


def max_diff(a: Any, b: Any) -> float:
    return max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "compile_options.json"))
    a = ap.parse_args()
    out: dict[str, Any] = {
        "command": "python benchmarks/" + Path(__file__).name + " " + " ".join(sys.argv[1:]),
        "jax": jax.__version__,
        "option_sets": OPTION_SETS,
        "load_average_start": os.getloadavg(),
        "cases": {},
    }
    for case in a.cases.split(","):
        fns = {k: CASES[case](o) for k, o in OPTION_SETS.items()}
        outs = {k: f() for k, f in fns.items()}  # compile, warm up
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(a.reps):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "ms_min": {k: 1e3 * min(v) for k, v in times.items()},
            "ms_median": {k: 1e3 * m for k, m in med.items()},
            "median_vs_ynn_off": {k: m / med["ynn_off"] for k, m in med.items()},
            "max_param_diff_vs_ynn_off": {k: max_diff(o, outs["ynn_off"]) for k, o in outs.items()},
        }
        out["cases"][case] = row
        print(
            case,
            ", ".join(
                f"{k} {row['ms_median'][k]:.1f} ms ({row['median_vs_ynn_off'][k]:.2f}x)"
                for k in fns
            ),
            flush=True,
        )
    out["load_average_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
