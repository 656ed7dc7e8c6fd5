"""Wall time of one CPU-protocol LeNet-5 epoch on CIFAR-10: pnjax vs PyTorch, and their accuracy.

One *epoch* of the ``cpu`` protocol of ``pnjax images --model lenet5 --mode partial`` (Adam
1e-3, batch 256, PyTorch's default initialization, per-channel normalization from the training
set, a new shuffled order every epoch with the remainder dropped) followed by the evaluation of
the validation and test halves of the CIFAR-10 test set (the paper's seeded 5,000 / 5,000 cut).
Each framework runs in its own process on the same uint8 arrays (written once to a ``.npz``);
the two alternate for ``--rounds`` rounds (torch first in even rounds, pnjax first in odd ones)
and the figures are medians over rounds:

- ``pnjax``: :func:`pnjax.persistent_fit` with ``iterations=0`` (the plain run). Each call
  compiles anew, so the epoch's training time is the difference of an ``E``-epoch and a
  1-epoch call divided by ``E - 1`` (compile time cancels; it is reported apart as
  ``fit(1) - epoch``). The evaluation (validation + test accuracy) is compiled as
  ``pnjax images`` compiles it (``pnjax._compile.jit``), timed warm, and added.
- ``torch``: the same model, initialization, optimizer, batches and evaluation in a PyTorch
  script, at its best thread count (1 or all cores, chosen by a short timing in the first
  round and kept); every epoch is timed whole (shuffle, batches, steps, evaluation) and the
  round's figure is the median epoch.

Both plain runs train ``E`` epochs and report validation and test accuracy side by side.
Machines here are shared: the load average is recorded before and after.

Run (prepare the data first, see docs/images.md)::

    python benchmarks/image_epoch.py --data-dir DIR             # 3 epochs x 3 rounds, ~5 min
    python benchmarks/image_epoch.py --data-dir DIR --epochs 8  # the protocol's full run

Writes ``benchmarks/results/image_epoch.json``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.8  # pnjax epoch wall / PyTorch epoch wall

TORCH_SCRIPT = textwrap.dedent(
    """
    import json, math, os, sys, time
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    d = np.load(sys.argv[1])
    epochs, seed, out, threads = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    mean = torch.tensor(d["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(d["std"]).view(1, 3, 1, 1)

    def prep(x):  # uint8 NHWC -> normalized float NCHW
        return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0 - mean) / std

    train_x, train_y = torch.from_numpy(d["train_x"]), torch.from_numpy(d["train_y"]).long()
    val_x, val_y = prep(d["val_x"]), torch.from_numpy(d["val_y"]).long()
    test_x, test_y = prep(d["test_x"]), torch.from_numpy(d["test_y"]).long()

    class LeNet5(nn.Module):  # PyTorch's default init for every layer
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
            self.f1, self.f2, self.f3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)
        def forward(self, x):
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.max_pool2d(F.relu(self.c2(x)), 2)
            x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC flattening, as in Flax
            return self.f3(F.relu(self.f2(F.relu(self.f1(x)))))

    def accuracy(model, x, y):
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(x[i:i + 1000]).argmax(1) == y[i:i + 1000]).sum())
                       for i in range(0, len(y), 1000))
        model.train()
        return hits / len(y)

    bs = 256
    n = len(train_y) // bs * bs

    def run(threads, epochs, steps_only=None):
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        model = LeNet5()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(seed)
        times = []
        for e in range(epochs):
            t0 = time.perf_counter()
            perm = torch.randperm(len(train_y), generator=g)[:n]
            for b, i in enumerate(range(0, n, bs)):
                if steps_only is not None and b == steps_only:
                    return (time.perf_counter() - t0) / steps_only
                idx = perm[i:i + bs]
                x, y = prep(train_x[idx].numpy()), train_y[idx]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            va, te = accuracy(model, val_x, val_y), accuracy(model, test_x, test_y)
            times.append(time.perf_counter() - t0)
        return times, va, te

    trial = {}
    if threads == "auto":
        cores = os.cpu_count() or 1
        trial = {t: min(run(t, 1, steps_only=20) for _ in range(2)) for t in sorted({1, cores})}
        best = min(trial, key=trial.get)
    else:
        best = int(threads)
    times, va, te = run(best, epochs)
    json.dump({"threads_trial_step_s": trial, "threads": best, "epoch_s": times,
               "val_acc": va, "test_acc": te, "torch": torch.__version__}, open(out, "w"))
    """
)


def pnjax_side(npz: Path, seed: int, epochs: int) -> dict:
    """One pnjax round, run in its own process (``--worker pnjax``)."""
    import pnjax
    from pnjax import _compile
    from pnjax.experiments import images as ex

    d = np.load(npz)
    proto = ex.get_protocol("cpu", "lenet5", "partial")
    train = {"x": d["train_x"], "y": d["train_y"]}
    prob = ex.make_problem("lenet5", proto, d["mean"], d["std"], train["x"][:1])
    params0, _ = prob.init(jax.random.key(seed))
    val_x, val_y, test_x, test_y = (
        jnp.asarray(d[k]) for k in ("val_x", "val_y", "test_x", "test_y")
    )
    acc = _compile.jit(prob.accuracy)  # as pnjax images compiles its evaluation

    def fit(e: int):
        t0 = time.perf_counter()
        res = pnjax.persistent_fit(
            params0, prob.loss_fn, optax.adam(proto.lr), iterations=0, lam=0.0, data=train,
            batch_size=proto.batch_size, epochs=e, key=jax.random.key(seed),
        )  # fmt: skip
        jax.block_until_ready(res.champion)
        return res, time.perf_counter() - t0

    _, t1 = fit(1)
    res, te = fit(epochs)
    t0 = time.perf_counter()
    float(acc(res.champion, None, val_x, val_y))  # compile
    eval_compile = time.perf_counter() - t0
    evals = []
    for _ in range(3):
        t0 = time.perf_counter()
        va = float(acc(res.champion, None, val_x, val_y))
        ta = float(acc(res.champion, None, test_x, test_y))
        evals.append(time.perf_counter() - t0)
    train_epoch = (te - t1) / (epochs - 1)
    return {
        "fit_1_epoch_s": t1,
        f"fit_{epochs}_epochs_s": te,
        "train_epoch_s": train_epoch,
        "compile_and_setup_s": t1 - train_epoch,
        "eval_compile_s": eval_compile,  # the first evaluation call, not part of epoch_s
        "eval_s": float(np.median(evals)),
        "epoch_s": train_epoch + float(np.median(evals)),
        "val_acc": va,
        "test_acc": ta,
        "steps_per_epoch": len(train["y"]) // proto.batch_size,
    }


def write_arrays(path: Path, data_dir: str | None, seed: int) -> dict:
    """The split's uint8 arrays and channel statistics, as both frameworks read them."""
    from pnjax.data import channel_stats, load_images
    from pnjax.experiments import images as ex

    data = load_images("cifar10", data_dir)
    print(f"decoded {data.images_per_second:,.0f} images/s ({data.pixels} pixels)", flush=True)
    splits = ex.make_splits(data, seed, None)
    mean, std = channel_stats(splits.train["x"])
    np.savez(
        path, train_x=splits.train["x"], train_y=splits.train["y"], val_x=splits.val[0],
        val_y=splits.val[1], test_x=splits.test[0], test_y=splits.test[1], mean=mean, std=std,
    )  # fmt: skip
    return {"pixels": data.pixels, "decode_images_per_s": data.images_per_second}


def run_worker(cmd: list[str], out: Path) -> dict:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{cmd[1]} failed:\n{r.stderr[-3000:]}")
    return json.loads(out.read_text())


def median_of(rounds: list[dict], key: str) -> float:
    return float(np.median([r[key] for r in rounds]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="TFDS data folder with prepared cifar10")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of each plain run (>= 2)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds per framework")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "image_epoch.json"))
    ap.add_argument("--worker", choices=["pnjax"], help=argparse.SUPPRESS)
    ap.add_argument("--npz", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.epochs < 2:
        ap.error(f"--epochs must be >= 2, got {args.epochs} (the epoch time is a difference)")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.worker == "pnjax":
        res = pnjax_side(Path(args.npz), args.seed, args.epochs)
        Path(args.out).write_text(json.dumps(res))
        return
    load0 = os.getloadavg()
    result = {
        "protocol": "cpu, lenet5, partial: Adam 1e-3, batch 256, PyTorch default init",
        "epochs": args.epochs,
        "rounds": args.rounds,
        "seed": args.seed,
        "load_average_start": load0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "jax": jax.__version__,
        "pnjax": importlib.metadata.version("pnjax"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    torch_rounds: list[dict] = []
    pnjax_rounds: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        npz, script, out = Path(tmp) / "d.npz", Path(tmp) / "t.py", Path(tmp) / "r.json"
        result.update(write_arrays(npz, args.data_dir, args.seed))
        script.write_text(TORCH_SCRIPT)
        threads = "auto"
        for r in range(args.rounds):
            for side in ("torch", "pnjax") if r % 2 == 0 else ("pnjax", "torch"):
                if side == "torch":
                    cmd = [sys.executable, str(script), str(npz), str(args.epochs),
                           str(args.seed), str(out), threads]  # fmt: skip
                    t = run_worker(cmd, out)
                    t["epoch_median_s"] = float(np.median(t["epoch_s"]))
                    threads = str(t["threads"])
                    torch_rounds.append(t)
                else:
                    cmd = [sys.executable, __file__, "--worker", "pnjax", "--npz", str(npz),
                           "--epochs", str(args.epochs), "--seed", str(args.seed), "--out",
                           str(out)]  # fmt: skip
                    pnjax_rounds.append(run_worker(cmd, out))
                last = (torch_rounds if side == "torch" else pnjax_rounds)[-1]
                secs = last["epoch_median_s"] if side == "torch" else last["epoch_s"]
                print(f"round {r} {side}: {secs:.2f} s/epoch, test {last['test_acc']:.4f}",
                      flush=True)  # fmt: skip
    pj_epoch = median_of(pnjax_rounds, "epoch_s")
    th_epoch = median_of(torch_rounds, "epoch_median_s")
    result.update(
        pnjax={
            "rounds": pnjax_rounds,
            "epoch_s": pj_epoch,
            "train_epoch_s": median_of(pnjax_rounds, "train_epoch_s"),
            "eval_s": median_of(pnjax_rounds, "eval_s"),
            "compile_and_setup_s": median_of(pnjax_rounds, "compile_and_setup_s"),
            "val_acc": pnjax_rounds[0]["val_acc"],
            "test_acc": pnjax_rounds[0]["test_acc"],
        },
        torch={
            "rounds": torch_rounds,
            "threads": torch_rounds[0]["threads"],
            "threads_trial_step_s": torch_rounds[0]["threads_trial_step_s"],
            "epoch_s": th_epoch,
            "val_acc": torch_rounds[0]["val_acc"],
            "test_acc": torch_rounds[0]["test_acc"],
            "torch": torch_rounds[0]["torch"],
        },
        ratio_pnjax_over_torch=pj_epoch / th_epoch,
        ratio_per_round=[
            p["epoch_s"] / t["epoch_median_s"]
            for p, t in zip(pnjax_rounds, torch_rounds, strict=True)
        ],  # fmt: skip
        target_ratio=TARGET,
        test_acc_gap_points=100 * (pnjax_rounds[0]["test_acc"] - torch_rounds[0]["test_acc"]),
        load_average_end=os.getloadavg(),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    keys = ("ratio_pnjax_over_torch", "ratio_per_round", "test_acc_gap_points",
            "load_average_start", "load_average_end")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}))


if __name__ == "__main__":
    main()
