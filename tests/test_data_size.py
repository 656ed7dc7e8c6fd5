"""Compile time does not grow with the data set: the data is an argument, never a constant."""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pnjax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_seconds: list[float] = []


def _listener(event: str, duration: float, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        _compile_seconds.append(duration)


jax.monitoring.register_event_duration_secs_listener(_listener)


class SmallConv(nn.Module):
    """A strided convolution and a dense layer on 32 x 32 x 3 images."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (5, 5), strides=(4, 4))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


MODEL = SmallConv()


def loss_fn(params, batch):
    x, y = batch
    logits = MODEL.apply({"params": params}, x.astype(jnp.float32) / 255.0)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _compile_time(n: int, loop: str) -> float:
    """Backend compile seconds of a one-epoch persistent_fit on ``n`` CIFAR-sized images."""
    rng = np.random.default_rng(0)
    data = (
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        rng.integers(0, 10, (n,), dtype=np.int32),
    )
    params = MODEL.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    jax.clear_caches()  # both sizes compile every piece afresh
    _compile_seconds.clear()
    t = time.perf_counter()
    res = pnjax.persistent_fit(
        params, loss_fn, optax.sgd(1e-2), iterations=0, lam=0.0, data=data, batch_size=1000,
        epochs=1, key=jax.random.key(1), loop=loop,
    )  # fmt: skip
    assert np.isfinite(res.history["loss"][0]), time.perf_counter() - t
    return sum(_compile_seconds)


@pytest.mark.parametrize("loop", ["scan", "python"])
def test_compile_time_does_not_grow_with_the_data(loop):
    small = _compile_time(1_000, loop)
    large = _compile_time(50_000, loop)
    assert small > 0 and large > 0
    assert large < 2 * small, f"compile {large:.2f} s for 50,000 images vs {small:.2f} s for 1,000"
