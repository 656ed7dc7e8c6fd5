"""Tests of the 1-D kink data generator and the "stuck" criterion (pnjax/data/kink.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pnjax.data import (
    affine_check_grid,
    affine_deviation,
    is_stuck,
    make_kink_data,
    two_piece_affine_loss,
)


def test_deterministic_and_seed_dependent():
    x1, y1 = make_kink_data(60, gap=1.0, seed=3)
    x2, y2 = make_kink_data(60, gap=1.0, seed=3)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    _, y3 = make_kink_data(60, gap=1.0, seed=4)
    assert not np.array_equal(y1, y3)


@pytest.mark.parametrize("n", [6, 60, 100])
def test_shapes_dtype_sorted(n):
    x, y = make_kink_data(n)
    assert x.shape == (n, 1) and y.shape == (n, 1)
    assert x.dtype == np.float32 and y.dtype == np.float32
    assert np.all(np.diff(x[:, 0]) > 0)
    assert np.all(np.isfinite(y))


@pytest.mark.parametrize("gap", [0.5, 1.0, 2.0])
def test_gap_is_empty_and_sides_balanced(gap):
    x, _ = make_kink_data(60, gap=gap, x_max=3.0)
    xs = x[:, 0]
    assert np.all(np.abs(xs) > gap)
    assert np.all(np.abs(xs) <= 3.0)
    assert (xs < 0).sum() == (xs > 0).sum() == 30
    np.testing.assert_allclose(xs, -xs[::-1])  # symmetric grid


def test_no_gap_is_one_even_grid():
    x, _ = make_kink_data(60, gap=0.0, x_max=3.0)
    np.testing.assert_allclose(np.diff(x[:, 0]), 0.1, rtol=1e-5)


def _reference_curve(x, wiggle_gap, x_max=3.0, h=30, amp=2.0, freq=2.0, sl=-1.0, sr=1.5):
    """The documented target ``v(x) + A·w(x)`` computed independently with ``np.polyfit``."""
    t_ref = wiggle_gap + (x_max - wiggle_gap) * (np.arange(h) + 0.5) / h
    s_ref = np.sin(freq * t_ref)
    coef = np.polyfit(t_ref, s_ref, 1)
    r = np.sqrt(np.mean((s_ref - np.polyval(coef, t_ref)) ** 2))
    t = np.abs(x)
    return np.where(x < 0, sl * x, sr * x) + amp * (np.sin(freq * t) - np.polyval(coef, t)) / r


@pytest.mark.parametrize(("gap", "wiggle_gap"), [(1.0, None), (0.0, None), (0.0, 1.0), (0.5, 1.0)])
def test_target_formula(gap, wiggle_gap):
    """Noiseless y is the documented curve; ``wiggle_gap`` fills the gapped curve in."""
    x, y = make_kink_data(60, gap=gap, wiggle_gap=wiggle_gap, noise=0.0)
    xs = x[:, 0].astype(np.float64)
    ref = _reference_curve(xs, gap if wiggle_gap is None else wiggle_gap)
    np.testing.assert_allclose(y[:, 0], ref, rtol=1e-5, atol=1e-5)


def test_wiggle_is_affine_free_per_side():
    x, y = make_kink_data(60, gap=1.0, noise=0.0, slope_left=0.0, slope_right=0.0)
    xs, ys = x[:, 0].astype(np.float64), y[:, 0].astype(np.float64)
    for m in (xs < 0, xs > 0):
        np.testing.assert_allclose(np.polyfit(xs[m], ys[m], 1), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.mean(ys**2), 4.0, rtol=1e-5)  # unit RMS times A = 2


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_kink_data(61)
    with pytest.raises(ValueError):
        make_kink_data(60, gap=3.0, x_max=3.0)
    with pytest.raises(ValueError):
        make_kink_data(60, gap=-0.1)


def _numpy_two_piece(x, y, continuous):
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if continuous:
        a = np.stack([np.ones_like(x), np.minimum(x, 0), np.maximum(x, 0)], 1)
        c = np.linalg.lstsq(a, y, rcond=None)[0]
        return np.mean((a @ c - y) ** 2)
    sse = 0.0
    for m in (x < 0, x >= 0):
        coef = np.polyfit(x[m], y[m], 1)
        sse += np.sum((np.polyval(coef, x[m]) - y[m]) ** 2)
    return sse / x.size


@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("gap", [0.0, 1.0])
def test_two_piece_loss_matches_numpy(gap, continuous):
    x, y = make_kink_data(60, gap=gap, seed=1)
    got = two_piece_affine_loss(x, y, continuous=continuous)
    np.testing.assert_allclose(got, _numpy_two_piece(x, y, continuous), rtol=1e-9)


def test_two_piece_loss_is_wiggle_energy_and_exact_for_affine_pieces():
    amp, noise = 2.0, 0.1
    x, y = make_kink_data(60, gap=1.0, amplitude=amp, noise=noise)
    ref = two_piece_affine_loss(x, y)
    assert abs(ref - (amp**2 + noise**2)) < 0.3  # ~A² + σ²: wiggle is affine-free per side
    assert ref < float(np.var(y))  # but it is clearly worse than a fit that bends
    xs = x[:, 0].astype(np.float64)
    pieces = np.where(xs < 0, 0.3 - 2.0 * xs, -1.0 + 0.5 * xs)
    assert two_piece_affine_loss(xs, pieces) < 1e-20
    kink = np.abs(xs)
    assert two_piece_affine_loss(xs, kink, continuous=True) < 1e-20


def test_two_piece_loss_shape_errors():
    with pytest.raises(ValueError):
        two_piece_affine_loss(np.zeros(5), np.zeros(6))
    with pytest.raises(ValueError):
        two_piece_affine_loss(np.array([-1.0, 1.0, 2.0]), np.zeros(3))


def test_stuck_criterion_hand_built():
    x, y = make_kink_data(60, gap=1.0)
    grid = affine_check_grid(x)
    g = grid[:, 0].astype(np.float64)
    assert grid.shape == (601, 1) and grid.dtype == np.float32
    # Stuck: two affine pieces, joined by a bend inside the gap (not necessarily at 0).
    stuck = np.where(g < -0.2, 1.0 - 0.8 * g, np.where(g > 0.5, 2.0 + 1.3 * g, 1.16 + 3.0 * g))
    stuck_v = 1.5 * np.abs(g)
    # Not stuck: a kink inside the data at x = 2, and a smooth curve.
    kink_in_data = 1.5 * np.abs(g) + 2.0 * np.maximum(g - 2.0, 0.0)
    curved = np.sin(2.0 * g)
    preds = np.stack([stuck, stuck_v, kink_in_data, curved]).astype(np.float32)
    verdict = np.asarray(is_stuck(preds, grid, radius=1.0))
    np.testing.assert_array_equal(verdict, [True, True, False, False])
    dev = np.asarray(affine_deviation(preds[..., None], grid, radius=1.0))  # [..., G, 1] works
    assert dev.shape == (4,)
    assert dev[0] < 1e-4 and dev[1] < 1e-4 and dev[2] > 0.1 and dev[3] > 0.1
    # A kink inside the gap only counts with a radius that contains it.
    assert not bool(is_stuck(stuck, grid, radius=0.1))


def test_stuck_criterion_on_networks():
    """A zero-bias ReLU net (every kink at 0) is stuck; one with a bias moving a kink is not."""
    from pnjax.models import KinkMLP

    x, _ = make_kink_data(60, gap=1.0)
    grid = affine_check_grid(x)
    model = KinkMLP()
    params = model.init(jax.random.key(0), jnp.asarray(x))
    assert bool(is_stuck(lambda gx: model.apply(params, gx), grid, radius=1.0))
    moved = jax.tree_util.tree_map(lambda a: a, params)
    w1 = moved["params"]["Dense_0"]["kernel"][0]
    b1 = -2.0 * w1  # every first-layer kink at x = 2, inside the data
    moved["params"]["Dense_0"]["bias"] = b1
    assert not bool(is_stuck(lambda gx: model.apply(moved, gx), grid, radius=1.0))


def test_is_stuck_jit_and_vmap():
    x, _ = make_kink_data(60, gap=1.0)
    grid = affine_check_grid(x, 101)
    g = jnp.asarray(grid[:, 0])
    slopes = jnp.linspace(-1.0, 1.0, 5)
    preds = jax.vmap(lambda s: s * jnp.abs(g) + jnp.sin(s * 3.0) * jnp.maximum(g - 2.0, 0.0))(
        slopes
    )
    out = jax.jit(lambda p: is_stuck(p, grid, radius=1.0, atol=1e-3))(preds)
    expected = np.abs(np.sin(np.asarray(slopes) * 3.0)) < 1e-3
    np.testing.assert_array_equal(np.asarray(out), expected)
