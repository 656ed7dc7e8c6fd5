"""Stochastic Lanczos quadrature against Hessians whose spectrum is known."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pnjax.diagnostics import hessian_spectrum, hessian_vector_product

# 100 eigenvalues: a bulk of 80 in [-0.1, 0.1], 15 in [4.9, 5.1], outliers 20, 30, 40, 50, 60
EIGS = np.concatenate(
    [np.linspace(-0.1, 0.1, 80), np.linspace(4.9, 5.1, 15), [20.0, 30.0, 40.0, 50.0, 60.0]]
)


def quadratic(eigs, seed=0):
    """``L(θ) = ½ θᵀ Q diag(eigs) Qᵀ θ`` over a two-leaf pytree; Hessian spectrum ``eigs``."""
    n = len(eigs)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    h = jnp.asarray((q * eigs) @ q.T, jnp.float32)

    def loss(p):
        theta = jnp.concatenate([p["a"]["kernel"].ravel(), p["b"]])
        return 0.5 * theta @ h @ theta

    params = {"a": {"kernel": jnp.ones((2, 6))}, "b": jnp.full((n - 12,), 0.3)}
    return loss, params, h


@pytest.fixture(scope="module")
def spectrum():
    loss, params, _ = quadratic(EIGS)
    return hessian_spectrum(loss, params, key=jax.random.key(0), num_probes=24, order=40)


def test_shapes_and_total_weight(spectrum):
    assert spectrum.nodes.shape == spectrum.weights.shape == (24, 40)
    np.testing.assert_allclose(spectrum.weights.sum(axis=1), 1.0, atol=1e-5)
    grid = jnp.linspace(-5, 70, 3001)
    dens = spectrum.density(grid, 0.2)
    assert abs(float(jnp.sum(dens) * (grid[1] - grid[0])) - 1.0) < 1e-3


def test_extreme_ritz_values(spectrum):
    assert abs(float(spectrum.max) - 60.0) < 1e-3
    assert abs(float(spectrum.min) + 0.1) < 2e-2
    # Ritz values interlace: never outside the true spectrum
    assert float(spectrum.min) >= -0.1 - 1e-4 and float(spectrum.max) <= 60.0 + 1e-3


def test_density_peaks_positions_and_masses(spectrum):
    grid = jnp.linspace(-2, 8, 2001)
    dens = np.asarray(spectrum.density(grid, 0.15))
    g = np.asarray(grid)
    peaks = [g[i] for i in range(1, len(g) - 1) if dens[i] > dens[i - 1] and dens[i] >= dens[i + 1]]
    peaks = [p for p in peaks if dens[np.searchsorted(g, p)] > 0.1]
    assert len(peaks) == 2 and abs(peaks[0]) < 0.05 and abs(peaks[1] - 5.0) < 0.05
    dx = g[1] - g[0]
    bulk = dens[(g > -1) & (g < 1)].sum() * dx
    middle = dens[(g > 4) & (g < 6)].sum() * dx
    assert abs(bulk - 0.80) < 0.05 and abs(middle - 0.15) < 0.04
    # each outlier carries ~1/100 of the mass
    nodes, w = np.asarray(spectrum.nodes), np.asarray(spectrum.weights)
    for lam in (20.0, 40.0, 60.0):
        mass = w[np.abs(nodes - lam) < 0.5].sum() / nodes.shape[0]
        assert 0.002 < mass < 0.03, (lam, mass)


def test_second_point_reuses_the_compilation():
    base, params, _ = quadratic(EIGS)
    traces = []

    def loss(p):
        traces.append(1)  # runs once per trace
        return base(p)

    a = hessian_spectrum(loss, params, key=jax.random.key(0), num_probes=2, order=10)
    n = len(traces)
    moved = jax.tree_util.tree_map(lambda x: 2 * x, params)
    b = hessian_spectrum(loss, moved, key=jax.random.key(0), num_probes=2, order=10)
    assert len(traces) == n and n > 0
    np.testing.assert_allclose(a.nodes, b.nodes, rtol=1e-4, atol=1e-4)  # a quadratic: same H


def test_exhausted_krylov_space_is_cut_off():
    # 3 distinct eigenvalues in 30 dimensions: Lanczos exhausts after 3 steps
    eigs = np.repeat([1.0, 2.0, 7.0], 10)
    loss, params, _ = quadratic(eigs, seed=1)
    spec = hessian_spectrum(loss, params, key=jax.random.key(1), num_probes=3, order=12)
    assert np.all(np.isfinite(spec.nodes))
    assert float(spec.min) >= 1.0 - 1e-4 and float(spec.max) <= 7.0 + 1e-4
    np.testing.assert_allclose(spec.weights.sum(axis=1), 1.0, atol=1e-5)


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(jnp.tanh(nn.Dense(5)(x)))


def test_matches_dense_hessian_of_a_network():
    x = jax.random.normal(jax.random.key(2), (16, 3))
    y = jnp.sin(x[:, :1])
    params = Tiny().init(jax.random.key(3), x)["params"]

    def loss(p):
        return jnp.mean((Tiny().apply({"params": p}, x) - y) ** 2)

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    dense = jax.hessian(lambda f: loss(unravel(f)))(flat)  # the test's reference only
    eigs = np.linalg.eigvalsh(np.asarray(dense, np.float64))
    v = jax.random.normal(jax.random.key(4), flat.shape)
    hv = jax.flatten_util.ravel_pytree(hessian_vector_product(loss, params, unravel(v)))[0]
    np.testing.assert_allclose(hv, dense @ v, rtol=1e-4, atol=1e-5)
    spec = hessian_spectrum(loss, params, key=jax.random.key(5), num_probes=2, order=flat.size)
    np.testing.assert_allclose([spec.min, spec.max], [eigs[0], eigs[-1]], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"order": 0}, "order"), ({"num_probes": 0}, "num_probes"), ({"order": 101}, "order=101")],
)
def test_bad_arguments(kwargs, match):
    loss, params, _ = quadratic(EIGS)
    with pytest.raises(ValueError, match=match):
        hessian_spectrum(loss, params, key=jax.random.key(0), **kwargs)


def test_bad_sigma(spectrum):
    with pytest.raises(ValueError, match="sigma"):
        spectrum.density(jnp.zeros(3), 0.0)
