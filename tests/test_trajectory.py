"""Snapshots inside the compiled run, the PCA plane and the loss on it, with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pnjax
from pnjax.diagnostics import loss_surface, project_trajectories, record_run

A = jnp.array([1.0, 2.0, 4.0])


def quad_loss(p):
    return 0.5 * jnp.sum(A * p["w"] ** 2) + 0.5 * jnp.sum(p["b"] ** 2)


P0 = {"w": jnp.array([1.0, -1.0, 0.5]), "b": jnp.array([2.0])}


def test_full_batch_snapshots_follow_gradient_descent():
    lr = 0.1
    run = pnjax.make_train_run(quad_loss, optax.sgd(lr), steps=10)
    bank = pnjax.AnchorBank.create(P0, 1)
    rec = record_run(run, P0, bank, 0.0, every=3)
    assert rec.at.tolist() == [0, 3, 6, 9, 10]
    for i, t in enumerate(rec.at):  # θ_t = (1 - lr a)^t θ_0, coordinatewise
        np.testing.assert_allclose(rec.probes["w"][i], (1 - lr * A) ** t * P0["w"], rtol=1e-5)
        np.testing.assert_allclose(rec.probes["b"][i], (1 - lr) ** t * P0["b"], rtol=1e-5)
    np.testing.assert_allclose(rec.params["w"], rec.probes["w"][-1])
    np.testing.assert_allclose(rec.metrics["loss"], quad_loss(rec.params), rtol=1e-6)


def test_a_second_replay_reuses_the_compilation():
    traces = []

    def probe(p):
        traces.append(1)  # runs once per trace
        return p["b"]

    run = pnjax.make_train_run(quad_loss, optax.sgd(0.1), steps=6)
    bank = pnjax.AnchorBank.create(P0, 2)
    first = record_run(run, P0, bank, 0.5, every=2, probe=probe)
    n = len(traces)
    second = record_run(run, P0, bank.push(first.params), 0.5, every=2, probe=probe)
    assert len(traces) == n and n > 0
    assert not np.allclose(first.probes, second.probes)  # the anchor changed the run


def test_reproduces_persistent_fit_runs():
    x = jnp.linspace(-1, 1, 32)[:, None]
    y = jnp.sin(3 * x)
    params0 = {
        "Dense_0": {"kernel": jnp.linspace(-1, 1, 8)[None], "bias": jnp.linspace(0.5, -0.5, 8)},
        "Dense_1": {"kernel": jnp.linspace(1, -1, 8)[:, None], "bias": jnp.zeros(1)},
    }

    def loss(p, batch=None):
        xb, yb = (x, y) if batch is None else batch
        h = jnp.tanh(xb @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - yb) ** 2)

    opt = optax.adam(1e-2)
    res = pnjax.persistent_fit(params0, loss, opt, iterations=1, lam=0.05, steps=40, loop="scan")
    run = pnjax.make_train_run(loss, opt, steps=40)
    mask = jnp.ones(2)
    bank = pnjax.AnchorBank.create(params0, 2)
    plain = record_run(run, params0, bank, 0.05, mask, every=10)
    second = record_run(run, params0, bank.push(res.bank.get(0)), 0.05, mask, every=10)
    for rec, n in ((plain, 0), (second, 1)):
        np.testing.assert_allclose(rec.metrics["loss"], res.history["loss"][n], rtol=1e-5)
    np.testing.assert_allclose(
        second.params["Dense_0"]["kernel"], res.bank.get(1)["Dense_0"]["kernel"], atol=1e-6
    )
    # mini-batch form: per-epoch data order from the same key
    key = jax.random.key(7)
    mres = pnjax.persistent_fit(
        params0,
        lambda p, b: loss(p, b),
        opt,
        iterations=0,
        lam=0.0,
        data=(x, y),
        batch_size=8,
        epochs=3,
        key=key,
        loop="scan",
    )
    mrun = pnjax.make_train_run(lambda p, b: loss(p, b), opt, data=(x, y), batch_size=8, epochs=3)
    mrec = record_run(mrun, params0, bank, 0.0, mask, key, every=2, probe=lambda p: loss(p))
    assert mrec.at.tolist() == [0, 2, 3] and mrec.probes.shape == (3,)
    np.testing.assert_allclose(mrec.probes[-1], mres.history["loss"][0], rtol=1e-5)


def test_bad_every():
    run = pnjax.make_train_run(quad_loss, optax.sgd(0.1), steps=5)
    bank = pnjax.AnchorBank.create(P0, 1)
    for every, match in ((0, "positive"), (6, "exceeds")):
        with pytest.raises(ValueError, match=match):
            record_run(run, P0, bank, 0.0, every=every)


def plane_trajectory(coefs, center, u, v):
    pts = center + coefs[:, :1] * u + coefs[:, 1:] * v  # [T, 5]
    return {"k": pts[:, :3].reshape(-1, 3, 1), "b": pts[:, 3:]}


def test_trajectories_in_a_plane_are_recovered():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(5, 2)))
    u, v = jnp.asarray(q[:, 0]), jnp.asarray(q[:, 1])
    center = jnp.asarray(rng.normal(size=5), jnp.float32)
    t = jnp.linspace(0, 1, 20)[:, None]
    first = plane_trajectory(jnp.concatenate([3 * (1 - t), jnp.sin(4 * t)], 1), center, u, v)
    second = plane_trajectory(jnp.concatenate([-t, 2 * t**2], 1), center, u, v)
    proj = project_trajectories([first, second])
    assert proj.directions.shape == (2, 5)
    np.testing.assert_allclose(proj.directions @ proj.directions.T, np.eye(2), atol=1e-5)
    np.testing.assert_allclose(float(jnp.sum(proj.explained_variance)), 1.0, atol=1e-5)
    np.testing.assert_allclose(proj.coords[0][-1], [0.0, 0.0], atol=1e-6)  # the origin
    for traj, coords in zip((first, second), proj.coords, strict=True):
        for i in (0, 7, 19):
            back = proj.point(coords[i])
            np.testing.assert_allclose(back["k"], traj["k"][i], atol=1e-5)
            np.testing.assert_allclose(back["b"], traj["b"][i], atol=1e-5)
    # distances within the plane are preserved
    d_true = np.linalg.norm(3.0 * np.asarray(u) - 0.0)  # first[0] - first[-1] = 3u + sin(4)v - 0
    d_plane = np.linalg.norm(np.asarray(proj.coords[0][0]) - np.asarray(proj.coords[0][-1]))
    assert abs(d_plane - np.hypot(3.0, np.sin(4.0))) < 1e-4 and d_true > 0
    with pytest.raises(ValueError, match="num_components"):
        project_trajectories([first], num_components=6)


def test_loss_surface_of_a_quadratic():
    rng = np.random.default_rng(1)
    traj = {
        "w": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(6, 1)), jnp.float32),
    }
    proj = project_trajectories([traj])
    xs, ys = jnp.linspace(-2, 2, 5), jnp.linspace(-1, 1, 3)
    z = loss_surface(quad_loss, proj, xs, ys)
    assert z.shape == (3, 5)
    for i, yv in enumerate(ys):
        for j, xv in enumerate(xs):
            np.testing.assert_allclose(
                z[i, j], quad_loss(proj.point(jnp.array([xv, yv]))), rtol=1e-5
            )
    # ½θᵀAθ at the origin
    np.testing.assert_allclose(
        z[1, 2], quad_loss(jax.tree_util.tree_map(lambda a: a[-1], traj)), rtol=1e-5
    )


@pytest.mark.parametrize("every", [3, 4])
def test_a_lam_schedule_is_replayed_step_by_step(every):
    """λ·schedule(count) with count the step within the run, in record_run as in the run."""
    schedule = lambda n: jnp.where(n < 6, 1.0, 0.0)  # noqa: E731 - the penalty stops at step 6
    run = pnjax.make_train_run(quad_loss, optax.sgd(0.1), steps=10, lam_schedule=schedule)
    bank = pnjax.AnchorBank.create(P0, 2).push({"w": jnp.array([1.0, 1.0, 1.0]), "b": P0["b"]})
    mask = jnp.ones(bank.num_layers)
    direct, _ = jax.jit(run)(P0, bank, 0.3, mask, jax.random.key(0))
    rec = record_run(run, P0, bank, 0.3, mask, every=every)
    np.testing.assert_allclose(rec.params["w"], direct["w"], rtol=1e-6)
    unscheduled = record_run(
        pnjax.make_train_run(quad_loss, optax.sgd(0.1), steps=10), P0, bank, 0.3, mask,
        every=every,
    )  # fmt: skip
    assert not np.allclose(unscheduled.params["w"], direct["w"], rtol=1e-4)
