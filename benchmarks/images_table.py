"""Markdown tables of ``pnjax images`` results, beside the paper's numbers.

For each ``results.json`` given (one setting each, e.g. merged by ``pnjax images-merge``):

- per method, over seeds: plain and championship test accuracy and the gain (championship -
  plain, paired by seed), mean ± standard error, in percent;
- ``persistent`` against each control: the difference of championship test accuracy, paired
  by seed (positive: persistent ahead), mean ± standard error.

Run::

    python benchmarks/images_table.py benchmarks/results/images_lenet5_full_0.2.json ...

Prints markdown to stdout; reads nothing else and trains nothing.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _ms(a: np.ndarray) -> str:
    a = 100 * np.asarray(a, float)
    if len(a) < 2:
        return f"{a.mean():.2f}" if a.size else "-"
    return f"{a.mean():.2f} ± {a.std(ddof=1) / math.sqrt(len(a)):.2f}"


def _signed(a: np.ndarray) -> str:
    a = 100 * np.asarray(a, float)
    if len(a) < 2:
        return f"{a.mean():+.2f}" if a.size else "-"
    return f"{a.mean():+.2f} ± {a.std(ddof=1) / math.sqrt(len(a)):.2f}"


def table(results: dict[str, Any]) -> str:
    """The markdown of one setting."""
    cfg = results["config"]
    runs = results["runs"]
    by = {(r["seed"], r["method"]): r for r in runs if r["champion_iteration"] >= 0}
    methods = list(dict.fromkeys(r["method"] for r in runs))
    init = cfg.get("init_std")
    head = (
        f"**{cfg['model']} {cfg['mode']}"
        + (f", init N(0, {init}²)" if init else ", PyTorch default init")
        + f"**, protocol `{cfg['protocol']}` ({cfg['epochs']} epochs x {cfg['iterations'] + 1} "
        f"runs, λ = {cfg['lam']}), {cfg['pixels']} pixels, seeds {cfg['seeds']}"
    )
    lines = [head, "", "| method | seeds | plain test % | champion test % | gain (points) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for m in methods:
        seeds = sorted(s for (s, mm) in by if mm == m)
        plain = [by[s, m]["history"][0]["test_acc"] for s in seeds]
        champ = [by[s, m]["history"][by[s, m]["champion_iteration"]]["test_acc"] for s in seeds]
        lines.append(
            f"| `{m}` | {len(seeds)} | {_ms(plain)} | {_ms(champ)} | "
            f"{_signed(np.subtract(champ, plain))} |"
        )
    paper = results.get("paper") or {}
    if paper:
        pv = paper.get("plain", (None, None))
        pp = paper.get("persistent", (None, None))
        lines.append(f"| paper (one run; val / test) | 1 | {pv[0]:.2f} / {pv[1]:.2f} | "
                     f"{pp[0]:.2f} / {pp[1]:.2f} | "
                     f"{pp[1] - pv[1]:+.2f} (test) |")  # fmt: skip
    if "persistent" in methods and len(methods) > 1:
        lines += ["", "| persistent champion − control champion (test, points, paired by seed) "
                  "| seeds | difference |", "|---|---|---|"]  # fmt: skip
        for m in methods:
            if m == "persistent":
                continue
            seeds = sorted(s for (s, mm) in by if mm == m and (s, "persistent") in by)

            def champ(s: int, mm: str) -> float:
                r = by[s, mm]
                return r["history"][r["champion_iteration"]]["test_acc"]

            diff = [champ(s, "persistent") - champ(s, m) for s in seeds]
            lines.append(f"| vs `{m}` | {len(seeds)} | {_signed(diff)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+", type=Path, help="results.json files")
    a = ap.parse_args()
    print("\n\n".join(table(json.loads(p.read_text())) for p in a.results))


if __name__ == "__main__":
    main()
