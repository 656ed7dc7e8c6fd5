"""Hessian eigenvalue density of LeNet-5, plain run vs persistent championship (CPU protocol).

The paper (Min, arXiv 2007.01419, Figure 12) shows that the persistent championship of
ResNet-18 on CIFAR-10 has fewer Hessian outliers than the plain model. This is the CPU-sized
version of that comparison with ``pnjax.diagnostics.hessian_spectrum`` (stochastic Lanczos
quadrature, full reorthogonalization, forward-over-reverse Hessian-vector products):

- data: Fashion-MNIST (Debian package ``dataset-fashion-mnist``), zero-padded from 28x28 to
  32x32 (one channel), scaled to [0, 1]: the first ``train`` training images for training, the
  next ``val`` for validation (championship score: validation error);
- model: ``pnjax.models.LeNet5`` with kernels ``normal(0.05)`` (the paper's second full-model
  LeNet-5 initialization), zero biases;
- ``pnjax.persistent_fit``: Adam(1e-3), batch 256, ``epochs`` epochs per run, ``iterations``
  persistent runs, full model (Eq. 4), λ = 0.01 (the paper's LeNet-5 full-model setting),
  key ``jax.random.key(seed)``;
- Hessian of the mean training cross-entropy over the first ``hess_images`` training images
  (averaged by ``lax.map`` over batches of 250), at the final params of the plain run, of the
  last persistent iteration, and of the championship when it is neither, ``num_probes`` probes of ``order`` Lanczos steps each. The Hessian model is the
  ``fast_pool=False`` LeNet-5 (same params and outputs; its pooling has no custom gradient, so it
  can be differentiated forward-over-reverse).

Writes ``benchmarks/results/hessian_density.{json,png}``.

Usage::

    nice python benchmarks/hessian_density.py             # about 15 min on 2 loaded CPUs
    python benchmarks/hessian_density.py --quick          # tiny smoke test
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
from _spectra import plot_spectra, spectra_of_fit  # benchmarks/_spectra.py

import pnjax
from pnjax.models import LeNet5

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path("/usr/share/datasets/fashion-mnist")


def load_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` Fashion-MNIST training images ``[n, 32, 32, 1]`` and labels ``[n]``."""
    if not DATA.exists():
        raise SystemExit(
            f"{DATA} not found: apt-get update && apt-get install -y dataset-fashion-mnist"
        )
    with gzip.open(DATA / "train-images-idx3-ubyte.gz", "rb") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    with gzip.open(DATA / "train-labels-idx1-ubyte.gz", "rb") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)[:n].astype(np.int32)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2))).astype(np.float32)[..., None] / 255.0
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=5_000)
    ap.add_argument("--val", type=int, default=2_000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--lam", type=float, default=0.01)
    ap.add_argument("--hess-images", type=int, default=2_000)
    ap.add_argument("--num-probes", type=int, default=3)
    ap.add_argument("--order", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "hessian_density.json")
    args = ap.parse_args()
    if args.quick:
        args.train, args.val, args.epochs, args.iterations = 1_000, 500, 1, 1
        args.hess_images, args.num_probes, args.order = 500, 1, 5
    xs, ys = load_images(args.train + args.val)
    x, y = jnp.asarray(xs[: args.train]), jnp.asarray(ys[: args.train])
    xv, yv = jnp.asarray(xs[args.train :]), jnp.asarray(ys[args.train :])
    init = nn.initializers.normal(0.05)
    model = LeNet5(kernel_init=init)
    plain_model = LeNet5(kernel_init=init, fast_pool=False)
    params0 = model.init(jax.random.key(args.seed), x[:1])["params"]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[0])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]))

    def val_error(p):
        return jnp.mean(jnp.argmax(model.apply({"params": p}, xv), -1) != yv)

    t0 = time.perf_counter()
    res = pnjax.persistent_fit(
        params0,
        loss_fn,
        optax.adam(1e-3),
        iterations=args.iterations,
        lam=args.lam,
        score_fn=val_error,
        data=(x, y),
        batch_size=256,
        epochs=args.epochs,
        key=jax.random.key(args.seed),
    )
    train_seconds = time.perf_counter() - t0
    print(res.summary, flush=True)
    nb = args.hess_images // 250
    hb = (x[: nb * 250].reshape(nb, 250, 32, 32, 1), y[: nb * 250].reshape(nb, 250))

    def full_loss(p):
        def one(b):
            logits = plain_model.apply({"params": p}, b[0])
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, b[1]))

        return jnp.mean(jax.lax.map(one, hb))

    spectra = spectra_of_fit(
        full_loss, res, key=jax.random.key(100 + args.seed),
        num_probes=args.num_probes, order=args.order,
    )  # fmt: skip
    h = res.history
    out = {
        "command": " ".join(["python", "benchmarks/hessian_density.py", *sys.argv[1:]]),
        "setup": {
            "model": "LeNet5(kernel_init=normal(0.05)), zero biases",
            "data": f"Fashion-MNIST padded to 32x32x1: train[:{args.train}] train, next "
            f"{args.val} validation",
            "optimizer": "optax.adam(1e-3), batch 256",
            "epochs": args.epochs,
            "iterations": args.iterations,
            "lam": args.lam,
            "penalty": "full model (Eq. 4)",
            "hessian": f"mean cross-entropy over train[:{nb * 250}], {args.num_probes} probes x "
            f"{args.order} Lanczos steps, full reorthogonalization (matfree)",
        },
        "seed": args.seed,
        "champion_iteration": int(res.champion_iteration),
        "val_error": h["score"].tolist(),
        "train_loss": h["loss"].tolist(),
        "train_seconds": train_seconds,
        "spectra": spectra,
        "environment": {
            "pnjax": pnjax.__version__,
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(out, png)
    print(f"wrote {args.out} and {png}")


def plot(out: dict[str, Any], path: Path) -> None:
    title = f"LeNet-5 Hessian density, Fashion-MNIST (SLQ); champion: iteration {out['champion_iteration']}"
    plot_spectra(out["spectra"], title, path)


if __name__ == "__main__":
    main()
