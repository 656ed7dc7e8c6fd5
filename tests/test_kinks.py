"""First-layer ReLU kink locations against the data, with hand-set params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pnjax.diagnostics import kink_report, relu_kinks
from pnjax.models import KinkMLP

X = jnp.concatenate([jnp.linspace(-3, -1, 10), jnp.linspace(1, 3, 10)])[:, None]


def hand_params():
    params = KinkMLP(features=(6, 4, 1)).init(jax.random.key(0), X)["params"]
    w = jnp.array([[2.0, -1.0, 1.0, 0.5, 0.0, -4.0]])
    b = jnp.array([-4.0, 0.5, 0.0, 5.0, 1.0, 4.0])
    # kinks: 2 (in data), 0.5 (gap), 0 (gap), -10 (outside), none, 1 (on a data point: in data)
    return {**params, "Dense_0": {"kernel": w, "bias": b}}


def test_locations():
    loc = np.asarray(relu_kinks(hand_params()))
    np.testing.assert_allclose(loc[[0, 1, 2, 3, 5]], [2.0, 0.5, 0.0, -10.0, 1.0])
    assert np.isnan(loc[4])


def test_report_counts():
    r = kink_report(hand_params(), X)
    np.testing.assert_allclose(r["gap"], [-1.0, 1.0])
    assert r["in_data"].tolist() == [True, False, False, False, False, True]
    assert r["in_gap"].tolist() == [False, True, True, False, False, False]
    assert int(r["num_outside"]) == 2 and int(r["num_in_data"]) == 2  # outside: -10, no kink
    # unit 5: relu(-4x + 4) is zero for every x >= 1 but not for x <= -1; unit 4 is relu(1) > 0
    assert r["dead"].tolist() == [False] * 6
    dead = hand_params()
    dead["Dense_0"]["bias"] = dead["Dense_0"]["bias"].at[4].set(-1.0)  # relu(0·x - 1) = 0
    assert kink_report(dead, X)["dead"].tolist() == [False, False, False, False, True, False]


def test_he_init_puts_every_kink_at_zero():
    params = KinkMLP().init(jax.random.key(3), X)["params"]
    r = kink_report(params, X)
    assert int(r["num_in_gap"]) == 32 and int(r["num_in_data"]) == 0


def test_needs_scalar_input():
    params = KinkMLP().init(jax.random.key(0), jnp.ones((2, 3)))["params"]
    with pytest.raises(ValueError, match="1-D input"):
        relu_kinks(params)
    with pytest.raises(ValueError, match="unknown layer"):
        relu_kinks(params, layer="Dense_9")
