"""Data sets used by pnjax's experiments."""

from pnjax.data.kink import (
    affine_check_grid,
    affine_deviation,
    is_stuck,
    make_kink_data,
    two_piece_affine_loss,
)

__all__ = [
    "affine_check_grid",
    "affine_deviation",
    "is_stuck",
    "make_kink_data",
    "two_piece_affine_loss",
]
