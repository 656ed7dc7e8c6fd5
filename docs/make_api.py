"""Writes docs/api.md from the docstrings of pnjax's public API.

    python docs/make_api.py
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pnjax

SECTIONS = {
    "Core": ["layer_names", "AnchorBank", "persistent_penalty", "persistent_gradient",
             "persistent_bias", "PersistentBiasState", "add_persistent_penalty"],
    "Drivers": ["persistent_fit", "FitResult", "make_train_run", "run_chains", "ChainsResult",
                "random_restarts"],
    "Helpers": ["layer_layout", "layer_mask", "layer_sq_norms", "layer_dots", "fast_dots"],
    "Models (pnjax.models)": ["models.KinkMLP", "models.LeNet5", "models.AlexNet",
                              "models.ResNet18", "models.max_pool", "models.dense.matmul",
                              "models.dense.dot_general"],
}


def resolve(name: str) -> object:
    """``pnjax.<name>``, following dots (``models.dense.matmul``)."""
    import importlib

    obj: object = pnjax
    for part in name.split("."):
        if not hasattr(obj, part):
            obj = importlib.import_module(f"{obj.__name__}.{part}")  # type: ignore[attr-defined]
        else:
            obj = getattr(obj, part)
    return obj


def render(name: str) -> str:
    obj = resolve(name)
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        sig = ""
    else:
        # Flax modules: drop the framework's own parent/name fields
        kept = [p for n, p in signature.parameters.items() if n not in ("parent", "name")]
        sig = str(signature.replace(parameters=kept))
        sig = re.sub(r"<function ([\w.<>]+?) at 0x[0-9a-f]+>", r"\1", sig)
    doc = inspect.getdoc(obj) or ""
    out = [f"### `pnjax.{name}{sig}`\n", "```text", doc, "```\n"]
    if inspect.isclass(obj):
        for meth in ("create", "push", "get"):
            fn = obj.__dict__.get(meth)
            if fn is None:
                continue
            fn = fn.__func__ if isinstance(fn, classmethod) else fn
            out += [f"#### `{name}.{meth}{inspect.signature(fn)}`\n", "```text",
                    inspect.getdoc(fn) or "", "```\n"]
    return "\n".join(out)


def main() -> None:
    parts = ["# API reference\n",
             "Generated from the docstrings by `python docs/make_api.py`; the names on this page "
             "are the public contract (DESIGN.md section 3).\n"]
    for title, names in SECTIONS.items():
        parts.append(f"## {title}\n")
        parts += [render(n) for n in names]
    Path(__file__).with_name("api.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
