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
