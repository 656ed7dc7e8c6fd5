"""Active Neuron Least Squares (ANLS) for one-hidden-layer ReLU regression.

The network is ``N(x) = Σ_j c_j relu(w_j·x + b_j) + c_0`` (Flax layout: ``Dense_0`` with kernel
``W [d, m]`` and bias ``b [m]``, then ``Dense_1`` with kernel ``c [m, 1]`` and bias ``c_0 [1]``),
trained on the mean squared error ``L = (1/N) Σ_i (N(x_i) - y_i)²``.

Why least squares (Ainsworth and Shin, arXiv 2007.07213). The *activation pattern* is the
``[N, m]`` boolean matrix ``A_ij = [w_j·x_i + b_j > 0]``. While it is fixed, ``N(x_i) =
Σ_j A_ij u_j·x̃_i + c_0`` with ``x̃ = [x, 1]`` and ``u_j = c_j [w_j, b_j]``: the network is linear
in ``(u, c_0)`` and the loss a convex quadratic, so a stationary point of gradient descent is a
least-squares fit of each unit's affine piece on the subset of data it is active on. Gradient
descent on a plateau is gradient descent *inside* one pattern; nothing in the gradient tells a
unit to move its breakpoint past a data point it does not yet touch (the kink data of
:func:`pnjax.data.make_kink_data` is the extreme case: every breakpoint in the data's gap, the
gradient of every breakpoint position exactly zero at the two-affine-pieces fit).

The rule implemented here. The papers' own update rule was not at hand when this was written;
this is a rule built from the abstract's description ("explicit adjustment of the activation
pattern at each step" plus least squares), chosen so that every accepted step is a realizable
network whose true loss went down. One *sweep* is:

1. **Pattern moves, one unit at a time** (``j = 1..m`` in order). Sort unit ``j``'s
   pre-activations ``z_ij = w_j·x_i + b_j`` over the data. The candidates for ``(w_j, b_j)``
   are: unchanged; the bias shifted so that the breakpoint passes the ``k`` nearest active
   points (they become inactive; the new threshold lies midway between the ``k``-th and
   ``k+1``-th smallest positive ``z``), for every ``k`` in ``moves``; the bias shifted so that
   the ``k`` nearest inactive points become active (midway on the other side); and the
   orientation flipped, ``(w_j, b_j) -> -(w_j, b_j)`` (the unit's pattern complemented). For
   each candidate hidden layer the output layer ``(c, c_0)`` is the exact least-squares
   solution for the now fixed features ``relu(x W + b)``, so each candidate's loss is the true
   loss of a network. The best candidate replaces unit ``j`` if its loss is below the current
   one by a relative ``1e-6`` (so float round-off never makes the search churn).
2. **Least squares inside the pattern** (``refit_hidden=True``). With ``A`` fixed, the
   minimizer ``u*`` of the quadratic above is a least-squares solve; it may not be realizable
   (a unit's new zero crossing may leave the pattern), so the step is ``u(t) = u + t (u* - u)``
   for ``t`` in ``1, 1/2, ..., 2^-12``, mapped back to parameters with ``c_j = s_j √|u_j|`` and
   ``[w_j, b_j] = u_j / c_j`` (``s_j`` the current sign of ``c_j``, which keeps the orientation),
   and the ``t`` with the lowest true loss is kept if it beats the current loss. For small
   ``t`` the pattern does not change and the quadratic decreases, so this step stalls only at a
   least-squares fit of the pattern: the stationary points of gradient descent.

Every accepted step lowers the loss, so ANLS is monotone; it stops improving at a network that
is least-squares optimal for its pattern *and* for every pattern one move away. Its cost is
``(2 len(moves) + 2) m`` least-squares solves of size ``[N, m + 1]`` per sweep plus one of size
``[N, m (d + 1) + 1]`` (QR with a 1e-7 relative ridge): cheap for the small regressions it is meant
for (``N`` up to a few thousand, ``m`` up to a few hundred).

References:
  M. Ainsworth and Y. Shin, "Plateau Phenomenon in Gradient Descent Training of ReLU networks:
  Explanation, Quantification and Avoidance", arXiv 2007.07213 (2020); SIAM J. Sci. Comput.
  43(5) (2021). "Active Neuron Least Squares: A training method for multivariate rectified
  neural networks", SIAM J. Sci. Comput. 44(4) (2022).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["ANLSResult", "anls", "anls_sweep", "one_hidden_loss"]

_RTOL = 1e-6
_STEPS = 13  # t = 1, 1/2, ..., 2^-12


@dataclasses.dataclass(frozen=True)
class ANLSResult:
    """What :func:`anls` returns.

    Attributes:
      params: the final parameters, in the layout they were given in.
      losses: ``[sweeps + 1]`` float64 mean squared errors, before the first sweep and after each.
      accepted_moves: ``[sweeps]`` number of units whose pattern move was accepted per sweep.
    """

    params: PyTree
    losses: np.ndarray
    accepted_moves: np.ndarray


def _unpack(params: PyTree) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, bool]:
    """``(W [d, m], b [m], c [m], c0 [])`` from Flax Dense params (optionally under 'params')."""
    wrapped = isinstance(params, dict) and set(params) == {"params"}
    p = params["params"] if wrapped else params
    if not (isinstance(p, dict) and set(p) == {"Dense_0", "Dense_1"}):
        keys = sorted(p) if isinstance(p, dict) else type(p).__name__
        raise ValueError(
            "anls needs the params of a one-hidden-layer network, a dict with exactly "
            f"'Dense_0' and 'Dense_1' (e.g. KinkMLP(features=(m, 1))), got {keys}."
        )
    W, b = p["Dense_0"]["kernel"], p["Dense_0"]["bias"]
    c, c0 = p["Dense_1"]["kernel"], p["Dense_1"]["bias"]
    if W.ndim != 2 or c.shape != (W.shape[1], 1) or b.shape != (W.shape[1],) or c0.shape != (1,):
        raise ValueError(
            "anls handles one output: need Dense_0 kernel [d, m], bias [m] and Dense_1 kernel "
            f"[m, 1], bias [1]; got {W.shape}, {b.shape}, {c.shape}, {c0.shape}."
        )
    return W, b, c[:, 0], c0[0], wrapped


def _pack(W, b, c, c0, wrapped: bool) -> PyTree:
    p = {
        "Dense_0": {"kernel": W, "bias": b},
        "Dense_1": {"kernel": c[:, None], "bias": c0[None]},
    }
    return {"params": p} if wrapped else p


def one_hidden_loss(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error ``(1/N) Σ_i (N(x_i) - y_i)²`` of the one-hidden-layer ReLU network.

    Args:
      params: Flax params with ``Dense_0`` (``[d, m]``, ``[m]``) and ``Dense_1`` (``[m, 1]``,
        ``[1]``), optionally under a ``'params'`` key.
      x: ``[N, d]`` inputs.
      y: ``[N]`` or ``[N, 1]`` targets.

    Returns:
      Scalar loss.
    """
    W, b, c, c0, _ = _unpack(params)
    pred = jax.nn.relu(x @ W + b) @ c + c0
    return jnp.mean((pred - y.reshape(-1)) ** 2)


def _lstsq(A: jax.Array, y: jax.Array) -> jax.Array:
    """``argmin_c ||A c - y||² + δ ||c||²`` with ``δ = 1e-7 ||A||_F² / k``, by QR.

    The tiny ridge makes the problem full rank (dead units give zero columns, coincident
    breakpoints equal ones) and picks a near minimum-norm solution; QR of the stacked tall
    matrix ``[A; √δ I]`` is used because XLA:CPU's SVD (behind ``jnp.linalg.lstsq``) takes
    a few tenths of a second on the wide ``[60, 65]`` problems here, QR a tenth of a
    millisecond.
    """
    k = A.shape[1]
    delta = 1e-7 * jnp.sum(A * A) / k + jnp.finfo(A.dtype).tiny
    tall = jnp.concatenate([A, jnp.sqrt(delta) * jnp.eye(k, dtype=A.dtype)], axis=0)
    q, r = jnp.linalg.qr(tall)
    rhs = q[: A.shape[0]].T @ y
    return jax.scipy.linalg.solve_triangular(r, rhs, lower=False)


def _output_lstsq(H: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Least-squares ``(c, c0)`` for features ``H [N, m]``; returns ``(c, c0, loss)``."""
    A = jnp.concatenate([H, jnp.ones((H.shape[0], 1), H.dtype)], axis=1)
    coef = _lstsq(A, y)
    loss = jnp.mean((A @ coef - y) ** 2)
    return coef[:-1], coef[-1], loss


def _loss(W, b, c, c0, x, y):
    return jnp.mean((jax.nn.relu(x @ W + b) @ c + c0 - y) ** 2)


def _candidate_biases(z: jax.Array, b: jax.Array, moves: Sequence[int]) -> jax.Array:
    """Biases that move the breakpoint past ``k`` data points either way (see module docstring).

    ``z [N]`` are one unit's pre-activations; the sorted values are padded with one point below
    the smallest and one above the largest, so a move past every point is still defined.
    """
    n = z.shape[0]
    zs = jnp.sort(z)
    spread = zs[-1] - zs[0] + 1.0
    zp = jnp.concatenate([zs[:1] - spread, zs, zs[-1:] + spread])  # [N + 2]
    p = jnp.sum(z <= 0)  # inactive count; zp[1:p+1] inactive, zp[p+1:] active
    out = []
    for k in moves:
        hi = jnp.minimum(p + k, n)  # deactivate the k smallest positive z: zs[p .. p+k-1]
        out.append(b - 0.5 * (zp[hi] + zp[hi + 1]))
        lo = jnp.maximum(p - k, 0)  # activate the k largest non-positive z: zs[p-k .. p-1]
        out.append(b - 0.5 * (zp[lo] + zp[lo + 1]))
    return jnp.stack(out)


def _unit_moves(carry, j, x, y, moves):
    """Pattern moves of unit ``j`` (step 1 of a sweep)."""
    W, b, c, c0, loss, accepted = carry
    z = x @ W[:, j] + b[j]
    biases = _candidate_biases(z, b[j], moves)  # [2K]
    cand_w = jnp.concatenate(
        [W[:, j][None], jnp.broadcast_to(W[:, j], (biases.shape[0], W.shape[0])), -W[:, j][None]]
    )  # [2K + 2, d]
    cand_b = jnp.concatenate([b[j][None], biases, -b[j][None]])

    def solve(wj, bj):
        Wn, bn = W.at[:, j].set(wj), b.at[j].set(bj)
        cn, c0n, ln = _output_lstsq(jax.nn.relu(x @ Wn + bn), y)
        return Wn, bn, cn, c0n, ln

    Ws, bs, cs, c0s, ls = jax.vmap(solve)(cand_w, cand_b)
    ls = jnp.where(jnp.isfinite(ls), ls, jnp.inf)
    i = jnp.argmin(ls)
    better = ls[i] < loss * (1.0 - _RTOL)
    pick = lambda new, old: jnp.where(better, new[i], old)  # noqa: E731
    moved = better & (i > 0)
    return (
        pick(Ws, W),
        pick(bs, b),
        pick(cs, c),
        pick(c0s, c0),
        jnp.where(better, ls[i], loss),
        accepted + moved.astype(jnp.int32),
    ), None


def _pattern_lstsq(W, b, c, c0, loss, x, y):
    """Least squares inside the current pattern with a backtracked step (step 2 of a sweep)."""
    n, d = x.shape
    m = W.shape[1]
    xt = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], axis=1)  # [N, d + 1]
    act = (x @ W + b > 0).astype(x.dtype)  # [N, m]
    phi = (act[:, :, None] * xt[:, None, :]).reshape(n, m * (d + 1))
    phi = jnp.concatenate([phi, jnp.ones((n, 1), x.dtype)], axis=1)
    sol = _lstsq(phi, y)
    u_star, c0_star = sol[:-1].reshape(m, d + 1), sol[-1]
    theta = jnp.concatenate([W.T, b[:, None]], axis=1)  # [m, d + 1]
    u = c[:, None] * theta
    sign = jnp.where(c < 0, -1.0, 1.0).astype(x.dtype)

    def at(t):
        ut = u + t * (u_star - u)
        norm = jnp.linalg.norm(ut, axis=1)
        ct = sign * jnp.sqrt(norm)
        safe = jnp.where(norm > 0, ct, 1.0)
        th = jnp.where((norm > 0)[:, None], ut / safe[:, None], theta)
        Wt, bt = th[:, :-1].T, th[:, -1]
        c0t = c0 + t * (c0_star - c0)
        return Wt, bt, ct, c0t, _loss(Wt, bt, ct, c0t, x, y)

    ts = 0.5 ** jnp.arange(_STEPS, dtype=x.dtype)
    Ws, bs, cs, c0s, ls = jax.vmap(at)(ts)
    ls = jnp.where(jnp.isfinite(ls), ls, jnp.inf)
    i = jnp.argmin(ls)
    better = ls[i] < loss * (1.0 - _RTOL)
    pick = lambda new, old: jnp.where(better, new[i], old)  # noqa: E731
    return pick(Ws, W), pick(bs, b), pick(cs, c), pick(c0s, c0), jnp.where(better, ls[i], loss)


def _check_moves(moves: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(moves)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                     for k in ks):
        raise ValueError(f"moves must be a non-empty sequence of ints >= 1, got {moves!r}")
    return tuple(int(k) for k in ks)


def anls_sweep(
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    moves: Sequence[int] = (1, 2, 4),
    refit_hidden: bool = True,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """One ANLS sweep (pattern moves for every unit, then least squares inside the pattern).

    Pure and jit-able (``moves`` and ``refit_hidden`` static). See the module docstring for the
    rule.

    Args:
      params: one-hidden-layer Flax params (``Dense_0`` ``[d, m]``, ``[m]``; ``Dense_1``
        ``[m, 1]``, ``[1]``), optionally under ``'params'``.
      x: ``[N, d]`` inputs.
      y: ``[N]`` or ``[N, 1]`` targets.
      moves: the numbers ``k`` of data points a breakpoint may pass in one move.
      refit_hidden: also take the backtracked least-squares step inside the pattern.

    Returns:
      ``(params, loss, accepted)``: the new params (same layout), their mean squared error and
      the number of units whose pattern changed.
    """
    ks = _check_moves(moves)
    W, b, c, c0, wrapped = _unpack(params)
    x = jnp.asarray(x, W.dtype)
    y = jnp.asarray(y, W.dtype).reshape(-1)
    if x.ndim != 2 or x.shape[1] != W.shape[0] or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"need x [N, {W.shape[0]}] and y [N] or [N, 1], got x {x.shape}, y {y.shape}"
        )
    loss = _loss(W, b, c, c0, x, y)
    carry = (W, b, c, c0, loss, jnp.int32(0))
    carry, _ = jax.lax.scan(
        lambda cr, j: _unit_moves(cr, j, x, y, ks), carry, jnp.arange(W.shape[1])
    )
    W, b, c, c0, loss, accepted = carry
    if refit_hidden:
        W, b, c, c0, loss = _pattern_lstsq(W, b, c, c0, loss, x, y)
    return _pack(W, b, c, c0, wrapped), loss, accepted


def anls(
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    *,
    sweeps: int = 20,
    moves: Sequence[int] = (1, 2, 4),
    refit_hidden: bool = True,
) -> ANLSResult:
    """Trains a one-hidden-layer ReLU regression network by Active Neuron Least Squares.

    Each sweep changes every unit's activation pattern where that lowers the loss and solves
    the least-squares problems exactly (module docstring); the loss never goes up.

    Examples:
      >>> import jax, numpy as np
      >>> from pnjax.baselines import anls
      >>> from pnjax.models import KinkMLP
      >>> from pnjax.data import make_kink_data
      >>> x, y = make_kink_data()
      >>> params = KinkMLP(features=(16, 1)).init(jax.random.key(0), x)['params']
      >>> res = anls(params, x, y, sweeps=5)
      >>> bool(res.losses[-1] < 0.2 * res.losses[0])
      True

    Args:
      params: one-hidden-layer Flax params, e.g. ``KinkMLP(features=(m, 1))``'s.
      x: ``[N, d]`` inputs.
      y: ``[N]`` or ``[N, 1]`` targets.
      sweeps: number of sweeps (each ``(2 len(moves) + 2) m + 1`` least-squares solves).
      moves: how many data points a breakpoint may pass in one move.
      refit_hidden: take the least-squares step inside the pattern after the moves.

    Returns:
      An :class:`ANLSResult`.

    Raises:
      ValueError: params not of a one-hidden-layer, one-output network; shapes of ``x``, ``y``
        that do not match; ``sweeps`` or ``moves`` not positive ints.
    """
    if isinstance(sweeps, bool) or not isinstance(sweeps, (int, np.integer)) or sweeps < 1:
        raise ValueError(f"sweeps must be an int >= 1, got {sweeps!r}")
    ks = _check_moves(moves)
    x, y = jnp.asarray(x), jnp.asarray(y)
    losses = [float(one_hidden_loss(params, x, y))]
    accepted = []
    for _ in range(int(sweeps)):
        params, loss, acc = _jitted_sweep(params, x, y, moves=ks, refit_hidden=refit_hidden)
        losses.append(float(loss))
        accepted.append(int(acc))
    return ANLSResult(params, np.asarray(losses), np.asarray(accepted))


_jitted_sweep = jax.jit(anls_sweep, static_argnames=("moves", "refit_hidden"))
