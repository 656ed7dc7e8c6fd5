"""Activation statistics captured from unmodified Linen models, against hand-computed answers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pnjax.diagnostics import (
    activation_histograms,
    activation_percentiles,
    capture_activations,
    histogram_edges,
    saturation_stats,
)


class TanhMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Dense(4)(x))
        x = jnp.tanh(nn.Dense(4)(x))
        return nn.Dense(2, name="head")(x)


def identity_params(scale1=1.0, scale2=3.0):
    eye = jnp.eye(4)
    return {
        "Dense_0": {"kernel": scale1 * eye, "bias": jnp.zeros(4)},
        "Dense_1": {"kernel": scale2 * eye, "bias": jnp.zeros(4)},
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }


X = jnp.linspace(-2.0, 2.0, 400).reshape(100, 4)


def test_capture_names_and_values():
    acts = capture_activations(TanhMLP(), {"params": identity_params()}, X)
    assert list(acts) == ["Dense_0", "Dense_1", "head"]  # not the model's own output
    np.testing.assert_allclose(acts["Dense_0"], X, atol=1e-6)  # Dense outputs: pre-activations
    np.testing.assert_allclose(acts["Dense_1"], 3 * np.tanh(np.asarray(X)), rtol=1e-5, atol=1e-6)
    tanh = capture_activations(
        TanhMLP(), {"params": identity_params()}, X, layers=("Dense_1",), activation=jnp.tanh
    )
    assert list(tanh) == ["Dense_1"]
    np.testing.assert_allclose(tanh["Dense_1"], np.tanh(3 * np.tanh(np.asarray(X))), atol=1e-6)


def test_unknown_layer_is_named():
    with pytest.raises(ValueError, match="Dense_7.*captured"):
        capture_activations(TanhMLP(), {"params": identity_params()}, X, layers=("Dense_7",))


def test_percentile_matches_numpy():
    acts = {"a": jnp.asarray(np.random.default_rng(0).normal(size=(50, 8)), jnp.float32)}
    p = activation_percentiles(acts, 98.0)
    np.testing.assert_allclose(p["a"], np.percentile(np.abs(np.asarray(acts["a"])), 98), rtol=1e-6)


def test_histogram_known_counts_and_clipping():
    a = jnp.array([-5.0, -0.9, -0.1, 0.1, 0.2, 0.6, 0.99, 3.0])
    h = activation_histograms({"a": a}, bins=4, value_range=(-1.0, 1.0))["a"]
    # bins [-1,-.5) [-.5,0) [0,.5) [.5,1]; -5 and 3 are counted in the edge bins
    np.testing.assert_allclose(h, [2 / 8, 1 / 8, 2 / 8, 3 / 8])
    assert histogram_edges(4).tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="value_range"):
        activation_histograms({"a": a}, value_range=(1.0, 1.0))


def test_saturation_grows_with_weight_scale_under_jit():
    """Scaling a tanh layer's input pushes its 98th percentile toward 1 (saturation)."""

    @jax.jit
    def stats(params):
        return saturation_stats(
            TanhMLP(), {"params": params}, X, layers=("Dense_0", "Dense_1"), activation=jnp.tanh
        )

    low, high = stats(identity_params(0.1, 0.1)), stats(identity_params(1.0, 30.0))
    x98 = np.percentile(np.abs(np.asarray(X)), 98)
    np.testing.assert_allclose(low["percentile"]["Dense_0"], np.tanh(0.1 * x98), rtol=1e-5)
    assert float(high["percentile"]["Dense_1"]) > 0.999
    assert float(low["percentile"]["Dense_1"]) < 0.02
    for s in (low, high):
        for h in s["histogram"].values():
            assert h.shape == (50,) and abs(float(h.sum()) - 1.0) < 1e-6
    # saturated: almost all mass in the two edge bins
    h = high["histogram"]["Dense_1"]
    assert float(h[0] + h[-1]) > 0.9
