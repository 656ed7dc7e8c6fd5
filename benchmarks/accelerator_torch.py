"""The PyTorch reference for ``benchmarks/accelerator.py``: the same models and steps, on the
same device, in a process of its own.

Written as PyTorch users write them (``nn.Conv2d`` / ``nn.Linear`` modules, ``torch.optim.SGD``,
``torch.func.vmap`` for many small models) at PyTorch's best ordinary settings on a GPU
(``cudnn.benchmark = True`` and TF32 matrix products, ``torch.set_float32_matmul_precision
("high")``, which is what XLA uses for float32 on the GPU by default):

- ``step_time``: one SGD-momentum training step of LeNet-5 (``nn.Conv2d`` + ``max_pool2d``) and
  of the CIFAR ResNet-18 (``kuangliu/pytorch-cifar`` layout, BatchNorm in training mode), batch
  128 of 32 x 32 x 3, eager and under ``torch.compile`` (its compile time reported apart); the
  median of repeated steps, each ended by ``torch.cuda.synchronize``;
- ``kink_chains``: chain-steps per second of C kink MLPs (``nn.Linear`` 1-32-32-1, 60 points,
  SGD momentum 0.9, a plain run then a persistent run with the Eq. 4 penalty as a loss term)
  trained together with ``torch.func.vmap``, marginal time between S1 and S2 steps per run as in
  ``accelerator.py``.

Timing inputs are random pixels: no accuracy is read from them.

Run::

    python benchmarks/accelerator_torch.py                 # on the GPU, about 2 minutes
    python benchmarks/accelerator_torch.py --quick         # CPU smoke test

Writes ``benchmarks/results/accelerator_<device>_torch.json`` by default.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LAM, LR, MOM = 0.01, 1e-3, 0.9


class LeNet5(nn.Module):
    """conv5x5(6)-relu-pool-conv5x5(16)-relu-pool-fc120-relu-fc84-relu-fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR ResNet-18: 3x3 stem, four stages of two blocks, global pooling, fc10."""

    def __init__(self, stage_sizes: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        blocks, cin = [], 64
        for i, n in enumerate(stage_sizes):
            for j in range(n):
                cout = 64 * 2**i
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(
    name: str, batch: int, reps: int, device: torch.device, compiled: bool, small: bool
) -> dict[str, Any]:
    """Median ms of one SGD-momentum step (eager or ``torch.compile``)."""
    torch.manual_seed(0)
    side = 16 if small else 32
    model: nn.Module = (
        (ResNet18((1, 1, 1, 1)) if small else ResNet18()) if name == "resnet18" else LeNet5()
    )
    if name == "lenet5" and small:
        side = 32
    model = model.to(device).train()
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOM)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    fn = torch.compile(step) if compiled else step
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return {
        "model": f"{name} ({'torch.compile' if compiled else 'eager'})",
        "input": [batch, 3, side, side],
        "step_ms": statistics.median(ts) * 1e3,
        "first_call_s": first,
        "reps": reps,
    }


def kink_point(c: int, steps: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """C kink MLPs under ``torch.func.vmap``: plain run, then a persistent run (Eq. 4 term)."""
    from torch.func import functional_call, grad, stack_module_state, vmap

    sys.path.insert(0, str(ROOT))
    from pnjax.data import make_kink_data

    xn, yn = make_kink_data()
    x = torch.from_numpy(np.array(xn)).to(device)
    y = torch.from_numpy(np.array(yn)).to(device)
    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(
            nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1)
        )

    models = [make() for _ in range(c)]
    init, buffers = stack_module_state(models)
    init = {n: v.detach().to(device) for n, v in init.items()}
    base = copy.deepcopy(models[0]).to("meta")
    groups: dict[str, list[str]] = {}
    for n in init:
        groups.setdefault(n.rsplit(".", 1)[0], []).append(n)

    def mse(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.mean((functional_call(base, (p, buffers), (x,)) - y) ** 2)

    def pen_loss(p: dict[str, torch.Tensor], a: Any, sq: Any) -> torch.Tensor:
        pen = sum(sum((a[n] * p[n]).sum() for n in ns).abs() / sq[g] for g, ns in groups.items())
        return mse(p) + LAM * pen

    plain_grad, pen_grad = vmap(grad(mse)), vmap(grad(pen_loss))

    def train(anchor: Any, n_steps: int) -> dict[str, torch.Tensor]:
        p = {n: v.clone() for n, v in init.items()}
        opt = torch.optim.SGD(list(p.values()), lr=LR, momentum=MOM)
        if anchor is not None:
            sq = {
                g: sum((anchor[n] ** 2).flatten(1).sum(1) for n in ns) for g, ns in groups.items()
            }
        for _ in range(n_steps):
            g = plain_grad(p) if anchor is None else pen_grad(p, anchor, sq)
            for n, v in p.items():
                v.grad = g[n]
            opt.step()
        return {n: v.detach().clone() for n, v in p.items()}

    train(train(None, 3), 3)  # warm-up
    times = []
    for s in steps:
        _sync(device)
        t = time.perf_counter()
        train(train(None, s), s)
        _sync(device)
        times.append(time.perf_counter() - t)
    per = (times[1] - times[0]) / (2 * (steps[1] - steps[0]) * c)
    ok = per > 0
    return {
        "C": c,
        "us_per_chain_step": per * 1e6 if ok else None,
        "chain_steps_per_s": 1.0 / per if ok else None,
        "steps": list(steps),
        "call_s": times,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke test")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=150.0, help="time budget, seconds")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    t0 = time.perf_counter()
    batch, reps = (2, 2) if a.quick else (128, 30)
    chains = [1] if a.quick else [1, 64, 1024, 4096]
    steps = (3, 13) if a.quick else (20, 220)
    out: dict[str, Any] = {
        "command": "python benchmarks/accelerator_torch.py" + (" --quick" if a.quick else ""),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "quick": a.quick,
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "threads": torch.get_num_threads(),
        },
        "step_time": {},
        "kink_chains": {"rows": []},
        "errors": {},
    }
    path = Path(a.out or RESULTS / f"accelerator_{device.type}_torch.json")
    path.parent.mkdir(parents=True, exist_ok=True)

    def guarded(name: str, fn: Callable[[], Any]) -> Any:
        print(name, flush=True)
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - an unattended run records and goes on
            import traceback

            traceback.print_exc()
            out["errors"][name] = f"{type(e).__name__}: {e}"[:2000]
            return None
        finally:
            out["wall_s"] = time.perf_counter() - t0
            path.write_text(json.dumps(out, indent=1))

    for name in ("lenet5", "resnet18"):
        for compiled in (False, True):
            if compiled and (a.quick or time.perf_counter() - t0 > 0.6 * a.budget_s):
                continue  # torch.compile needs a C compiler on the CPU; skipped in --quick
            key = f"{name}{'_compile' if compiled else ''}"
            out["step_time"][key] = guarded(
                f"step_time_{key}",
                lambda n=name, c=compiled: step_time(n, batch, reps, device, c, a.quick),
            )
    for c in chains:
        if time.perf_counter() - t0 > a.budget_s:
            out["kink_chains"]["stop"] = f"time budget spent before C = {c}"
            break
        row = guarded(f"kink_chains C={c}", lambda c=c: kink_point(c, steps, device))
        if row is not None:
            out["kink_chains"]["rows"].append(row)
            print(f"  C={c}: {row['chain_steps_per_s']} chain-steps/s", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(out, indent=1))
    print("wrote", path, "in", round(out["wall_s"], 1), "s")
    return out


if __name__ == "__main__":
    main()
