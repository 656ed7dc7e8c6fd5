"""Compiled programs across driver calls: time and XLA compilations of three calls.

Run: ``python benchmarks/compile_cache.py`` (from the repository root). For each driver, a
first call, the same call again, and a call with another λ; the count is of
``/jax/core/compile/backend_compile_duration`` events (``jax.monitoring``). One optimizer
object serves every call, as ``docs/own_loop.md`` says to do.
"""

import time

import jax
import jax.numpy as jnp
import optax

import pnjax

X = jnp.linspace(-1, 1, 32).reshape(16, 2)
Y = jnp.sin(3 * X[:, :1])


def init(key):
    k1, k2 = jax.random.split(key)
    return {"Dense_0": {"kernel": jax.random.normal(k1, (2, 4)), "bias": jnp.zeros(4)},
            "Dense_1": {"kernel": jax.random.normal(k2, (4, 1)) / 2, "bias": jnp.zeros(1)}}


def loss(p):
    h = jnp.tanh(X @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
    return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - Y) ** 2)


def main():
    count = [0]

    def listen(event, secs, **kw):
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listen)
    tx = optax.adam(1e-2)
    p0 = init(jax.random.key(0))
    inits = jax.vmap(init)(jax.random.split(jax.random.key(0), 8))
    drivers = (
        ("persistent_fit", lambda lam: pnjax.persistent_fit(p0, loss, tx, iterations=3,
                                                            lam=lam, steps=200)),
        ("run_chains C=8", lambda lam: pnjax.run_chains(inits, loss, tx, iterations=3,
                                                        lam=lam, steps=200)),
    )  # fmt: skip
    for name, call in drivers:
        for what, lam in (("first", 0.1), ("same", 0.1), ("other lam", 0.2)):
            count[0] = 0
            t = time.perf_counter()
            jax.block_until_ready(call(lam).champion)
            secs = time.perf_counter() - t
            print(f"{name:15s} {what:10s} {secs:7.3f} s  {count[0]:3d} programs compiled")


if __name__ == "__main__":
    main()
