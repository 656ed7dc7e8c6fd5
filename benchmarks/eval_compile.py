"""Test-set evaluation of ``pnjax images``: ``jax.jit`` against ``pnjax._compile.jit``.

``pnjax images`` evaluated its test half with plain ``jax.jit`` (XLA:CPU's YNNPACK convolutions)
and now with pnjax's CPU compile options (convolutions in Eigen), as the drivers compile the
validation score. This checks that the two give the same accuracies and measures both: for each
model and three initializations (``jax.random.key(0..2)``, the ``cpu`` protocol's partial-mode
init), the largest absolute difference of the logits of the first 1,000 test images, whether
their argmax agrees, the accuracy on the seed-0 test half (5,000 images) both ways, and the warm
wall time of that evaluation (best of 3).

Run (prepare the data first, see docs/images.md)::

    python benchmarks/eval_compile.py --data-dir DIR

Writes ``benchmarks/results/eval_compile.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnjax import _compile  # noqa: E402
from pnjax.data import channel_stats, load_images  # noqa: E402
from pnjax.experiments import images as ex  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(f, *args, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def check(model: str, data) -> dict:
    proto = ex.get_protocol("cpu", model, "partial")
    splits = ex.make_splits(data, 0, None)
    mean, std = channel_stats(splits.train["x"])
    prob = ex.make_problem(model, proto, mean, std, splits.train["x"][:1])
    tx, ty = (jnp.asarray(a) for a in splits.test)

    def logits(params, x):
        return prob.module.apply({"params": params}, ex.normalize(x, jnp.asarray(mean),
                                                                 jnp.asarray(std)))  # fmt: skip

    lj, lp = jax.jit(logits), _compile.jit(logits)
    aj, ap = jax.jit(prob.accuracy), _compile.jit(prob.accuracy)
    inits = []
    for s in range(3):
        params, _ = prob.init(jax.random.key(s))
        a, b = np.asarray(lj(params, tx[:1000])), np.asarray(lp(params, tx[:1000]))
        inits.append({
            "init_key": s,
            "max_abs_logit_diff": float(np.abs(a - b).max()),
            "argmax_agree": float((a.argmax(1) == b.argmax(1)).mean()),
            "acc_jax_jit": float(aj(params, None, tx, ty)),
            "acc_pnjax": float(ap(params, None, tx, ty)),
        })  # fmt: skip
    return {
        "inits": inits,
        "eval_s_jax_jit": best_of(aj, params, None, tx, ty),
        "eval_s_pnjax": best_of(ap, params, None, tx, ty),
        "test_images": int(len(ty)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="TFDS data folder with prepared cifar10")
    ap.add_argument("--models", default="lenet5,alexnet")
    ap.add_argument("--out", default=str(RESULTS / "eval_compile.json"))
    args = ap.parse_args()
    data = load_images("cifar10", args.data_dir)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "jax": jax.__version__,
        "load_average_start": os.getloadavg(),
        "pixels": data.pixels,
    }
    for model in args.models.split(","):
        result[model] = check(model, data)
        r = result[model]
        print(f"{model}: max |logit diff| {max(i['max_abs_logit_diff'] for i in r['inits']):.1e}, "
              f"eval {r['eval_s_jax_jit']:.2f} s (jax.jit) vs {r['eval_s_pnjax']:.2f} s (pnjax)",
              flush=True)  # fmt: skip
    result["load_average_end"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
