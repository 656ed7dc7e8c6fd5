"""The release metadata: one version, the CLI reports it, the changelog and API page keep up."""

import re
from pathlib import Path

import pytest

import pnjax
from pnjax import cli

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_single_sourced():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pnjax.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]|rc)?\d*", pnjax.__version__)


def test_changelog_names_the_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## {pnjax.__version__}" in text


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pnjax {pnjax.__version__}"


@pytest.mark.parametrize("command", ["kink", "toy2d"])
def test_cli_refuses_a_lambda_overflowing_float32(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--lam", "1e40"])
    assert exc.value.code == 2
    assert "--lam must fit in float32" in capsys.readouterr().err


def test_api_page_documents_every_public_name():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"```\{auto(?:function|class)\} pnjax\.(\w+)", api))
    missing = sorted(set(pnjax.__all__) - documented)
    assert not missing, f"add these to docs/api.md: {missing}"
