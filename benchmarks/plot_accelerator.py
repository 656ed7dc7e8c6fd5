"""Figure of the accelerator runs: chain-steps per second against the number of chains.

Reads ``benchmarks/results/accelerator_gpu_chains.json`` (pnjax, ``benchmarks/accelerator.py``)
and ``benchmarks/results/accelerator_gpu_torch.json`` (``benchmarks/accelerator_torch.py``) and
writes ``benchmarks/results/accelerator_gpu.png``::

    python benchmarks/plot_accelerator.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pnjax", default=str(RESULTS / "accelerator_gpu_chains.json"))
    ap.add_argument("--torch", default=str(RESULTS / "accelerator_gpu_torch.json"))
    ap.add_argument("--out", default=str(RESULTS / "accelerator_gpu.png"))
    a = ap.parse_args()
    ours, ref = json.loads(Path(a.pnjax).read_text()), json.loads(Path(a.torch).read_text())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    series = [
        (ours["kink_chains"]["rows"], "pnjax run_chains, kink MLP", "o-"),
        (ref["kink_chains"]["rows"], "torch.func.vmap, kink MLP", "s--"),
        (ours["lenet5_chains"]["rows"], "pnjax run_chains, LeNet-5 (32 images/chain)", "^-"),
    ]
    for rows, label, style in series:
        pts = [(r["C"], r["chain_steps_per_s"]) for r in rows if r["chain_steps_per_s"]]
        ax.plot(*zip(*pts, strict=True), style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chains trained together (C)")
    ax.set_ylabel("chain-steps per second")
    ax.set_title(f"{ours['machine']['device_kind']}, {ours['date_utc']} UTC", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
