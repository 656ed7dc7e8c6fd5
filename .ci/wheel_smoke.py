"""Smoke test of an installed pnjax wheel; run it from outside the source tree.

    python .ci/wheel_smoke.py X.Y.Z     # fails unless pnjax X.Y.Z is imported from site-packages
"""

import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import optax

import pnjax

expected = sys.argv[1]
where = Path(pnjax.__file__).resolve()
assert "site-packages" in where.parts, f"pnjax imported from {where}, not from the wheel"
assert pnjax.__version__ == expected, (pnjax.__version__, expected)


def loss(p):
    return jnp.sum((p["w"] - 1.0) ** 2) * jnp.sum((p["w"] + 1.0) ** 2)


res = pnjax.persistent_fit({"w": jnp.array([0.3, 0.2])}, loss, optax.sgd(0.05), iterations=1,
                           lam=0.1, steps=200)
assert res.history["score"].shape == (2,) and int(res.bank.count) == 2, res.history
cli = Path(sys.executable).with_name("pnjax")
out = subprocess.run([str(cli), "--version"], capture_output=True, text=True, check=True).stdout
assert out.strip() == f"pnjax {expected}", out
print(f"wheel smoke test passed: {out.strip()} from {where.parent}")
