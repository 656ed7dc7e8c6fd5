"""The shared driver pieces: features both drivers now have, persistent_search, old checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pnjax
from pnjax.loop import init_state, record

X = jnp.linspace(-1, 1, 32).reshape(16, 2)
Y = jnp.sin(3 * X[:, :1])


def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "Dense_0": {"kernel": jax.random.normal(k1, (2, 4)), "bias": jnp.zeros(4)},
        "Dense_1": {"kernel": jax.random.normal(k2, (4, 1)) / 2, "bias": jnp.zeros(1)},
        "Dense_2": {"kernel": jnp.ones((1, 1)), "bias": jnp.zeros(1)},
    }


def loss(p, batch=None):
    x, y = (X, Y) if batch is None else batch
    h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    h = h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    return jnp.mean((h @ p["Dense_2"]["kernel"] + p["Dense_2"]["bias"] - y) ** 2)


C = 2
INITS = jax.vmap(init)(jax.random.split(jax.random.key(0), C))


def one(tree, c):
    return jax.tree_util.tree_map(lambda x: x[c], tree)


def test_record_push_championship_history():
    params = {"a": {"w": jnp.ones(2)}}
    shapes = {"score": jax.ShapeDtypeStruct((), jnp.float32)}
    s = init_state(params, (), shapes, iterations=2, capacity=3, keep_finals=False)
    s = record(s, 0, params, (), {"score": jnp.float32(2.0)}, params)
    bad = {"a": {"w": jnp.array([jnp.nan, 1.0])}}
    s = record(s, 1, bad, (), {"score": jnp.float32(0.0)}, bad)
    s = record(s, 2, params, (), {"score": jnp.float32(1.0)}, params)
    assert s.history["diverged"].tolist() == [False, True, False]
    assert s.history["pushed"].tolist() == [True, False, True]
    assert int(s.champion_iteration) == 2 and int(s.bank.count) == 2 and int(s.done) == 3
    # independent chains: jax.vmap of the same function
    two = jax.vmap(lambda p: init_state(p, (), shapes, iterations=0, capacity=1,
                                        keep_finals=False))(  # fmt: skip
        {"a": {"w": jnp.ones((2, 2))}}
    )
    out = jax.vmap(lambda st, sc: record(st, 0, {"a": {"w": jnp.ones(2)}}, (), {"score": sc},
                                         {"a": {"w": jnp.ones(2)}}))(two, jnp.array([1.0, jnp.nan]))  # fmt: skip
    assert out.history["pushed"][:, 0].tolist() == [True, False]


def test_run_chains_callback_anchor_fn_and_several_layers():
    seen = []

    def halve(p, key):
        return jax.tree_util.tree_map(lambda x: 0.5 * x, p)

    kw = dict(iterations=2, lam=0.05, steps=20, key=jax.random.key(1), anchor_fn=halve)
    layers = [("Dense_0", "Dense_2"), None]  # a set of two layers: masks, not one index
    res = pnjax.run_chains(INITS, loss, optax.sgd(0.05), chain_layers=layers,
                           callback=lambda n, info: seen.append((n, info)), **kw)  # fmt: skip
    assert [n for n, _ in seen] == [0, 1, 2]
    assert seen[-1][1]["score"].shape == (C,)
    np.testing.assert_array_equal(seen[-1][1]["champion_iteration"], res.champion_iteration)
    assert res.history["layer"].tolist() == [[-2] * 3, [-1] * 3]  # -2: several layers
    assert res.history["layer_mask"][0].tolist() == [[True, False, True]] * 3
    for c in range(C):
        fit = pnjax.persistent_fit(one(INITS, c), loss, optax.sgd(0.05), layers=layers[c],
                                   **(kw | {"key": jax.random.split(kw["key"], C)[c]}))  # fmt: skip
        np.testing.assert_allclose(res.history["loss"][c], fit.history["loss"], rtol=1e-5)
        np.testing.assert_allclose(
            np.asarray(res.chain(c).bank.anchors["Dense_1"]["kernel"]),
            np.asarray(fit.bank.anchors["Dense_1"]["kernel"]),
            rtol=1e-5,
            atol=1e-7,
        )
        np.testing.assert_allclose(  # what was pushed is the halved final params
            np.asarray(fit.bank.get(0)["Dense_1"]["kernel"]),
            0.5 * np.asarray(seen[0][1]["params"]["Dense_1"]["kernel"][c]),
            rtol=1e-6,
        )


def test_run_chains_mid_iteration_checkpoints_resume(tmp_path, monkeypatch):
    pytest.importorskip("orbax.checkpoint")
    from pnjax import checkpoint as ckpt

    kw = dict(iterations=1, lam=0.05, data=(X, Y), batch_size=4, epochs=4, key=jax.random.key(2))
    ref = pnjax.run_chains(INITS, loss, optax.adam(1e-2), loop="scan", **kw)
    real = ckpt.save_checkpoint

    class Interrupted(Exception):
        pass

    def save(directory, step, state, metadata=None, **k):
        path = real(directory, step, state, metadata, **k)
        if metadata["done"] == 1 and metadata["partial_epochs"] > 0:
            raise Interrupted
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    with pytest.raises(Interrupted):
        pnjax.run_chains(INITS, loss, optax.adam(1e-2), checkpoint_dir=tmp_path,
                         checkpoint_every_epochs=2, **kw)  # fmt: skip
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    got = pnjax.run_chains(INITS, loss, optax.adam(1e-2), checkpoint_dir=tmp_path,
                           checkpoint_every_epochs=2, **kw)  # fmt: skip
    for k in ("loss", "score", "curve"):
        np.testing.assert_allclose(got.history[k], ref.history[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got.champion_iteration, ref.champion_iteration)


def test_checkpoint_scope_numbers_every_driver(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    with pnjax.fit.checkpoint_scope(tmp_path):
        pnjax.persistent_fit(one(INITS, 0), loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=3)
        pnjax.run_chains(INITS, loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-000", "fit-001"]
    with pnjax.fit.checkpoint_scope(tmp_path):
        pnjax.persistent_fit(one(INITS, 0), loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=3)
        again = pnjax.run_chains(INITS, loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=3)
    assert again.history["loss"].shape == (C, 2)


def _sgd_train_fn(steps=30, lr=0.05, lam=0.1):
    tx = optax.chain(pnjax.persistent_bias(pnjax.AnchorBank.create(init(jax.random.key(0)), 4),
                                           lam), optax.sgd(lr))  # fmt: skip

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    def train_fn(params0, bank, n, key):
        s = optax.tree_utils.tree_set(tx.init(params0), bank=bank)
        p = params0
        for _ in range(steps):
            p, s = step(p, s)
        return p

    return train_fn, step


def test_persistent_search_equals_persistent_fit_and_resumes(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    params0 = init(jax.random.key(0))
    train_fn, step = _sgd_train_fn()
    res = pnjax.persistent_search(train_fn, params0, iterations=3, score_fn=loss)
    fit = pnjax.persistent_fit(params0, loss, optax.sgd(0.05), iterations=3, lam=0.1, steps=30)
    np.testing.assert_allclose(res.history["score"], fit.history["loss"], rtol=1e-4, atol=1e-6)
    assert res.champion_iteration == fit.champion_iteration
    assert step._cache_size() == 1
    first = pnjax.persistent_search(train_fn, params0, iterations=3, score_fn=loss,
                                    checkpoint_dir=tmp_path)  # fmt: skip
    calls = []
    again = pnjax.persistent_search(
        lambda *a: calls.append(1) or train_fn(*a), params0, iterations=3, score_fn=loss,
        checkpoint_dir=tmp_path,
    )  # fmt: skip
    assert again.resumed_from == 4 and not calls
    np.testing.assert_array_equal(again.history["score"], first.history["score"])
    with pytest.raises(ValueError, match="iterations: 3 in the checkpoint, 4 now"):
        pnjax.persistent_search(train_fn, params0, iterations=4, score_fn=loss,
                                checkpoint_dir=tmp_path)  # fmt: skip


def test_persistent_search_divergence_and_bad_params():
    params0 = init(jax.random.key(0))

    def train_fn(p, bank, n, key):
        scale = jnp.nan if n == 1 else 1.0 + n
        return jax.tree_util.tree_map(lambda x: x * scale, p)

    res = pnjax.persistent_search(train_fn, params0, iterations=2, score_fn=loss)
    assert res.history["diverged"].tolist() == [False, True, False]
    assert int(res.bank.count) == 2 and res.champion_iteration in (0, 2)
    with pytest.raises(ValueError, match="train_fn returned"):
        pnjax.persistent_search(lambda p, b, n, k: {"w": 1.0}, params0, iterations=0,
                                score_fn=lambda p: 0.0)  # fmt: skip


def test_old_checkpoint_layout_is_refused(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    from pnjax import checkpoint as ckpt

    params0 = init(jax.random.key(0))
    # what pnjax 0.1.0's first persistent_fit saved: field by field, no layout number
    old = {"bank": pnjax.AnchorBank.create(params0, 2), "champion": params0,
           "history": {"score": np.zeros(1, np.float32)}, "rng": jax.random.key(0)}  # fmt: skip
    meta = {"fingerprint": {"iterations": 1, "lam": 0.1}, "done": 1, "partial_epochs": 0,
            "champion_iteration": 0, "champion_score": 1.0, "has_finals": False}  # fmt: skip
    ckpt.save_checkpoint(tmp_path, 1, old, meta)
    with pytest.raises(ValueError, match="checkpoint layout 1 .* cannot resume it"):
        pnjax.persistent_fit(params0, loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=3,
                             checkpoint_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="checkpoint layout 1"):
        pnjax.run_chains(INITS, loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=3,
                         checkpoint_dir=tmp_path)  # fmt: skip


def test_make_train_run_takes_data_as_an_argument():
    """The run's pieces never close over the data: the same jitted core serves any data set."""
    run = pnjax.make_train_run(loss, optax.sgd(0.05), data=(X, Y), batch_size=4, epochs=1)
    core = jax.jit(run.core)
    params0 = init(jax.random.key(0))
    bank = pnjax.AnchorBank.create(params0, 1)
    args = (params0, bank, jnp.float32(0.0), jnp.ones(3), jax.random.key(0), ())
    (p1, _), m1 = core(*args, (X, Y))
    (p2, _), m2 = core(*args, (X[::-1], Y[::-1]))
    assert core._cache_size() == 1
    assert float(m1["loss"]) != float(m2["loss"])
    p3, m3 = jax.jit(run)(*args[:5])
    np.testing.assert_allclose(m3["loss"], m1["loss"], rtol=1e-6)
