"""``pnjax.fast_dots``: same values and derivatives as the function it wraps, dots swapped."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pnjax
from pnjax.models import KinkMLP


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        x = jnp.tanh(nn.Dense(8)(x))
        return nn.Dense(1)(x)


X = jax.random.normal(jax.random.key(1), (12, 3))
Y = jnp.sin(X[:, :1])
MODEL = MLP()
PARAMS = MODEL.init(jax.random.key(0), X)["params"]


def loss(params, x=X):
    return jnp.mean((MODEL.apply({"params": params}, x) - Y) ** 2)


def _close(a, b, tol=1e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, rtol=tol, atol=tol)


def _swapped(fn, *args) -> bool:
    """Whether the reverse pass of ``fn`` holds dense.matmul's materialized transpose."""
    text = str(jax.make_jaxpr(jax.grad(fn))(*args))
    return "optimization_barrier" in text


def test_values_and_gradients_match_and_dots_are_swapped() -> None:
    fast = pnjax.fast_dots(loss)
    _close(fast(PARAMS), loss(PARAMS))
    _close(jax.grad(fast)(PARAMS), jax.grad(loss)(PARAMS))
    assert _swapped(fast, PARAMS)
    assert not _swapped(loss, PARAMS)


def test_jit_vmap_grad_in_every_order() -> None:
    fast = pnjax.fast_dots(loss)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 1.5 * a, -a]), PARAMS)
    ref = jax.vmap(jax.grad(loss))(stacked)
    _close(jax.jit(jax.vmap(jax.grad(fast)))(stacked), ref)
    _close(jax.vmap(jax.grad(jax.jit(fast)))(stacked), ref)
    _close(jax.grad(lambda p: jnp.sum(jax.vmap(fast)(p)))(stacked), ref)
    # wrapping a vmapped function: the dots are batched dot_generals
    many = pnjax.fast_dots(jax.vmap(loss))
    _close(jax.grad(lambda p: jnp.sum(many(p)))(stacked), ref)
    assert _swapped(lambda p: jnp.sum(many(p)), stacked)


def test_second_order_and_forward_mode() -> None:
    fast = pnjax.fast_dots(loss)
    v = jax.tree.map(jnp.ones_like, PARAMS)
    hvp = lambda f: jax.jvp(jax.grad(f), (PARAMS,), (v,))[1]  # noqa: E731
    _close(hvp(fast), hvp(loss), 1e-4)
    _close(jax.jacfwd(fast)(PARAMS), jax.jacfwd(loss)(PARAMS))


def test_nested_jit_scan_cond_checkpoint_and_custom_jvp() -> None:
    w = jax.random.normal(jax.random.key(2), (3, 3))

    @jax.custom_jvp
    def user_rule(h):  # a user's own rule: its body's dot must be left alone
        return h @ w

    user_rule.defjvp(lambda p, t: (user_rule(p[0]), 2.0 * (t[0] @ w)))  # deliberately not exact

    def fn(a, h):
        inner = jax.jit(lambda h: jnp.tanh(h @ a))
        h = inner(h)
        h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ a), None), h, None, length=2)
        h = jax.lax.cond(jnp.sum(h) > 0, lambda h: h @ a, lambda h: h @ a.T, h)
        h = jax.checkpoint(lambda h: jnp.sin(h @ a))(h)
        return jnp.sum(user_rule(h) ** 2)

    a = jax.random.normal(jax.random.key(3), (3, 3))
    fast = pnjax.fast_dots(fn)
    _close(fast(a, X), fn(a, X))
    _close(jax.grad(fast, argnums=(0, 1))(a, X), jax.grad(fn, argnums=(0, 1))(a, X), 1e-4)
    assert _swapped(fast, a, X)


@pytest.mark.parametrize(
    "spec",
    [
        ("bni,io->bno", (4, 5, 3), (3, 2)),  # free axes of h (a Dense on a sequence)
        ("bni,bio->bno", (4, 5, 3), (4, 3, 2)),  # shared batch axis
        ("ni,oi->no", (5, 3), (2, 3)),  # W stored [out, in]
        ("i,io->o", (3,), (3, 2)),  # a vector input
        ("ni,nj->ij", (5, 3), (5, 2)),  # not layer form: kept as is
    ],
)
def test_dot_forms(spec) -> None:
    eq, sh, sw = spec
    h = jax.random.normal(jax.random.key(4), sh)
    w = jax.random.normal(jax.random.key(5), sw)
    fn = lambda h, w: jnp.sum(jnp.sin(jnp.einsum(eq, h, w)))  # noqa: E731
    fast = pnjax.fast_dots(fn)
    _close(fast(h, w), fn(h, w))
    _close(jax.grad(fast, argnums=(0, 1))(h, w), jax.grad(fn, argnums=(0, 1))(h, w))


def test_integer_and_explicit_precision_dots_are_kept() -> None:
    ints = jnp.arange(6).reshape(2, 3)
    fn = lambda a: a @ ints.T  # noqa: E731
    np.testing.assert_array_equal(pnjax.fast_dots(fn)(ints), fn(ints))
    hi = lambda w: jnp.sum(jnp.dot(X, w, precision="highest"))  # noqa: E731
    w = jnp.ones((3, 2))
    assert not _swapped(pnjax.fast_dots(hi), w)


def test_keyword_arguments_and_pytree_outputs() -> None:
    fn = lambda p, *, x: {"loss": loss(p, x), "n": x.shape[0]}  # noqa: E731
    out = pnjax.fast_dots(fn)(PARAMS, x=X)
    _close(out["loss"], loss(PARAMS))
    assert int(out["n"]) == X.shape[0]


def test_kinkmlp_is_unchanged_and_run_chains_agrees() -> None:
    """Idempotent on pnjax's own fast layers; run_chains gives the plain function's results."""
    kx = jnp.linspace(-1.0, 1.0, 10)[:, None]
    km = KinkMLP(fast_matmul=True)
    kp = km.init(jax.random.key(0), kx)["params"]
    kl = lambda p: jnp.mean((km.apply({"params": p}, kx) - kx**2) ** 2)  # noqa: E731
    _close(jax.grad(pnjax.fast_dots(kl))(kp), jax.grad(kl)(kp))

    inits = jax.vmap(lambda k: MODEL.init(k, X)["params"])(jax.random.split(jax.random.key(0), 2))
    kw = dict(iterations=1, lam=0.01, steps=20)
    ref = pnjax.run_chains(inits, loss, optax.sgd(1e-2, momentum=0.9), **kw)
    got = pnjax.run_chains(inits, pnjax.fast_dots(loss), optax.sgd(1e-2, momentum=0.9), **kw)
    _close(got.champion, ref.champion, 1e-4)


def test_not_a_function() -> None:
    with pytest.raises(TypeError, match="expects a function"):
        pnjax.fast_dots(3)
