"""Reliability: partial divergence, determinism, and fuzzing of the penalty and the transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import numpy_gradient, numpy_penalty
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pnjax


def _two_layer_problem():
    params = {"a": {"w": jnp.array([0.5, -0.2])}, "b": {"w": jnp.array([0.3, 0.4])}}

    def loss(p):
        fit = jnp.sum((p["a"]["w"] - 1.0) ** 2) + jnp.sum((p["b"]["w"] + 1.0) ** 2)
        # the loss (and its gradient) is NaN once layer a leaves the disc of radius 5
        return fit + 0.0 * jnp.log(25.0 - jnp.sum(p["a"]["w"] ** 2))

    return params, loss


def test_only_some_iterations_diverge_and_the_run_goes_on():
    params, loss = _two_layer_problem()
    res = pnjax.persistent_fit(
        params,
        loss,
        optax.sgd(0.05),
        iterations=9,
        lam=1e3,  # large enough to throw the penalized layer far away
        steps=200,
        layers="random",
        layer_draw="per_iteration",
        key=jax.random.key(1),
    )
    h = res.history
    layer_a = h["layer"] == 0
    assert layer_a[1:].any() and (~layer_a[1:]).any(), "the key must draw both layers"
    # the plain run converges; a persistent run diverges exactly when it penalizes layer a
    expected = layer_a.copy()
    expected[0] = False
    np.testing.assert_array_equal(h["diverged"], expected)
    assert res.diverged_iterations == tuple(np.flatnonzero(expected).tolist())
    np.testing.assert_array_equal(h["pushed"], ~expected)
    assert int(res.bank.count) == int((~expected).sum())
    assert res.champion_iteration >= 0 and not h["diverged"][res.champion_iteration]
    assert np.isfinite(h["score"][~expected]).all()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(res.champion))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(res.bank))
    s = res.summary
    assert f"{len(res.diverged_iterations)} diverged" in s and "not pushed" in s
    assert f"champion iteration {res.champion_iteration}" in s


def test_push_diverged_is_reported():
    params, loss = _two_layer_problem()
    res = pnjax.persistent_fit(
        params, loss, optax.sgd(0.05), iterations=2, lam=1e3, steps=50, layers="a",
        push_diverged=True,
    )  # fmt: skip
    assert res.history["diverged"].tolist() == [False, True, True]
    assert res.history["pushed"].all() and "pushed anyway" in res.summary
    assert res.champion_iteration == 0


def test_summary_when_everything_diverges_or_nothing():
    params, loss = _two_layer_problem()
    ok = pnjax.persistent_fit(params, loss, optax.sgd(0.05), iterations=1, lam=0.01, steps=20)
    assert "none diverged" in ok.summary and ok.diverged_iterations == ()
    bad = pnjax.persistent_fit(params, loss, optax.sgd(1e4), iterations=1, lam=0.01, steps=20)
    assert bad.champion_iteration == -1 and "every iteration diverged" in bad.summary


def _leaves_bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree_util.tree_leaves(tree)]


def test_same_seed_bit_identical_on_cpu():
    x = jnp.linspace(-1, 1, 40).reshape(20, 2)
    y = jnp.sin(3 * x[:, :1])
    params = {
        "Dense_0": {"kernel": jax.random.normal(jax.random.key(0), (2, 6)), "bias": jnp.zeros(6)},
        "Dense_1": {"kernel": jax.random.normal(jax.random.key(1), (6, 1)), "bias": jnp.zeros(1)},
    }

    def loss(p, batch):
        bx, by = batch
        h = jnp.tanh(bx @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - by) ** 2)

    def fit(seed):
        return pnjax.persistent_fit(
            params, loss, optax.adam(1e-2), iterations=2, lam=0.05, data=(x, y), batch_size=5,
            epochs=2, layers="random", layer_draw="per_iteration", shuffle="per_iteration",
            key=jax.random.key(seed),
        )  # fmt: skip

    a, b, c = fit(7), fit(7), fit(8)
    for k in a.history:
        assert a.history[k].tobytes() == b.history[k].tobytes(), k
    assert _leaves_bits(a.champion) == _leaves_bits(b.champion)
    assert _leaves_bits(a.bank) == _leaves_bits(b.bank)
    assert a.history["curve"].tobytes() != c.history["curve"].tobytes(), "the seed must matter"


def test_run_chains_same_seed_bit_identical():
    if not hasattr(pnjax, "run_chains"):
        pytest.skip("pnjax.run_chains is not available yet")
    x = jnp.linspace(-1, 1, 16).reshape(8, 2)
    y = jnp.cos(2 * x[:, :1])
    inits = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(2), (3, 2, 1))}}

    def loss(p):
        return jnp.mean((x @ p["Dense_0"]["kernel"] - y) ** 2)

    def run():
        return pnjax.run_chains(
            inits, loss, optax.adam(1e-2), iterations=2, lam=0.05, steps=30, key=jax.random.key(0)
        )

    a, b = run(), run()
    assert _leaves_bits(a.champion) == _leaves_bits(b.champion)
    for k, v in a.history.items():
        assert np.asarray(v).tobytes() == np.asarray(b.history[k]).tobytes(), k


# ---------------------------------------------------------------- fuzzing the penalty/transform

DTYPES = [jnp.float32, jnp.float16, jnp.bfloat16, jnp.int32, jnp.bool_]
if jax.config.jax_enable_x64:
    DTYPES.append(jnp.float64)

shapes = st.lists(st.integers(0, 2), min_size=0, max_size=2).map(tuple)


@st.composite
def pytrees(draw):
    """Nested dicts (layers) of leaves with random shapes (zero-size ones included) and dtypes."""
    dtype = draw(st.sampled_from(DTYPES)) if draw(st.booleans()) else None
    n_layers = draw(st.integers(1, 3))
    tree = {}
    for i in range(n_layers):
        layer = {}
        for j in range(draw(st.integers(1, 3))):
            dt = dtype or draw(st.sampled_from(DTYPES))
            layer[f"p{j}"] = (draw(shapes), dt)
        tree[f"L{i}"] = layer
    if draw(st.booleans()):  # a layer nested one level deeper
        tree["outer"] = {"inner": {"k": (draw(shapes), dtype or jnp.float32)}}
    return tree


def _materialize(spec, seed):
    leaves, treedef = jax.tree_util.tree_flatten(spec, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, (shape, dt) in zip(keys, leaves, strict=True):
        v = jax.random.normal(k, shape) * 2
        out.append(
            (v > 0)
            if dt == jnp.bool_
            else jnp.round(v).astype(dt)
            if dt == jnp.int32
            else v.astype(dt)
        )
    return jax.tree_util.tree_unflatten(treedef, out)


def _tol(tree):
    dts = {jnp.dtype(x.dtype) for x in jax.tree_util.tree_leaves(tree)}
    return 3e-2 if dts & {jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)} else 1e-4


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=pytrees(), seed=st.integers(0, 2**16), n_anchors=st.integers(0, 3))
def test_fuzz_penalty_gradient_transform(spec, seed, n_anchors):
    params = _materialize(spec, seed)
    bank = pnjax.AnchorBank.create(params, 3)
    anchors = [_materialize(spec, seed + 1 + k) for k in range(n_anchors)]
    for a in anchors:
        bank = bank.push(a)
    stored = [bank.get(k) for k in range(n_anchors)]  # as cast into the bank
    lam = 0.3
    pen = pnjax.persistent_penalty(params, bank, lam)
    assert pen.shape == () and jnp.issubdtype(pen.dtype, jnp.inexact)
    assert np.isfinite(float(pen))
    np.testing.assert_allclose(
        float(pen), numpy_penalty(params, stored, lam), rtol=_tol(params), atol=_tol(params)
    )
    grad = pnjax.persistent_gradient(params, bank, lam)
    assert jax.tree_util.tree_structure(grad) == jax.tree_util.tree_structure(params)
    for g, p in zip(
        jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(params), strict=True
    ):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert np.isfinite(np.asarray(g, np.float64)).all()
    if all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree_util.tree_leaves(params)):
        ref = numpy_gradient(params, stored, lam)
        from conftest import numpy_layers

        got = numpy_layers(grad)
        for name, vec in ref.items():
            np.testing.assert_allclose(got[name], vec, rtol=_tol(params), atol=_tol(params))
    tx = optax.chain(pnjax.persistent_bias(bank, lam), optax.sgd(0.1))
    state = tx.init(params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, state, params)
    for u, p in zip(
        jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(params), strict=True
    ):
        assert u.shape == p.shape and np.isfinite(np.asarray(u, np.float64)).all()


@pytest.mark.parametrize("empty", [{}, [], (), None, {"a": {}}])
def test_empty_trees_get_a_clear_error(empty):
    with pytest.raises(ValueError, match="no array leaves"):
        pnjax.AnchorBank.create(empty, 2)


@settings(max_examples=12, deadline=None)
@given(
    lam=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-5, 5),
        st.text(max_size=3),
        st.none(),
        st.lists(st.floats(-1, 1), max_size=2),
    )
)
def test_fuzz_lam(lam):
    params = {"w": jnp.ones(2)}
    bank = pnjax.AnchorBank.create(params, 2).push(params)
    arr = None
    try:
        arr = np.asarray(lam, np.float64)
    except (TypeError, ValueError):
        pass
    with np.errstate(over="ignore"):
        valid = arr is not None and np.all(np.isfinite(arr.astype(np.float32))) and np.all(arr >= 0)
    if valid and arr.ndim == 0:
        out = pnjax.persistent_penalty(params, bank, lam)
        assert np.isfinite(float(out))
    elif not valid:
        with pytest.raises((ValueError, TypeError), match="lam"):
            pnjax.persistent_penalty(params, bank, lam)
        with pytest.raises((ValueError, TypeError), match="lam"):
            pnjax.persistent_bias(bank, lam)
