"""One prepared run for an accelerator: chain throughput, step times, penalty overhead.

Made to run unattended on one GPU (or TPU) in under 8 minutes and write one JSON file:

- ``kink_chains``: chain-steps per second of ``pnjax.run_chains`` on the kink MLP (Flax
  ``nn.Dense`` 1-32-32-1 through ``pnjax.fast_dots``, 60 points, SGD momentum 0.9, plain + one
  persistent run per chain) for C = 1, 4, 16, ..., 4096 chains;
- ``lenet5_chains``: the same on LeNet-5 (a fixed batch of 32 CIFAR-sized images per chain,
  softmax cross-entropy) for C = 1, 2, 4, ..., 64;
- ``step_time``: one SGD-momentum training step of LeNet-5 and of ResNet-18 (batch 128,
  32 x 32 x 3 inputs, ResNet-18 with its batch statistics), median of repeated calls (the
  LeNet-5 figure is the plain step of ``penalty_overhead``);
- ``penalty_overhead``: the LeNet-5 SGD step with the Eq. 6 bias of K = 20 anchors
  (``optax.chain(pnjax.persistent_bias(bank, λ), optax.sgd(...))``) against the plain step.

Each chain sweep stops where throughput stops scaling (less than ``--min-gain`` more
chain-steps/s than the previous C) or when its share of ``--budget-s`` is spent; the JSON says
where and why. Per-step times of ``run_chains`` come from two calls with ``S1`` and ``S2`` steps
per run, ``(T(S2) - T(S1)) / (2 (S2 - S1) C)``, so compilation cancels; compile time is reported
separately. Every timing ends with ``jax.block_until_ready``.

Run::

    python benchmarks/accelerator.py                       # on the accelerator, < 8 min
    python benchmarks/accelerator.py --quick               # CPU smoke test, < 1 min
    python benchmarks/accelerator.py --out my_run.json

Writes ``benchmarks/results/accelerator_<backend>.json`` by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pnjax  # noqa: E402
from pnjax import _compile  # noqa: E402
from pnjax.chains import prepare_chains  # noqa: E402
from pnjax.data import make_kink_data  # noqa: E402
from pnjax.models import LeNet5, ResNet18  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = (
    "kink_chains",
    "lenet5_chains",
    "penalty_overhead",
    "penalty_overhead_resnet18",
    "step_time_lenet5",
    "step_time_lenet5_fast_pool",
    "step_time_resnet18",
)
LAM, LR, MOM = 0.01, 1e-3, 0.9

FULL = {
    "kink_chains": [1, 4, 16, 64, 256, 1024, 4096],
    "kink_steps": (200, 2200),
    "lenet_chains": [1, 2, 4, 8, 16, 32, 64],
    "lenet_steps": (20, 220),
    "lenet_batch": 32,
    "step_batch": 128,
    "step_reps": 30,
    "resnet": "full",
    "resnet_penalty_k": 20,
}
QUICK = {  # a smoke test of every code path; its figures mean nothing
    "kink_chains": [1],
    "kink_steps": (5, 105),
    "lenet_chains": [1],
    "lenet_steps": (2, 6),
    "lenet_batch": 4,
    "step_batch": 2,
    "step_reps": 2,
    "resnet": "small",
    "resnet_penalty_k": 2,
}


class KinkDense(nn.Module):
    """The kink MLP as a user writes it: plain ``nn.Dense`` layers."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(1)(x)


# ----------------------------------------------------------------------------- problems


def kink_problem(
    use_fast_dots: bool,
) -> tuple[Callable[[Any], jax.Array], Callable[[jax.Array], Any]]:
    """``loss_fn(params)`` and ``init(key)`` of the kink MLP, as written or through
    ``pnjax.fast_dots`` (a CPU-specific rewrite of the dense layers' products)."""
    x, y = (jnp.asarray(a) for a in make_kink_data())
    model = KinkDense()

    def loss_fn(params: Any) -> jax.Array:
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    loss = pnjax.fast_dots(loss_fn) if use_fast_dots else loss_fn
    return loss, lambda k: model.init(k, x)["params"]


def lenet_problem(
    batch: int, fast_pool: bool
) -> tuple[Callable[[Any], jax.Array], Callable[[jax.Array], Any]]:
    """``loss_fn(params)`` and ``init(key)`` of LeNet-5 on a fixed batch of random pixels
    (a timing input only: no accuracy is ever read from it). ``fast_pool=False`` is the model
    as a Flax user writes it (``nn.Conv`` + ``nn.max_pool``); ``True`` is pnjax's CPU layer."""
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(batch, 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, batch))
    model = LeNet5(fast_pool=fast_pool)

    def loss_fn(params: Any) -> jax.Array:
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss_fn, lambda k: model.init(k, x[:1])["params"]


# ----------------------------------------------------------------------------- measurements


def chains_point(
    loss_fn: Callable[[Any], jax.Array],
    init: Callable[[jax.Array], Any],
    c: int,
    steps: tuple[int, int],
    reps: int = 3,
) -> dict[str, Any]:
    """``run_chains`` with ``c`` chains at ``S1`` and ``S2`` steps per run; marginal step time.

    Each step count is prepared once with :func:`pnjax.chains.prepare_chains` and its compiled program
    called ``reps`` more times on the same arguments (the fastest kept), so neither compilation
    nor the per-call set-up enters the per-step figure; ``first_call_s`` (compile and one run)
    is reported beside it.
    """
    # jitted: an eager vmap of a CNN's init compiles each batched primitive on its own, three
    # times slower than compiling the one program (about 25 s vs 9 s for LeNet-5 on a CPU)
    inits = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(0), c))
    sgd = optax.sgd(LR, momentum=MOM)
    times, first = [], []
    for s in steps:
        t = time.perf_counter()
        prep = prepare_chains(inits, loss_fn, sgd, iterations=1, lam=LAM, steps=s)
        jax.block_until_ready(prep.finish(prep.compiled(*prep.args)).champion)
        first.append(time.perf_counter() - t)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(prep.compiled(*prep.args))
            best = min(best, time.perf_counter() - t)
        times.append(best)
    s1, s2 = steps
    per = (times[1] - times[0]) / (2 * (s2 - s1) * c)
    ok = per > 0  # a difference lost in noise (tiny runs) is reported as null
    return {
        "C": c,
        "us_per_chain_step": per * 1e6 if ok else None,
        "chain_steps_per_s": 1.0 / per if ok else None,
        "steps": list(steps),
        "call_s": times,
        "first_call_s": first,
        "compile_s": max(first[0] - times[0], 0.0),
    }


def chains_sweep(
    problem: tuple[Callable[[Any], jax.Array], Callable[[jax.Array], Any]],
    chains: Sequence[int],
    steps: tuple[int, int],
    min_gain: float,
    deadline: float,
) -> dict[str, Any]:
    """Throughput for growing C until it stops scaling, or the deadline passes."""
    rows: list[dict[str, Any]] = []
    stop = "ran every C"
    for c in chains:
        if time.perf_counter() > deadline:
            stop = f"time budget spent before C = {c}"
            break
        row = chains_point(*problem, c, steps)
        rows.append(row)
        print(f"  C={c}: {row['chain_steps_per_s']} chain-steps/s", flush=True)
        rates = [r["chain_steps_per_s"] or 0.0 for r in rows]
        if len(rows) > 1 and rates[-1] < min_gain * rates[-2]:
            stop = f"stopped scaling at C = {c} (gain < {min_gain}x over C = {rows[-2]['C']})"
            break
    best = max(rows, key=lambda r: r["chain_steps_per_s"] or 0.0) if rows else None
    return {"rows": rows, "stop": stop, "best": best}


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def step_time(
    name: str, batch: int, reps: int, small: bool = False, fast_pool: bool = False
) -> dict[str, Any]:
    """Median seconds of one jitted SGD-momentum step of ``name`` (``lenet5``, ``resnet18``).

    ``small`` (the ``--quick`` smoke test only): ResNet-18 with one block per stage on
    16 x 16 inputs, to keep its compilation short on a CPU.
    """
    rng = np.random.RandomState(0)
    side = 16 if small else 32
    x = jnp.asarray(rng.randn(batch, side, side, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 10, batch))
    bn = name == "resnet18"
    if bn:
        model = ResNet18(stage_sizes=(1, 1, 1, 1)) if small else ResNet18()
    else:
        model = LeNet5(fast_pool=fast_pool)
    init_kw = {"train": False} if bn else {}
    variables = jax.jit(lambda k, xs: model.init(k, xs, **init_kw))(jax.random.key(0), x[:2])
    params, stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(LR, momentum=MOM)

    def loss_fn(p: Any, s: Any) -> tuple[jax.Array, Any]:
        if bn:
            logits, upd = model.apply(
                {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
            )
            s = upd["batch_stats"]
        else:
            logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), s

    @_compile.jit
    def step(p: Any, s: Any, o: Any) -> Any:
        (loss, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), s, o, loss

    opt = tx.init(params)
    t = time.perf_counter()
    jax.block_until_ready(step(params, stats, opt))
    first = time.perf_counter() - t
    sec = _median_time(lambda: step(params, stats, opt), reps)
    return {
        "model": f"{type(model).__name__}{'(stage_sizes=(1, 1, 1, 1))' if small else ''}"
        + ("" if bn else f"(fast_pool={fast_pool})"),
        "input": [batch, side, side, 3],
        "step_ms": sec * 1e3,
        "first_call_s": first,
        "reps": reps,
    }


def flat_bias(
    params: Any, bank: pnjax.AnchorBank
) -> tuple[Callable[..., Any], jax.Array, jax.Array]:
    """An alternative formulation of the Eq. 6 bias, for comparison only: the bank flattened
    once to ``[K, P]`` and the bias computed over the flat parameter vector (a segment sum for
    the per-layer dots, one gather-multiply-sum for the bias) instead of two small einsums per
    leaf. Returns ``bias(params, anchors_flat, inv_sq, lam)`` and ``anchors_flat``."""
    from pnjax.layers import layer_layout
    from pnjax.penalty import _inverse_sq_norms

    layout = layer_layout(params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [int(np.size(x)) for x in leaves]
    seg = jnp.asarray(np.repeat(np.asarray(layout.leaf_layer), sizes))
    anchors_flat = jnp.concatenate(
        [a.reshape(bank.capacity, -1) for a in jax.tree_util.tree_leaves(bank.anchors)], axis=1
    )
    num_layers = layout.num_layers

    def bias(p: Any, a: jax.Array, inv_sq: jax.Array, lam: float) -> Any:
        flat = jnp.concatenate([x.reshape(-1) for x in jax.tree_util.tree_leaves(p)])
        dots = jax.ops.segment_sum((a * flat).T, seg, num_segments=num_layers)  # [L, K]
        coef = lam * jnp.sign(dots.T) * inv_sq  # [K, L]
        g = jnp.sum(coef[:, seg] * a, axis=0)  # [P]
        parts = jnp.split(g, np.cumsum(sizes)[:-1])
        return jax.tree_util.tree_unflatten(
            treedef, [q.reshape(np.shape(x)) for q, x in zip(parts, leaves, strict=True)]
        )

    return bias, anchors_flat, _inverse_sq_norms(bank)


def penalty_overhead(
    batch: int, reps: int, fast_pool: bool, k: int = 20, model: str = "lenet5", small: bool = False
) -> dict[str, Any]:
    """SGD step with the Eq. 6 bias of ``k`` anchors vs the same step without it.

    ``model``: ``lenet5`` (on the problem of :func:`lenet_problem`) or ``resnet18`` (batch
    statistics in training mode). Three steps, alternated, best median of each: plain;
    ``optax.chain(pnjax.persistent_bias(bank, λ), sgd)``; and, for comparison only, the same
    bias through :func:`flat_bias` (checked equal to the transform's before timing).
    """
    if model == "lenet5":
        loss_only, init = lenet_problem(batch, fast_pool)
        init = jax.jit(init)  # one compilation, not one per primitive of the forward pass
        params = init(jax.random.key(0))
        stats: Any = {}

        def loss_fn(p: Any, s: Any) -> tuple[jax.Array, Any]:
            return loss_only(p), s
    else:
        rng = np.random.RandomState(0)
        side = 16 if small else 32
        x = jnp.asarray(rng.randn(batch, side, side, 3).astype(np.float32))
        y = jnp.asarray(rng.randint(0, 10, batch))
        net = ResNet18(stage_sizes=(1, 1, 1, 1)) if small else ResNet18()
        variables = net.init(jax.random.key(0), x[:2], train=False)
        params, stats = variables["params"], variables["batch_stats"]

        def loss_fn(p: Any, s: Any) -> tuple[jax.Array, Any]:
            logits, upd = net.apply(
                {"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"]
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        @jax.jit
        def init(key: jax.Array) -> Any:
            return net.init(key, x[:2], train=False)["params"]

    bank = pnjax.AnchorBank.create(params, k)
    for i in range(k):
        bank = bank.push(init(jax.random.key(100 + i)))
    sgd = optax.sgd(LR, momentum=MOM)
    bias, anchors_flat, inv_sq = flat_bias(params, bank)

    @_compile.jit
    def plain(p: Any, s: Any, o: Any) -> Any:
        (_, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
        u, o = sgd.update(g, o, p)
        return optax.apply_updates(p, u), s, o

    @_compile.jit
    def penalized(p: Any, s: Any, o: Any, bank: pnjax.AnchorBank) -> Any:
        tx = optax.chain(pnjax.persistent_bias(bank, LAM), sgd)
        (_, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), s, o

    @_compile.jit
    def flat(p: Any, s: Any, o: Any, a: jax.Array, inv: jax.Array) -> Any:
        (_, s), g = jax.value_and_grad(loss_fn, has_aux=True)(p, s)
        g = jax.tree_util.tree_map(jnp.add, g, bias(p, a, inv, LAM))
        u, o = sgd.update(g, o, p)
        return optax.apply_updates(p, u), s, o

    tx0 = optax.chain(pnjax.persistent_bias(bank, LAM), sgd)
    o_plain, o_pen = sgd.init(params), tx0.init(params)
    ref = tx0.update(jax.tree_util.tree_map(jnp.zeros_like, params), o_pen, params)[0]
    alt = jax.tree_util.tree_map(
        lambda b: -LR * b, jax.jit(bias)(params, anchors_flat, inv_sq, LAM)
    )
    err = max(
        float(jnp.max(jnp.abs(r - q)) / (jnp.max(jnp.abs(r)) + 1e-30))
        for r, q in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(alt), strict=True)
    )
    best = {"plain": 0.0, "penalized": 0.0, "flat": 0.0}
    calls = {
        "plain": lambda: plain(params, stats, o_plain),
        "penalized": lambda: penalized(params, stats, o_pen, bank),
        "flat": lambda: flat(params, stats, o_plain, anchors_flat, inv_sq),
    }
    for _ in range(2 if reps < 5 else 3):  # alternate, keep the best median of each
        for name, fn in calls.items():
            t = _median_time(fn, reps)
            best[name] = t if best[name] == 0 else min(best[name], t)
    return {
        "model": model,
        "K": k,
        "batch": batch,
        "params": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params))),
        "leaves": len(jax.tree_util.tree_leaves(params)),
        "plain_step_ms": best["plain"] * 1e3,
        "penalized_step_ms": best["penalized"] * 1e3,
        "overhead": best["penalized"] / best["plain"] - 1,
        "flat_step_ms": best["flat"] * 1e3,
        "flat_overhead": best["flat"] / best["plain"] - 1,
        "flat_max_rel_diff": err,
    }


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test")
    ap.add_argument("--out", default=None, help="JSON path (default results/accelerator_*.json)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="total time budget, seconds")
    ap.add_argument("--min-gain", type=float, default=1.1, help="scaling threshold between C's")
    ap.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)} (default: all)",
    )
    a = ap.parse_args(argv)
    chosen = a.phases.split(",")
    unknown = sorted(set(chosen) - set(PHASES))
    if unknown:
        ap.error(f"--phases: unknown {unknown}; choose from {','.join(PHASES)}")
    cfg = QUICK if a.quick else FULL
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    on_cpu = jax.default_backend() == "cpu"
    out: dict[str, Any] = {
        "command": "python benchmarks/accelerator.py"
        + (" --quick" if a.quick else "")
        + (f" --budget-s {a.budget_s:g}" if a.budget_s != 420.0 else "")
        + (f" --phases {a.phases}" if chosen != list(PHASES) else ""),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "quick": a.quick,
        "machine": {
            "backend": jax.default_backend(),
            "device_kind": dev.device_kind,
            "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": _version("flax"),
            "optax": optax.__version__,
            "pnjax": pnjax.__version__,
            "compiler_options": _compile.cpu_compiler_options(),
        },
        "settings": {**cfg, "budget_s": a.budget_s, "min_gain": a.min_gain},
        # The models as a user writes them; pnjax's CPU-specific layers (fast_dots, the fast
        # conv-relu-pool) only where the backend is the CPU, and always labelled.
        "models": {
            "kink": "Flax nn.Dense 1-32-32-1" + (" through pnjax.fast_dots" if on_cpu else ""),
            "lenet5": f"pnjax.models.LeNet5(fast_pool={on_cpu})",
        },
        "errors": {},
    }
    path = Path(a.out or RESULTS / f"accelerator_{jax.default_backend()}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    budget = a.budget_s
    phases: dict[str, float] = {}
    out["phase_s"] = phases

    def run_phase(
        name: str, fn: Callable[[], Any], into: dict[str, Any] | None = None, key: str = ""
    ) -> None:
        """Runs one phase and stores its result in ``into[key]`` (default ``out[name]``); an
        error is recorded and the next phase runs. Writes the JSON after each phase, so a run
        cut short keeps what it measured."""
        into, key = (out, name) if into is None else (into, key)
        into[key] = None
        if name not in chosen:
            return
        print(name, flush=True)
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - an unattended run records and goes on
            import traceback

            traceback.print_exc()
            out["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            result = None
        into[key] = result
        phases[name] = time.perf_counter() - start
        out["wall_s"] = time.perf_counter() - t0
        path.write_text(json.dumps(out, indent=1))

    # budget shares: kink 35%, LeNet chains 35%, the rest for step times and the penalty
    run_phase(
        "kink_chains",
        lambda: chains_sweep(
            kink_problem(use_fast_dots=on_cpu),
            cfg["kink_chains"],
            cfg["kink_steps"],
            a.min_gain,
            t0 + 0.35 * budget,
        ),
    )
    run_phase(
        "lenet5_chains",
        lambda: chains_sweep(
            lenet_problem(cfg["lenet_batch"], fast_pool=on_cpu),
            cfg["lenet_chains"],
            cfg["lenet_steps"],
            a.min_gain,
            t0 + 0.7 * budget,
        ),
    )
    run_phase(
        "penalty_overhead",
        lambda: penalty_overhead(cfg["step_batch"], cfg["step_reps"], fast_pool=on_cpu),
    )
    run_phase(
        "penalty_overhead_resnet18",
        lambda: penalty_overhead(
            cfg["step_batch"],
            cfg["step_reps"],
            fast_pool=on_cpu,
            k=cfg["resnet_penalty_k"],
            model="resnet18",
            small=cfg["resnet"] == "small",
        ),
    )
    out["step_time"] = {}
    for name, kw in (
        ("lenet5", {"fast_pool": False}),
        ("lenet5_fast_pool", {"fast_pool": True}),
        ("resnet18", {"small": cfg["resnet"] == "small"}),
    ):
        model = name.split("_")[0]
        run_phase(
            f"step_time_{name}",
            lambda model=model, kw=kw: step_time(model, cfg["step_batch"], cfg["step_reps"], **kw),
            into=out["step_time"],
            key=name,
        )
    out["wall_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("phase_s", "wall_s", "errors")}, indent=1))
    print("wrote", path)
    return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
