"""Driver features: compiled programs kept across calls, λ over time, one meaning of
``layers=``, extending a checkpointed run, starting from a bank, summaries and plots."""

from __future__ import annotations

import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pnjax
from pnjax import programs

X = jnp.linspace(-1, 1, 32).reshape(16, 2)
Y = jnp.sin(3 * X[:, :1])
STEPS = 12
C = 2


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


P0 = init(jax.random.key(0))
INITS = jax.vmap(init)(jax.random.split(jax.random.key(0), C))
# one optimizer object and one set of settings, so the tests share their compiled programs
TX = optax.sgd(0.05)
KW = dict(iterations=2, steps=STEPS)

_COMPILES = [0]


def _listen(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listen)


def compiles(fn):
    """How many XLA programs ``fn()`` compiles, and its result."""
    before = _COMPILES[0]
    out = fn()
    return _COMPILES[0] - before, out


def one(tree, c):
    return jax.tree_util.tree_map(lambda x: x[c], tree)


# ----------------------------------------------------------------------------- 1. cache


def test_persistent_fit_compiles_once_across_calls():
    tx = optax.sgd(0.05)
    kw = dict(iterations=2, steps=STEPS)
    first, ref = compiles(lambda: pnjax.persistent_fit(P0, loss, tx, lam=0.1, **kw))
    assert first > 0
    again, res = compiles(lambda: pnjax.persistent_fit(P0, loss, tx, lam=0.1, **kw))
    assert again == 0
    np.testing.assert_array_equal(res.history["loss"], ref.history["loss"])
    other_p = init(jax.random.key(7))  # made outside the count
    n, res2 = compiles(lambda: pnjax.persistent_fit(other_p, loss, tx, lam=0.3, **kw))
    assert n == 0  # another λ and other init params of the same shapes: nothing compiled
    assert not np.allclose(res2.history["loss"], ref.history["loss"])
    n, _ = compiles(lambda: pnjax.persistent_fit(P0, loss, optax.sgd(0.05), lam=0.1, **kw))
    assert n > 0  # a new optimizer object is a new program


def test_run_chains_compiles_once_across_calls_minibatch():
    tx = optax.adam(1e-2)
    kw = dict(iterations=1, batch_size=4, epochs=2, loop="scan")
    first, _ = compiles(lambda: pnjax.run_chains(INITS, loss, tx, lam=0.1, data=(X, Y), **kw))
    assert first > 0
    # other data of the same shapes, other λ, other keys (made outside the count)
    data2, lam2, key2 = (X[::-1], Y[::-1]), jnp.array([0.0, 0.2]), jax.random.key(3)
    n, _ = compiles(
        lambda: pnjax.run_chains(INITS, loss, tx, lam=lam2, data=data2, key=key2, **kw)
    )
    assert n == 0


def test_cache_keeps_no_loss_fn_alive():
    def my_loss(p):
        return loss(p)

    ref = weakref.ref(my_loss)
    tx = optax.sgd(0.05)  # kept: an entry lives as long as all its objects
    pnjax.persistent_fit(P0, my_loss, tx, iterations=0, lam=0.0, steps=3)
    size = programs.size()
    del my_loss
    gc.collect()
    assert ref() is None
    assert programs.size() < size  # its entry is dropped


# ----------------------------------------------------------------------------- 2. λ over time


def test_prepared_program_runs_after_the_inline_optimizer_and_loss_are_gone():
    # the cache reaches user objects weakly; the prepared program must still hold them
    from pnjax.chains import prepare_chains

    want = pnjax.run_chains(INITS, loss, TX, lam=0.1, **KW)
    prep = prepare_chains(INITS, lambda p: loss(p), optax.sgd(0.05), lam=0.1, **KW)
    gc.collect()
    got = prep.finish(prep.compiled(*prep.args))
    np.testing.assert_allclose(got.history["loss"], want.history["loss"], rtol=1e-6)
    assert prep.compiled.lower(*prep.args).compile() is not None


def test_lam_schedule_counts_updates_within_each_run():
    tx, kw = TX, KW
    const = pnjax.persistent_fit(P0, loss, tx, lam=0.2, **kw)
    # λ = 0.2 for the first STEPS updates: with count restarting in every run, every run is
    # penalized throughout; with a global count, runs 1 and 2 would be plain runs.
    sched = pnjax.persistent_fit(
        P0, loss, tx, lam=optax.piecewise_constant_schedule(0.2, {STEPS: 0.0}), **kw
    )
    np.testing.assert_allclose(sched.history["loss"], const.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(sched.history["lam"], [0.2, 0.2, 0.2])
    ramp = pnjax.persistent_fit(P0, loss, tx, lam=optax.linear_schedule(0.0, 0.4, STEPS), **kw)
    np.testing.assert_allclose(ramp.history["lam"], 0.4 * (STEPS - 1) / STEPS, rtol=1e-6)
    assert not np.allclose(ramp.history["loss"][1:], const.history["loss"][1:])
    with pytest.raises(ValueError, match="λ must be finite and >= 0"):
        pnjax.persistent_fit(P0, loss, tx, lam=lambda t: -1.0 + 0.0 * t, **kw)


def test_lam_per_iteration_both_drivers():
    tx, kw = TX, KW
    res = pnjax.persistent_fit(P0, loss, tx, lam=[0.0, 0.3], **kw)
    np.testing.assert_allclose(res.history["lam"], [0.0, 0.0, 0.3])
    # λ_1 = 0: run 1 repeats the plain run; run 2 is repelled
    np.testing.assert_allclose(res.history["loss"][1], res.history["loss"][0], rtol=1e-6)
    assert not np.isclose(res.history["loss"][2], res.history["loss"][0])
    with pytest.raises(ValueError, match="2 persistent iterations"):
        pnjax.persistent_fit(P0, loss, tx, lam=[0.1, 0.2, 0.3, 0.4], **kw)
    lams = np.array([[0.0, 0.3], [0.3, 0.1]], np.float32)  # [C, N]
    ch = pnjax.run_chains(INITS, loss, tx, lam=lams, key=jax.random.key(2), **kw)
    np.testing.assert_allclose(ch.history["lam"], [[0.0, 0.0, 0.3], [0.3, 0.3, 0.1]])
    fit = pnjax.persistent_fit(one(INITS, 1), loss, tx, lam=list(lams[1]),
                               key=jax.random.split(jax.random.key(2), C)[1], **kw)  # fmt: skip
    np.testing.assert_allclose(ch.history["loss"][1], fit.history["loss"], rtol=1e-5)
    sch = pnjax.run_chains(INITS, loss, tx, lam=optax.linear_schedule(0.0, 0.4, STEPS), **kw)
    np.testing.assert_allclose(sch.history["lam"], 0.4 * (STEPS - 1) / STEPS, rtol=1e-6)


# ----------------------------------------------------------------------------- 3. layers=


def test_layers_is_one_set_in_both_drivers():
    tx, kw = TX, KW | {"lam": 0.1}
    both = ["Dense_0", "Dense_2"]  # C = 2 names: a set, not one per chain
    ch = pnjax.run_chains(INITS, loss, tx, layers=both, **kw)
    assert ch.history["layer"].tolist() == [[-2] * 3] * C  # -2: several layers
    assert ch.history["layer_mask"].tolist() == [[[True, False, True]] * 3] * C
    fit = pnjax.persistent_fit(one(INITS, 1), loss, tx, layers=both,
                               key=jax.random.split(jax.random.key(0), C)[1], **kw)  # fmt: skip
    assert fit.history["layer"].tolist() == [-2] * 3
    assert fit.history["layer_mask"].tolist() == [[True, False, True]] * 3
    np.testing.assert_allclose(ch.history["loss"][1], fit.history["loss"], rtol=1e-5)
    per = pnjax.run_chains(INITS, loss, tx, chain_layers=[None, "Dense_1"], **kw)
    assert per.history["layer"].tolist() == [[-1] * 3, [1] * 3]
    for bad in ([None, "Dense_1"], ["random", None], np.array([[0, 0, 0], [1, 1, 1]])):
        with pytest.raises(ValueError, match="chain_layers="):
            pnjax.run_chains(INITS, loss, tx, layers=bad, **kw)
    with pytest.raises(ValueError, match="not both"):
        pnjax.run_chains(INITS, loss, tx, layers="Dense_0", chain_layers=[None, None], **kw)


# ----------------------------------------------------------------------------- 4. extend, bank


def test_extend_a_finished_checkpointed_run(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    tx = TX
    kw = dict(lam=0.1, steps=STEPS, checkpoint_dir=tmp_path / "run")
    short = pnjax.persistent_fit(P0, loss, tx, iterations=1, **kw)
    assert short.resumed_from == 0
    longer = pnjax.persistent_fit(P0, loss, tx, iterations=2, **kw)
    assert longer.resumed_from == 2 and len(longer.history["loss"]) == 3
    fresh = pnjax.persistent_fit(P0, loss, tx, lam=0.1, **KW)
    np.testing.assert_allclose(longer.history["loss"], fresh.history["loss"], rtol=1e-5)
    assert int(longer.bank.count) == 3 and longer.bank.capacity == 3
    with pytest.raises(ValueError, match="pass iterations >= 2"):
        pnjax.persistent_fit(P0, loss, tx, iterations=1, **kw)
    with pytest.raises(ValueError, match="different configuration"):
        pnjax.persistent_fit(P0, loss, tx, iterations=3, **(kw | {"lam": 0.2}))


def test_start_from_a_bank():
    tx = TX
    kw = dict(lam=0.1, steps=STEPS)
    whole = pnjax.persistent_fit(P0, loss, tx, **(KW | kw))
    first = pnjax.persistent_fit(P0, loss, tx, iterations=0, **kw)
    rest = pnjax.persistent_fit(P0, loss, tx, iterations=1, init_bank=first.bank, **kw)
    # runs 0 and 1 of `rest` are runs 1 and 2 of `whole`: same anchors before them
    np.testing.assert_allclose(rest.history["loss"], whole.history["loss"][1:], rtol=1e-5)
    assert rest.history["penalty"][0] > 0 and int(rest.bank.count) == 3
    ch = pnjax.run_chains(jax.tree_util.tree_map(lambda x: x[None], P0), loss, tx,
                          iterations=1, init_bank=first.bank, **kw)  # fmt: skip
    np.testing.assert_allclose(ch.history["loss"][0], rest.history["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="AnchorBank"):
        pnjax.persistent_fit(P0, loss, tx, iterations=1, init_bank={"a": 1}, **kw)


# ----------------------------------------------------------------------------- 5. reading results


def test_summary_and_plot():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ch = pnjax.run_chains(INITS, loss, TX, lam=0.1, **KW)
    text = ch.summary()
    lines = text.splitlines()
    assert "champion" in lines[0] and "plain score" in lines[0] and len(lines) == C + 2
    for c in range(C):
        fields = lines[c + 1].split()
        assert int(fields[1]) == ch.champion_iteration[c]
        assert float(fields[3]) == pytest.approx(ch.history["score"][c, 0], rel=1e-5)
    fig, (ax0, ax1) = ch.chain(0).plot()
    assert len(ax0.lines) == 3 and ax1.get_xlabel() == "iteration"
    import matplotlib.pyplot as plt

    plt.close(fig)
