"""Neuron saturation: per-layer activation statistics, captured without touching the model.

The paper's Section 5 (Figures 14 and 15) measures how saturated a tanh network's neurons are by
the 98th percentile of ``|activation|`` per layer (close to 1: saturated) and by the histogram of
activation values. Here the activations are the outputs of a Flax Linen model's submodules,
collected with ``capture_intermediates`` (so the model's code is unchanged); an ``activation``
function maps them to what the paper plots (e.g. ``jnp.tanh`` of each ``Dense`` output when the
model applies ``tanh`` as a plain function). Every function here is pure and jittable, so the
statistics can be reduced inside a compiled training run (see
:func:`pnjax.diagnostics.record_run`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
Filter = Callable[[nn.Module, str], bool]


def _flatten_intermediates(tree: dict[str, Any], prefix: str = "") -> dict[str, jax.Array]:
    out: dict[str, jax.Array] = {}
    for name, sub in tree.items():
        if name == "__call__" or not isinstance(sub, dict):
            if not prefix:
                continue  # the model's own output
            calls = sub if isinstance(sub, tuple) else (sub,)
            for i, value in enumerate(calls):
                if isinstance(value, jax.Array):
                    out[prefix + (f"#{i}" if i else "")] = value
            continue
        out.update(_flatten_intermediates(sub, f"{prefix}/{name}" if prefix else name))
    return out


def capture_activations(
    model: nn.Module,
    variables: PyTree,
    *args: Any,
    layers: Sequence[str] | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    filter_fn: Filter | None = None,
    **apply_kwargs: Any,
) -> dict[str, jax.Array]:
    """The outputs of ``model``'s submodules on ``args``, by layer name.

    Runs ``model.apply(variables, *args, capture_intermediates=..., mutable=['intermediates'])``;
    the model's code is not changed and its parameters are not touched.

    Args:
      model: a Flax Linen module.
      variables: its variables, e.g. ``{'params': params}``.
      *args: the inputs (e.g. a batch ``x``).
      layers: names to keep (``'Dense_0'``, or ``'block/Dense_1'`` for nested modules), in the
        order wanted; default every captured submodule output except the model's own output.
      activation: applied to every kept output (e.g. ``jnp.tanh`` when the model applies
        ``tanh`` to each ``Dense`` output as a plain function).
      filter_fn: Flax's ``capture_intermediates`` filter ``(module, method_name) -> bool``;
        default every submodule's ``__call__``.
      **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

    Returns:
      ``{name: array}``, each the submodule's output (``[batch, ...]``); a module called twice
      gives ``name`` and ``name#1``.

    Raises:
      ValueError: a name in ``layers`` that was not captured (the message lists those that were).
    """
    _, state = model.apply(
        variables,
        *args,
        capture_intermediates=filter_fn or True,
        mutable=["intermediates"],
        **apply_kwargs,
    )
    acts = _flatten_intermediates(state["intermediates"])
    if layers is not None:
        missing = [n for n in layers if n not in acts]
        if missing:
            raise ValueError(f"layers {missing} were not captured; captured: {sorted(acts)}.")
        acts = {n: acts[n] for n in layers}
    if activation is not None:
        acts = {n: activation(a) for n, a in acts.items()}
    return acts


def activation_percentiles(acts: dict[str, jax.Array], q: float = 98.0) -> dict[str, jax.Array]:
    """The ``q``-th percentile of ``|a|`` over all examples and units of each layer.

    Args:
      acts: ``{name: array}`` (any shapes), e.g. from :func:`capture_activations`.
      q: the percentile in ``[0, 100]`` (the paper's Figure 14 uses 98).

    Returns:
      ``{name: float32 scalar}`` (linear interpolation between order statistics, as
      ``numpy.percentile``).
    """
    return {n: jnp.percentile(jnp.abs(a).astype(jnp.float32), q) for n, a in acts.items()}


def histogram_edges(bins: int = 50, value_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """The ``[bins + 1]`` bin edges used by :func:`activation_histograms`."""
    return jnp.linspace(value_range[0], value_range[1], bins + 1)


def activation_histograms(
    acts: dict[str, jax.Array],
    *,
    bins: int = 50,
    value_range: tuple[float, float] = (-1.0, 1.0),
) -> dict[str, jax.Array]:
    """Normalized histograms of each layer's activation values.

    Values outside ``value_range`` are counted in the first or last bin, so every histogram
    sums to 1 (the fraction of values per bin; divide by the bin width for a density).

    Args:
      acts: ``{name: array}``.
      bins: number of equal-width bins (edges: :func:`histogram_edges`).
      value_range: ``(low, high)``; ``(-1, 1)`` suits tanh activations.

    Returns:
      ``{name: float32 [bins]}``, each summing to 1.

    Raises:
      ValueError: ``bins < 1`` or ``low >= high``.
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}.")
    if not lo < hi:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}.")
    out = {}
    for n, a in acts.items():
        a = jnp.ravel(a).astype(jnp.float32)
        idx = jnp.clip(jnp.floor((a - lo) / (hi - lo) * bins), 0, bins - 1).astype(jnp.int32)
        counts = jnp.zeros((bins,), jnp.float32).at[idx].add(1.0)
        out[n] = counts / a.size
    return out


def saturation_stats(
    model: nn.Module,
    variables: PyTree,
    *args: Any,
    q: float = 98.0,
    bins: int = 50,
    value_range: tuple[float, float] = (-1.0, 1.0),
    layers: Sequence[str] | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
    filter_fn: Filter | None = None,
    **apply_kwargs: Any,
) -> dict[str, dict[str, jax.Array]]:
    """Per-layer saturation statistics of ``model`` on the inputs ``args``, in one pure function.

    Examples:
      >>> import flax.linen as nn, jax, jax.numpy as jnp
      >>> from pnjax.diagnostics import saturation_stats
      >>> params = {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}
      >>> class Net(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         return nn.Dense(3)(x)
      >>> x = jnp.linspace(-1, 1, 300).reshape(100, 3)
      >>> s = saturation_stats(Net(), {"params": {"Dense_0": params}}, x, bins=4)
      >>> float(s["percentile"]["Dense_0"]) > 0.95, s["histogram"]["Dense_0"].tolist()
      (True, [0.25, 0.25, 0.25, 0.25])

    Args:
      model, variables, args, layers, activation, filter_fn, apply_kwargs: as in
        :func:`capture_activations`.
      q: percentile of ``|a|`` (:func:`activation_percentiles`).
      bins, value_range: as in :func:`activation_histograms`.

    Returns:
      ``{'percentile': {name: scalar}, 'histogram': {name: [bins]}}``.
    """
    acts = capture_activations(
        model,
        variables,
        *args,
        layers=layers,
        activation=activation,
        filter_fn=filter_fn,
        **apply_kwargs,
    )
    return {
        "percentile": activation_percentiles(acts, q),
        "histogram": activation_histograms(acts, bins=bins, value_range=value_range),
    }
