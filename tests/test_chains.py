"""run_chains: equality with persistent_fit per chain, population semantics, compile-once, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TwoDense

import pnjax

X = jnp.linspace(-1, 1, 48).reshape(16, 3)
Y = jnp.sin(3 * X[:, :1])
C = 3


def mse(params, batch=None):
    x, y = (X, Y) if batch is None else batch
    return jnp.mean((TwoDense().apply({"params": params}, x) - y) ** 2)


@pytest.fixture(scope="module")
def inits():
    keys = jax.random.split(jax.random.key(0), C)
    return jax.vmap(lambda k: TwoDense().init(k, jnp.ones((1, 3)))["params"])(keys)


def chain(tree, c):
    return jax.tree_util.tree_map(lambda x: x[c], tree)


def assert_same_history(fit, res, c, rtol=1e-4):
    for k in ("score", "loss", "penalty", "curve"):
        np.testing.assert_allclose(res.history[k][c], fit.history[k], rtol=rtol, atol=1e-6)
    for k in ("layer", "diverged", "pushed"):
        np.testing.assert_array_equal(res.history[k][c], fit.history[k])
    assert res.champion_iteration[c] == fit.champion_iteration


def test_independent_equals_persistent_fit_per_chain(inits):
    """Per-chain init, λ, layer choice (all / fixed / random per iteration) and key."""
    keys = jax.random.split(jax.random.key(5), C)
    lams = np.array([0.0, 0.05, 0.2], np.float32)
    layers = [None, "Dense_1", "random"]
    kw = dict(iterations=3, steps=30, layer_draw="per_iteration")
    res = pnjax.run_chains(
        inits, mse, optax.adam(1e-2), lam=lams, chain_layers=layers, key=keys, **kw
    )
    assert isinstance(res, pnjax.ChainsResult) and res.num_chains == C
    assert res.history["curve"].shape[:2] == (C, 4)
    assert (
        res.history["layer"][0].tolist() == [-1] * 4 and res.history["layer"][1].tolist() == [1] * 4
    )
    for c in (1, 2):  # chain 0 (λ = 0, every layer) is the plain case test_minibatch covers
        fit = pnjax.persistent_fit(
            chain(inits, c),
            mse,
            optax.adam(1e-2),
            lam=float(lams[c]),
            layers=layers[c],
            key=keys[c],
            **kw,
        )
        assert_same_history(fit, res, c)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            res.chain(c).champion,
            fit.champion,
        )
        np.testing.assert_allclose(res.chain(c).bank.sq_norms, fit.bank.sq_norms, rtol=1e-4)
    assert int(res.chain(2).bank.count) == 4


def test_minibatch_form_equals_persistent_fit(inits):
    keys = jax.random.split(jax.random.key(1), C)
    kw = dict(iterations=2, lam=0.05, data=(X, Y), batch_size=4, epochs=2, shuffle="per_iteration")
    res = pnjax.run_chains(inits, mse, optax.adam(1e-2), key=keys, **kw)
    for c in (2,):
        fit = pnjax.persistent_fit(chain(inits, c), mse, optax.adam(1e-2), key=keys[c], **kw)
        assert_same_history(fit, res, c)


def test_population_shared_bank(inits):
    """Round r trains each chain from its own init against every solution of rounds < r."""
    lam, steps, rounds = 0.05, 25, 3
    res = pnjax.run_chains(
        inits,
        mse,
        optax.sgd(1e-2),
        iterations=rounds - 1,
        lam=lam,
        steps=steps,
        mode="population",
    )
    assert res.mode == "population" and res.bank.capacity == rounds * C
    assert int(res.bank.count) == rounds * C  # r * C after r rounds
    assert res.history["pushed"].all()
    assert np.all(res.history["penalty"][:, 0] == 0) and np.all(res.history["penalty"][:, 1:] > 0)
    # round 1 of chain c = a plain run of L + P over the C solutions of round 0 (slots 0..C-1)
    run = jax.jit(pnjax.make_train_run(mse, optax.sgd(1e-2), steps=steps))
    shared = pnjax.AnchorBank.create(chain(inits, 0), rounds * C)
    for c in range(C):
        shared = shared.push(res.bank.get(c))
    ones = jnp.ones((2,), jnp.float32)
    for c in range(C):
        p, _ = run(chain(inits, c), shared, jnp.float32(lam), ones, jax.random.key(0))
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            p,
            res.bank.get(C + c),
        )


def test_compiles_once_whatever_the_iterations(inits):
    traces = []

    def loss(p):
        traces.append(1)
        return mse(p)

    def count(iterations, mode):
        traces.clear()
        pnjax.run_chains(
            inits, loss, optax.adam(1e-2), iterations=iterations, lam=0.01, steps=5, mode=mode
        )
        return len(traces)

    assert count(1, "independent") == count(4, "independent") >= 1


def test_divergence_is_per_chain(inits):
    # chain 1's λ is so large that every penalized run blows up; its plain run is fine
    res = pnjax.run_chains(
        inits, mse, optax.sgd(1e-2), iterations=2, lam=jnp.array([0.01, 1e30, 0.01]), steps=20
    )
    d = res.history["diverged"]
    assert d[1].tolist() == [False, True, True] and not d[[0, 2]].any()
    assert res.history["pushed"][1].tolist() == [True, False, False]
    assert res.champion_iteration[1] == 0
    assert res.chain(1).bank.count == 1 and res.chain(0).bank.count == 3


def test_random_restarts_best_by_score():
    def init_fn(k):
        return TwoDense().init(k, jnp.ones((1, 3)))["params"]

    def score(p):  # a "validation" score that differs from the loss
        return -mse(p)

    res = pnjax.random_restarts(
        init_fn,
        mse,
        optax.adam(1e-2),
        num_restarts=4,
        steps=20,
        score_fn=score,
        key=jax.random.key(2),
    )
    assert res.scores.shape == (4,) and res.champion_index == int(np.argmin(res.scores))
    np.testing.assert_allclose(-float(mse(res.champion)), res.scores.min(), rtol=1e-5)
    with pytest.raises(ValueError, match="num_restarts must be an int >= 1"):
        pnjax.random_restarts(
            init_fn, mse, optax.sgd(1e-2), num_restarts=0, steps=1, key=jax.random.key(0)
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "swarm"}, r"unknown mode 'swarm'; use mode='independent'"),
        ({"lam": [0.1, 0.2]}, r"lam has shape \(2,\), but there are 3 chains; pass a scalar"),
        ({"lam": -1.0}, "lam must be finite and >= 0"),
        ({"layers": [None, None]}, "for one choice per chain pass chain_layers="),
        ({"layers": "Dense_7"}, "unknown layer name"),
        ({"key": jax.random.split(jax.random.key(0), 2)}, "batch of 3 keys"),
        ({"iterations": -1}, "iterations must be an int >= 0"),
        ({"capacity": 1, "mode": "population"}, "capacity=1 is smaller than the 3 anchors"),
        ({"batch_size": 4}, "need data="),
    ],
)
def test_bad_arguments(inits, kwargs, match):
    args = {"iterations": 1, "lam": 0.01, "steps": 5} | kwargs
    with pytest.raises(ValueError, match=match):
        pnjax.run_chains(inits, mse, optax.sgd(1e-2), **args)


def test_leading_axes_must_agree(inits):
    bad = {**inits, "Dense_0": jax.tree_util.tree_map(lambda x: x[:2], inits["Dense_0"])}
    with pytest.raises(ValueError, match=r"different leading \(chain\) axes \[2, 3\]"):
        pnjax.run_chains(bad, mse, optax.sgd(1e-2), iterations=1, lam=0.01, steps=5)
    with pytest.raises(ValueError, match="needs a leading chain axis"):
        pnjax.run_chains(
            {"w": jnp.float32(1.0)}, mse, optax.sgd(1e-2), iterations=1, lam=0.0, steps=1
        )


def test_checkpointed_run_resumes_bit_identical(tmp_path):
    """run_chains(checkpoint_dir=...) resumes after an interruption and equals a plain run."""
    pytest.importorskip("orbax.checkpoint")
    from pnjax.experiments.toy2d import TOY_START, toy_loss

    starts = jnp.stack([TOY_START, TOY_START + 0.05, TOY_START - 0.05])
    kw = dict(iterations=3, lam=jnp.array([0.1, 0.05, 0.0]), steps=300)
    ref = pnjax.run_chains(starts, toy_loss, optax.sgd(1e-1), **kw)
    full = pnjax.run_chains(
        starts, toy_loss, optax.sgd(1e-1), checkpoint_dir=tmp_path, checkpoint_keep=10, **kw
    )
    from pnjax import checkpoint as ckpt

    assert ckpt.checkpoint_steps(tmp_path) == [1, 2, 3, 4]
    # drop the newest steps: as if the run had died during iteration 2
    import shutil

    for step in (3, 4):
        shutil.rmtree(tmp_path / str(step))
    assert ckpt.checkpoint_steps(tmp_path) == [1, 2]
    resumed = pnjax.run_chains(starts, toy_loss, optax.sgd(1e-1), checkpoint_dir=tmp_path, **kw)
    assert ckpt.checkpoint_steps(tmp_path)[-1] == 4
    for res in (full, resumed):
        np.testing.assert_array_equal(res.history["loss"], ref.history["loss"])
        np.testing.assert_array_equal(res.champion_iteration, ref.champion_iteration)
        np.testing.assert_array_equal(np.asarray(res.champion), np.asarray(ref.champion))
        np.testing.assert_array_equal(np.asarray(res.bank.anchors), np.asarray(ref.bank.anchors))
    with pytest.raises(ValueError, match="lam"):
        pnjax.run_chains(
            starts,
            toy_loss,
            optax.sgd(1e-1),
            checkpoint_dir=tmp_path,
            **(kw | {"lam": jnp.array([0.2, 0.05, 0.0])}),
        )


@pytest.mark.parametrize("mode", ["independent", "population"])
@pytest.mark.parametrize("form", ["full", "mini"])
def test_python_loop_equals_scan(mode, form):
    from conftest import TwoDense

    x = jnp.linspace(-1, 1, 48).reshape(16, 3)
    y = jnp.sin(3 * x[:, :1])
    model = TwoDense()
    inits = jax.vmap(lambda k: model.init(k, x[:1])["params"])(
        jax.random.split(jax.random.key(0), 3)
    )

    def loss(p, batch=None):
        xb, yb = (x, y) if batch is None else batch
        return jnp.mean((model.apply({"params": p}, xb) - yb) ** 2)

    kw = dict(iterations=2, lam=jnp.array([0.0, 0.05, 0.1]), key=jax.random.key(1), mode=mode)
    kw |= (
        dict(steps=20)
        if form == "full"
        else dict(data=(x, y), batch_size=4, epochs=2, shuffle="per_iteration")
    )
    ref = pnjax.run_chains(inits, loss, optax.adam(1e-2), loop="scan", **kw)
    got = pnjax.run_chains(inits, loss, optax.adam(1e-2), loop="python", **kw)
    for k in ("loss", "score", "penalty", "curve", "pushed", "diverged"):
        np.testing.assert_allclose(got.history[k], ref.history[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.champion_iteration, ref.champion_iteration)
    with pytest.raises(ValueError, match="loop must be"):
        pnjax.run_chains(inits, loss, optax.adam(1e-2), loop="while", **kw)
