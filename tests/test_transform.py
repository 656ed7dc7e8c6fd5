import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from conftest import TwoDense, numpy_gradient, numpy_layers, random_like
from flax import nnx

import pnjax


def _bank(params, n=3, capacity=5):
    bank = pnjax.AnchorBank.create(params, capacity)
    for s in range(n):
        bank = bank.push(random_like(params, 10 + s))
    return bank


def _allclose(a, b, **kw):
    chex.assert_trees_all_close(a, b, **kw)


@pytest.mark.parametrize("layers", [None, ("Dense_1",)])
def test_update_is_grads_plus_penalty_gradient(linen_params, layers):
    bank = _bank(linen_params)
    grads = random_like(linen_params, 99)
    tx = pnjax.persistent_bias(bank, 0.05, layers=layers)
    upd, _ = tx.update(grads, tx.init(linen_params), linen_params)
    pen_grad = jax.grad(pnjax.persistent_penalty)(linen_params, bank, 0.05, layers)
    _allclose(upd, jax.tree_util.tree_map(jnp.add, grads, pen_grad), rtol=1e-5, atol=1e-7)


def test_requires_params(linen_params):
    tx = pnjax.persistent_bias(_bank(linen_params), 0.1)
    with pytest.raises(ValueError, match="requires the current value of parameters"):
        tx.update(linen_params, tx.init(linen_params))


def test_bad_inputs(linen_params):
    bank = _bank(linen_params)
    with pytest.raises(ValueError, match="lam must be finite"):
        pnjax.persistent_bias(bank, -1.0)
    with pytest.raises(ValueError, match="unknown layer"):
        pnjax.persistent_bias(bank, 0.1, layers=("nope",))
    with pytest.raises(TypeError, match="AnchorBank"):
        pnjax.persistent_bias(linen_params, 0.1)
    tx = pnjax.persistent_bias(bank, 0.1)
    with pytest.raises(ValueError, match="tree structure"):
        tx.init({"w": jnp.ones(2)})


def _loss(params, x, y):
    return jnp.mean((TwoDense().apply({"params": params}, x) - y) ** 2)


DATA = (jnp.linspace(-1, 1, 24).reshape(8, 3), jnp.sin(jnp.arange(8.0)).reshape(8, 1))


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optax.sgd(1e-2, momentum=0.9),
        lambda: optax.adam(1e-2),
        lambda: optax.adamw(1e-2, weight_decay=1e-3),
        lambda: optax.rmsprop(1e-2),
        lambda: optax.lion(1e-3),
    ],
)
def test_before_optimizer_equals_penalized_loss(linen_params, make_opt):
    """chain(persistent_bias, opt) follows the same path as opt on L + P."""
    bank = _bank(linen_params)
    lam = 0.05
    tx_a = optax.chain(pnjax.persistent_bias(bank, lam), make_opt())
    tx_b = make_opt()

    def penalized(p):
        return _loss(p, *DATA) + pnjax.persistent_penalty(p, bank, lam)

    @jax.jit
    def run(p0):
        def body(_, c):
            pa, pb, sa, sb = c
            ua, sa = tx_a.update(jax.grad(_loss)(pa, *DATA), sa, pa)
            ub, sb = tx_b.update(jax.grad(penalized)(pb), sb, pb)
            return optax.apply_updates(pa, ua), optax.apply_updates(pb, ub), sa, sb

        pa, pb, _, _ = jax.lax.fori_loop(0, 20, body, (p0, p0, tx_a.init(p0), tx_b.init(p0)))
        return pa, pb

    pa, pb = run(linen_params)
    _allclose(pa, pb, rtol=1e-5, atol=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), pa, linen_params)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


def test_after_adam_is_decoupled(linen_params):
    """Placed after Adam's scaling the bias bypasses the normalization (like adamw's decay)."""
    bank = _bank(linen_params)
    lam, lr = 0.05, 1e-2
    tx = optax.chain(optax.scale_by_adam(), pnjax.persistent_bias(bank, lam), optax.scale(-lr))
    adam = optax.scale_by_adam()
    grads = jax.grad(_loss)(linen_params, *DATA)
    upd, _ = tx.update(grads, tx.init(linen_params), linen_params)
    direction, _ = adam.update(grads, adam.init(linen_params))
    bias = pnjax.persistent_gradient(linen_params, bank, lam)
    want = jax.tree_util.tree_map(lambda d, b: -lr * (d + b), direction, bias)
    _allclose(upd, want, rtol=1e-5, atol=1e-8)
    coupled = optax.chain(pnjax.persistent_bias(bank, lam), optax.adam(lr))
    upd_c, _ = coupled.update(grads, coupled.init(linen_params), linen_params)
    diff = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a - b).max()), upd, upd_c)
    assert max(jax.tree_util.tree_leaves(diff)) > 1e-5, "decoupled must differ from coupled"


def test_swap_bank_without_recompiling(linen_params):
    empty = pnjax.AnchorBank.create(linen_params, 4)
    tx = optax.chain(pnjax.persistent_bias(empty, 0.1), optax.sgd(1e-2))
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.grad(_loss)(p, *DATA), s, p)
        return optax.apply_updates(p, u), s

    bank = empty
    outs = []
    for k in range(3):
        bank = bank.push(random_like(linen_params, k))
        state = optax.tree_utils.tree_set(tx.init(linen_params), bank=bank)
        p, _ = step(linen_params, state)
        outs.append(p)
    assert len(traces) == 1
    assert float(jnp.abs(outs[0]["Dense_0"]["kernel"] - outs[2]["Dense_0"]["kernel"]).max()) > 0


def test_inject_hyperparams_schedule_and_per_chain_lambda(linen_params):
    bank = _bank(linen_params)
    tx = optax.inject_hyperparams(pnjax.persistent_bias)(
        bank=bank, lam=optax.linear_schedule(0.0, 1.0, 10)
    )
    state = tx.init(linen_params)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, linen_params)
    u0, state = tx.update(zeros, state, linen_params)  # lam = 0 at count 0
    assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(u0)) == 0.0
    u1, state = tx.update(zeros, state, linen_params)
    want = pnjax.persistent_gradient(linen_params, bank, 0.1)
    _allclose(u1, want, rtol=1e-5, atol=1e-8)

    lams = jnp.array([0.0, 0.1, 0.2])

    def one(lam):
        t = optax.inject_hyperparams(pnjax.persistent_bias)(bank=bank, lam=lam)
        u, _ = t.update(zeros, t.init(linen_params), linen_params)
        return u

    us = jax.vmap(one)(lams)
    for i, lam in enumerate(lams.tolist()):
        _allclose(
            jax.tree_util.tree_map(lambda x, i=i: x[i], us),
            pnjax.persistent_gradient(linen_params, bank, lam),
            rtol=1e-5,
            atol=1e-8,
        )


def test_nnx_optimizer():
    model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 1, rngs=nnx.Rngs(1)))
    params = nnx.state(model, nnx.Param)
    anchor = jax.tree_util.tree_map(lambda x: x + 1.0, params)
    bank = pnjax.AnchorBank.create(params, 3).push(anchor)
    opt = nnx.Optimizer(
        model, optax.chain(pnjax.persistent_bias(bank, 0.1), optax.sgd(0.1)), wrt=nnx.Param
    )
    x, y = DATA

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    grads = nnx.grad(loss)(model)
    before = nnx.state(model, nnx.Param)
    before = jax.tree_util.tree_map(jnp.copy, before)
    pen_grad = jax.grad(pnjax.persistent_penalty)(before, bank, 0.1)
    opt.update(model, grads)
    after = nnx.state(model, nnx.Param)
    want = jax.tree_util.tree_map(lambda p, g, b: p - 0.1 * (g + b), before, grads, pen_grad)
    _allclose(after, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_updates(linen_params):
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), linen_params)
    bank = _bank(p16)
    tx = optax.chain(pnjax.persistent_bias(bank, 0.1), optax.sgd(1e-2))
    upd, _ = tx.update(p16, tx.init(p16), p16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(upd))


# With and without jit (chex.variants), and inside Optax's wrappers --------------------------

LAM = 0.05
MASK_DENSE_1 = {"Dense_0": {"kernel": False, "bias": False}, "Dense_1": {"kernel": True, "bias": True}}


class VariantsTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        self.params = TwoDense().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
        self.bank = _bank(self.params)
        self.grads = random_like(self.params, 99)

    def _update(self, tx):
        """``tx.update(grads, init(params), params)`` through the variant (jit or not)."""
        update = self.variant(tx.update)
        upd, _ = update(self.grads, tx.init(self.params), self.params)
        return upd

    def _layers_form(self, layers):
        return self._update(pnjax.persistent_bias(self.bank, LAM, layers=layers))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("all", None), ("Dense_1", ("Dense_1",)))
    def test_update_is_grads_plus_penalty_gradient(self, layers):
        upd = self._update(pnjax.persistent_bias(self.bank, LAM, layers=layers))
        pen_grad = jax.grad(pnjax.persistent_penalty)(self.params, self.bank, LAM, layers)
        chex.assert_trees_all_close(
            upd, jax.tree_util.tree_map(jnp.add, self.grads, pen_grad), rtol=1e-5, atol=1e-7
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("leaf_mask", MASK_DENSE_1),
        ("prefix_mask", {"Dense_0": False, "Dense_1": True}),
        ("callable_mask", lambda p: {k: jax.tree_util.tree_map(lambda _, k=k: k == "Dense_1", v)
                                     for k, v in p.items()}),
    )
    def test_masked_equals_layers_form(self, mask):
        tx = optax.masked(pnjax.persistent_bias(self.bank, LAM), mask)
        got = self._update(tx)
        chex.assert_trees_all_close(got, self._layers_form(("Dense_1",)), rtol=1e-6, atol=1e-8)
        # the masked-out layer got nothing
        chex.assert_trees_all_equal(got["Dense_0"], self.grads["Dense_0"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_everything_out_is_identity(self):
        mask = jax.tree_util.tree_map(lambda _: False, self.params)
        got = self._update(optax.masked(pnjax.persistent_bias(self.bank, LAM), mask))
        chex.assert_trees_all_equal(got, self.grads)

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_part_of_a_layer_penalizes_the_kept_leaves(self):
        """Kernels only: θ^l, Θ_k^l and ||Θ_k^l||² are over the kernels (Eq. 6 on the subtree)."""
        mask = {n: {"kernel": True, "bias": False} for n in self.params}
        got = self._update(optax.masked(pnjax.persistent_bias(self.bank, LAM), mask))
        kernels = {n: {"kernel": self.params[n]["kernel"]} for n in self.params}
        anchors = [
            {n: {"kernel": self.bank.get(k)[n]["kernel"]} for n in self.params}
            for k in range(int(self.bank.count))
        ]
        ref = numpy_gradient(kernels, anchors, LAM)
        bias = jax.tree_util.tree_map(jnp.subtract, got, self.grads)
        for name, vec in numpy_layers({n: {"kernel": bias[n]["kernel"]} for n in bias}).items():
            np.testing.assert_allclose(vec, ref[name], rtol=1e-5, atol=1e-7)
            assert np.abs(ref[name]).max() > 0
        chex.assert_trees_all_equal(
            {n: bias[n]["bias"] for n in bias},
            {n: jnp.zeros_like(self.params[n]["bias"]) for n in self.params},
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_partition_equals_layers_form(self):
        lr = 0.1
        labels = {"Dense_0": {"kernel": "plain", "bias": "plain"},
                  "Dense_1": {"kernel": "pen", "bias": "pen"}}
        tx = optax.partition(
            {"pen": optax.chain(pnjax.persistent_bias(self.bank, LAM), optax.sgd(lr)),
             "plain": optax.sgd(lr)},
            labels,
        )
        want_tx = optax.chain(
            pnjax.persistent_bias(self.bank, LAM, layers=("Dense_1",)), optax.sgd(lr)
        )
        chex.assert_trees_all_close(
            self._update(tx), self._update(want_tx), rtol=1e-6, atol=1e-8
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_inject_hyperparams(self):
        inner = optax.inject_hyperparams(pnjax.persistent_bias)(bank=self.bank, lam=LAM)
        got = self._update(optax.masked(inner, MASK_DENSE_1))
        chex.assert_trees_all_close(got, self._layers_form(("Dense_1",)), rtol=1e-6, atol=1e-8)

    def test_masked_with_mismatched_params(self):
        tx = optax.masked(pnjax.persistent_bias(self.bank, LAM), {"w": False, "v": True})
        with pytest.raises(ValueError, match="tree structure"):
            tx.init({"w": jnp.ones(2), "v": jnp.ones(2)})

    def test_vector_lam_is_refused(self):
        with pytest.raises(ValueError, match="lam must be a scalar"):
            pnjax.persistent_bias(self.bank, jnp.array([0.1, 0.2]))
