"""Times the extreme eigenpairs of first-layer splitting matrices: dense eigh against LOBPCG.

``m`` symmetric ``d x d`` matrices shaped like a Fashion-MNIST first layer's splitting
matrices (``d = 785``; a random ``X Xᵀ / k - I/2`` with a spectrum of both signs), three ways:
``jax.vmap(jnp.linalg.eigh)`` in float32 under ``jit``, NumPy float64 ``eigh`` (all
eigenpairs), and ``pnjax.baselines.extreme_eigenpairs(method='lobpcg')`` (the two extreme
eigenpairs). Each timed call follows a warm-up call; eigenvalues are compared with the float64
ones. Writes ``benchmarks/results/split_eig_time.json``.

Usage::

    nice python benchmarks/split_eig_time.py --neurons 32 --dim 785
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pnjax
import pnjax  # noqa: E402
from pnjax.baselines import extreme_eigenpairs  # noqa: E402


def _time(fn):
    jax.block_until_ready(fn())
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=32)
    ap.add_argument("--dim", type=int, default=785)
    ap.add_argument("--rank", type=int, default=600)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results/split_eig_time.json"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    X = rng.standard_normal((a.neurons, a.dim, a.rank))
    S = np.einsum("nij,nkj->nik", X, X) / a.rank - 0.5 * np.eye(a.dim)
    S32 = jnp.asarray(S, jnp.float32)
    f = jax.jit(jax.vmap(jnp.linalg.eigh))
    (w32, _), t_jax = _time(lambda: f(S32))
    (w64, _), t_np = _time(lambda: np.linalg.eigh(S))
    (lo, _, hi, _), t_lob = _time(lambda: extreme_eigenpairs(S32, method="lobpcg"))
    res = {
        "command": f"python benchmarks/split_eig_time.py --neurons {a.neurons} --dim {a.dim} "
        f"--rank {a.rank}",
        "neurons": a.neurons, "dim": a.dim,
        "jax_eigh_f32_vmap_jit_s": t_jax, "numpy_eigh_f64_s": t_np, "lobpcg_extremes_s": t_lob,
        "lobpcg_max_abs_err_min": float(np.max(np.abs(lo - w64[:, 0]))),
        "lobpcg_max_abs_err_max": float(np.max(np.abs(hi - w64[:, -1]))),
        "jax_eigh_f32_max_abs_err_min": float(np.max(np.abs(np.asarray(w32)[:, 0] - w64[:, 0]))),
        "environment": {"pnjax": pnjax.__version__, "jax": jax.__version__,
                        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                        "load_average": list(np.round(np.array(__import__("os").getloadavg()),
                                                      1))},
    }
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
