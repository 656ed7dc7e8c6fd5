"""The Examples in the core docstrings run and print what they say."""

import doctest
import importlib

import pytest

MODULES = [
    "pnjax.layers",
    "pnjax.anchors",
    "pnjax.penalty",
    "pnjax.transform",
    "pnjax.fit",
    "pnjax.fast_dots",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
