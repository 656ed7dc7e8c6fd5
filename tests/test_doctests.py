"""The Examples in every docstring of every pnjax module run and print what they say."""

import doctest
import importlib
import pkgutil

import pytest

import pnjax

# every module of the package, found by walking it: a new module is tested without listing it
MODULES = sorted(
    m.name for m in pkgutil.walk_packages(pnjax.__path__, prefix="pnjax.") if "__main__" not in m.name
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def test_the_modules_with_examples_are_found():
    assert {"pnjax.chains", "pnjax.baselines.restarts", "pnjax.transform"} <= set(MODULES)
