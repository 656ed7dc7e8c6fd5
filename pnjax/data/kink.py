"""1-D "kink" regression data for the paper's Section 3 experiment (Min, arXiv 2007.01419).

The paper trains a 1-32-32-1 ReLU network (He-normal weights, zero biases) with full-batch gradient
descent (momentum 0.9, learning rate 1e-3, 50,000 steps, mean squared error) on a small 1-D data
set and observes that most initializations end at a predictor made of **two affine pieces with a
kink near x = 0** (loss ~4.2), far from a good fit (best of 100 re-initializations: 0.33). The
paper does not publish its data; this module builds data on which the same set-up fails the same
way, plus the tools to measure that failure.

Why a gap around 0 makes the set-up fail (Holzmueller and Steinwart, arXiv 2002.04861; Steinwart,
arXiv 1903.11482). With zero biases, every first-layer unit ``relu(w x + b)`` has its kink at
``x = -b / w = 0``, so at initialization the network is ``f(x) = a·x`` for ``x > 0`` and
``f(x) = c·x`` for ``x < 0``: two affine pieces kinked at 0 (the second layer, whose input is then
positively homogeneous in ``x``, puts its kinks at 0 as well). While every kink of the network lies
in the empty interval ``(-gap, gap)``, the predictor restricted to the data is affine on each side,
and moving a kink inside the gap changes nothing but the slope and offset of those affine pieces.
Gradient descent first fits the two affine pieces; once it has, the gradient that would move a
kink out of the gap and into the data vanishes (the loss is flat in those directions), so the
network stays at the "two affine pieces" solution however nonlinear the target is. Without a gap
the data itself straddles the kinks, the biases get a useful gradient from the start, and the
kinks spread over the data.

The target. Points lie on an even grid on each side of the gap,

    x_i = ± (gap + (x_max - gap) · (i + 1/2) / h),   i = 0, ..., h - 1,   h = num_points / 2,

(with ``gap = 0`` this is one even grid over ``[-x_max, x_max]``) and

    y_i = v(x_i) + A · w(x_i) + σ ε_i,   ε_i ~ N(0, 1) i.i.d.,
    v(x) = slope_left · x  for x < 0,   slope_right · x  for x >= 0,
    w(x) = (sin(ω|x| + φ) - c0 - c1·|x|) / r,

where ``c0 + c1·t`` is the least-squares affine fit of ``sin(ω t + φ)`` over the grid's
``t_i = |x_i|`` and ``r`` the root mean square of what is left. ``v`` is a "V" with its kink at 0;
``w`` is an even, continuous, sine-like wiggle that no affine function on either side of the gap
can explain (on the data it is orthogonal to ``{1, x}`` on each side). Hence the best fit by two
affine pieces is (up to the noise) ``v`` itself, continuous with its kink at 0, and its mean
squared error is about ``A² + σ²``: the "stuck" level. A network that bends inside the data can
fit ``v + A·w`` down to about the noise level ``σ²``. For the no-gap control, ``wiggle_gap`` keeps
``c0, c1, r`` of the gapped grid so that the control is the same curve with the gap filled in.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "affine_check_grid",
    "affine_deviation",
    "is_stuck",
    "make_kink_data",
    "two_piece_affine_loss",
]


def _affine_residual(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Residual of the least-squares fit of ``v`` (shape ``[n]``) by ``c0 + c1·x`` (float64)."""
    basis = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(basis, v, rcond=None)
    return v - basis @ coef


def _side_grid(num_per_side: int, gap: float, x_max: float) -> np.ndarray:
    """``gap + (x_max - gap) · (i + 1/2) / h`` for ``i = 0..h-1`` (float64, ascending)."""
    return gap + (x_max - gap) * (np.arange(num_per_side, dtype=np.float64) + 0.5) / num_per_side


def make_kink_data(
    num_points: int = 60,
    *,
    gap: float = 1.0,
    x_max: float = 3.0,
    amplitude: float = 2.0,
    frequency: float = 2.0,
    phase: float = 0.0,
    slope_left: float = -1.0,
    slope_right: float = 1.5,
    noise: float = 0.1,
    seed: int = 0,
    wiggle_gap: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Builds the 1-D regression data set described in the module docstring.

    ``x`` is an even grid on ``[-x_max, -gap] ∪ [gap, x_max]`` (``num_points / 2`` points per side,
    no point with ``|x| <= gap`` when ``gap > 0``) and
    ``y = v(x) + amplitude · w(x) + noise · ε`` with ``v`` a V-shape kinked at 0 (``slope_left``,
    ``slope_right``) and ``w`` the even, unit-RMS, affine-free part of ``sin(frequency·|x| + phase)``
    (see the module docstring). The result depends only on the arguments (the noise comes from
    ``numpy.random.default_rng(seed)``).

    Args:
      num_points: N, the number of points; must be even and at least 6.
      gap: half-width of the empty interval around 0 (``>= 0``, ``< x_max``). ``gap = 0`` gives
        one even grid over ``[-x_max, x_max]``.
      x_max: the data lie in ``[-x_max, x_max]``.
      amplitude: A, the root mean square of the wiggle (on the points of ``wiggle_gap``'s grid);
        the best two-affine-piece fit then has mean squared error about ``A² + noise²``.
      frequency: ω of the sine from which the wiggle is made.
      phase: φ of that sine.
      slope_left: slope of the V for ``x < 0``.
      slope_right: slope of the V for ``x >= 0``.
      noise: σ, standard deviation of the Gaussian noise added to ``y``.
      seed: seed of the noise.
      wiggle_gap: the gap of the grid on which ``w`` is made affine-free and unit-RMS (default:
        ``gap``). The no-gap control of a gap-``g`` data set is
        ``make_kink_data(gap=0.0, wiggle_gap=g)``: the same target curve with the gap filled in.

    Returns:
      ``(x, y)``, two float32 NumPy arrays of shape ``[N, 1]``, ``x`` sorted ascending.

    Raises:
      ValueError: on an odd or too small ``num_points``, or a gap outside ``[0, x_max)``.
    """
    if num_points < 6 or num_points % 2:
        raise ValueError(f"num_points must be even and >= 6, got {num_points}")
    wiggle_gap = gap if wiggle_gap is None else wiggle_gap
    for name, g in (("gap", gap), ("wiggle_gap", wiggle_gap)):
        if not 0.0 <= g < x_max:
            raise ValueError(f"need 0 <= {name} < x_max, got {name}={g}, x_max={x_max}")
    h = num_points // 2
    side = _side_grid(h, gap, x_max)
    x = np.concatenate([-side[::-1], side])
    # w(x) = (sin(ω|x| + φ) - c0 - c1|x|) / rms, (c0, c1) and rms from the wiggle_gap grid's t = |x|.
    t_ref = _side_grid(h, wiggle_gap, x_max)
    s_ref = np.sin(frequency * t_ref + phase)
    basis = np.stack([np.ones_like(t_ref), t_ref], axis=1)
    coef, *_ = np.linalg.lstsq(basis, s_ref, rcond=None)
    rms = np.sqrt(np.mean((s_ref - basis @ coef) ** 2))
    t = np.abs(x)
    wiggle = np.sin(frequency * t + phase) - coef[0] - coef[1] * t
    if rms > 0:
        wiggle = wiggle / rms
    v = np.where(x < 0, slope_left * x, slope_right * x)
    eps = np.random.default_rng(seed).standard_normal(num_points)
    y = v + amplitude * wiggle + noise * eps
    return x[:, None].astype(np.float32), y[:, None].astype(np.float32)


def two_piece_affine_loss(
    x: np.ndarray | jax.Array,
    y: np.ndarray | jax.Array,
    *,
    split: float = 0.0,
    continuous: bool = False,
) -> float:
    """Mean squared error of the best least-squares fit by two affine pieces split at ``split``.

    With ``continuous=False`` (default) the pieces are independent,
    ``g(x) = a_L + b_L·x`` for ``x < split`` and ``a_R + b_R·x`` for ``x >= split``: the lowest loss
    of any predictor that is affine on each side, which is what a ReLU network whose kinks all lie
    in the data's gap around 0 realizes. With ``continuous=True`` the pieces are joined at
    ``split``, ``g(x) = c + b_L·min(x - split, 0) + b_R·max(x - split, 0)``: the loss of a single
    kink exactly at ``split`` (what a zero-bias network can express). Computed in float64.

    Args:
      x: inputs, shape ``[N]`` or ``[N, 1]``.
      y: targets, shape ``[N]`` or ``[N, 1]``.
      split: where the pieces meet.
      continuous: join the two pieces at ``split``.

    Returns:
      ``(1/N) Σ_i (g(x_i) - y_i)²`` for the least-squares ``g`` as a Python float.

    Raises:
      ValueError: if the shapes differ or a side has fewer than 2 points (independent pieces).
    """
    xs = np.asarray(x, np.float64).reshape(-1)
    ys = np.asarray(y, np.float64).reshape(-1)
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must hold the same number of points, got {xs.shape}, {ys.shape}")
    left = xs < split
    if continuous:
        d = xs - split
        basis = np.stack([np.ones_like(d), np.minimum(d, 0.0), np.maximum(d, 0.0)], axis=1)
        coef, *_ = np.linalg.lstsq(basis, ys, rcond=None)
        return float(np.mean((basis @ coef - ys) ** 2))
    sse = 0.0
    for mask in (left, ~left):
        if mask.sum() < 2:
            raise ValueError("each side of `split` needs at least 2 points")
        sse += float(np.sum(_affine_residual(xs[mask], ys[mask]) ** 2))
    return sse / xs.size


def affine_check_grid(x: np.ndarray | jax.Array, num: int = 601) -> np.ndarray:
    """An even grid over the data's range, ``[min x, max x]``, to evaluate predictors on.

    Args:
      x: the data inputs, shape ``[N]`` or ``[N, 1]``.
      num: number of grid points G.

    Returns:
      float32 array of shape ``[G, 1]`` (ready for ``KinkMLP().apply``).
    """
    xs = np.asarray(x, np.float64).reshape(-1)
    return np.linspace(xs.min(), xs.max(), num)[:, None].astype(np.float32)


def affine_deviation(
    predictions: np.ndarray | jax.Array,
    x_grid: np.ndarray | jax.Array,
    *,
    radius: float,
) -> jax.Array:
    """How far a predictor is from being affine on each side of ``(-radius, radius)``.

    For each side ``S_- = {x_g <= -radius}`` and ``S_+ = {x_g >= radius}`` of the grid, fits
    ``c0 + c1·x`` to the predictions by least squares and returns

        D = max_{side} max_{g in side} |p_g - c0_side - c1_side · x_g|.

    ``D`` is 0 (to float precision) exactly when every kink of the predictor inside the grid's
    range lies in ``(-radius, radius)``. The fit is a fixed projection computed from the (concrete)
    grid, so this function is jit/vmap friendly in ``predictions``.

    Args:
      predictions: ``[..., G]`` or ``[..., G, 1]``, the predictor's values on ``x_grid``.
      x_grid: ``[G]`` or ``[G, 1]``, concrete (not traced); each side needs at least 2 points.
      radius: half-width of the interval where kinks are allowed.

    Returns:
      ``D`` with shape ``[...]`` (the leading axes of ``predictions``).
    """
    g = np.asarray(x_grid, np.float64).reshape(-1)
    p = jnp.asarray(predictions)
    if p.shape[-1] == 1 and p.ndim >= 2 and p.shape[-2] == g.size:
        p = p[..., 0]
    if p.shape[-1] != g.size:
        raise ValueError(f"predictions end in {p.shape[-1]} values but the grid has {g.size}")
    devs = []
    for mask in (g <= -radius, g >= radius):
        idx = np.flatnonzero(mask)
        if idx.size < 2:
            raise ValueError(f"fewer than 2 grid points with |x| >= radius={radius} on one side")
        basis = np.stack([np.ones(idx.size), g[idx]], axis=1)
        resid = np.eye(idx.size) - basis @ np.linalg.pinv(basis)  # I - A A⁺, symmetric
        r = p[..., idx] @ jnp.asarray(resid, p.dtype)
        devs.append(jnp.max(jnp.abs(r), axis=-1))
    return jnp.maximum(devs[0], devs[1])


def is_stuck(
    predictions: np.ndarray | jax.Array | Callable[[np.ndarray], jax.Array],
    x_grid: np.ndarray | jax.Array,
    *,
    radius: float,
    atol: float = 0.05,
) -> jax.Array:
    """Whether a predictor is the "two affine pieces, kink(s) near 0" solution.

    Stuck means ``affine_deviation(predictions, x_grid, radius=radius) <= atol``: on the grid the
    predictor is, to ``atol`` (in units of y), affine on ``x <= -radius`` and on ``x >= radius``,
    i.e. all its kinks lie in ``(-radius, radius)``. Use ``radius = gap`` of the data (kinks in the
    data's empty interval) and ``x_grid = affine_check_grid(x)``. Trained networks on
    ``make_kink_data`` are bimodal: stuck ones have ``D`` at float32 round-off, the others ``D``
    of the order of the wiggle's amplitude, so the verdict does not hinge on ``atol``.

    Args:
      predictions: ``[..., G]`` or ``[..., G, 1]`` values on ``x_grid``, or a callable mapping
        ``x_grid`` (shape ``[G, 1]``) to them, e.g. ``lambda g: KinkMLP().apply(params, g)``.
      x_grid: ``[G]`` or ``[G, 1]`` concrete grid over the data's range.
      radius: half-width of the interval around 0 where the kinks of a stuck predictor lie.
      atol: tolerance on the largest deviation from affine, in units of y.

    Returns:
      Boolean array of shape ``[...]``.
    """
    if callable(predictions):
        g = np.asarray(x_grid, np.float32).reshape(-1, 1)
        predictions = predictions(g)
    return affine_deviation(predictions, x_grid, radius=radius) <= atol
