"""Chain-steps per second of 100 kink chains: pnjax vs PyTorch, each in its own process.

The kink-sized problem written as a user writes it: a Flax ``nn.Dense`` 1-32-32-1 ReLU MLP
(default initializers), 60 points of ``pnjax.data.make_kink_data()``, mean squared error, SGD
with momentum 0.9 (lr 1e-3), and per chain one plain run plus one persistent run (the plain
run's solution as the one anchor, λ = 0.01, every layer, Eq. 4). A *chain-step* is one update
of one chain. The rules of ``benchmarks/README.md`` apply:

- every measurement is a fresh subprocess running one method (``--worker``), so no two
  frameworks ever share a process or its thread pools; the methods are run in turn, ``--rounds``
  times (alternated), and the median over rounds is reported;
- PyTorch runs with its default settings at 1 and at 2 threads, the best is quoted, written as
  its users write it: the penalty is a loss term under autograd, no host sync inside the loop;
- compile (and first-call) time is measured and reported separately: a pnjax method prepares
  ``run_chains`` with ``S1`` and with ``S2`` steps per run (``pnjax.chains.prepare_chains``, the
  public driver split into its compiled program and arguments), calls each program once
  (compile + run: ``first_call_s``), then times two more calls of it (fastest kept, wall and
  process CPU time); the per-step time is ``(T(S2) - T(S1)) / (2 (S2 - S1) C)``, so neither
  compilation nor the per-call set-up enters it (an earlier version subtracted the compile time
  JAX reports from whole ``run_chains`` calls, which left the CPU-time column negative);
- the matmul peak (best 2048 x 2048 float32 product of JAX and of PyTorch) is measured in the
  same run, also in subprocesses, alternated with the rest.

Methods (``C`` = 100 chains unless stated):

- ``pnjax_dense``: ``run_chains`` on the user's ``nn.Dense`` loss, one XLA device (the headline);
- ``pnjax_dense_fast_dots``: the same loss through ``pnjax.fast_dots`` (one line, same model);
- ``pnjax_dense_fast_dots_mesh``: the same, chains split over one XLA CPU device per core
  (``run_chains(..., mesh=...)``, ``XLA_FLAGS=--xla_force_host_platform_device_count=<cores>``);
- ``pnjax_kinkmlp_fast``: pnjax's own ``KinkMLP(fast_matmul=True)`` (hand-tuned layers,
  labelled as such), one device;
- ``torch_vmap_t{1,2}``: ``torch.func.stack_module_state`` + ``vmap(grad(loss))`` over the 100
  chains, SGD momentum via ``torch.optim.SGD`` on the stacked parameters (foreach kernels);
- ``torch_eager_t{1,2}``: ``torch.nn`` + ``torch.optim.SGD``, one chain (its per-chain-step time
  is the same for any number of chains run one after another).

Achieved GFLOP/s = (XLA's flop count of one chain's loss-and-gradient + 2 P for the penalty's
two dots over P parameters in half of the steps) x chain-steps/s.

Run::

    python benchmarks/chains_fair.py              # 3 rounds; one round took 26 min at load ~20
    python benchmarks/chains_fair.py --quick      # 1 round, short runs: a smoke test, ~1 min

Writes ``benchmarks/results/chains_fair.json`` and ``chains_fair.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAM, LR, MOM = 0.01, 1e-3, 0.9
CHAINS = 100

PNJAX_METHODS = (
    "pnjax_dense",
    "pnjax_dense_fast_dots",
    "pnjax_dense_fast_dots_mesh",
    "pnjax_kinkmlp_fast",
)
TORCH_METHODS = ("torch_vmap_t1", "torch_vmap_t2", "torch_eager_t1", "torch_eager_t2")
PEAK_METHODS = ("matmul_jax", "matmul_torch_t2")
LABELS = {
    "pnjax_dense": "pnjax run_chains, user nn.Dense model",
    "pnjax_dense_fast_dots": "pnjax run_chains, user nn.Dense model through fast_dots",
    "pnjax_dense_fast_dots_mesh": "pnjax run_chains, nn.Dense through fast_dots, mesh over the cores",
    "pnjax_kinkmlp_fast": "pnjax run_chains, pnjax's own KinkMLP(fast_matmul=True)",
    "torch_vmap_t1": "torch.func.vmap, 1 thread",
    "torch_vmap_t2": "torch.func.vmap, 2 threads",
    "torch_eager_t1": "PyTorch eager (one chain), 1 thread",
    "torch_eager_t2": "PyTorch eager (one chain), 2 threads",
}


# ----------------------------------------------------------------------------- workers


def _kink_data():
    sys.path.insert(0, str(ROOT))
    from pnjax.data import make_kink_data

    return make_kink_data()  # x, y: float32 [60, 1]


def _flax_mlp():
    import flax.linen as nn

    class MLP(nn.Module):
        """The user's model: plain nn.Dense layers."""

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Dense(32)(x))
            x = nn.relu(nn.Dense(32)(x))
            return nn.Dense(1)(x)

    return MLP()


def worker_pnjax(method: str, quick: bool) -> dict[str, Any]:
    if method.endswith("_mesh"):  # before JAX starts
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "")
            + f" --xla_force_host_platform_device_count={os.cpu_count() or 1}"
        ).strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    sys.path.insert(0, str(ROOT))
    import pnjax
    from pnjax.models import KinkMLP

    x, y = (jnp.asarray(a) for a in _kink_data())
    model = KinkMLP(fast_matmul=True) if method == "pnjax_kinkmlp_fast" else _flax_mlp()

    def loss_fn(params):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    if "fast_dots" in method:
        loss_fn = pnjax.fast_dots(loss_fn)
    keys = jax.random.split(jax.random.key(0), CHAINS)
    inits = jax.vmap(lambda k: model.init(k, x)["params"])(keys)
    mesh = None
    if method.endswith("_mesh"):
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("chains",))

    from pnjax.chains import prepare_chains

    def timed(steps: int) -> tuple[float, float, float]:
        """First call (compile + run) of the prepared program, then its fastest of two calls
        (wall, process CPU): compilation never enters the per-step figures."""
        t = time.perf_counter()
        prep = prepare_chains(
            inits,
            loss_fn,
            optax.sgd(LR, momentum=MOM),
            iterations=1,
            lam=LAM,
            steps=steps,
            mesh=mesh,
        )
        jax.block_until_ready(prep.finish(prep.compiled(*prep.args)).champion)
        first = time.perf_counter() - t
        best = (float("inf"), float("inf"))
        for _ in range(2):
            t, c = time.perf_counter(), time.process_time()
            jax.block_until_ready(prep.compiled(*prep.args))
            best = min(best, (time.perf_counter() - t, time.process_time() - c))
        return first, *best

    s1, s2 = (20, 220) if quick else (100, 1100)
    f1, t1, c1 = timed(s1)
    f2, t2, c2 = timed(s2)
    per_step = (t2 - t1) / (2 * (s2 - s1) * CHAINS)
    return {
        "us_per_chain_step": per_step * 1e6,
        "cpu_us_per_chain_step": (c2 - c1) / (2 * (s2 - s1) * CHAINS) * 1e6,
        "compile_s": f1 - t1,
        "first_call_s": [f1, f2],
        "steps": [s1, s2],
        "call_s": [t1, t2],
        "cpu_s": [c1, c2],
        "devices": jax.device_count() if mesh is not None else 1,
    }


def worker_torch(method: str, quick: bool) -> dict[str, Any]:
    import torch
    from torch import nn

    threads = int(method.rsplit("_t", 1)[1])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    xn, yn = _kink_data()
    x, y = torch.from_numpy(xn.copy()), torch.from_numpy(yn.copy())

    def make():
        return nn.Sequential(
            nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
        )

    def layers(names):  # parameter names grouped by layer: "0.weight", "0.bias" -> "0"
        out: dict[str, list[str]] = {}
        for n in names:
            out.setdefault(n.rsplit(".", 1)[0], []).append(n)
        return out

    if method.startswith("torch_eager"):
        model = make()
        init = {k: v.clone() for k, v in model.state_dict().items()}
        groups = layers(init)

        def train(anchor, steps):
            model.load_state_dict(init)
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)
            params = dict(model.named_parameters())
            if anchor is not None:
                sq = {g: sum((anchor[n] ** 2).sum() for n in ns) for g, ns in groups.items()}
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.mean((model(x) - y) ** 2)
                if anchor is not None:  # Eq. 4 as a loss term
                    loss = loss + LAM * sum(
                        sum((anchor[n] * params[n]).sum() for n in ns).abs() / sq[g]
                        for g, ns in groups.items()
                    )
                loss.backward()
                opt.step()
            return {n: p.detach().clone() for n, p in params.items()}

        chains, steps = 1, (50 if quick else 200)
    else:
        import copy

        from torch.func import functional_call, grad, stack_module_state, vmap

        models = [make() for _ in range(CHAINS)]
        init, buffers = stack_module_state(models)
        init = {n: v.detach() for n, v in init.items()}
        base = copy.deepcopy(models[0]).to("meta")
        groups = layers(init)

        def mse(p):
            return torch.mean((functional_call(base, (p, buffers), (x,)) - y) ** 2)

        def pen_loss(p, a, sq):  # one chain; Eq. 4 as a loss term
            pen = sum(
                sum((a[n] * p[n]).sum() for n in ns).abs() / sq[g] for g, ns in groups.items()
            )
            return mse(p) + LAM * pen

        plain_grad = vmap(grad(mse))
        pen_grad = vmap(grad(pen_loss))

        def train(anchor, steps):
            p = {n: v.clone() for n, v in init.items()}
            opt = torch.optim.SGD(list(p.values()), lr=LR, momentum=MOM)
            if anchor is not None:
                sq = {
                    g: sum((anchor[n] ** 2).flatten(1).sum(1) for n in ns)
                    for g, ns in groups.items()
                }
            for _ in range(steps):
                g = plain_grad(p) if anchor is None else pen_grad(p, anchor, sq)
                for n, v in p.items():
                    v.grad = g[n]
                opt.step()
            return {n: v.detach().clone() for n, v in p.items()}

        chains, steps = CHAINS, (10 if quick else 40)

    t = time.perf_counter()
    train(train(None, 5), 5)  # first-call warm-up
    warm = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    sol = train(None, steps)
    train(sol, steps)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    return {
        "us_per_chain_step": dt / (2 * steps * chains) * 1e6,
        "cpu_us_per_chain_step": dc / (2 * steps * chains) * 1e6,
        "warmup_s": warm,
        "steps": steps,
        "chains": chains,
        "threads": threads,
        "torch": torch.__version__,
    }


def worker_matmul(method: str, n: int = 2048, reps: int = 5) -> dict[str, Any]:
    if method == "matmul_jax":
        import jax
        import jax.numpy as jnp

        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        f = jax.jit(lambda m: m @ m)
        f(a).block_until_ready()
        best = 0.0
        for _ in range(reps):
            t = time.perf_counter()
            f(a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        # flop count of one chain's loss-and-gradient, from XLA, for the GFLOP/s column
        x, y = (jnp.asarray(v) for v in _kink_data())
        model = _flax_mlp()
        p0 = model.init(jax.random.key(0), x)["params"]

        def loss_fn(params):
            return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

        ca = jax.jit(jax.value_and_grad(loss_fn)).lower(p0).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        params = sum(v.size for v in jax.tree_util.tree_leaves(p0))
        return {
            "gflops": best,
            "xla_flops_loss_and_grad": float(ca["flops"]),
            "params": int(params),
            "jax": jax.__version__,
        }
    import torch

    torch.set_num_threads(int(method.rsplit("_t", 1)[1]))
    a = torch.randn(n, n)
    a @ a
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ a
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return {"gflops": best, "torch": torch.__version__}


def worker(method: str, quick: bool) -> dict[str, Any]:
    load0 = os.getloadavg()
    if method.startswith("pnjax"):
        out = worker_pnjax(method, quick)
    elif method.startswith("torch"):
        out = worker_torch(method, quick)
    else:
        out = worker_matmul(method, reps=2 if quick else 5)
    out["loadavg"] = [load0, os.getloadavg()]
    return out


# ----------------------------------------------------------------------------- parent


def run_worker(method: str, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    if quick:
        cmd.append("--quick")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    med = {
        m: statistics.median(r["us_per_chain_step"] for r in rs)
        for m, rs in runs.items()
        if not m.startswith("matmul")
    }
    peak = max(statistics.median(r["gflops"] for r in runs[m]) for m in PEAK_METHODS)
    info = runs["matmul_jax"][0]
    flops = info["xla_flops_loss_and_grad"] + 0.5 * 4 * info["params"]
    vmap_best = min(("torch_vmap_t1", "torch_vmap_t2"), key=lambda m: med[m])
    eager_best = min(("torch_eager_t1", "torch_eager_t2"), key=lambda m: med[m])
    rows = {}
    for m, us in med.items():
        gf = flops / us / 1e3  # flops per chain-step / (us) -> GFLOP/s
        rows[m] = {
            "label": LABELS[m],
            "us_per_chain_step": us,
            "chain_steps_per_s": 1e6 / us,
            "gflops": gf,
            "fraction_of_peak": gf / peak,
            "vs_torch_vmap": med[vmap_best] / us,
            "vs_torch_eager": med[eager_best] / us,
            "all_us": [r["us_per_chain_step"] for r in runs[m]],
            "cpu_us_per_chain_step": statistics.median(r["cpu_us_per_chain_step"] for r in runs[m]),
        }
        for k in ("compile_s", "warmup_s"):
            if k in runs[m][0]:
                rows[m][f"{k}_median"] = statistics.median(r[k] for r in runs[m])
    targets = {}
    for m in ("pnjax_dense", "pnjax_dense_fast_dots", "pnjax_dense_fast_dots_mesh"):
        r = rows[m]
        targets[m] = {
            "vs_torch_vmap": r["vs_torch_vmap"],
            "met_vs_torch_vmap(>=4)": r["vs_torch_vmap"] >= 4,
            "vs_torch_eager": r["vs_torch_eager"],
            "met_vs_torch_eager(>=80)": r["vs_torch_eager"] >= 80,
            "fraction_of_peak": r["fraction_of_peak"],
            "met_fraction_of_peak(>=0.4)": r["fraction_of_peak"] >= 0.4,
        }
    return {
        "rows": rows,
        "torch_vmap_best": vmap_best,
        "torch_eager_best": eager_best,
        "matmul_peak_gflops": peak,
        "matmul_gflops": {m: statistics.median(r["gflops"] for r in runs[m]) for m in PEAK_METHODS},
        "flops_per_chain_step": flops,
        "params": info["params"],
        "targets": targets,
    }


def plot(out: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = out["summary"]["rows"]
    order = sorted(rows, key=lambda m: rows[m]["us_per_chain_step"])
    loads = [r["loadavg"][0][0] for rs in out["runs"].values() for r in rs]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    colors = ["tab:blue" if m.startswith("pnjax") else "tab:orange" for m in order]
    for ax, key, name in zip(
        axes, ("us_per_chain_step", "cpu_us_per_chain_step"), ("wall", "process CPU"), strict=True
    ):
        vals = [rows[m][key] for m in order]
        ax.barh(range(len(order)), vals, color=colors)
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} µs per chain-step (lower is better; median over rounds)")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    axes[0].set_yticks(range(len(order)), [rows[m]["label"] for m in order], fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(
        f"100 kink chains (nn.Dense 1-32-32-1), plain + 1 persistent run, "
        f"{out['machine']['cpu_count']} CPU cores, load average {min(loads):.0f}-{max(loads):.0f}, "
        f"{out['date_utc']} UTC",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    a: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    rounds: int,
    t0: float,
    load0: tuple[float, float, float],
) -> None:
    """Writes the JSON and the PNG of the rounds done so far."""
    out = {
        "command": "python benchmarks/chains_fair.py" + (" --quick" if a.quick else ""),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
        "wall_s": time.time() - t0,
        "loadavg": {"start": load0, "end": os.getloadavg()},
        "niceness": os.nice(0),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "chains": CHAINS,
            "model": "flax nn.Dense 1-32-32-1 ReLU, default init",
            "data": "pnjax.data.make_kink_data(): 60 points",
            "optimizer": f"SGD lr {LR} momentum {MOM}",
            "per_chain": "plain run + 1 persistent run (1 anchor, every layer, lambda 0.01)",
            "rounds_done": rounds,
        },
        "runs": runs,
    }
    out["summary"] = summarize(runs)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    plot(out, Path(a.out).with_suffix(".png"))
    print("wrote", a.out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help="run one method in this process and print its JSON")
    ap.add_argument("--quick", action="store_true", help="short runs, one round (smoke test)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "chains_fair.json"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.quick)))
        return
    methods = PEAK_METHODS + PNJAX_METHODS + TORCH_METHODS
    rounds = 1 if a.quick else a.rounds
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    t0 = time.time()
    load0 = os.getloadavg()
    for r in range(rounds):
        order = methods if r % 2 == 0 else methods[::-1]
        for m in order:
            res = run_worker(m, a.quick)
            runs[m].append(res)
            shown = res.get("us_per_chain_step", res.get("gflops"))
            print(f"round {r} {m}: {shown:.2f} (load {res['loadavg'][0][0]:.2f})", flush=True)
        write(a, runs, r + 1, t0, load0)  # after every round: a cut-short run keeps its rounds
    print(json.dumps(json.loads(Path(a.out).read_text())["summary"]["targets"], indent=1))


if __name__ == "__main__":
    main()
