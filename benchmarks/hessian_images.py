"""Hessian eigenvalue density of a ``pnjax images`` run: plain model vs persistent models.

The paper's Figure 12 (Min, arXiv 2007.01419) compares the Hessian spectrum of the plain
ResNet-18 on CIFAR-10 with that of its persistent championship. This script does that
comparison for any finished (or partly finished) ``pnjax images`` experiment: it rebuilds the
experiment from the run's ``results.json`` and reruns the seed and method on its checkpoint
folder, which trains nothing (every iteration is restored), then computes, with
``pnjax.diagnostics.hessian_spectrum`` (stochastic Lanczos quadrature, forward-over-reverse
Hessian-vector products), the density of the Hessian of the mean training cross-entropy over the
first ``--hess-images`` training images at:

- the plain run (bank slot 0),
- the last persistent iteration,
- the championship, when it is neither.

LeNet-5 is differentiated in its ``fast_pool=False`` form (same params and outputs; the fast
pooling layer has a custom first derivative only). ResNet-18's loss is taken in training mode
(batch statistics of each chunk of 250 images), as in training.

Usage (the CPU-protocol LeNet-5 here; ResNet-18 after ``pnjax images --model resnet18
--protocol paper`` on an accelerator)::

    pnjax images --model lenet5 --mode full --protocol cpu --init-std 0.2 --seeds 0 \\
        --methods persistent --data-dir DIR --out runs/lenet5
    python benchmarks/hessian_images.py --run runs/lenet5 --seed 0 --data-dir DIR

Writes ``benchmarks/results/hessian_images_<model>.{json,png}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _spectra import plot_spectra, spectra_of_fit  # noqa: E402  (benchmarks/_spectra.py)

import pnjax  # noqa: E402
from pnjax.data.images import channel_stats, load_images, normalize  # noqa: E402
from pnjax.experiments.images import (  # noqa: E402
    Protocol,
    make_problem,
    make_splits,
    run_method,
)
from pnjax.models import LeNet5  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK = 250


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the --out folder of pnjax images")
    ap.add_argument("--checkpoint-dir", type=Path, default=None, help="(default RUN/checkpoints)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="persistent")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--hess-images", type=int, default=2_000)
    ap.add_argument("--num-probes", type=int, default=3)
    ap.add_argument("--order", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    cfg = json.loads((args.run / "results.json").read_text())["config"]
    fields = {f.name for f in dataclasses.fields(Protocol)}
    proto = Protocol(**{k: cfg[k] for k in fields if k in cfg})
    model = cfg["model"]
    data = load_images(cfg["dataset"], args.data_dir)
    seeds = cfg["seeds"]
    splits0 = make_splits(data, seeds[0] if seeds else 0, proto.train_size)
    mean, std = channel_stats(splits0.train["x"])
    problem = make_problem(model, proto, mean, std, splits0.train["x"][:1])
    splits = make_splits(data, args.seed, proto.train_size)
    folder = (args.checkpoint_dir or args.run / "checkpoints") / f"seed-{args.seed}" / args.method
    t0 = time.perf_counter()
    record, fits = run_method(
        problem, splits, proto, seed=args.seed, method=args.method, mode=cfg["mode"],
        checkpoint_dir=folder, say=print, with_fit=True,
    )  # fmt: skip
    restore_s = time.perf_counter() - t0
    if args.method == "restarts":
        raise SystemExit("--method restarts has no persistent iterations; pick another method")
    res = fits[0]
    if res.resumed_from < len(res.history["score"]):
        print(f"note: {len(res.history['score']) - res.resumed_from} iteration(s) were trained now")

    n = args.hess_images // CHUNK * CHUNK
    xs = jnp.asarray(splits.train["x"][:n]).reshape(n // CHUNK, CHUNK, *splits.train["x"].shape[1:])
    ys = jnp.asarray(splits.train["y"][:n]).reshape(n // CHUNK, CHUNK)
    m_mean, m_std = jnp.asarray(mean), jnp.asarray(std)
    if model == "lenet5":
        net = LeNet5(fast_pool=False)

        def logits_of(p: Any, x: jax.Array) -> jax.Array:
            return net.apply({"params": p}, normalize(x, m_mean, m_std))
    else:
        state = res.champion_state

        def logits_of(p: Any, x: jax.Array) -> jax.Array:
            out, _ = problem.module.apply(
                {"params": p, "batch_stats": state["batch_stats"]},
                normalize(x, m_mean, m_std),
                train=True,
                mutable=["batch_stats"],
            )
            return out

    def full_loss(p: Any) -> jax.Array:
        def one(b: tuple[jax.Array, jax.Array]) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(logits_of(p, b[0]), b[1]).mean()

        return jnp.mean(jax.lax.map(one, (xs, ys)))

    spectra = spectra_of_fit(
        full_loss, res, key=jax.random.key(100 + args.seed),
        num_probes=args.num_probes, order=args.order,
    )  # fmt: skip
    out = {
        "command": " ".join(["python", "benchmarks/hessian_images.py", *sys.argv[1:]]),
        "experiment": cfg,
        "seed": args.seed,
        "method": args.method,
        "champion_iteration": int(res.champion_iteration),
        "history": record["history"],
        "hessian": f"mean training cross-entropy over train[:{n}], {args.num_probes} probes x "
        f"{args.order} Lanczos steps, full reorthogonalization (matfree)",
        "restore_seconds": restore_s,
        "spectra": spectra,
        "environment": {
            "pnjax": pnjax.__version__,
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "platform": platform.platform(),
        },
    }
    path = args.out or RESULTS / f"hessian_images_{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    plot(out, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(out: dict[str, Any], path: Path) -> None:
    cfg = out["experiment"]
    title = (
        f"{cfg['model']} {cfg['mode']} on {cfg['dataset']} ({cfg['pixels']} pixels), seed "
        f"{out['seed']}, {out['method']}; champion: iteration {out['champion_iteration']}"
    )
    plot_spectra(out["spectra"], title, path)


if __name__ == "__main__":
    main()
