"""Neuron splitting (S2D, signed S3D): exact at ε = 0, second-order prediction, S two ways."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pnjax.baselines import (
    extreme_eigenpairs,
    hidden_widths,
    mlp_apply,
    split_neurons,
    splitting_matrices,
)
from pnjax.models import KinkMLP


class Net(nn.Module):
    """One hidden layer whose size is a ``width`` attribute."""

    width: int = 5
    act: str = "relu"

    @nn.compact
    def __call__(self, x):
        f = {"relu": jax.nn.relu, "tanh": jnp.tanh, "softplus": jax.nn.softplus}[self.act]
        return nn.Dense(2, name="Dense_1")(f(nn.Dense(self.width, name="Dense_0")(x)))


def mse(out, t):
    return jnp.mean((out - t) ** 2)


def _params64(widths, d=3, seed=0):
    """Float64 Dense-chain params with N(0, 1/fan_in) kernels and N(0, 0.1²) biases."""
    rng = np.random.default_rng(seed)
    out, prev = {}, d
    for i, w in enumerate(widths):
        out[f"Dense_{i}"] = {
            "kernel": jnp.asarray(rng.standard_normal((prev, w)) / np.sqrt(prev)),
            "bias": jnp.asarray(0.1 * rng.standard_normal(w)),
        }
        prev = w
    return out


def _data(dtype=jnp.float32, n=24, d=3, out=2):
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (n, d), dtype)
    y = jnp.sin(2 * x[:, :1]) * jnp.ones((1, out), dtype) + 0.1 * jax.random.normal(
        ky, (n, out), dtype
    )
    return x, y


@pytest.mark.parametrize("scheme", ["positive", "signed"])
def test_eps_zero_split_keeps_outputs_for_a_width_attribute_model(scheme):
    x, y = _data()
    model = Net(width=5)
    params = model.init(jax.random.key(0), x)["params"]
    S = splitting_matrices(params, x, y, mse)
    res = split_neurons(params, S, eps=0.0, scheme=scheme, fraction=0.4)
    (w,) = hidden_widths(res.params)
    assert w == 7
    grown = Net(width=w).apply({"params": res.params}, x)
    np.testing.assert_allclose(grown, model.apply({"params": params}, x), rtol=1e-5, atol=1e-6)


def test_eps_zero_split_two_hidden_layers_kinkmlp():
    x, y = _data(out=1)
    params = KinkMLP(features=(6, 5, 1)).init(jax.random.key(2), x)["params"]
    S = splitting_matrices(params, x, y, mse, batch_size=8)
    res = split_neurons(params, S, eps=0.0, scheme="signed", fraction=0.5)
    widths = hidden_widths(res.params)
    assert sum(widths) == 11 + 6 and all(len(v) for v in res.split.values())
    out = KinkMLP(features=widths + (1,)).apply({"params": res.params}, x)
    np.testing.assert_allclose(out, KinkMLP(features=(6, 5, 1)).apply({"params": params}, x),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_dummy_matrix_equals_direct_sum(act):
    f = {"tanh": jnp.tanh, "relu": jax.nn.relu}[act]
    with jax.enable_x64(True):
        x, y = _data(jnp.float64, out=1)
        params = _params64((4, 3, 1), seed=3)
        a = splitting_matrices(params, x, y, mse, activation=f, batch_size=12)
        b = splitting_matrices(params, x, y, mse, activation=f, batch_size=12, method="direct")
        for n in a:
            m, d = params[n]["kernel"].shape[1], params[n]["kernel"].shape[0]
            assert a[n].shape == (m, d + 1, d + 1)
            assert float(jnp.max(jnp.abs(a[n]))) > 1e-4  # not trivially zero
            np.testing.assert_allclose(a[n], b[n], rtol=1e-10, atol=1e-12)
        if act != "tanh":
            return
        # the first layer's sum written out in NumPy: g = ∂L/∂h from the last layers' chain
        # rule, σ''(z) = -2 tanh(z) (1 - tanh(z)²)
        xs, ys = np.asarray(x), np.asarray(y)
        K = {n: np.asarray(params[n]["kernel"]) for n in params}
        B = {n: np.asarray(params[n]["bias"]) for n in params}
        ref = np.zeros((4, 4, 4))
        for s in (0, 12):
            xb, yb = xs[s : s + 12], ys[s : s + 12]
            z1 = xb @ K["Dense_0"] + B["Dense_0"]
            h1 = np.tanh(z1)
            z2 = h1 @ K["Dense_1"] + B["Dense_1"]
            out = np.tanh(z2) @ K["Dense_2"] + B["Dense_2"]
            g_out = 2 * (out - yb) / yb.size
            g2 = (g_out @ K["Dense_2"].T) * (1 - np.tanh(z2) ** 2)
            g1 = g2 @ K["Dense_1"].T
            curv = -2 * h1 * (1 - h1**2)
            xt = np.concatenate([xb, np.ones((12, 1))], axis=1)
            ref += np.einsum("nj,ni,nk->jik", g1 * curv, xt, xt) / 2
        np.testing.assert_allclose(a["Dense_0"], ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("scheme", ["positive", "signed"])
def test_small_eps_loss_change_matches_second_order_prediction(scheme):
    with jax.enable_x64(True):
        x, y = _data(jnp.float64, out=1)
        params = _params64((5, 4, 1), seed=4)
        act = jnp.tanh
        S = splitting_matrices(params, x, y, mse, activation=act)
        base = float(mse(mlp_apply(params, x, act), y))
        eps = 1e-3
        res = split_neurons(params, S, eps=eps, scheme=scheme, fraction=0.5)
        if scheme == "signed":
            assert any(v.any() for v in res.signed.values())  # the signed copies were used
        measured = float(mse(mlp_apply(res.params, x, act), y)) - base
        assert res.predicted_change < 0
        np.testing.assert_allclose(measured, res.predicted_change, rtol=2e-3)


def test_signed_split_descends_where_positive_split_is_stable():
    """Every S positive semi-definite (splitting stable): S2D predicts no descent, S3D does."""
    with jax.enable_x64(True):
        x, y = _data(jnp.float64, out=1)
        params = _params64((4, 1), seed=5)
        B = jax.random.normal(jax.random.key(6), (4, 4, 2), jnp.float64)
        S = {"Dense_0": B @ jnp.swapaxes(B, 1, 2)}  # [4, 4, 4] PSD of rank 2
        pos = split_neurons(params, S, eps=1e-2, scheme="positive", count=2)
        sgn = split_neurons(params, S, eps=1e-2, scheme="signed", count=2)
        assert pos.predicted_change >= -1e-18
        assert sgn.predicted_change < 0 and sgn.signed["Dense_0"].all()
        lam_max = np.linalg.eigvalsh(np.asarray(S["Dense_0"]))[:, -1]
        r = (3.0 - 1) / (3.0 + 1)  # default c = 3
        best2 = np.sort(-r * lam_max)[:2]
        np.testing.assert_allclose(sgn.predicted_change, 1e-4 / 2 * best2.sum(), rtol=1e-10)


def test_bad_input_errors():
    x, y = _data()
    params = Net(width=3).init(jax.random.key(0), x)["params"]
    S = splitting_matrices(params, x, y, mse)
    with pytest.raises(ValueError, match="scheme"):
        split_neurons(params, S, scheme="both")
    with pytest.raises(ValueError, match="c > 1"):
        split_neurons(params, S, scheme="signed", c=1.0)
    with pytest.raises(ValueError, match="hidden layers"):
        split_neurons(params, {}, scheme="positive")
    with pytest.raises(ValueError, match="method"):
        splitting_matrices(params, x, y, mse, method="exact")
    with pytest.raises(ValueError, match="Dense chain"):
        splitting_matrices({"Dense_0": params["Dense_0"]}, x, y, mse)


def test_lobpcg_extremes_match_dense_eigh():
    """LOBPCG's (λ_min, v_min), (λ_max, v_max) against float64 eigh on distinct spectra."""
    rng = np.random.default_rng(0)
    m, d = 4, 40
    Q = np.linalg.qr(rng.standard_normal((m, d, d)))[0]
    lam = np.sort(rng.uniform(-1.0, 2.0, (m, d)), axis=1)
    lam[:, 0] -= 0.5  # separate the extremes from the rest
    lam[:, -1] += 0.5
    S = np.einsum("mij,mj,mkj->mik", Q, lam, Q).astype(np.float32)
    lo, v_lo, hi, v_hi = extreme_eigenpairs(S, method="lobpcg")
    dlo, dv_lo, dhi, dv_hi = extreme_eigenpairs(S, method="dense")
    np.testing.assert_allclose(lo, dlo, atol=1e-4)
    np.testing.assert_allclose(hi, dhi, atol=1e-4)
    np.testing.assert_allclose(np.abs(np.sum(v_lo * dv_lo, -1)), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.abs(np.sum(v_hi * dv_hi, -1)), 1.0, atol=1e-3)
    with pytest.raises(ValueError, match="larger than 5"):
        extreme_eigenpairs(S[:, :4, :4], method="lobpcg")
    with pytest.raises(ValueError, match="method"):
        extreme_eigenpairs(S, method="arpack")


def test_split_with_lobpcg_equals_dense_split_on_wide_input():
    """A 70-input layer: 'auto' takes LOBPCG, and picks the same neurons as the dense path."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((64, 70)), jnp.float32)
    y = jnp.sin(x[:, :2])
    params = Net(width=6).init(jax.random.key(0), x)["params"]
    S = splitting_matrices(params, x, y, mse)
    a = split_neurons(params, S, count=2, scheme="signed", eig_method="auto")
    b = split_neurons(params, S, count=2, scheme="signed", eig_method="dense")
    for n in a.scores:
        np.testing.assert_allclose(a.scores[n], b.scores[n], rtol=1e-3, atol=1e-6)
        np.testing.assert_array_equal(a.split[n], b.split[n])
    np.testing.assert_allclose(a.predicted_change, b.predicted_change, rtol=1e-3)
