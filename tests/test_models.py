"""Models, their CPU-fast formulations against the ordinary Flax ones, and ``_compile.jit``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pnjax import _compile
from pnjax.models import AlexNet, LeNet5, ResNet18, max_pool
from pnjax.models.alexnet import conv_im2col
from pnjax.models.pooling import conv_relu_pool, space_to_depth

DN = ("NHWC", "HWIO", "NHWC")


def _max_abs(a: object, b: object) -> float:
    return max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ----------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (3, 4, 6, 1)])
def test_max_pool_matches_flax_values_and_gradients(shape: tuple[int, ...]) -> None:
    x = jax.random.normal(jax.random.key(0), shape)
    ref = nn.max_pool(x, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(max_pool(x), ref)
    ct = jax.random.normal(jax.random.key(1), ref.shape)
    g = jax.grad(lambda x: jnp.vdot(max_pool(x), ct))(x)
    g_ref = jax.grad(lambda x: jnp.vdot(nn.max_pool(x, (2, 2), strides=(2, 2)), ct))(x)
    np.testing.assert_allclose(g, g_ref, atol=1e-6)


def test_max_pool_relu_ties_give_the_same_gradient_below_the_relu() -> None:
    # Many exact zeros after the ReLU: windows full of ties. select_and_scatter sends the
    # gradient to one of them, jnp.max splits it, and the ReLU's zero derivative removes both.
    z = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)) - 0.8
    z = z.at[:, :2].set(-1.0)  # whole windows of zeros after the ReLU
    ct = jax.random.normal(jax.random.key(1), (4, 4, 4, 3))

    def f(pool):  # noqa: ANN001, ANN202
        return jax.grad(lambda z: jnp.vdot(pool(nn.relu(z)), ct))(z)

    assert float(jnp.mean(nn.relu(z) == 0)) > 0.5
    g = f(max_pool)
    g_ref = f(lambda y: nn.max_pool(y, (2, 2), strides=(2, 2)))
    np.testing.assert_allclose(g, g_ref, atol=1e-6)


def test_max_pool_ties_split_the_gradient() -> None:
    x = jnp.ones((1, 2, 2, 1))
    g = jax.grad(lambda x: max_pool(x).sum())(x)
    np.testing.assert_allclose(g, jnp.full_like(x, 0.25))


def test_max_pool_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        max_pool(jnp.ones((4, 4)))
    with pytest.raises(ValueError):
        max_pool(jnp.ones((1, 1, 1, 1)))


# ----------------------------------------------------------------------------- fast convs


def test_space_to_depth_layout() -> None:
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    y = space_to_depth(x, 2)
    assert y.shape == (2, 2, 2, 12)
    np.testing.assert_array_equal(y[1, 1, 0, (1 * 2 + 0) * 3 + 2], x[1, 3, 0, 2])


@pytest.mark.parametrize(
    ("hw", "cin", "cout", "k", "window"),
    [(32, 3, 6, 5, 2), (11, 2, 4, 3, 2), (12, 3, 5, 4, 3)],
)
def test_conv_relu_pool_matches_direct(hw: int, cin: int, cout: int, k: int, window: int) -> None:
    kx, kw, kb, kc = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, (3, hw, hw, cin))
    w = jax.random.normal(kw, (k, k, cin, cout)) * 0.3
    b = jax.random.normal(kb, (cout,)) * 0.3

    def ref(x, w, b):  # noqa: ANN001, ANN202
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN) + b
        return nn.max_pool(nn.relu(y), (window, window), strides=(window, window))

    out, out_ref = jax.jit(conv_relu_pool, static_argnums=3)(x, w, b, window), jax.jit(ref)(x, w, b)
    assert out.shape == out_ref.shape
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
    ct = jax.random.normal(kc, out.shape)
    grad = jax.grad(lambda *a: jnp.vdot(conv_relu_pool(*a, window), ct), argnums=(0, 1, 2))
    g = jax.jit(grad)(x, w, b)
    g_ref = jax.jit(jax.grad(lambda *a: jnp.vdot(ref(*a), ct), argnums=(0, 1, 2)))(x, w, b)
    for u, v in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("hw", "k", "p"), [(4, 5, 2), (2, 3, 1), (5, 3, 0)])
def test_conv_im2col_matches_lax(hw: int, k: int, p: int) -> None:
    x = jax.random.normal(jax.random.key(0), (2, hw, hw, 7))
    w = jax.random.normal(jax.random.key(1), (k, k, 7, 5))

    def ref(x, w):  # noqa: ANN001, ANN202
        return jax.lax.conv_general_dilated(x, w, (1, 1), [(p, p)] * 2, dimension_numbers=DN)

    np.testing.assert_allclose(
        jax.jit(conv_im2col, static_argnums=2)(x, w, p), jax.jit(ref)(x, w), atol=1e-4, rtol=1e-5
    )
    ct = jax.random.normal(jax.random.key(2), ref(x, w).shape)
    g = jax.jit(jax.grad(lambda x, w: jnp.vdot(conv_im2col(x, w, p), ct), argnums=(0, 1)))(x, w)
    g_ref = jax.jit(jax.grad(lambda x, w: jnp.vdot(ref(x, w), ct), argnums=(0, 1)))(x, w)
    for u, v in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- models


def _loss_and_grads(model: nn.Module, params: object, x: jax.Array, y: jax.Array):  # noqa: ANN202
    def loss(p):  # noqa: ANN001, ANN202
        logits = model.apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.value_and_grad(loss)(params)


@pytest.mark.parametrize(("cls", "batch"), [(LeNet5, 16), (AlexNet, 4)])
def test_fast_model_matches_flax_formulation(cls: type[nn.Module], batch: int) -> None:
    x = jax.random.normal(jax.random.key(0), (batch, 32, 32, 3))
    y = jnp.arange(batch) % 10
    fast, ref = cls(), cls(fast_pool=False)
    params = fast.init(jax.random.key(1), x)["params"]
    params_ref = ref.init(jax.random.key(1), x)["params"]
    assert jax.tree.structure(params) == jax.tree.structure(params_ref)
    assert _max_abs(params, params_ref) == 0.0
    np.testing.assert_allclose(
        jax.jit(fast.apply)({"params": params}, x),
        jax.jit(ref.apply)({"params": params}, x),
        atol=1e-5,
    )
    lg = jax.jit(_loss_and_grads, static_argnums=0)
    (l1, g1), (l2, g2) = lg(fast, params, x, y), lg(ref, params, x, y)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(u, v, atol=2e-5, rtol=1e-4)


def test_lenet_paper_init_and_classes() -> None:
    model = LeNet5(num_classes=7, kernel_init=nn.initializers.normal(0.2))
    x = jnp.zeros((2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    assert model.apply({"params": params}, x).shape == (2, 7)
    assert params["Conv_0"]["kernel"].shape == (5, 5, 3, 6)
    assert params["Dense_0"]["kernel"].shape == (400, 120)
    assert sum(p.size for p in jax.tree.leaves(params)) == 62006 - 3 * 85  # 7 classes, not 10
    assert 0.15 < float(jnp.std(params["Dense_0"]["kernel"])) < 0.25


def test_alexnet_shapes() -> None:
    model = AlexNet(num_classes=100)
    x = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.eval_shape(model.apply, variables, x).shape == (8, 100)
    n = sum(p.size for p in jax.tree.leaves(variables["params"]))
    assert n == 2_472_266 + 90 * 257  # 2.47 M at 10 classes (as in PyTorch)


def test_resnet18_shapes_and_batch_stats() -> None:
    model = ResNet18(num_classes=10)
    x = jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert set(variables) == {"params", "batch_stats"}
    assert sum(p.size for p in jax.tree.leaves(variables["params"])) == 11_173_962
    out, upd = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x
    )
    assert out.shape == (4, 10)
    assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_resnet18_batch_stats_update_and_eval_mode() -> None:
    # One block per stage and an 8x8 input keep this fast; the blocks are ResNet-18's.
    model = ResNet18(num_classes=3, stage_sizes=(1, 1, 1, 1))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)) * 2.0 + 1.0
    variables = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(1), x)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    out_train, upd = train(variables, x)
    assert out_train.shape == (2, 3)
    stem_old = variables["batch_stats"]["BatchNorm_0"]["mean"]
    stem_new = upd["batch_stats"]["BatchNorm_0"]["mean"]
    assert float(jnp.max(jnp.abs(stem_new - stem_old))) > 0  # running mean moved
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    out_eval = evaluate({**variables, "batch_stats": upd["batch_stats"]}, x)
    assert out_eval.shape == (2, 3) and bool(jnp.all(jnp.isfinite(out_eval)))
    with pytest.raises(Exception):  # noqa: B017 - flax raises when batch_stats is not mutable
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True), variables, x)


# ----------------------------------------------------------------------------- _compile.jit


def test_cpu_compiler_options_only_on_cpu() -> None:
    assert _compile.cpu_compiler_options("gpu") == {}
    assert _compile.cpu_compiler_options("tpu") == {}
    opts = _compile.cpu_compiler_options("cpu")
    assert opts in ({}, _compile.CPU_COMPILER_OPTIONS)
    if jax.default_backend() == "cpu":
        assert opts == _compile.CPU_COMPILER_OPTIONS  # this jaxlib accepts the option


def test_cpu_compiler_options_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PNJAX_NO_CPU_COMPILER_OPTIONS", "1")
    assert _compile.cpu_compiler_options("cpu") == {}


def test_jit_matches_jax_jit_and_compiles_once() -> None:
    model = LeNet5()
    x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    y = jnp.arange(8) % 10
    params = model.init(jax.random.key(1), x)["params"]
    tx = optax.adam(1e-3)
    traces = []

    def step(p, o, x, y):  # noqa: ANN001, ANN202
        traces.append(1)
        (loss, g) = _loss_and_grads(model, p, x, y)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    fast = _compile.jit(step)
    ref = jax.jit(step)
    o = tx.init(params)
    p1, _, l1 = fast(params, o, x, y)
    p2, _, l2 = ref(params, o, x, y)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    assert _max_abs(p1, p2) < 1e-6
    n = len(traces)
    fast(p1, o, x + 1.0, y)  # same shapes and dtypes: no retrace, no recompile
    assert len(traces) == n
    assert fast.lower(params, o, x, y).compile() is not None
    if jax.default_backend() == "cpu":
        assert "xla_cpu_experimental_ynn_fusion_type" in fast.compiler_options
    fast(params, o, x[:4], y[:4])  # a new shape compiles once more
    assert len(traces) == n + 1


def test_jit_static_args_donation_and_decorator() -> None:
    @_compile.jit(static_argnames="n")
    def power(x: jax.Array, n: int) -> jax.Array:
        return x**n

    np.testing.assert_allclose(power(jnp.arange(3.0), n=3), jnp.arange(3.0) ** 3)
    np.testing.assert_allclose(power(jnp.arange(3.0), n=2), jnp.arange(3.0) ** 2)
    f = _compile.jit(lambda x, n: x * n, static_argnums=1, donate_argnums=0)
    np.testing.assert_allclose(f(jnp.ones(4), 3), jnp.full(4, 3.0))
    g = _compile.jit(lambda x: x + 1, compiler_options={"xla_cpu_enable_fast_math": False})
    np.testing.assert_allclose(g(jnp.zeros(2)), jnp.ones(2))
    assert power.__name__ == "power"


# ----------------------------------------------------------------------------- dense matmul


def test_dense_matmul_same_values_and_derivatives_as_matmul() -> None:
    from pnjax.models.dense import matmul

    h = jax.random.normal(jax.random.key(0), (7, 5))
    w = jax.random.normal(jax.random.key(1), (5, 3))
    ct = jax.random.normal(jax.random.key(2), (7, 3))
    np.testing.assert_array_equal(matmul(h, w), h @ w)

    def loss(f):  # noqa: ANN001, ANN202
        return lambda h, w: jnp.vdot(jnp.tanh(f(h, w)), ct)

    fast, ref = loss(matmul), loss(jnp.matmul)
    g, g_ref = jax.grad(fast, (0, 1))(h, w), jax.grad(ref, (0, 1))(h, w)
    assert _max_abs(g, g_ref) < 1e-5
    # forward mode and second order: Hessian-vector products and a full Hessian in w
    v = jax.random.normal(jax.random.key(3), w.shape)
    hvp = jax.jvp(lambda w: jax.grad(fast, 1)(h, w), (w,), (v,))[1]
    hvp_ref = jax.jvp(lambda w: jax.grad(ref, 1)(h, w), (w,), (v,))[1]
    np.testing.assert_allclose(hvp, hvp_ref, atol=1e-5)
    np.testing.assert_allclose(jax.hessian(fast, 1)(h, w), jax.hessian(ref, 1)(h, w), atol=1e-5)
    # vmapped over a leading chain axis of both operands
    hs, ws = jnp.stack([h, 2 * h]), jnp.stack([w, -w])
    gv = jax.vmap(jax.grad(fast, 1))(hs, ws)
    gv_ref = jax.vmap(jax.grad(ref, 1))(hs, ws)
    np.testing.assert_allclose(gv, gv_ref, atol=1e-5)


def test_dense_dot_general_falls_back_outside_the_plain_2d_case() -> None:
    from jax import lax

    from pnjax.models.dense import dot_general

    x3 = jax.random.normal(jax.random.key(0), (2, 4, 5))
    w = jax.random.normal(jax.random.key(1), (5, 3))
    dn = (((2,), (0,)), ((), ()))
    np.testing.assert_array_equal(dot_general(x3, w, dn), lax.dot_general(x3, w, dn))
    x2 = x3[0]
    dn2 = (((1,), (0,)), ((), ()))
    hi = dot_general(x2, w, dn2, precision=lax.Precision.HIGHEST)
    np.testing.assert_allclose(hi, lax.dot_general(x2, w, dn2, precision="highest"), rtol=1e-6)


def test_kink_mlp_fast_matmul_matches_nn_dense() -> None:
    from pnjax.models import KinkMLP

    x = jnp.linspace(-2.0, 2.0, 60)[:, None]
    y = jnp.abs(x)
    fast, ref = KinkMLP(), KinkMLP(fast_matmul=False)
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(lambda k: fast.init(k, x)["params"])(keys)
    params_ref = jax.vmap(lambda k: ref.init(k, x)["params"])(keys)
    assert jax.tree.structure(params) == jax.tree.structure(params_ref)
    assert _max_abs(params, params_ref) == 0.0  # same parameter tree and initialization

    def loss(model):  # noqa: ANN001, ANN202
        return lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    out = jax.vmap(lambda p: fast.apply({"params": p}, x))(params)
    np.testing.assert_allclose(out, jax.vmap(lambda p: ref.apply({"params": p}, x))(params))
    g = jax.jit(jax.vmap(jax.grad(loss(fast))))(params)
    g_ref = jax.jit(jax.vmap(jax.grad(loss(ref))))(params)
    assert _max_abs(g, g_ref) < 1e-5
