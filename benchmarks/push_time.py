"""Time of the first (compiling) and a later eager ``AnchorBank.push`` in a fresh process.

    python benchmarks/push_time.py            # writes benchmarks/results/push_time.json

Each repetition runs in its own Python process (a fresh JAX has no compiled programs), on the
kink MLP's params (1-32-32-1, 3 layers) and a bank of capacity 20. Wall and CPU time are
reported; on a shared machine the CPU time is the steadier of the two.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, time, jax, jax.numpy as jnp, pnjax, pnjax.models
params = pnjax.models.KinkMLP().init(jax.random.key(0), jnp.ones((1, 1)))["params"]
bank = jax.block_until_ready(pnjax.AnchorBank.create(params, capacity=20))
out = {}
for name in ("first", "second"):
    w, c = time.perf_counter(), time.process_time()
    bank = jax.block_until_ready(bank.push(params))
    out[name] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}
print(json.dumps(out))
"""


def main(reps: int = 5) -> None:
    runs = []
    for _ in range(reps):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True
        )
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import jax

    import pnjax

    summary = {
        f"{name}_{kind}_median": statistics.median(r[name][kind] for r in runs)
        for name in ("first", "second")
        for kind in ("wall_s", "cpu_s")
    }
    result = {"pnjax": pnjax.__version__, "jax": jax.__version__, "reps": reps, **summary,
              "runs": runs}
    out = Path(__file__).parent / "results" / "push_time.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
