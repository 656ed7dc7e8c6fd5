"""Neuron splitting for Dense networks: splitting steepest descent (S2D) and signed splitting (S3D).

Splitting a hidden neuron ``h_j(x) = σ(θ_j·x̃)`` (``x̃ = [x, 1]``, ``θ_j`` its kernel column and
bias, ``a_j`` its outgoing row of the next kernel) into copies ``θ_j + ε δ_k`` that carry
``w_k a_j`` (``Σ_k w_k = 1``) leaves the network unchanged at ``ε = 0``. When the weighted mean
displacement ``Σ_k w_k δ_k`` is zero, the first-order change of the loss vanishes and

    L(split) - L = (ε²/2) Σ_k w_k δ_kᵀ S_j δ_k + O(ε³),
    S_j = E_x[ g_j(x) σ''(θ_j·x̃) x̃ x̃ᵀ ],   g_j = ∂L/∂h_j,

the *splitting matrix* of neuron ``j`` (Liu, Wu and Wang, arXiv 1910.02366), ``[d+1, d+1]``.
Neurons are split together, all hidden layers at once, and to second order their changes add.

**S2D** (positive split): copies ``θ_j ± ε v_min`` with ``w = 1/2`` each; the change is
``(ε²/2) λ_min(S_j)``, a descent when ``λ_min < 0``. When every ``λ_min >= 0`` the network is
"splitting stable" and S2D cannot help.

**S3D** (signed split, Wu, Ye, Lei, Lee and Liu, arXiv 2003.10392, as derived here from its
abstract): a copy may carry a negative weight. With ``c >= 1`` the bound on ``Σ_k |w_k|``,
copies ``θ_j + ε r v_max`` and ``θ_j + ε v_max`` with weights ``(c+1)/2`` and ``-(c-1)/2``,
``r = (c-1)/(c+1)``, have zero weighted mean displacement and change the loss by
``-(ε²/2) λ_max (c-1)/(c+1)``, a descent whenever ``λ_max > 0``. Per neuron the signed scheme
takes whichever of the two splits predicts the larger decrease, so some split lowers the loss
unless every ``S_j`` is zero (checked by ``tests/test_splitting.py``).

**How S is obtained** (as in the S2D authors' code): a zero dummy ``V_j`` enters through the
added term ``h_j <- h_j + σ''(z_j) x̃ᵀ V_j x̃``, which changes no forward value, and
``S_j = ∂L/∂V_j``. For ReLU, whose ``σ''`` is zero almost everywhere, ``σ''`` is that of
``softplus_β(z) = log(1 + e^{βz}) / β`` with ``β = 3`` (:func:`softplus_curvature`); for a smooth
activation it is the activation's own second derivative (by autodiff). ``S`` is averaged over
the batches and symmetrized.

**Which neurons**: the ``fraction`` (default 30%) of all hidden neurons with the smallest
predicted change (``λ_min`` for S2D; ``min(λ_min, -λ_max (c-1)/(c+1))`` for S3D) over the whole
network (one global threshold).

**Surgery**: the model must be a chain of Dense layers with an elementwise activation between
them and none after the last (:func:`mlp_apply`), its params a dict ``{name: {'kernel': [in,
out], 'bias': [out]}}`` whose names sort into the chain's order (Flax's ``Dense_0``,
``Dense_1``, ... as in :class:`pnjax.models.KinkMLP`). A split layer gains columns (kernel)
and entries (bias), the next layer gains kernel rows; the first copy stays at the neuron's
index, the second is appended. Build the grown model from :func:`hidden_widths` of the new
params (e.g. ``KinkMLP(features=hidden_widths(p) + (1,))``) and reset the optimizer.

References:
  Q. Liu, L. Wu and D. Wang, "Splitting Steepest Descent for Growing Neural Architectures",
  NeurIPS 2019, arXiv 1910.02366. L. Wu, M. Ye, Q. Lei, J. D. Lee and Q. Liu, "Steepest Descent
  Neural Architecture Optimization: Escaping Local Optimum with Signed Neural Splitting",
  arXiv 2003.10392.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Activation = Callable[[jax.Array], jax.Array]

__all__ = [
    "SplitResult",
    "extreme_eigenpairs",
    "hidden_widths",
    "mlp_apply",
    "softplus_curvature",
    "split_neurons",
    "splitting_matrices",
]


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _chain(params: PyTree) -> tuple[dict[str, Any], tuple[str, ...], bool]:
    """The Dense chain: ``(layers, names in order, wrapped under 'params')``, validated."""
    wrapped = isinstance(params, dict) and set(params) == {"params"}
    p = params["params"] if wrapped else params
    if not isinstance(p, dict) or len(p) < 2:
        raise ValueError(
            "splitting needs the params of a Dense chain with at least one hidden layer: a dict "
            f"{{name: {{'kernel', 'bias'}}}} of >= 2 layers, got {type(p).__name__} "
            f"{sorted(p) if isinstance(p, dict) else ''}."
        )
    names = tuple(sorted(p, key=_natural_key))
    prev = None
    for n in names:
        layer = p[n]
        if not (isinstance(layer, dict) and set(layer) == {"kernel", "bias"}):
            raise ValueError(
                f"layer {n!r} must hold exactly 'kernel' and 'bias' (a Dense layer with bias), "
                f"got {sorted(layer) if isinstance(layer, dict) else type(layer).__name__}."
            )
        k, b = layer["kernel"], layer["bias"]
        if k.ndim != 2 or b.shape != (k.shape[1],):
            raise ValueError(f"layer {n!r}: need kernel [in, out] and bias [out], got "
                             f"{k.shape}, {b.shape}.")
        if prev is not None and k.shape[0] != prev:
            raise ValueError(
                f"layer {n!r} takes {k.shape[0]} inputs but the layer before it has {prev} "
                "outputs; the names must sort into the chain's order (Dense_0, Dense_1, ...)."
            )
        prev = k.shape[1]
    return p, names, wrapped


def hidden_widths(params: PyTree) -> tuple[int, ...]:
    """Widths of the hidden Dense layers of a chain (every layer but the last), in order.

    Args:
      params: Dense-chain params (see the module docstring), optionally under ``'params'``.

    Returns:
      Tuple of ints, e.g. ``(32, 32)`` for ``KinkMLP()``.
    """
    p, names, _ = _chain(params)
    return tuple(int(p[n]["kernel"].shape[1]) for n in names[:-1])


def softplus_curvature(z: jax.Array, beta: float = 3.0) -> jax.Array:
    """``d²/dz² softplus_β(z) = β s(βz)(1 - s(βz))``, ``s`` the logistic sigmoid.

    The ReLU surrogate of the S2D authors' code (``β = 3``).

    Args:
      z: pre-activations, any shape.
      beta: sharpness β > 0.

    Returns:
      Array shaped like ``z``.
    """
    s = jax.nn.sigmoid(beta * z)
    return beta * s * (1.0 - s)


def _curvature_fn(activation: Activation, curvature: Activation | None) -> Activation:
    if curvature is not None:
        return curvature
    if activation is jax.nn.relu:
        return softplus_curvature
    return _autodiff_curvature(activation)


@functools.lru_cache(maxsize=64)
def _autodiff_curvature(activation: Activation) -> Activation:
    """Elementwise σ'' by autodiff (cached, so the compiled batch function is reused)."""
    second = jnp.vectorize(jax.grad(jax.grad(lambda t: activation(t))))
    return lambda z: second(z)


def _with_one(x: jax.Array) -> jax.Array:
    return jnp.concatenate([x, jnp.ones(x.shape[:-1] + (1,), x.dtype)], axis=-1)


def mlp_apply(
    params: PyTree,
    x: jax.Array,
    activation: Activation = jax.nn.relu,
    *,
    extra: Callable[[str, jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Forward pass of a Dense chain: ``h_{l+1} = σ(h_l K_l + b_l)``, no activation at the end.

    Equals ``KinkMLP(features=...).apply({'params': params}, x)`` for ReLU.

    Args:
      params: Dense-chain params (module docstring).
      x: ``[N, d]`` inputs.
      activation: σ, elementwise.
      extra: ``extra(name, z, x̃) -> [N, m]`` added to hidden layer ``name``'s activations
        (``z [N, m]`` its pre-activations, ``x̃ [N, in + 1]`` its input with a 1 appended).

    Returns:
      ``[N, out]`` outputs.
    """
    p, names, _ = _chain(params)
    h = x
    for i, n in enumerate(names):
        z = h @ p[n]["kernel"] + p[n]["bias"]
        if i == len(names) - 1:
            return z
        out = activation(z)
        if extra is not None:
            out = out + extra(n, z, _with_one(h))
        h = out
    raise AssertionError("unreachable")


def _batches(x: jax.Array, y: jax.Array, batch_size: int | None):
    n = x.shape[0]
    if batch_size is not None and (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or batch_size < 1
    ):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    if batch_size is None or batch_size >= n:
        yield x, y
        return
    for s in range(0, n - batch_size + 1, batch_size):
        yield x[s : s + batch_size], y[s : s + batch_size]



@functools.partial(jax.jit, static_argnames=("loss_fn", "activation", "curv", "method"))
def _batch_matrices(p, xb, yb, *, loss_fn, activation, curv, method):
    """One batch's ``{name: Σ_n g σ''(z) x̃ x̃ᵀ}`` (compiled once per functions and shapes)."""
    names = tuple(sorted(p, key=_natural_key))
    hidden = names[:-1]
    if method == "dummy":
        zeros = {
            n: jnp.zeros((p[n]["kernel"].shape[1],) + (p[n]["kernel"].shape[0] + 1,) * 2,
                         p[n]["kernel"].dtype)
            for n in hidden
        }

        def loss_of(V):
            def extra(n, z, xt):
                return curv(z) * jnp.einsum("ni,jik,nk->nj", xt, V[n], xt)

            return loss_fn(mlp_apply(p, xb, activation, extra=extra), yb)

        return jax.grad(loss_of)(zeros)

    taps = {}

    def record(n, z, xt):
        taps[n] = (z, xt)
        return 0.0

    mlp_apply(p, xb, activation, extra=record)  # the pre-activations and inputs
    offsets = {n: jnp.zeros_like(taps[n][0]) for n in hidden}

    def loss_off(off):
        return loss_fn(mlp_apply(p, xb, activation, extra=lambda n, z, xt: off[n]), yb)

    g = jax.grad(loss_off)(offsets)  # [B, m] per layer: ∂L/∂h_ij (L the batch mean)
    return {
        n: jnp.einsum("nj,ni,nk->jik", g[n] * curv(taps[n][0]), taps[n][1], taps[n][1])
        for n in hidden
    }


def splitting_matrices(
    params: PyTree,
    x: jax.Array,
    y: jax.Array,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    activation: Activation = jax.nn.relu,
    curvature: Activation | None = None,
    batch_size: int | None = None,
    method: str = "dummy",
) -> dict[str, jax.Array]:
    """Splitting matrices ``S_j = E_x[g_j σ''(z_j) x̃ x̃ᵀ]`` of every hidden neuron.

    Args:
      params: Dense-chain params (module docstring).
      x: ``[N, d]`` inputs.
      y: targets, whatever ``loss_fn`` takes (leading axis ``N``).
      loss_fn: ``loss_fn(outputs [B, out], y_batch) -> scalar``, a mean over the batch.
      activation: σ of the hidden layers.
      curvature: σ'' to use (default: :func:`softplus_curvature` for ``jax.nn.relu``, autodiff
        of ``activation`` otherwise).
      batch_size: average the per-batch matrices over full batches of this size (default: one
        batch, all of ``x``); a ragged last batch is dropped.
      method: ``'dummy'`` (the gradient of a zero dummy matrix, as in the S2D authors' code) or
        ``'direct'`` (``g`` from per-example gradients with respect to the activations, then
        the sum written out); they agree to round-off.

    Returns:
      ``{hidden layer name: [m, in + 1, in + 1]}`` symmetric matrices (the last row and column
      belong to the bias).

    Raises:
      ValueError: bad params, batch size or method.
    """
    if method not in ("dummy", "direct"):
        raise ValueError(f"method must be 'dummy' or 'direct', got {method!r}")
    p, names, _ = _chain(params)
    curv = _curvature_fn(activation, curvature)
    one = functools.partial(
        _batch_matrices, loss_fn=loss_fn, activation=activation, curv=curv, method=method
    )
    total, count = None, 0
    for xb, yb in _batches(x, y, batch_size):
        s = one(p, xb, yb)
        total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
        count += 1
    return {n: 0.5 * (s + jnp.swapaxes(s, -1, -2)) / count for n, s in total.items()}


@dataclasses.dataclass(frozen=True)
class SplitResult:
    """What :func:`split_neurons` returns.

    Attributes:
      params: the grown params (same layout as the input).
      split: ``{hidden layer name: int array of the split neurons' indices}``.
      signed: ``{hidden layer name: bool array}``, True where the signed split was used.
      predicted_change: ``(ε²/2) Σ_j Σ_k w_k δ_kᵀ S_j δ_k`` over the split neurons: the
        second-order prediction of the loss change.
      scores: ``{hidden layer name: [m]}`` every neuron's predicted change per unit ``ε²/2``.
    """

    params: PyTree
    split: dict[str, np.ndarray]
    signed: dict[str, np.ndarray]
    predicted_change: float
    scores: dict[str, np.ndarray]


DENSE_EIGH_MAX = 64  # 'auto' uses the dense float64 eigh up to this matrix size


@functools.partial(jax.jit, static_argnames=("iterations",))
def _lobpcg_extremes(S: jax.Array, iterations: int) -> tuple[jax.Array, ...]:
    """LOBPCG for the largest eigenpair of ``S_j`` and of ``-S_j``, vmapped over neurons."""
    from jax.experimental.sparse.linalg import lobpcg_standard

    def top(A, x0):
        lam, vec, _ = lobpcg_standard(A, x0, m=iterations)
        return lam[0], vec[:, 0]

    x0 = jax.random.normal(jax.random.key(0), (S.shape[-1], 1), S.dtype)
    hi, v_hi = jax.vmap(top, in_axes=(0, None))(S, x0)
    neg_lo, v_lo = jax.vmap(top, in_axes=(0, None))(-S, x0)
    return -neg_lo, v_lo, hi, v_hi


def extreme_eigenpairs(
    S: jax.Array | np.ndarray, *, method: str = "auto", iterations: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The smallest and largest eigenpairs of a batch of symmetric matrices.

    ``S_j v = λ v`` for ``j = 1..m``; only ``(λ_min, v_min)`` (S2D) and ``(λ_max, v_max)``
    (S3D) are needed, so large matrices (a first layer on 784 pixels: ``785 x 785`` per
    neuron) need not be fully eigendecomposed.

    - ``'dense'``: ``numpy.linalg.eigh`` in float64 (every eigenpair; ``O(m d³)``).
    - ``'lobpcg'``: ``jax.experimental.sparse.linalg.lobpcg_standard`` for the top eigenpair of
      ``S_j`` and of ``-S_j`` (``λ_min(S) = -λ_max(-S)``), batched over neurons with ``vmap``
      under ``jit``, in ``S``'s dtype, at most ``iterations`` block iterations; needs
      ``d > 5``. About ``O(m d² iterations)``; a few seconds for 32 matrices of ``785 x 785``
      on a 2-core CPU, where batched dense ``eigh`` takes minutes.
    - ``'auto'``: ``'dense'`` up to ``d = 64`` (:data:`DENSE_EIGH_MAX`), ``'lobpcg'`` above.

    When an extreme eigenvalue is repeated, any unit vector of its eigenspace may come back.

    Args:
      S: ``[m, d, d]`` symmetric matrices.
      method: ``'auto'``, ``'dense'`` or ``'lobpcg'``.
      iterations: LOBPCG's iteration cap.

    Returns:
      ``(λ_min [m], v_min [m, d], λ_max [m], v_max [m, d])`` as float64 NumPy arrays, unit
      eigenvectors.

    Raises:
      ValueError: an unknown method, ``S`` not ``[m, d, d]``, or LOBPCG on ``d <= 5``.
    """
    if method not in ("auto", "dense", "lobpcg"):
        raise ValueError(f"method must be 'auto', 'dense' or 'lobpcg', got {method!r}")
    if S.ndim != 3 or S.shape[1] != S.shape[2]:
        raise ValueError(f"S must have shape [m, d, d], got {tuple(S.shape)}")
    d = S.shape[-1]
    if method == "auto":
        method = "dense" if d <= DENSE_EIGH_MAX else "lobpcg"
    if method == "lobpcg":
        if d <= 5:
            raise ValueError(f"LOBPCG needs matrices larger than 5 x 5, got d={d}; use 'dense'")
        out = _lobpcg_extremes(jnp.asarray(S), iterations)
        lo, v_lo, hi, v_hi = (np.asarray(a, np.float64) for a in out)
        v_lo /= np.linalg.norm(v_lo, axis=-1, keepdims=True)
        v_hi /= np.linalg.norm(v_hi, axis=-1, keepdims=True)
        return lo, v_lo, hi, v_hi
    lam, vec = np.linalg.eigh(np.asarray(S, np.float64))  # ascending, eigenvectors in columns
    return lam[:, 0], vec[:, :, 0], lam[:, -1], vec[:, :, -1]


def split_neurons(
    params: PyTree,
    matrices: dict[str, jax.Array],
    *,
    fraction: float = 0.3,
    eps: float = 0.01,
    scheme: str = "positive",
    c: float = 3.0,
    count: int | None = None,
    eig_method: str = "auto",
) -> SplitResult:
    """Splits the neurons with the most negative predicted loss change (S2D or S3D).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from pnjax.baselines import hidden_widths, split_neurons, splitting_matrices
      >>> from pnjax.models import KinkMLP
      >>> x = jnp.linspace(-1, 1, 16)[:, None]; y = jnp.sin(3 * x)
      >>> params = KinkMLP(features=(4, 4, 1)).init(jax.random.key(0), x)['params']
      >>> mse = lambda out, t: jnp.mean((out - t) ** 2)
      >>> S = splitting_matrices(params, x, y, mse)
      >>> res = split_neurons(params, S, fraction=0.25, scheme='signed')
      >>> hidden_widths(res.params)[0] + hidden_widths(res.params)[1]
      10

    Args:
      params: Dense-chain params (module docstring).
      matrices: :func:`splitting_matrices` of ``params``.
      fraction: share of all hidden neurons to split (rounded, at least one); ignored with
        ``count``.
      eps: ε, the step along the unit eigenvector.
      scheme: ``'positive'`` (S2D) or ``'signed'`` (S3D).
      c: S3D's bound on the sum of the copies' absolute weights, ``c > 1``.
      count: split exactly this many neurons.
      eig_method: how the extreme eigenpairs of each ``S_j`` are found
        (:func:`extreme_eigenpairs`): ``'dense'``, ``'lobpcg'`` or ``'auto'``.

    Returns:
      A :class:`SplitResult`.

    Raises:
      ValueError: unknown scheme, ``c <= 1`` for the signed scheme, a fraction outside (0, 1],
        matrices that do not match the params.
    """
    if scheme not in ("positive", "signed"):
        raise ValueError(f"scheme must be 'positive' (S2D) or 'signed' (S3D), got {scheme!r}")
    if scheme == "signed" and not c > 1.0:
        raise ValueError(f"the signed split needs c > 1 (the bound on Σ|w|), got c={c}")
    p, names, wrapped = _chain(params)
    hidden = names[:-1]
    if set(matrices) != set(hidden):
        raise ValueError(
            f"matrices cover layers {sorted(matrices)} but the hidden layers are {list(hidden)}; "
            "pass splitting_matrices(params, ...) of these params."
        )
    r = (c - 1.0) / (c + 1.0)
    eig = {}
    scores = {}
    for n in hidden:
        S = matrices[n]
        k = p[n]["kernel"]
        if S.shape != (k.shape[1], k.shape[0] + 1, k.shape[0] + 1):
            raise ValueError(f"matrices[{n!r}] has shape {S.shape}, expected "
                             f"{(k.shape[1], k.shape[0] + 1, k.shape[0] + 1)}")
        lo, v_lo, hi, v_hi = extreme_eigenpairs(S, method=eig_method)
        pos = lo
        sgn = -r * hi
        use_signed = (sgn < pos) if scheme == "signed" else np.zeros_like(pos, bool)
        scores[n] = np.where(use_signed, sgn, pos)
        eig[n] = (v_lo, v_hi, use_signed)
    total = sum(s.size for s in scores.values())
    if count is None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        count = max(1, int(round(fraction * total)))
    if not 1 <= count <= total:
        raise ValueError(f"count must be in [1, {total}] (the hidden neurons), got {count}")
    flat = np.concatenate([scores[n] for n in hidden])
    chosen = np.zeros(total, bool)
    chosen[np.argsort(flat, kind="stable")[:count]] = True  # one global threshold
    offsets = np.cumsum([0] + [scores[n].size for n in hidden])

    dtypes = {n: (p[n]["kernel"].dtype, p[n]["bias"].dtype) for n in names}
    new = {n: {"kernel": np.asarray(p[n]["kernel"]), "bias": np.asarray(p[n]["bias"])}
           for n in names}
    split, signed = {}, {}
    predicted = 0.0
    # last hidden layer first: splitting layer l duplicates rows of layer l+1's kernel, so the
    # copies made in l+1 are already there and get halved with the rest.
    for li in range(len(hidden) - 1, -1, -1):
        n, nxt = hidden[li], names[li + 1]
        idx = np.flatnonzero(chosen[offsets[li] : offsets[li + 1]])
        v_lo, v_hi, use_signed = eig[n]
        sg = use_signed[idx]
        split[n], signed[n] = idx, sg
        predicted += float(np.sum(scores[n][idx])) * eps**2 / 2
        if idx.size == 0:
            continue
        K, b = new[n]["kernel"], new[n]["bias"]
        theta = np.concatenate([K.T, b[:, None]], axis=1).astype(np.float64)  # [m, in + 1]
        v = np.where(sg[:, None], v_hi[idx], v_lo[idx])  # [k, in + 1]
        d1 = np.where(sg[:, None], r * v, v)  # the copy kept at the neuron's index
        d2 = np.where(sg[:, None], v, -v)  # the appended copy
        w1 = np.where(sg, (c + 1.0) / 2.0, 0.5)
        w2 = np.where(sg, -(c - 1.0) / 2.0, 0.5)
        t2 = theta[idx] + eps * d2
        theta[idx] = theta[idx] + eps * d1
        theta = np.concatenate([theta, t2], axis=0)
        new[n] = {"kernel": theta[:, :-1].T, "bias": theta[:, -1]}
        A = new[nxt]["kernel"].astype(np.float64)  # [m, out]
        rows = A[idx].copy()
        A[idx] = w1[:, None] * rows
        new[nxt] = {"kernel": np.concatenate([A, w2[:, None] * rows]), "bias": new[nxt]["bias"]}
    new = {
        n: {"kernel": jnp.asarray(new[n]["kernel"], dtypes[n][0]),
            "bias": jnp.asarray(new[n]["bias"], dtypes[n][1])}
        for n in names
    }
    out = {n: new[n] for n in names}
    return SplitResult(
        params={"params": out} if wrapped else out,
        split=split,
        signed=signed,
        predicted_change=predicted,
        scores=scores,
    )
