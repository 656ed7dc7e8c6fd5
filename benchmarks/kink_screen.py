"""Screens generated kink data sets: best-of-100 plain loss and stuck fraction at one budget.

For each candidate ``make_kink_data(**kwargs)`` it trains ``num`` plain He-initialized 1-32-32-1
ReLU networks (seeds ``0..num-1``, ``optax.sgd(1e-3, momentum=0.9)``, full batch, ``steps``
steps) all at once through ``pnjax.run_chains(..., iterations=0)`` (the shoot-out's own
screening, ``benchmarks/shootout.py``'s ``kink_screen``), and records the best loss, the stuck
fraction (``pnjax.data.is_stuck`` with ``radius = gap``), the median loss of the runs that
escaped and the two-piece affine loss. Used to pick the shoot-out's data sets.

Usage::

    nice python benchmarks/kink_screen.py --steps 15000 \
        --candidates '{}' '{"noise": 0.3}' '{"noise": 1.0}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's pnjax
from shootout import kink_screen, kink_setup  # noqa: E402

import pnjax  # noqa: E402
from pnjax.data import two_piece_affine_loss  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15000)
    ap.add_argument("--num", type=int, default=100)
    ap.add_argument("--candidates", nargs="+", default=["{}"],
                    help="make_kink_data keyword arguments, one JSON object each")
    ap.add_argument("--out", default=str(RESULTS / "kink_screen.json"))
    args = ap.parse_args()
    out = Path(args.out)
    runs = []
    t0 = time.time()
    for text in args.candidates:
        kw = json.loads(text)
        setup = kink_setup(kw)
        t = time.perf_counter()
        scr = kink_screen(setup, args.steps, args.num)
        wall = time.perf_counter() - t
        loss, stuck = np.asarray(scr["loss"], np.float64), np.asarray(scr["stuck"], bool)
        free = loss[~stuck]
        runs.append({
            "data_kwargs": kw,
            "two_piece_affine_loss": two_piece_affine_loss(setup["x"], setup["y"]),
            f"best_of_{args.num}": float(np.min(loss)),
            "best_seed": int(np.argmin(loss)),
            "stuck_fraction": float(np.mean(stuck)),
            "escaped_loss_median": float(np.median(free)) if free.size else None,
            "stuck_seeds": np.flatnonzero(stuck).tolist(),
            "final_loss": loss.tolist(),
            "wall_s": wall,
        })
        print(f"[{time.time() - t0:6.0f} s] {kw}: best {np.min(loss):.4f}, stuck "
              f"{np.mean(stuck):.2f}, escaped median "
              f"{np.median(free) if free.size else float('nan'):.4f} ({wall:.0f} s)", flush=True)
        out.write_text(json.dumps({
            "command": "python benchmarks/kink_screen.py --steps "
            f"{args.steps} --num {args.num} --candidates "
            + " ".join(f"'{c}'" for c in args.candidates),
            "steps": args.steps, "num": args.num, "runs": runs,
            "environment": {"pnjax": pnjax.__version__, "jax": jax.__version__,
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        }, indent=1))


if __name__ == "__main__":
    main()
