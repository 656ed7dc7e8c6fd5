"""The accelerator benchmark runs end to end (``--quick``, on the CPU) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_quick_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "acc.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/accelerator.py", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] is True
    assert res["errors"] == {}, res["errors"]
    assert {"backend", "device_kind", "jax", "loadavg"} <= set(res["machine"])
    for sweep in ("kink_chains", "lenet5_chains"):
        rows = res[sweep]["rows"]
        assert rows and rows[0]["C"] >= 1
        assert {"us_per_chain_step", "chain_steps_per_s", "compile_s", "call_s"} <= set(rows[0])
        assert all(t > 0 for r in rows for t in r["call_s"])
        assert res[sweep]["stop"]
    for model in ("lenet5", "lenet5_fast_pool", "resnet18"):
        assert res["step_time"][model]["step_ms"] > 0
    pen = res["penalty_overhead"]
    assert pen["K"] == 20 and pen["plain_step_ms"] > 0 and pen["penalized_step_ms"] > 0
    assert pen["overhead"] == pytest.approx(pen["penalized_step_ms"] / pen["plain_step_ms"] - 1)
    res = res["penalty_overhead_resnet18"]
    assert res["model"] == "resnet18" and res["penalized_step_ms"] > 0
    assert res["flat_max_rel_diff"] < 1e-3  # the comparison formulation computes the same bias


def test_images_table_reads_a_results_json_and_pairs_by_seed(tmp_path: Path) -> None:
    def run(seed, method, plain, champ):
        hist = [{"test_acc": plain}, {"test_acc": champ}]
        return {"seed": seed, "method": method, "champion_iteration": 1, "history": hist}

    res = {
        "config": {"model": "lenet5", "mode": "full", "protocol": "cpu", "init_std": 0.2,
                   "epochs": 8, "iterations": 9, "lam": 0.01, "pixels": "lossy JPEG",
                   "seeds": [0, 1]},  # fmt: skip
        "paper": {"plain": [70.74, 69.94], "persistent": [71.64, 71.78]},
        "runs": [run(0, "persistent", 0.50, 0.52), run(1, "persistent", 0.40, 0.41),
                 run(0, "restarts", 0.50, 0.50), run(1, "restarts", 0.40, 0.43)],  # fmt: skip
    }
    path = tmp_path / "r.json"
    path.write_text(json.dumps(res))
    proc = subprocess.run([sys.executable, "benchmarks/images_table.py", str(path)], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if "|" in line}
    assert "+1.50 ± 0.50" in rows["`persistent`"]  # gains 2 and 1 points
    assert "45.00 ± 5.00" in rows["`persistent`"]  # plain 50 and 40
    assert "+1.84 (test)" in rows["paper (one run; val / test)"]
    assert "+0.00 ± 2.00" in rows["vs `restarts`"]  # differences +2 and -2 points

    # persistent alone (the AlexNet row): no empty table of differences
    res["runs"] = res["runs"][:2]
    path.write_text(json.dumps(res))
    proc = subprocess.run([sys.executable, "benchmarks/images_table.py", str(path)], cwd=ROOT,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "+1.50 ± 0.50" in proc.stdout
    assert "control champion" not in proc.stdout
