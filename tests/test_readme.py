"""The "Use it" example of README.md runs as written and does what its comments say."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_use_it_block_runs():
    text = README.read_text()
    section = text[text.index("## Use it") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Use it section holds one python block"
    ns: dict = {}
    exec(compile(blocks[0], "README.md[Use it]", "exec"), ns)
    res, pnjax = ns["res"], ns["pnjax"]
    assert res.history["score"].shape == (4,)
    assert 0 <= res.champion_iteration <= 3
    assert int(ns["bank"].count) == 1
    assert pnjax.layer_names(ns["params"]) == ("layers_0", "layers_2")
    assert float(ns["pen"]) > 0
