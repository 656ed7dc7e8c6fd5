import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from conftest import numpy_gradient, numpy_layers, numpy_penalty, random_like
from hypothesis import given, settings
from hypothesis import strategies as st

import pnjax


def _bank(params, anchors, capacity=None):
    bank = pnjax.AnchorBank.create(params, capacity or max(1, len(anchors)) + 1)
    for a in anchors:
        bank = bank.push(a)
    return bank


@pytest.mark.parametrize("layers", [None, ("Dense_0",), ("Dense_1",), "Dense_1"])
def test_penalty_matches_numpy(linen_params, layers):
    anchors = [random_like(linen_params, s) for s in range(3)]
    bank = _bank(linen_params, anchors, capacity=5)
    got = pnjax.persistent_penalty(linen_params, bank, 0.01, layers=layers)
    sel = (layers,) if isinstance(layers, str) else layers
    want = numpy_penalty(linen_params, anchors, 0.01, sel)
    assert want > 0
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_gradient_matches_numpy_and_autodiff(linen_params):
    anchors = [random_like(linen_params, s) for s in range(4)]
    bank = _bank(linen_params, anchors)
    g = pnjax.persistent_gradient(linen_params, bank, 0.3)
    auto = jax.grad(pnjax.persistent_penalty)(linen_params, bank, 0.3)
    ref = numpy_gradient(linen_params, anchors, 0.3)
    for name, vec in numpy_layers(g).items():
        np.testing.assert_allclose(vec, ref[name], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(g, auto, rtol=1e-5, atol=1e-7)


def test_empty_bank_is_zero(linen_params):
    bank = pnjax.AnchorBank.create(linen_params, capacity=4)
    assert float(pnjax.persistent_penalty(linen_params, bank, 1.0)) == 0.0
    g = pnjax.persistent_gradient(linen_params, bank, 1.0)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(g))


def test_empty_slots_contribute_nothing(linen_params):
    a = random_like(linen_params, 7)
    small = _bank(linen_params, [a], capacity=1)
    big = _bank(linen_params, [a], capacity=9)
    np.testing.assert_allclose(
        pnjax.persistent_penalty(linen_params, small, 0.5),
        pnjax.persistent_penalty(linen_params, big, 0.5),
        rtol=1e-6,
    )


def test_zero_norm_layer_anchor_gives_zero_not_nan(linen_params):
    a = random_like(linen_params, 3)
    a["Dense_0"] = jax.tree_util.tree_map(jnp.zeros_like, a["Dense_0"])
    bank = _bank(linen_params, [a])
    pen = pnjax.persistent_penalty(linen_params, bank, 1.0)
    assert np.isfinite(float(pen))
    np.testing.assert_allclose(float(pen), numpy_penalty(linen_params, [a], 1.0), rtol=1e-5)
    g = pnjax.persistent_gradient(linen_params, bank, 1.0)
    assert float(jnp.abs(g["Dense_0"]["kernel"]).max()) == 0.0
    auto = jax.grad(pnjax.persistent_penalty)(linen_params, bank, 1.0)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(auto))


def test_toy_value():
    theta0 = jnp.array([2.0, -2.0])
    bank = _bank(theta0, [theta0])
    # |(2,-2)·(1,0)| / 8 * 0.1
    np.testing.assert_allclose(
        float(pnjax.persistent_penalty(jnp.array([1.0, 0.0]), bank, 0.1)), 0.025
    )


def test_jit_compiles_once_as_bank_fills(linen_params):
    traces = []

    @jax.jit
    def f(p, bank, lam):
        traces.append(1)
        return pnjax.persistent_penalty(p, bank, lam)

    bank = pnjax.AnchorBank.create(linen_params, capacity=5)
    vals = []
    for s in range(5):
        bank = bank.push(random_like(linen_params, s))
        vals.append(float(f(linen_params, bank, 0.1 * (s + 1))))
    assert len(traces) == 1
    assert len(set(vals)) == 5


def test_bfloat16(linen_params):
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), linen_params)
    anchors = [random_like(p16, s) for s in range(2)]
    bank = _bank(p16, anchors)
    assert jax.tree_util.tree_leaves(bank.anchors)[0].dtype == jnp.bfloat16
    pen = pnjax.persistent_penalty(p16, bank, 0.1)
    assert pen.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(pen), numpy_penalty(p16, anchors, 0.1), rtol=2e-2)
    g = pnjax.persistent_gradient(p16, bank, 0.1)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), -1])
def test_bad_lambda(linen_params, lam):
    bank = _bank(linen_params, [linen_params])
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        pnjax.persistent_penalty(linen_params, bank, lam)
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        pnjax.persistent_gradient(linen_params, bank, lam)


@pytest.mark.parametrize("lam", [[0.1, 0.2], jnp.array([0.1]), np.full((2, 2), 0.1)])
def test_lambda_must_be_a_scalar(linen_params, lam):
    """A vector λ used to broadcast into a vector "penalty"; per-chain λ is run_chains' job."""
    bank = _bank(linen_params, [linen_params])
    for fn in (pnjax.persistent_penalty, pnjax.persistent_gradient):
        with pytest.raises(ValueError, match="lam must be a scalar here, got shape"):
            fn(linen_params, bank, lam)
        with pytest.raises(ValueError, match="pnjax.run_chains"):
            jax.jit(fn)(linen_params, bank, jnp.asarray(lam))
    # per chain, under vmap, each chain sees a scalar λ
    pens = jax.vmap(pnjax.persistent_penalty, (None, None, 0))(
        linen_params, bank, jnp.array([0.1, 0.2])
    )
    np.testing.assert_allclose(pens[1], 2 * pens[0], rtol=1e-6)


def test_unknown_layer_and_mismatched_bank(linen_params):
    bank = _bank(linen_params, [linen_params])
    with pytest.raises(ValueError, match="unknown layer name.*'conv'"):
        pnjax.persistent_penalty(linen_params, bank, 0.1, layers=("conv",))
    with pytest.raises(ValueError, match="tree structure"):
        pnjax.persistent_penalty({"w": jnp.ones(3)}, bank, 0.1)
    with pytest.raises(TypeError, match="AnchorBank"):
        pnjax.persistent_penalty(linen_params, {"not": "a bank"}, 0.1)


def test_layers_of_the_wrong_type(linen_params):
    bank = _bank(linen_params, [linen_params])
    with pytest.raises(TypeError, match=r"layers must be None, a layer name.*got 7.5 \(float\)"):
        pnjax.persistent_penalty(linen_params, bank, 0.1, layers=7.5)
    # an int is a layer index, as in the drivers: out of range is refused with the valid range
    with pytest.raises(ValueError, match=r"layer index 7 is out of range.*0\.\.1"):
        pnjax.persistent_penalty(linen_params, bank, 0.1, layers=7)


def test_vector_lambda_outside_vmap(linen_params):
    bank = _bank(linen_params, [linen_params])
    with pytest.raises(ValueError, match=r"lam must be a scalar here, got shape \(3,\)"):
        pnjax.persistent_penalty(linen_params, bank, jnp.array([0.1, 0.2, 0.3]))
    # under vmap each chain's λ is a scalar
    pens = jax.vmap(lambda lam: pnjax.persistent_penalty(linen_params, bank, lam))(
        jnp.array([0.1, 0.2])
    )
    chex.assert_shape(pens, (2,))


class PenaltyVariantsTest(chex.TestCase):
    """Eq. 4/5 and Eq. 6 against float64 NumPy, traced under jit and run eagerly."""

    def setUp(self):
        super().setUp()
        from conftest import TwoDense

        self.params = TwoDense().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
        self.anchors = [random_like(self.params, s) for s in range(3)]
        self.bank = _bank(self.params, self.anchors, capacity=5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("all", None), ("Dense_0", ("Dense_0",)))
    def test_penalty_and_gradient(self, layers):
        pen = self.variant(lambda p, b, lam: pnjax.persistent_penalty(p, b, lam, layers))
        grad = self.variant(lambda p, b, lam: pnjax.persistent_gradient(p, b, lam, layers))
        got = pen(self.params, self.bank, 0.01)
        chex.assert_shape(got, ())
        np.testing.assert_allclose(
            float(got), numpy_penalty(self.params, self.anchors, 0.01, layers), rtol=1e-5
        )
        ref = numpy_gradient(self.params, self.anchors, 0.01, layers)
        g = grad(self.params, self.bank, 0.01)
        chex.assert_trees_all_equal_shapes_and_dtypes(g, self.params)
        for name, vec in numpy_layers(g).items():
            np.testing.assert_allclose(vec, ref[name], rtol=1e-5, atol=1e-8)


# Property tests over random pytrees ---------------------------------------------------------

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)


@st.composite
def pytrees(draw):
    """A dict of layers, each a dict of 1-3 float32 leaves of random shapes."""
    n_layers = draw(st.integers(1, 3))
    tree = {}
    for i in range(n_layers):
        n_leaves = draw(st.integers(1, 3))
        tree[f"L{i}"] = {
            f"p{j}": draw(
                hnp.arrays(
                    np.float32,
                    draw(shapes),
                    elements=st.floats(-3, 3, width=32, allow_subnormal=False),
                )
            )
            for j in range(n_leaves)
        }
    return tree


@settings(max_examples=40, deadline=None)
@given(tree=pytrees(), n_anchors=st.integers(0, 3), lam=st.floats(0, 2), seed=st.integers(0, 99))
def test_property_penalty_and_gradient(tree, n_anchors, lam, seed):
    params = jax.tree_util.tree_map(jnp.asarray, tree)
    anchors = [random_like(params, seed + k) for k in range(n_anchors)]
    bank = _bank(params, anchors, capacity=4)
    pen = float(pnjax.persistent_penalty(params, bank, lam))
    want = numpy_penalty(params, anchors, lam)
    assert pen >= 0
    np.testing.assert_allclose(pen, want, rtol=1e-4, atol=1e-5)
    g = numpy_layers(pnjax.persistent_gradient(params, bank, lam))
    ref = numpy_gradient(params, anchors, lam)
    for name in ref:
        np.testing.assert_allclose(g[name], ref[name], rtol=1e-4, atol=1e-5)
