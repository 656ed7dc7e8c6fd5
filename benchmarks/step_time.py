"""Training-step time of LeNet-5, AlexNet and ResNet-18 on the CPU: pnjax vs Flax vs PyTorch.

Three implementations of one Adam training step (softmax cross-entropy, CIFAR-sized inputs
``32 x 32 x 3``, 10 classes) are timed interleaved in one process, so machine noise hits all
of them alike:

- ``pnjax``: ``pnjax.models`` (default fast path) compiled with ``pnjax._compile.jit``;
- ``flax``: the ordinary Flax formulation (``nn.Conv`` + ``nn.max_pool``) under plain
  ``jax.jit`` with no compile options (XLA:CPU defaults);
- ``torch``: the same architecture in PyTorch (eager, ``torch.set_num_threads(os.cpu_count())``).

Each timing calls ``jax.block_until_ready`` before reading the clock, and records wall time
(``time.perf_counter``) and process CPU time (``time.process_time``). A profile of the pnjax
step follows: forward, forward+backward and full step timed separately, and the most expensive
compiled ops from ``jax.profiler``.

Run (about 6-8 minutes on 2 cores)::

    python benchmarks/step_time.py                 # all models, batch 128 and 256
    python benchmarks/step_time.py --quick         # batch 128, fewer repetitions
    python benchmarks/step_time.py --models lenet5 --batches 256 --reps 20

Writes ``benchmarks/results/step_time.json`` and ``benchmarks/results/step_time.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pnjax import _compile  # noqa: E402
from pnjax.models import AlexNet, LeNet5, ResNet18  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _profile import xla_op_nanoseconds  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("lenet5", "alexnet", "resnet18")
TARGETS = {"lenet5": 1.2, "alexnet": 1.5, "resnet18": 1.5}


# ----------------------------------------------------------------------------- JAX steps


def make_jax_step(
    model: nn.Module, batch: int, jit: Callable[..., Any], seed: int = 0
) -> tuple[Callable[[], Any], dict[str, Callable[[], Any]]]:
    """Builds one Adam training step of ``model`` on fixed random data.

    Args:
      model: a Flax module mapping ``[batch, 32, 32, 3]`` to logits ``[batch, 10]``; if it
        has a ``batch_stats`` collection it is called with ``train=True`` and updated.
      batch: batch size.
      jit: ``jax.jit`` or ``pnjax._compile.jit``.
      seed: seed of the data and parameters.

    Returns:
      ``run()`` that performs one step and returns its (blocked) outputs, and a dict of
      profile parts (``forward``, ``forward_backward``) with the same signature.
    """
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(batch, 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, batch))
    has_bn = isinstance(model, ResNet18)
    kwargs = {"train": True} if has_bn else {}
    variables = model.init(jax.random.key(seed), x[:2], **({"train": False} if has_bn else {}))
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    def loss_fn(p: Any, s: Any, xb: jax.Array, yb: jax.Array) -> tuple[jax.Array, Any]:
        if has_bn:
            logits, upd = model.apply(
                {"params": p, "batch_stats": s}, xb, mutable=["batch_stats"], **kwargs
            )
            s = upd["batch_stats"]
        else:
            logits = model.apply({"params": p}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), s

    def step(p: Any, s: Any, o: Any, xb: jax.Array, yb: jax.Array) -> Any:
        (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s, xb, yb)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), s, o, loss

    def fwd(p: Any, s: Any, xb: jax.Array, yb: jax.Array) -> Any:
        return loss_fn(p, s, xb, yb)[0]

    def fwd_bwd(p: Any, s: Any, xb: jax.Array, yb: jax.Array) -> Any:
        return jax.value_and_grad(loss_fn, has_aux=True)(p, s, xb, yb)

    step_c, fwd_c, fwd_bwd_c = jit(step), jit(fwd), jit(fwd_bwd)

    def run() -> Any:
        return jax.block_until_ready(step_c(params, stats, opt_state, x, y))

    parts = {
        "forward": lambda: jax.block_until_ready(fwd_c(params, stats, x, y)),
        "forward_backward": lambda: jax.block_until_ready(fwd_bwd_c(params, stats, x, y)),
        "step": run,
    }
    run.compiled = step_c  # type: ignore[attr-defined]
    return run, parts


def flax_reference(name: str) -> nn.Module:
    """The ordinary Flax formulation of ``name`` (``nn.Conv`` + ``nn.max_pool``)."""
    return {
        "lenet5": LeNet5(fast_pool=False),
        "alexnet": AlexNet(fast_pool=False),
        "resnet18": ResNet18(),
    }[name]


def pnjax_model(name: str) -> nn.Module:
    """pnjax's model ``name`` with its defaults."""
    return {"lenet5": LeNet5(), "alexnet": AlexNet(), "resnet18": ResNet18()}[name]


# ----------------------------------------------------------------------------- PyTorch


def make_torch_step(name: str, batch: int, seed: int = 0) -> Callable[[], Any]:
    """One Adam step of the PyTorch version of ``name`` (NCHW, eager, float32)."""
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(seed)

    class TLeNet5(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = tnn.Conv2d(3, 6, 5), tnn.Conv2d(6, 16, 5)
            self.f1, self.f2, self.f3 = (
                tnn.Linear(400, 120),
                tnn.Linear(120, 84),
                tnn.Linear(84, 10),
            )

        def forward(self, x: Any) -> Any:
            x = F.max_pool2d(F.relu(self.c1(x)), 2)
            x = F.max_pool2d(F.relu(self.c2(x)), 2).flatten(1)
            return self.f3(F.relu(self.f2(F.relu(self.f1(x)))))

    class TAlexNet(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = tnn.Sequential(
                tnn.Conv2d(3, 64, 11, stride=4, padding=5), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Conv2d(64, 192, 5, padding=2), tnn.ReLU(), tnn.MaxPool2d(2),
                tnn.Conv2d(192, 384, 3, padding=1), tnn.ReLU(),
                tnn.Conv2d(384, 256, 3, padding=1), tnn.ReLU(),
                tnn.Conv2d(256, 256, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
            )  # fmt: skip
            self.fc = tnn.Linear(256, 10)

        def forward(self, x: Any) -> Any:
            return self.fc(self.features(x).flatten(1))

    class Block(tnn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(cout)
            self.c2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(cout)
            self.sc = tnn.Sequential()
            if stride != 1 or cin != cout:
                self.sc = tnn.Sequential(
                    tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
                )

        def forward(self, x: Any) -> Any:
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            return F.relu(y + self.sc(x))

    class TResNet18(tnn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1 = tnn.Conv2d(3, 64, 3, 1, 1, bias=False), tnn.BatchNorm2d(64)
            layers, cin = [], 64
            for i, cout in enumerate((64, 128, 256, 512)):
                for j in range(2):
                    layers.append(Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                    cin = cout
            self.layers = tnn.Sequential(*layers)
            self.fc = tnn.Linear(512, 10)

        def forward(self, x: Any) -> Any:
            x = self.layers(F.relu(self.b1(self.c1(x))))
            return self.fc(x.mean((2, 3)))

    model = {"lenet5": TLeNet5, "alexnet": TAlexNet, "resnet18": TResNet18}[name]()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))

    def run() -> Any:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return run


# ----------------------------------------------------------------------------- timing


def time_once(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and process-CPU seconds of one call (``fn`` blocks until its result is ready)."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def summarize(samples: list[tuple[float, float]]) -> dict[str, float]:
    """Median / min wall and median CPU time in milliseconds."""
    a = np.asarray(samples) * 1e3
    return {
        "wall_ms_median": float(np.median(a[:, 0])),
        "wall_ms_min": float(a[:, 0].min()),
        "cpu_ms_median": float(np.median(a[:, 1])),
        "reps": len(samples),
    }


def op_profile(run: Callable[[], Any], reps: int = 3, top: int = 8) -> list[dict[str, Any]]:
    """Most expensive XLA ops of ``run`` from a ``jax.profiler`` trace (ms per call)."""
    try:
        agg = xla_op_nanoseconds(run, reps)
        total = sum(agg.values())
        return [
            {"op": k, "ms": v / reps / 1e6, "share": v / total} for k, v in agg.most_common(top)
        ] + [{"op": "(all ops)", "ms": total / reps / 1e6, "share": 1.0}]
    except Exception as e:  # noqa: BLE001 - the profile is a best-effort extra
        return [{"op": f"profiler failed: {e!r}", "ms": float("nan"), "share": float("nan")}]


def bench_case(name: str, batch: int, reps: int, with_torch: bool) -> dict[str, Any]:
    """Times pnjax / flax / torch steps for one model and batch size, interleaved."""
    impls: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    t0 = time.perf_counter()
    impls["pnjax"], parts = make_jax_step(pnjax_model(name), batch, _compile.jit)
    impls["pnjax"]()
    compile_s["pnjax"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    impls["flax"], _ = make_jax_step(flax_reference(name), batch, jax.jit)
    impls["flax"]()
    compile_s["flax"] = time.perf_counter() - t0
    if with_torch:
        impls["torch"] = make_torch_step(name, batch)
        impls["torch"]()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in impls}
    for _ in range(reps):
        for k, fn in impls.items():
            samples[k].append(time_once(fn))
    res: dict[str, Any] = {"model": name, "batch": batch, "first_call_s": compile_s}
    res["times"] = {k: summarize(v) for k, v in samples.items()}
    t = res["times"]
    res["ratio_pnjax_over_flax"] = t["pnjax"]["wall_ms_median"] / t["flax"]["wall_ms_median"]
    if with_torch:
        res["ratio_pnjax_over_torch"] = t["pnjax"]["wall_ms_median"] / t["torch"]["wall_ms_median"]
        res["ratio_pnjax_over_torch_cpu"] = (
            t["pnjax"]["cpu_ms_median"] / t["torch"]["cpu_ms_median"]
        )
        res["target_ratio"] = TARGETS[name]
    # Profile of pnjax's step: forward / forward+backward / full step, and the top ops.
    for fn in parts.values():
        fn()
    part_samples: dict[str, list[tuple[float, float]]] = {k: [] for k in parts}
    for _ in range(max(2, reps // 2)):
        for k, fn in parts.items():
            part_samples[k].append(time_once(fn))
    res["pnjax_parts"] = {k: summarize(v) for k, v in part_samples.items()}
    res["pnjax_top_ops"] = op_profile(parts["step"], reps=2 if name == "resnet18" else 3)
    return res


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bar chart of median wall time per step (log scale), one group per model and batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['model']}\nbatch {r['batch']}" for r in results]
    impls = [k for k in ("pnjax", "flax", "torch") if k in results[0]["times"]]
    xs = np.arange(len(results))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(results)), 4))
    for i, k in enumerate(impls):
        vals = [r["times"][k]["wall_ms_median"] for r in results]
        bars = ax.bar(xs + (i - (len(impls) - 1) / 2) * width, vals, width, label=k)
        for b, v in zip(bars, vals, strict=True):
            ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                        va="bottom", fontsize=7)  # fmt: skip
    ax.set_xticks(xs, labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per training step (median wall)")
    ax.set_title("Adam step, CIFAR-sized input, CPU: pnjax vs ordinary Flax vs PyTorch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    ap.add_argument("--batches", default=None, help="comma-separated (default 128,256)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per implementation")
    ap.add_argument("--quick", action="store_true", help="batch 128 only, fewer repetitions")
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch references")
    ap.add_argument("--out", default=str(RESULTS / "step_time.json"))
    args = ap.parse_args(argv)

    batches = [int(b) for b in (args.batches or ("128" if args.quick else "128,256")).split(",")]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {MODELS}")
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        except ImportError:
            print("torch not installed: skipping the PyTorch references")
            with_torch = False

    results = []
    for m in models:
        for b in batches:
            default_reps = {"lenet5": 20, "alexnet": 10, "resnet18": 2}[m]
            reps = args.reps or (max(2, default_reps // 2) if args.quick else default_reps)
            t0 = time.perf_counter()
            r = bench_case(m, b, reps, with_torch)
            r["case_seconds"] = time.perf_counter() - t0
            results.append(r)
            t = r["times"]
            line = f"{m:9s} batch {b:4d}: " + "  ".join(
                f"{k} {v['wall_ms_median']:8.1f} ms (cpu {v['cpu_ms_median']:8.1f})"
                for k, v in t.items()
            )
            if with_torch:
                line += f"  pnjax/torch {r['ratio_pnjax_over_torch']:.2f}"
            line += f"  pnjax/flax {r['ratio_pnjax_over_flax']:.2f}"
            print(line, flush=True)
            parts = r["pnjax_parts"]
            print("    pnjax parts (wall ms): " + ", ".join(
                f"{k} {v['wall_ms_median']:.1f}" for k, v in parts.items()))  # fmt: skip
            print("    top ops: " + ", ".join(
                f"{o['op']} {o['ms']:.1f}" for o in r["pnjax_top_ops"][:5]))  # fmt: skip

        write(args.out, results, with_torch, argv)


def write(out_path: str, results: list[dict[str, Any]], with_torch: bool, argv: Any) -> None:
    """Writes the JSON (with machine metadata) and the PNG; called after every model."""
    meta = {
        "command": "python "
        + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "pnjax_compiler_options": _compile.cpu_compiler_options(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "load_average_at_end": os.getloadavg(),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if with_torch:
        import torch

        meta["torch"] = torch.__version__
        meta["torch_threads"] = torch.get_num_threads()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
