"""ANLS leaves the two-affine-pieces plateau that gradient descent sits on, and never goes up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pnjax.baselines import anls, anls_sweep, one_hidden_loss
from pnjax.data import make_kink_data
from pnjax.data.kink import two_piece_affine_loss
from pnjax.models import KinkMLP


def _gd(params, x, y, steps):
    opt = optax.sgd(1e-3, momentum=0.9)
    loss = lambda p: one_hidden_loss(p, x, y)  # noqa: E731

    def body(carry, _):
        p, s = carry
        v, g = jax.value_and_grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), v

    (params, _), curve = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return params, curve


@pytest.fixture(scope="module")
def plateau():
    """The kink data and a 1-8-1 ReLU net that plain GD has brought to the plateau."""
    x, y = make_kink_data()
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = KinkMLP(features=(8, 1)).init(jax.random.key(0), x)["params"]
    params, curve = jax.jit(_gd, static_argnums=3)(params, x, y, 6000)
    return x, y, params, np.asarray(curve)


def test_gd_sits_on_the_plateau_anls_leaves_it(plateau):
    x, y, params, curve = plateau
    stuck = two_piece_affine_loss(x, y)  # best fit by two affine pieces (~A² + σ², here ~4)
    # plain GD: at the two-piece level and flat over its last 3000 steps
    np.testing.assert_allclose(curve[-1], stuck, rtol=1e-3)
    assert abs(curve[3000] - curve[-1]) < 1e-3 * stuck
    res = anls(params, x, y, sweeps=4)
    assert np.all(np.diff(res.losses) <= 1e-6 * res.losses[:-1])  # monotone
    assert res.accepted_moves.sum() > 0
    assert res.losses[-1] < 0.25 * stuck
    np.testing.assert_allclose(res.losses[-1], one_hidden_loss(res.params, x, y), rtol=1e-4)


def test_sweep_is_jittable_and_keeps_layout(plateau):
    x, y, params, _ = plateau
    wrapped = {"params": params}
    new, loss, acc = jax.jit(lambda p: anls_sweep(p, x, y, moves=(1,)))(wrapped)
    assert set(new) == {"params"}
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(wrapped)
    assert float(loss) <= float(one_hidden_loss(params, x, y))
    out = KinkMLP(features=(8, 1)).apply(new, x)
    np.testing.assert_allclose(jnp.mean((out - y) ** 2), loss, rtol=1e-4)


def test_bad_input_errors(plateau):
    x, y, params, _ = plateau
    two = dict(params, Dense_2=params["Dense_1"])  # a second hidden layer
    with pytest.raises(ValueError, match="one-hidden-layer"):
        anls(two, x, y)
    with pytest.raises(ValueError, match="sweeps"):
        anls(params, x, y, sweeps=0)
    with pytest.raises(ValueError, match="moves"):
        anls(params, x, y, moves=(0,))
    with pytest.raises(ValueError, match=r"x \[N, 1\]"):
        anls_sweep(params, x[:, [0, 0]], y)
