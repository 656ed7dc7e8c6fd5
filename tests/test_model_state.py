"""Models with state (Flax ``batch_stats``) through persistent_fit and run_chains."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pnjax
from pnjax.models import ResNet18

X = jnp.linspace(-1, 1, 48).reshape(16, 3)
Y = jnp.sin(3 * X[:, :1])
STEPS, LAM, EPOCHS, BATCH = 12, 0.05, 2, 4


def OPT():
    # SGD, not Adam: Adam turns the rounding noise of the near-zero gradients that BatchNorm's
    # scale invariance leaves into full-size steps, so two equal computations fused differently
    # (scan vs Python loop) drift apart by more than float tolerance
    return optax.sgd(0.1, momentum=0.9)


class BNNet(nn.Module):
    """Dense - BatchNorm - tanh - Dense: params plus a ``batch_stats`` collection."""

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(6, use_bias=False)(x)  # a bias before BatchNorm has no gradient
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        return nn.Dense(1)(jnp.tanh(x))


MODEL = BNNet()


def init_variables(seed=0):
    v = MODEL.init(jax.random.key(seed), X[:2], train=False)
    return v["params"], {"batch_stats": v["batch_stats"]}


def batch_loss(params, state, batch):
    """The mini-batch form: ``(loss, new_state)``; BatchNorm in training mode."""
    x, y = batch
    out, updates = MODEL.apply({"params": params, **state}, x, train=True, mutable=["batch_stats"])
    return jnp.mean((out - y) ** 2), updates


def full_loss(params, state):
    return batch_loss(params, state, (X, Y))


def eval_score(params, state):
    """Validation-style score with the running statistics: depends on the state."""
    out = MODEL.apply({"params": params, **state}, X, train=False)
    return jnp.mean((out - Y) ** 2)


def allclose(a, b, rtol=1e-5, atol=1e-6):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b
    )


def reference(params0, state0, form, key, iterations=1, score=eval_score):
    """Algorithm 1 by hand: every run from (params0, state0), Eq. 6 added to the gradient."""
    opt = OPT()

    @jax.jit
    def step(p, s, o, bank, batch):
        (loss, s), g = jax.value_and_grad(batch_loss, has_aux=True)(p, s, batch)
        g = jax.tree_util.tree_map(jnp.add, g, pnjax.persistent_gradient(p, bank, LAM))
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), s, o

    def batches():
        if form == "full":
            yield from [(X, Y)] * STEPS
            return
        for ekey in jax.random.split(key, EPOCHS):
            perm = jax.random.permutation(ekey, X.shape[0])
            for b in range(X.shape[0] // BATCH):
                idx = perm[b * BATCH : (b + 1) * BATCH]
                yield X[idx], Y[idx]

    bank = pnjax.AnchorBank.create(params0, iterations + 1)
    out = []
    for _ in range(iterations + 1):
        p, s, o = params0, state0, opt.init(params0)
        for batch in batches():
            p, s, o = step(p, s, o, bank, batch)
        out.append((p, s, float(score(p, s))))
        bank = bank.push(p)
    return out


def fit_kwargs(form, **extra):
    kw = dict(iterations=1, lam=LAM, score_fn=eval_score, key=jax.random.key(7))
    if form == "full":
        kw |= dict(steps=STEPS)
    else:
        kw |= dict(data=(X, Y), batch_size=BATCH, epochs=EPOCHS)
    return kw | extra


@pytest.mark.parametrize("loop", ["scan", "python"])
@pytest.mark.parametrize("form", ["full", "mini"])
def test_persistent_fit_equals_reference_loop(form, loop):
    params0, state0 = init_variables()
    loss = full_loss if form == "full" else batch_loss
    res = pnjax.persistent_fit(
        params0, loss, OPT(), loop=loop, model_state=state0, **fit_kwargs(form)
    )
    ref = reference(params0, state0, form, jax.random.key(7))
    for n, (p, _s, score) in enumerate(ref):
        allclose(res.bank.get(n), p)
        np.testing.assert_allclose(res.history["score"][n], score, rtol=1e-5)
    # the state really was threaded: the running statistics moved away from their init
    moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), ref[0][1], state0)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-3
    c = res.champion_iteration
    assert c == int(np.argmin([r[2] for r in ref]))
    allclose(res.champion_state, ref[c][1])
    # the default loss (over the whole data in the mini-batch form) uses the final state
    if form == "mini":
        p, s, _ = ref[0]
        whole = np.mean(
            [float(batch_loss(p, s, (X[i : i + 4], Y[i : i + 4]))[0]) for i in range(0, 16, 4)]
        )
        np.testing.assert_allclose(res.history["loss"][0], whole, rtol=1e-5)


def test_champion_state_is_the_champion_runs_state():
    """champion_state is the final state of the championship run (not of the last run)."""
    params0, state0 = init_variables()
    seen = []
    res = pnjax.persistent_fit(
        params0,
        full_loss,
        OPT(),
        iterations=2,
        lam=0.5,
        steps=STEPS,
        score_fn=eval_score,
        model_state=state0,
        callback=lambda n, info: seen.append((info["params"], info["model_state"])),
    )
    scores = res.history["score"]
    c = res.champion_iteration
    assert c == int(np.argmin(scores)) and c != 2, scores
    allclose(res.champion, seen[c][0], rtol=0, atol=0)
    allclose(res.champion_state, seen[c][1], rtol=0, atol=0)
    np.testing.assert_allclose(
        float(eval_score(res.champion, res.champion_state)), scores[c], rtol=1e-6
    )
    # the runs ended in different states, so picking the right one matters
    d = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), seen[c][1], seen[2][1])
    assert max(jax.tree_util.tree_leaves(d)) > 1e-4
    # a FitResult built without the new field still works (default None)
    assert pnjax.FitResult(res.champion, c, res.history, res.bank).champion_state is None


@pytest.mark.parametrize("form", ["full", "mini"])
def test_make_train_run_with_state_scan_equals_python_loop(form):
    """The stateful run's signature, jitted whole or driven from Python (also over chains)."""
    params0, state0 = init_variables()
    kw = dict(steps=STEPS) if form == "full" else dict(data=(X, Y), batch_size=BATCH, epochs=1)
    run = pnjax.make_train_run(
        full_loss if form == "full" else batch_loss, OPT(), has_state=True, **kw
    )
    bank = pnjax.AnchorBank.create(params0, 2).push(params0)
    args = (params0, bank, jnp.float32(LAM), jnp.ones(3), jax.random.key(0), state0)
    (p1, s1), m1 = jax.jit(run)(*args)
    (p2, s2), m2 = pnjax.fit.python_loop_run(run, jax.jit)(*args)
    allclose((p1, s1), (p2, s2))
    for k in ("loss", "score", "penalty", "curve"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["loss"], m1["score"])  # default score: the final loss
    # over a chain axis of 2 (every argument stacked, the bank too)
    two = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), args)
    (pc, sc), mc = pnjax.fit.python_loop_run(run, jax.jit, chains=True)(*two)
    allclose(chain((pc, sc), 1), (p1, s1))
    np.testing.assert_allclose(mc["loss"][1], m1["loss"], rtol=1e-5)


# ----------------------------------------------------------------------------- run_chains

C = 2


def chain_inits():
    pairs = [init_variables(seed) for seed in range(C)]
    stack = lambda *xs: jnp.stack(xs)  # noqa: E731
    return (
        jax.tree_util.tree_map(stack, *[p for p, _ in pairs]),
        jax.tree_util.tree_map(stack, *[s for _, s in pairs]),
    )


def chain(tree, c):
    return jax.tree_util.tree_map(lambda x: x[c], tree)


@pytest.mark.parametrize("loop, form", [("scan", "full"), ("python", "mini")])
def test_run_chains_independent_equals_persistent_fit_per_chain(loop, form):
    params, states = chain_inits()
    keys = jax.random.split(jax.random.key(3), C)
    lams = np.array([0.05, 0.2], np.float32)
    loss = full_loss if form == "full" else batch_loss
    kw = fit_kwargs(form, iterations=2)
    kw.pop("lam"), kw.pop("key")
    res = pnjax.run_chains(
        params, loss, OPT(), lam=lams, key=keys, loop=loop, model_state=states, **kw
    )
    assert jax.tree_util.tree_structure(res.champion_state) == jax.tree_util.tree_structure(states)
    for c in range(C):
        fit = pnjax.persistent_fit(
            chain(params, c),
            loss,
            OPT(),
            lam=float(lams[c]),
            key=keys[c],
            model_state=chain(states, c),
            **kw,
        )
        for k in ("score", "loss", "penalty", "curve"):
            np.testing.assert_allclose(res.history[k][c], fit.history[k], rtol=1e-5, atol=1e-6)
        assert res.champion_iteration[c] == fit.champion_iteration
        one = res.chain(c)
        allclose(one.champion, fit.champion)
        allclose(one.champion_state, fit.champion_state)
        allclose(one.bank.anchors, fit.bank.anchors)


def test_run_chains_population_and_errors():
    params, states = chain_inits()
    res = pnjax.run_chains(
        params,
        full_loss,
        OPT(),
        iterations=1,
        lam=LAM,
        steps=5,
        mode="population",
        model_state=states,
        score_fn=eval_score,
    )
    assert int(res.bank.count) == 2 * C
    for c in range(C):
        it = int(res.champion_iteration[c])
        assert it >= 0
        np.testing.assert_allclose(
            float(eval_score(chain(res.champion, c), chain(res.champion_state, c))),
            res.history["score"][c, it],
            rtol=1e-5,
        )
    kw = dict(iterations=1, lam=LAM, steps=2)
    with pytest.raises(ValueError, match="leading chain axis of init_params"):
        pnjax.run_chains(params, full_loss, OPT(), model_state=chain(states, 0), **kw)
    with pytest.raises(ValueError, match=r"not a \(loss, new_model_state\) pair"):
        pnjax.run_chains(params, lambda p, s: full_loss(p, s)[0], OPT(), model_state=states, **kw)
    with pytest.raises(ValueError, match="no model_state was given"):
        pnjax.run_chains(params, lambda p: full_loss(p, chain(states, 0)), OPT(), **kw)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_loss_fn_output_must_fit_model_state(loop):
    params0, state0 = init_variables()
    kw = dict(iterations=0, lam=0.0, steps=2, loop=loop)

    def fit(loss, **extra):
        return pnjax.persistent_fit(params0, loss, OPT(), **(kw | extra))

    # a state is given but the loss returns a scalar
    with pytest.raises(
        ValueError, match=r"loss_fn returned a single array of shape \[\] \(the loss alone\?\)"
    ):
        fit(lambda p, s: full_loss(p, s)[0], model_state=state0)
    # a triple
    with pytest.raises(ValueError, match="a tuple of length 3"):
        fit(lambda p, s: (*full_loss(p, s), 0.0), model_state=state0)
    # the inner dict instead of the whole collection: other tree structure
    with pytest.raises(ValueError, match="same tree structure, shapes and dtypes"):
        fit(
            lambda p, s: (full_loss(p, s)[0], full_loss(p, s)[1]["batch_stats"]), model_state=state0
        )
    # another dtype
    half = lambda t: jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), t)  # noqa: E731
    with pytest.raises(ValueError, match="float16"):
        fit(lambda p, s: (full_loss(p, s)[0], half(full_loss(p, s)[1])), model_state=state0)
    # a pair but no state given
    with pytest.raises(ValueError, match="no model_state was given"):
        fit(lambda p: full_loss(p, state0))
    # the mini-batch form names its signature
    with pytest.raises(ValueError, match=r"loss_fn\(params, model_state, batch\)"):
        pnjax.persistent_fit(
            params0,
            lambda p, s, b: batch_loss(p, s, b)[0],
            OPT(),
            iterations=0,
            lam=0.0,
            data=(X, Y),
            batch_size=4,
            epochs=1,
            model_state=state0,
            loop=loop,
        )


# ----------------------------------------------------------------------------- checkpoints


def _assert_same(a, b):
    for k in ("score", "loss", "penalty", "curve", "diverged", "pushed"):
        np.testing.assert_array_equal(a.history[k], b.history[k], err_msg=k)
    assert a.champion_iteration == b.champion_iteration
    for x, y in (
        (a.champion, b.champion),
        (a.champion_state, b.champion_state),
        (a.bank.anchors, b.bank.anchors),
    ):
        jax.tree_util.tree_map(np.testing.assert_array_equal, x, y)


def test_checkpoint_resume_with_state(tmp_path, monkeypatch):
    pytest.importorskip("orbax.checkpoint")
    import shutil

    from pnjax import checkpoint as ckpt

    params0, state0 = init_variables()
    kw = dict(iterations=3, lam=0.5, steps=STEPS, score_fn=eval_score, model_state=state0)
    ref = pnjax.persistent_fit(params0, full_loss, OPT(), **kw)
    folder = tmp_path / "full"
    full = pnjax.persistent_fit(
        params0, full_loss, OPT(), checkpoint_dir=folder, checkpoint_keep=10, **kw
    )
    _assert_same(full, ref)
    # as if the run had died during iteration 2
    for step in (3, 4):
        shutil.rmtree(folder / str(step))
    resumed = pnjax.persistent_fit(params0, full_loss, OPT(), checkpoint_dir=folder, **kw)
    assert resumed.resumed_from == 2
    _assert_same(resumed, ref)
    # the fingerprint knows the state: another initial state, or none, is refused
    other = jax.tree_util.tree_map(lambda x: x + 1, state0)
    with pytest.raises(ValueError, match="model_state: values differ"):
        pnjax.persistent_fit(
            params0, full_loss, OPT(), checkpoint_dir=folder, **(kw | {"model_state": other})
        )
    with pytest.raises(ValueError, match="model_state"):
        pnjax.persistent_fit(
            params0,
            lambda p: full_loss(p, state0)[0],
            OPT(),
            checkpoint_dir=folder,
            **(kw | {"model_state": None, "score_fn": None}),
        )

    # mini-batch form, checkpointed inside an iteration and interrupted there (in process)
    kw = dict(
        iterations=1,
        lam=0.5,
        data=(X, Y),
        batch_size=BATCH,
        epochs=4,
        key=jax.random.key(1),
        score_fn=eval_score,
        model_state=state0,
        checkpoint_every_epochs=2,
    )
    ref = pnjax.persistent_fit(
        params0, batch_loss, OPT(), **(kw | {"checkpoint_every_epochs": None})
    )
    real = ckpt.save_checkpoint

    class Interrupted(Exception):
        pass

    def save(directory, step, state, metadata=None, **k):
        path = real(directory, step, state, metadata, **k)
        if metadata["done"] == 1 and metadata["partial_epochs"] > 0:
            raise Interrupted  # die right after the mid-iteration save of iteration 1
        return path

    folder = tmp_path / "mini"
    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    with pytest.raises(Interrupted):
        pnjax.persistent_fit(params0, batch_loss, OPT(), checkpoint_dir=folder, **kw)
    monkeypatch.setattr(ckpt, "save_checkpoint", real)
    resumed = pnjax.persistent_fit(params0, batch_loss, OPT(), checkpoint_dir=folder, **kw)
    assert resumed.resumed_from == 1
    for k in ("score", "loss", "penalty", "curve"):
        np.testing.assert_allclose(resumed.history[k], ref.history[k], rtol=1e-6, atol=1e-7)
    allclose(resumed.champion_state, ref.champion_state)


def test_run_chains_checkpoint_resume_with_state(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    import shutil

    params, states = chain_inits()
    kw = dict(iterations=2, lam=0.5, steps=STEPS, score_fn=eval_score, model_state=states)
    ref = pnjax.run_chains(params, full_loss, OPT(), **kw)
    pnjax.run_chains(params, full_loss, OPT(), checkpoint_dir=tmp_path, checkpoint_keep=10, **kw)
    shutil.rmtree(tmp_path / "3")
    resumed = pnjax.run_chains(params, full_loss, OPT(), checkpoint_dir=tmp_path, **kw)
    np.testing.assert_array_equal(resumed.history["loss"], ref.history["loss"])
    np.testing.assert_array_equal(resumed.champion_iteration, ref.champion_iteration)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, resumed.champion_state, ref.champion_state
    )
    with pytest.raises(ValueError, match="model_state"):
        pnjax.run_chains(
            params,
            full_loss,
            OPT(),
            checkpoint_dir=tmp_path,
            **(kw | {"model_state": jax.tree_util.tree_map(lambda x: x * 2, states)}),
        )


# ----------------------------------------------------------------------------- ResNet18


def test_tiny_resnet18_auto_loop_python_equals_scan():
    """ResNet18's batch_stats through persistent_fit; loop='auto' picks 'python' on a CPU."""
    from pnjax.fit import choose_loop

    model = ResNet18(num_classes=2, stage_sizes=(1,))
    x = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
    y = jnp.arange(8) % 2
    v = model.init(jax.random.key(1), x[:4], train=False)
    params0, state0 = v["params"], {"batch_stats": v["batch_stats"]}

    def loss(p, s, batch):
        xb, yb = batch
        logits, upd = model.apply({"params": p, **s}, xb, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), upd

    want = "python" if jax.default_backend() == "cpu" else "scan"
    assert choose_loop(loss, params0, (x, y), state0) == want
    kw = dict(
        iterations=1,
        lam=0.01,
        data=(x, y),
        batch_size=4,
        epochs=1,
        key=jax.random.key(2),
        model_state=state0,
    )
    auto = pnjax.persistent_fit(params0, loss, optax.sgd(0.05), **kw)
    scan = pnjax.persistent_fit(params0, loss, optax.sgd(0.05), loop="scan", **kw)
    np.testing.assert_allclose(auto.history["loss"], scan.history["loss"], rtol=1e-4)
    allclose(auto.champion_state, scan.champion_state, rtol=1e-4, atol=1e-5)
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), auto.champion_state, state0
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4


def test_random_restarts_with_state_equals_persistent_fit_of_each_restart():
    from pnjax.baselines import random_restarts

    def init_fn(k):
        v = MODEL.init(k, X[:2], train=False)
        return v["params"], {"batch_stats": v["batch_stats"]}

    key = jax.random.key(3)
    res = random_restarts(
        init_fn,
        full_loss,
        OPT(),
        num_restarts=3,
        steps=STEPS,
        score_fn=eval_score,
        key=key,
        stateful=True,
    )
    keys = jax.random.split(key, 3)
    for r in range(3):
        p0, s0 = init_fn(keys[r])
        fit = pnjax.persistent_fit(
            p0,
            full_loss,
            OPT(),
            iterations=0,
            lam=0.0,
            steps=STEPS,
            score_fn=eval_score,
            model_state=s0,
        )
        np.testing.assert_allclose(res.scores[r], fit.history["score"][0], rtol=1e-4, atol=1e-6)
        if r == res.champion_index:
            allclose(res.champion, fit.champion, rtol=1e-4, atol=1e-5)
            allclose(res.champion_state, fit.champion_state, rtol=1e-4, atol=1e-5)
    moved = jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))),
        res.champion_state,
        init_fn(keys[res.champion_index])[1],
    )
    assert max(jax.tree_util.tree_leaves(moved)) > 0  # the running statistics were trained
    with pytest.raises(ValueError, match="stateful=True"):
        random_restarts(
            lambda k: MODEL.init(k, X[:2], train=False)["params"],
            full_loss,
            OPT(),
            num_restarts=2,
            steps=2,
            key=key,
            stateful=True,
        )
