"""Peak memory of the CLI's experiments against --steps and --reinit: the figures behind
``pnjax.cli.estimate_memory`` (see docs/long_runs.md).

    python benchmarks/cli_memory.py            # about 10 minutes on 2 CPU cores

Each configuration runs in a fresh process and reports its peak resident size
(``resource.getrusage``); results go to benchmarks/results/cli_memory.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, resource, sys
what, n = sys.argv[1], int(sys.argv[2])
if what == "toy2d_steps":
    from pnjax.experiments.toy2d import run_toy2d
    run_toy2d(iterations=1, steps=n)
else:
    from pnjax.experiments.kink import run_kink
    run_kink(num_reinit=n, num_stuck=0, iterations=0, steps=10, controls=False)
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
"""

CASES = [("toy2d_steps", 4_000_000), ("toy2d_steps", 8_000_000),
         ("kink_reinit", 25), ("kink_reinit", 2_000)]  # fmt: skip


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    rows = []
    for what, n in CASES:
        out = subprocess.run([sys.executable, "-c", CHILD, what, str(n)], capture_output=True,
                             text=True, check=True, cwd=root)  # fmt: skip
        rows.append({"case": what, "n": n, "peak_bytes": int(out.stdout.split()[-1])})
        print(rows[-1], flush=True)
    slopes = {}
    for what in ("toy2d_steps", "kink_reinit"):
        (a, b) = [r for r in rows if r["case"] == what]
        slopes[what] = (b["peak_bytes"] - a["peak_bytes"]) / (b["n"] - a["n"])
    print("bytes per unit:", slopes)
    path = root / "benchmarks" / "results" / "cli_memory.json"
    path.write_text(json.dumps({"rows": rows, "bytes_per_unit": slopes}, indent=2))


if __name__ == "__main__":
    main()
