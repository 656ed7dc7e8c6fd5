"""The experiment code behind the CLI, on tiny settings (the real runs live in benchmarks/)."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from pnjax.experiments import kink, toy2d


def test_toy_loss_minima():
    a = toy2d.toy_loss(jnp.array(toy2d.MINIMUM_A))
    b = toy2d.toy_loss(jnp.array(toy2d.MINIMUM_B))
    assert float(b) < float(a) < -0.99
    # GD from near each minimum stays near it (the deep one is pulled slightly by the other tail)
    for m in (toy2d.MINIMUM_A, toy2d.MINIMUM_B):
        w = jax.lax.fori_loop(
            0, 2000, lambda _, w: w - 0.1 * jax.grad(toy2d.toy_loss)(w), jnp.array(m) + 0.1
        )
        np.testing.assert_allclose(w, m, atol=0.05)


def test_random_direction_anchor_keeps_layer_norms():
    prob = kink.kink_problem()
    p = kink.init_params(prob, 0)
    r = kink.random_direction_anchor(p, jax.random.key(1))
    for layer in p:
        n_p = sum(float(jnp.sum(a**2)) for a in jax.tree_util.tree_leaves(p[layer]))
        n_r = sum(float(jnp.sum(a**2)) for a in jax.tree_util.tree_leaves(r[layer]))
        np.testing.assert_allclose(n_r, n_p, rtol=1e-4)
    a, b = r["Dense_1"]["kernel"].ravel(), p["Dense_1"]["kernel"].ravel()
    cos = float(jnp.vdot(a, b) / jnp.sqrt(jnp.vdot(a, a) * jnp.vdot(b, b)))
    assert abs(cos) < 0.2, "a random direction in 1024 dimensions is nearly orthogonal"


def test_scale_first_layer():
    prob = kink.kink_problem()
    p = kink.init_params(prob, 0)
    s = kink.scale_first_layer(p, 0.25)
    np.testing.assert_allclose(s["Dense_0"]["kernel"], 0.25 * p["Dense_0"]["kernel"])
    np.testing.assert_allclose(s["Dense_1"]["kernel"], p["Dense_1"]["kernel"])
    np.testing.assert_allclose(kink.first_layer_norm(s), 0.25 * kink.first_layer_norm(p), rtol=1e-5)


def test_run_kink_tiny_is_json_ready(tmp_path):
    summary, arrays = kink.run_kink(
        num_reinit=3, num_stuck=1, iterations=2, steps=200, scale_factors=(0.5,), reinit_chunk=2
    )
    text = json.dumps(summary)
    assert "reinit" in text and len(summary["reinit"]["losses"]) == 3
    if summary["persistent"]:
        p = summary["persistent"][0]
        assert len(p["losses"]) == 3 and len(p["stuck"]) == 3
        assert summary["random_anchors"] and summary["scaled_init"]
    kink.plot_kink(summary, arrays, str(tmp_path / "k.png"))
    assert (tmp_path / "k.png").stat().st_size > 10_000
