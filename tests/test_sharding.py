"""run_chains over a device mesh: 8 simulated CPU devices in a subprocess, same results."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh
    import pnjax

    assert jax.device_count() == 8, jax.devices()
    x = jnp.linspace(-1, 1, 32).reshape(16, 2)
    y = jnp.sin(3 * x[:, :1])

    def init(k):
        k1, k2 = jax.random.split(k)
        return {"Dense_0": {"kernel": jax.random.normal(k1, (2, 8)), "bias": jnp.zeros(8)},
                "Dense_1": {"kernel": jax.random.normal(k2, (8, 1)), "bias": jnp.zeros(1)}}

    def loss(p):
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

    C = 6  # not a multiple of 8: padded with inactive chains
    inits = jax.vmap(init)(jax.random.split(jax.random.key(0), C))
    mesh = Mesh(np.array(jax.devices()), ("chains",))
    kw = dict(iterations=2, lam=jnp.linspace(0.0, 0.1, C), steps=20, layers="random",
              key=jax.random.key(1), layer_draw="per_iteration")
    for mode in ("independent", "population"):
        ref = pnjax.run_chains(inits, loss, optax.adam(1e-2), mode=mode, **kw)
        sh = pnjax.run_chains(inits, loss, optax.adam(1e-2), mode=mode, mesh=mesh, **kw)
        for k in ("score", "loss", "penalty", "curve"):
            np.testing.assert_allclose(sh.history[k], ref.history[k], rtol=2e-4, atol=1e-6)
        for k in ("layer", "diverged", "pushed"):
            np.testing.assert_array_equal(sh.history[k], ref.history[k])
        np.testing.assert_array_equal(sh.champion_iteration, ref.champion_iteration)
        np.testing.assert_array_equal(np.asarray(sh.bank.count), np.asarray(ref.bank.count))
        leaf = jax.tree_util.tree_leaves(sh.champion)[0]
        assert leaf.shape[0] == C
        print(mode, "ok", int(np.sum(np.asarray(sh.bank.count))))
    # the chain axis really is split over the devices: one chain per device for C = 8
    inits8 = jax.vmap(init)(jax.random.split(jax.random.key(2), 8))
    res8 = pnjax.run_chains(inits8, loss, optax.adam(1e-2), iterations=0, lam=0.0, steps=5,
                            mesh=mesh)
    leaf = jax.tree_util.tree_leaves(res8.champion)[0]
    assert len(leaf.sharding.device_set) == 8, leaf.sharding
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {1}, leaf.sharding
    print("done")
    """
)


def test_sharded_chains_equal_unsharded():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "independent ok" in out.stdout and "population ok" in out.stdout
    assert "done" in out.stdout
