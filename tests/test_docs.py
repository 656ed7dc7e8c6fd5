"""Runs every ```python block of the tutorials and of chains.md, in order, one namespace a page."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("tutorial_*.md")) + [DOCS / "chains.md"]
# blocks that need several hosts cannot run in CI
SKIP_MARKERS = ("jax.distributed.initialize",)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_tutorial_runs(page):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no python blocks"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        if any(m in code for m in SKIP_MARKERS):
            continue
        try:
            exec(compile(code, f"{page.name}[block {i}]", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the failure message is the point
            raise AssertionError(f"{page.name} block {i} failed: {e!r}\n{code}") from e
