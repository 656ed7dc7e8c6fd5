import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TwoDense, random_like
from flax import nnx

import pnjax


def _bank(params, n=3, capacity=5):
    bank = pnjax.AnchorBank.create(params, capacity)
    for s in range(n):
        bank = bank.push(random_like(params, 10 + s))
    return bank


def _allclose(a, b, **kw):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


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
