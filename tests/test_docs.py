"""Runs every ```python block of the tutorials, chains.md, own_loop.md, diagnostics.md and
baselines.md, in order, one namespace a page."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("tutorial_*.md")) + [
    DOCS / "chains.md", DOCS / "own_loop.md", DOCS / "diagnostics.md", DOCS / "baselines.md"
]
# blocks that need several hosts cannot run in CI
SKIP_MARKERS = ("jax.distributed.initialize",)
# blocks that must set XLA_FLAGS before JAX starts: run as scripts in a fresh process
SCRIPT_MARKER = "xla_force_host_platform_device_count"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_tutorial_runs(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no python blocks"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        if any(m in code for m in SKIP_MARKERS) or SCRIPT_MARKER in code:
            continue
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{page.name} block {i} failed: {e!r}\n{code}") from e


def _script_blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in PAGES:
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
        out += [(page.name, i, b) for i, b in enumerate(blocks) if SCRIPT_MARKER in b]
    return out


@pytest.mark.parametrize(
    "name,index,code", _script_blocks(), ids=[f"{n}[{i}]" for n, i, _ in _script_blocks()]
)
def test_script_block_runs_in_a_fresh_process(name, index, code):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, f"{name} block {index} failed:\n{proc.stderr[-3000:]}"
    devices = int(proc.stdout.split()[0])
    assert devices == (os.cpu_count() or 1), proc.stdout
