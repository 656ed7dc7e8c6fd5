"""The 2-D toy of the paper's Section 2 (Eq. 1, with the sign slip corrected).

``f(x, y) = -exp(-((x-2)² + (y+2)²)/5) - 1.5 exp(-((x+2)² + (y+1)²))``

Two minima: a wide shallow one near (2, -2) and a narrow deeper one near (-2, -1). Plain GD
from (-0.335, -1.4) (lr 1e-3, 50,000 steps) falls into the first; one persistent iteration with
λ = 0.1 is repelled from it and reaches the second.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax.fit import FitResult, persistent_fit

TOY_START = jnp.array([-0.335, -1.4], jnp.float32)
"""The paper's initialization w_ini, between the two basins."""

MINIMUM_A = (2.0, -2.0)
MINIMUM_B = (-2.0, -1.0)


def toy_loss(w: jax.Array) -> jax.Array:
    """Eq. 1 at ``w = (x, y)`` (shape ``[2]``, or ``[..., 2]`` for a grid); returns ``[...]``."""
    x, y = w[..., 0], w[..., 1]
    return -jnp.exp(-((x - 2) ** 2 + (y + 2) ** 2) / 5) - 1.5 * jnp.exp(
        -((x + 2) ** 2 + (y + 1) ** 2)
    )


def trajectory(
    w0: jax.Array, bank: Any, lam: float, steps: int = 50_000, lr: float = 1e-3, every: int = 100
) -> np.ndarray:
    """Plain GD path on ``toy_loss + P`` (anchors from ``bank``): ``[steps // every + 1, 2]``."""
    from pnjax.penalty import persistent_penalty

    def total(w):
        return toy_loss(w) + persistent_penalty(w, bank, lam)

    @jax.jit
    def run(w):
        def step(w, _):
            w = w - lr * jax.grad(total)(w)
            return w, w

        _, path = jax.lax.scan(step, w, None, length=steps)
        return path[every - 1 :: every]

    path = np.asarray(run(w0))
    return np.concatenate([np.asarray(w0)[None], path])


def run_toy2d(
    lam: float = 0.1, iterations: int = 1, steps: int = 50_000, lr: float = 1e-3
) -> tuple[FitResult, dict[str, Any]]:
    """Runs Algorithm 1 on Eq. 1; returns the fit and a JSON-ready summary with trajectories."""
    res = persistent_fit(
        TOY_START, toy_loss, optax.sgd(lr), iterations=iterations, lam=lam, steps=steps
    )
    from pnjax.anchors import AnchorBank

    bank = AnchorBank.create(TOY_START, iterations + 1)
    paths = []
    finals = []
    for n in range(iterations + 1):
        paths.append(trajectory(TOY_START, bank, lam if n else 0.0, steps, lr))
        finals.append(res.bank.get(n) if n < int(res.bank.count) else None)
        if n < int(res.bank.count):
            bank = bank.push(res.bank.get(n))
    summary = {
        "lam": lam,
        "steps": steps,
        "lr": lr,
        "start": np.asarray(TOY_START).tolist(),
        "final_points": [np.asarray(f).tolist() for f in finals if f is not None],
        "final_loss": res.history["loss"].tolist(),
        "champion_iteration": res.champion_iteration,
        "champion": np.asarray(res.champion).tolist(),
        "paper": {"plain": list(MINIMUM_A), "persistent_iteration_1": list(MINIMUM_B)},
    }
    return res, {"summary": summary, "paths": paths}


def plot_toy2d(paths: list[np.ndarray], path_png: str) -> None:
    """Contour of Eq. 1 with the plain and persistent trajectories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.linspace(-4, 4, 241)
    ys = np.linspace(-4, 2, 181)
    X, Y = np.meshgrid(xs, ys)
    Z = np.asarray(toy_loss(jnp.stack([X, Y], -1)))
    fig, axes = plt.subplots(1, len(paths), figsize=(5 * len(paths), 4), squeeze=False)
    for n, (ax, p) in enumerate(zip(axes[0], paths, strict=True)):
        cs = ax.contourf(X, Y, Z, levels=30, cmap="viridis")
        ax.plot(p[:, 0], p[:, 1], "r-", lw=2)
        ax.plot(*p[0], "wo", ms=6, label="start")
        ax.plot(*p[-1], "r*", ms=14, label=f"end ({p[-1, 0]:.2f}, {p[-1, 1]:.2f})")
        ax.set_title("plain GD" if n == 0 else f"persistent iteration {n}")
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.legend(loc="upper right", fontsize=8)
        fig.colorbar(cs, ax=ax)
    fig.suptitle("Eq. 1: loss surface and GD trajectories (lr 1e-3, 50k steps, λ=0.1)")
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
