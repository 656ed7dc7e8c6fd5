"""Where the time of 100 kink chains goes: an XLA op profile and the two cores' scaling.

The problem of ``benchmarks/chains_fair.py`` (the user's Flax ``nn.Dense`` 1-32-32-1 MLP, 60
points, SGD momentum 0.9, plain + one persistent run per chain), through ``pnjax.fast_dots`` and
without it. Each measurement is a fresh subprocess (``--worker``):

- ``profile_dense`` / ``profile_fast_dots``: 100 chains on one XLA device; the prepared
  ``run_chains`` program (``pnjax.chains.prepare_chains``) timed (fastest of three calls) and
  traced once with ``jax.profiler``; XLA's thunks are grouped by op kind (``dot`` and
  ``ynn_fusion``, the matrix products; the other fusions, ``copy``, ``wrapped_reduce-window``
  ...) with their share of the traced op time. From the products' share:
  ``peak_share_if_only_dots`` is the share of the matmul peak the step would reach if every op
  but the dots took no time (the products' own speed is the limit), ``peak_share_if_dots_free``
  the share if the products took no time (the small ops are the limit);
- ``scaling_<C>_<cores>``: per chain-step time of ``C`` chains through ``fast_dots`` on one
  core (the process pinned with ``sched_setaffinity``, XLA single-threaded) or, for ``mesh``,
  split over one XLA CPU device per core; ``(T(S2) - T(S1)) / (2 (S2 - S1) C)``, compile apart.
  ``mesh_efficiency`` = (step time of 50 chains on one core) / (step time of 100 chains over
  the 2-device mesh, 50 per core): 1.0 when the two cores run their halves as fast as one core
  runs one half alone;
- ``peak_1core`` / ``peak_2cores``: the best 2048 x 2048 float32 product (GFLOP/s).

Run (about 2 minutes on 2 quiet cores)::

    python benchmarks/chains_profile.py
    python benchmarks/chains_profile.py --quick --out /tmp/p.json   # smoke test, ~1 minute

Writes ``benchmarks/results/chains_profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
S1, S2 = (20, 120) if "--quick" in sys.argv else (100, 1100)
ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# op kinds that are matrix products: XLA dots and YNNPACK fusions (a dot with its epilogue)
PRODUCTS = ("dot", "ynn_fusion")
WORKERS = (
    "peak_2cores", "peak_1core", "profile_dense", "profile_fast_dots",
    "scaling_50_1core", "scaling_100_1core", "scaling_100_mesh",
)  # fmt: skip


def _setup(method: str) -> None:
    """Before JAX starts: device count and pinning."""
    flags = os.environ.get("XLA_FLAGS", "")
    if method.endswith("_1core"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        flags += " " + ONE_THREAD
    if method.endswith("_mesh"):
        flags += f" --xla_force_host_platform_device_count={len(os.sched_getaffinity(0))}"
    os.environ["XLA_FLAGS"] = flags.strip()


def _problem(chains: int, fast: bool):
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from chains_fair import LR, MOM, _flax_mlp, _kink_data

    import pnjax

    x, y = (jnp.asarray(a) for a in _kink_data())
    model = _flax_mlp()

    def loss_fn(params):
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    keys = jax.random.split(jax.random.key(0), chains)
    inits = jax.vmap(lambda k: model.init(k, x)["params"])(keys)
    flops = jax.jit(jax.value_and_grad(loss_fn)).lower(
        jax.tree_util.tree_map(lambda a: a[0], inits)
    ).compile().cost_analysis()
    flops = flops[0] if isinstance(flops, (list, tuple)) else flops
    params = sum(a[0].size for a in jax.tree_util.tree_leaves(inits))
    # one chain-step: loss and gradient, plus the penalty's two dots in half of the steps
    per_step = float(flops["flops"]) + 2 * params
    return (pnjax.fast_dots(loss_fn) if fast else loss_fn), inits, per_step, (LR, MOM)


def _prepared(chains: int, steps: int, fast: bool, mesh_devices: bool):
    import jax
    import numpy as np
    import optax

    from pnjax.chains import prepare_chains

    loss_fn, inits, per_step, (lr, mom) = _problem(chains, fast)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("chains",)) if mesh_devices else None
    opt = optax.sgd(lr, momentum=mom)
    prep = prepare_chains(inits, loss_fn, opt, iterations=1, lam=0.01, steps=steps, mesh=mesh)
    jax.block_until_ready(prep.compiled(*prep.args))  # compile + first run
    return prep, (opt, loss_fn), per_step


def _fastest(prep, reps: int = 3) -> float:
    import jax

    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(prep.compiled(*prep.args))
        best = min(best, time.perf_counter() - t)
    return best


def worker_peak() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (2048, 2048), jnp.float32)
    f = jax.jit(lambda m: m @ m)
    f(a).block_until_ready()
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    return {"gflops": best}


def worker_profile(fast: bool) -> dict[str, Any]:
    import jax

    prep, keep, per_step = _prepared(100, S2, fast, False)
    seconds = _fastest(prep)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _profile import xla_op_nanoseconds  # imports JAX: only after _setup

    ops = xla_op_nanoseconds(lambda: jax.block_until_ready(prep.compiled(*prep.args)))
    kinds: collections.Counter[str] = collections.Counter()
    for name, ns in ops.items():
        kinds[name.split(".")[0]] += ns
    total = sum(kinds.values())
    chain_steps = 2 * S2 * 100
    return {
        "seconds_per_call": seconds,
        "us_per_chain_step_whole_call": seconds / chain_steps * 1e6,
        "flops_per_chain_step": per_step,
        "gflops_whole_call": per_step * chain_steps / seconds / 1e9,
        "traced_op_seconds": total / 1e9,
        "kinds": {k: {"seconds": v / 1e9, "share": v / total} for k, v in kinds.most_common()},
        "top_ops": [{"op": k, "share": v / total} for k, v in ops.most_common(12)],
        "jax": jax.__version__,
        "optimizer": type(keep[0]).__name__,  # held until here: the program's functions live
    }


def worker_scaling(chains: int, mesh: bool) -> dict[str, Any]:
    import jax

    times = {}
    for steps in (S1, S2):
        prep, keep, per_step = _prepared(chains, steps, True, mesh)
        times[steps] = _fastest(prep)
        del keep
    per = (times[S2] - times[S1]) / (2 * (S2 - S1) * chains)
    return {
        "us_per_chain_step": per * 1e6,
        "gflops": per_step / per / 1e9,
        "call_s": times,
        "devices": jax.device_count(),
        "cores": len(os.sched_getaffinity(0)),
    }


def worker(method: str) -> dict[str, Any]:
    _setup(method)
    load0 = os.getloadavg()
    if method.startswith("peak"):
        out = worker_peak()
    elif method.startswith("profile"):
        out = worker_profile(method.endswith("fast_dots"))
    else:
        _, c, where = method.split("_")
        out = worker_scaling(int(c), where == "mesh")
    out["loadavg"] = [load0, os.getloadavg()]
    return out


def run_worker(method: str) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method]
    cmd += ["--quick"] if "--quick" in sys.argv else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    peak = r["peak_2cores"]["gflops"]
    out: dict[str, Any] = {"peak_gflops_2cores": peak, "peak_gflops_1core": r["peak_1core"]["gflops"]}
    for name in ("profile_dense", "profile_fast_dots"):
        p = r[name]
        kinds = p["kinds"]
        dot_share = sum(kinds.get(k, {}).get("share", 0.0) for k in PRODUCTS)
        gflops = p["gflops_whole_call"]
        out[name] = {
            "share_of_2core_peak": gflops / peak,
            "dot_share": dot_share,
            "non_dot_share": 1 - dot_share,
            "peak_share_if_only_dots": gflops / max(dot_share, 1e-9) / peak,
            "peak_share_if_dots_free": gflops / max(1 - dot_share, 1e-9) / peak,
        }
    one, half, mesh = (r[k]["us_per_chain_step"] for k in
                       ("scaling_100_1core", "scaling_50_1core", "scaling_100_mesh"))  # fmt: skip
    out["scaling"] = {
        "us_per_chain_step": {"100_1core": one, "50_1core": half, "100_mesh_2cores": mesh},
        "mesh_speedup_over_1core": one / mesh,
        # per-step time of 50 chains on one core over that of 100 chains on the 2-core mesh
        # (each core holding 50): 1.0 when the cores run their halves as fast as one core alone
        "mesh_efficiency": (50 * half) / (100 * mesh),
        "mesh_share_of_2core_peak": r["scaling_100_mesh"]["gflops"] / peak,
        "1core_share_of_1core_peak": r["scaling_100_1core"]["gflops"] / r["peak_1core"]["gflops"],
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help="run one measurement in this process and print its JSON")
    ap.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    ap.add_argument("--out", default=str(RESULTS / "chains_profile.json"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker)))
        return
    t0 = time.time()
    runs = {}
    for m in WORKERS:
        runs[m] = run_worker(m)
        print(m, json.dumps({k: v for k, v in runs[m].items() if k in
                             ("gflops", "us_per_chain_step", "us_per_chain_step_whole_call")}),
              flush=True)  # fmt: skip
    out = {
        "command": "python benchmarks/chains_profile.py" + (" --quick" if a.quick else ""),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(t0)),
        "wall_s": time.time() - t0,
        "cpu_count": os.cpu_count(),
        "steps": [S1, S2],
        "runs": runs,
        "summary": summarize(runs),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
