"""What the Hessian-density benchmarks share: one spectrum as JSON, and their figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np


def spectrum_record(spec: Any, seconds: float, loss: float) -> dict[str, Any]:
    """A :class:`pnjax.diagnostics.HessianSpectrum` as JSON: extremes, the mass of the density
    above 10% and 50% of the top eigenvalue ("outliers"), the mass of nodes below zero, and the
    quadrature itself (``nodes``, ``weights``)."""
    nodes, weights = np.asarray(spec.nodes), np.asarray(spec.weights)
    lmax = float(spec.max)
    return {
        "min": float(spec.min),
        "max": lmax,
        "seconds": seconds,
        "loss": loss,
        "mass_above_0.1_max": float((weights * (nodes > 0.1 * lmax)).sum() / len(nodes)),
        "mass_above_0.5_max": float((weights * (nodes > 0.5 * lmax)).sum() / len(nodes)),
        "negative_mass": float((weights * (nodes < 0)).sum() / len(nodes)),
        "nodes": nodes.round(6).tolist(),
        "weights": weights.tolist(),
    }


def plot_spectra(spectra: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Smoothed densities (σ = 1% of the common range) of the records of :func:`spectrum_record`,
    one line each, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pnjax.diagnostics import HessianSpectrum

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lo = min(s["min"] for s in spectra.values())
    hi = max(s["max"] for s in spectra.values())
    pad = 0.05 * (hi - lo)
    grid = jnp.linspace(lo - pad, hi + pad, 1000)
    for name, s in spectra.items():
        spec = HessianSpectrum(
            nodes=jnp.asarray(s["nodes"]), weights=jnp.asarray(s["weights"]), steps=jnp.zeros(1)
        )
        dens = np.asarray(spec.density(grid, 0.01 * (hi - lo)))
        ax.semilogy(np.asarray(grid), dens + 1e-7, label=f"{name}: max {s['max']:.3g}")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (Gaussian kernel, σ = 1% of range)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spectra_of_fit(
    full_loss: Any, res: Any, *, key: Any, num_probes: int, order: int
) -> dict[str, dict[str, Any]]:
    """Hessian spectra of a :class:`pnjax.FitResult`'s plain run (bank slot 0), its last
    persistent iteration, and its championship when it is neither (when the plain run wins,
    "plain vs champion" would compare a model with itself), as :func:`spectrum_record`\\ s."""
    import time

    import jax

    from pnjax.diagnostics import hessian_spectrum

    last = int(res.bank.count) - 1
    models = [("plain", res.bank.get(0)), (f"persistent iteration {last}", res.bank.get(last))]
    if res.champion_iteration not in (0, last):
        models.append((f"champion (iteration {res.champion_iteration})", res.champion))
    spectra: dict[str, dict[str, Any]] = {}
    for name, params in models:
        t = time.perf_counter()
        spec = hessian_spectrum(full_loss, params, key=key, num_probes=num_probes, order=order)
        jax.block_until_ready(spec.nodes)
        sec = time.perf_counter() - t
        spectra[name] = spectrum_record(spec, sec, float(full_loss(params)))
        print(f"{name}: min {spec.min:.4g} max {spec.max:.4g} ({sec:.0f}s)", flush=True)
    return spectra
