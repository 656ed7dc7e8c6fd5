"""Data sets used by pnjax's experiments: the kink regression, and image data through
tensorflow-datasets without TensorFlow (CIFAR-10, Fashion-MNIST)."""

from pnjax.data.builders import default_data_dir, prepare
from pnjax.data.images import (
    ImageData,
    augment,
    channel_stats,
    check_prepared,
    load_images,
    normalize,
    split_test,
)
from pnjax.data.kink import (
    affine_check_grid,
    affine_deviation,
    is_stuck,
    make_kink_data,
    two_piece_affine_loss,
)
from pnjax.data.sources import DataError

__all__ = [
    "DataError",
    "ImageData",
    "affine_check_grid",
    "affine_deviation",
    "augment",
    "channel_stats",
    "check_prepared",
    "default_data_dir",
    "is_stuck",
    "load_images",
    "make_kink_data",
    "normalize",
    "prepare",
    "split_test",
    "two_piece_affine_loss",
]
