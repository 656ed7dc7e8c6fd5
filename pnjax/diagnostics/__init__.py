"""Diagnostics: Hessian spectral density, neuron saturation, trajectories, ReLU kink locations.

- :func:`hessian_spectrum`: eigenvalue density of the loss Hessian by stochastic Lanczos
  quadrature (Figure 12 of the paper).
- :func:`saturation_stats` and its parts: per-layer activation percentiles and histograms,
  captured without changing the model (Figures 14 and 15).
- :func:`record_run`, :func:`project_trajectories`, :func:`loss_surface`: params snapshots
  inside the compiled run, their PCA plane and the loss on it (Figure 6).
- :func:`kink_report`: first-layer ReLU kinks against the data range (Section 3).
"""

from pnjax.diagnostics.hessian import HessianSpectrum, hessian_spectrum, hessian_vector_product
from pnjax.diagnostics.kinks import first_layer, kink_report, relu_kinks
from pnjax.diagnostics.saturation import (
    activation_histograms,
    activation_percentiles,
    capture_activations,
    histogram_edges,
    saturation_stats,
)
from pnjax.diagnostics.trajectory import (
    RunRecord,
    TrajectoryProjection,
    loss_surface,
    project_trajectories,
    record_run,
)

__all__ = [
    "HessianSpectrum",
    "RunRecord",
    "TrajectoryProjection",
    "activation_histograms",
    "activation_percentiles",
    "capture_activations",
    "first_layer",
    "hessian_spectrum",
    "hessian_vector_product",
    "histogram_edges",
    "kink_report",
    "loss_surface",
    "project_trajectories",
    "record_run",
    "relu_kinks",
    "saturation_stats",
]
