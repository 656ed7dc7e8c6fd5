import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TwoDense

import pnjax
from pnjax.experiments.toy2d import TOY_START, toy_loss

X = jnp.linspace(-1, 1, 48).reshape(16, 3)
Y = jnp.sin(3 * X[:, :1])


@pytest.fixture
def init(linen_params):
    return linen_params


def mse(params, batch=None):
    x, y = (X, Y) if batch is None else batch
    return jnp.mean((TwoDense().apply({"params": params}, x) - y) ** 2)


def test_toy2d_escape():
    """Section 2: plain GD ends at (2, -2); persistent iteration 1 reaches (-2, -1)."""
    res = pnjax.persistent_fit(
        TOY_START, toy_loss, optax.sgd(1e-3), iterations=1, lam=0.1, steps=50_000
    )
    np.testing.assert_allclose(res.bank.get(0), [2.0, -2.0], atol=0.02)
    np.testing.assert_allclose(res.bank.get(1), [-2.0, -1.0], atol=0.05)
    assert res.champion_iteration == 1
    assert res.history["loss"][1] < res.history["loss"][0] - 0.4


def test_all_iterations_compile_once(init):
    traces = []

    def loss(p):
        traces.append(1)
        return mse(p)

    def count(iterations):
        traces.clear()
        pnjax.persistent_fit(
            init, loss, optax.adam(1e-2), iterations=iterations, lam=0.01, steps=20
        )
        return len(traces)

    assert count(1) == count(5) >= 1


def test_result_fields_and_championship(init):
    scores = []

    def score(p):
        return mse(p) + 0.0

    res = pnjax.persistent_fit(
        init,
        mse,
        optax.adam(1e-2),
        iterations=3,
        lam=0.05,
        steps=50,
        score_fn=score,
        callback=lambda n, info: scores.append(info["score"]),
    )
    h = res.history
    assert set(h) >= {"score", "loss", "penalty", "curve", "layer", "diverged", "pushed"}
    assert h["score"].shape == (4,) and h["curve"].shape[0] == 4
    assert res.champion_iteration == int(np.argmin(h["score"]))
    assert int(res.bank.count) == 4
    assert h["penalty"][0] == 0.0 and np.all(h["penalty"][1:] > 0)
    np.testing.assert_allclose(scores, h["score"])
    np.testing.assert_allclose(
        float(mse(res.champion)), h["loss"][res.champion_iteration], rtol=1e-5
    )
    # every run starts from the same init: the plain run is repeatable
    again = pnjax.persistent_fit(init, mse, optax.adam(1e-2), iterations=0, lam=0.05, steps=50)
    np.testing.assert_allclose(again.history["loss"][0], h["loss"][0], rtol=1e-6)


def test_iteration_uses_anchors_of_previous_runs(init):
    """Run 1 must equal a plain training of L + P with the plain run's solution as anchor."""
    res = pnjax.persistent_fit(init, mse, optax.sgd(1e-2), iterations=1, lam=0.1, steps=30)
    bank = pnjax.AnchorBank.create(init, 2).push(res.bank.get(0))
    p, opt = init, optax.sgd(1e-2)
    s = opt.init(p)
    total = jax.jit(jax.grad(lambda q: mse(q) + pnjax.persistent_penalty(q, bank, 0.1)))
    for _ in range(30):
        u, s = opt.update(total(p), s, p)
        p = optax.apply_updates(p, u)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p, res.bank.get(1)
    )


@pytest.mark.parametrize("draw", ["once", "per_iteration"])
def test_random_layer(init, draw):
    res = pnjax.persistent_fit(
        init,
        mse,
        optax.adam(1e-2),
        iterations=6,
        lam=0.01,
        steps=5,
        layers="random",
        key=jax.random.key(3),
        layer_draw=draw,
    )
    layers = res.history["layer"]
    assert layers.shape == (7,) and set(layers.tolist()) <= {0, 1}
    if draw == "once":
        assert len(set(layers.tolist())) == 1
    seeds = [
        tuple(
            pnjax.persistent_fit(
                init,
                mse,
                optax.adam(1e-2),
                iterations=6,
                lam=0.01,
                steps=1,
                layers="random",
                key=jax.random.key(s),
                layer_draw=draw,
            )
            .history["layer"]
            .tolist()
        )
        for s in range(6)
    ]
    assert len(set(seeds)) > 1, "the layer must depend on the key"


def test_fixed_layer_penalizes_only_that_layer(init):
    res = pnjax.persistent_fit(
        init, mse, optax.sgd(1e-2), iterations=1, lam=0.1, steps=10, layers=("Dense_1",)
    )
    assert res.history["layer"].tolist() == [1, 1]


def test_minibatch_form(init):
    data = (X, Y)
    res = pnjax.persistent_fit(
        init,
        mse,
        optax.adam(1e-2),
        iterations=2,
        lam=0.01,
        data=data,
        batch_size=4,
        epochs=3,
        key=jax.random.key(0),
    )
    assert res.history["curve"].shape == (3, 3)
    np.testing.assert_allclose(res.history["loss"][0], float(mse(res.bank.get(0))), rtol=1e-5)
    assert res.history["loss"][0] < float(mse(init))


def test_divergence_is_marked_not_pushed_not_champion(init):
    # a learning rate so large that every run blows up
    res = pnjax.persistent_fit(init, mse, optax.sgd(1e6), iterations=2, lam=0.01, steps=50)
    assert res.history["diverged"].all()
    assert not res.history["pushed"].any()
    assert res.champion_iteration == -1 and int(res.bank.count) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"iterations": -1}, "iterations must be an int >= 0"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"lam": -0.5}, "lam must be finite and >= 0"),
        ({"lam": float("nan")}, "lam must be finite and >= 0"),
        ({"capacity": 1, "iterations": 3}, "capacity=1 is smaller than iterations=3"),
        ({"layers": ("Dense_9",)}, "unknown layer name"),
        ({"layers": "random"}, "pass key="),
        ({"layers": "random", "key": jax.random.key(0), "layer_draw": "always"}, "layer_draw"),
        ({"shuffle": "never"}, "shuffle must be"),
        ({"batch_size": 4}, "need data="),
    ],
)
def test_bad_arguments(init, kwargs, match):
    args = {"iterations": 1, "lam": 0.01, "steps": 5} | kwargs
    with pytest.raises(ValueError, match=match):
        pnjax.persistent_fit(init, mse, optax.sgd(1e-2), **args)


@pytest.mark.parametrize("form", ["full", "mini"])
def test_python_loop_equals_scan_and_compiles_once(init, form):
    traces = []

    def loss(p, batch=None):
        traces.append(1)
        return mse(p, batch)

    kw = dict(iterations=2, lam=0.05, key=jax.random.key(0))
    if form == "full":
        kw |= dict(steps=25)
    else:
        kw |= dict(data=(X, Y), batch_size=4, epochs=2)
    ref = pnjax.persistent_fit(init, loss, optax.adam(1e-2), **kw)
    traces.clear()
    got = pnjax.persistent_fit(init, loss, optax.adam(1e-2), loop="python", **kw)
    n_traces = len(traces)
    for k in ("loss", "score", "penalty", "curve"):
        np.testing.assert_allclose(got.history[k], ref.history[k], rtol=1e-5, atol=1e-7)
    assert got.champion_iteration == ref.champion_iteration
    traces.clear()
    pnjax.persistent_fit(init, loss, optax.adam(1e-2), loop="python", **(kw | {"iterations": 4}))
    assert len(traces) == n_traces, "more iterations must not trace the step again"
    with pytest.raises(ValueError, match="loop must be"):
        pnjax.persistent_fit(init, loss, optax.adam(1e-2), loop="while", **kw)


def test_auto_loop_picks_python_for_convolutions_on_cpu(init):
    import flax.linen as nn

    from pnjax.fit import choose_loop

    class Conv(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1)(nn.Conv(2, (3, 3))(x).reshape(x.shape[0], -1))

    x = jnp.ones((2, 4, 4, 1))
    p = Conv().init(jax.random.key(0), x)["params"]
    want = "python" if jax.default_backend() == "cpu" else "scan"
    assert choose_loop(lambda q: jnp.mean(Conv().apply({"params": q}, x)), p, None) == want
    assert choose_loop(mse, init, None) == "scan"
    assert choose_loop(mse, init, (X, Y)) == "scan"
