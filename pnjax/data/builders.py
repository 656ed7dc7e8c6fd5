"""TFDS builders that need no TensorFlow: local files in, ``array_record`` shards out.

:func:`prepare` reads a local copy (see :mod:`pnjax.data.sources`), and writes it once with
``tensorflow-datasets`` as encoded images (PNG, or the source's own JPEG bytes) in
``file_format='array_record'``, which ``tfds.data_source`` reads back without TensorFlow. The
prepared data sets are named ``pnjax_cifar10`` and ``pnjax_fashion_mnist``; their metadata
records the pixels (``'original'`` or ``'lossy JPEG'``) and the source layout. Each example
keeps its index in the source's order, so the order read back does not depend on TFDS's
shuffling of the shards.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pnjax.data.sources import (
    CIFAR10_CLASSES,
    FASHION_MNIST_CLASSES,
    SOURCES,
    DataError,
    Source,
    opened,
    prepare_hint,
)

VERSION = "1.0.0"
SHAPES = {"cifar10": (32, 32, 3), "fashion_mnist": (28, 28, 1)}
CLASSES = {"cifar10": CIFAR10_CLASSES, "fashion_mnist": FASHION_MNIST_CLASSES}
DATASETS = tuple(SHAPES)


def default_data_dir() -> Path:
    """``$TFDS_DATA_DIR``, else TFDS's default (``~/tensorflow_datasets``)."""
    env = os.environ.get("TFDS_DATA_DIR")
    return Path(env).expanduser() if env else Path("~/tensorflow_datasets").expanduser()


def builder_name(name: str) -> str:
    """The TFDS name of pnjax's prepared copy of ``name`` (``'pnjax_cifar10'``)."""
    check_name(name)
    return f"pnjax_{name}"


def check_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return name


def _builder_class(name: str) -> Any:
    """A ``GeneratorBasedBuilder`` subclass for ``name`` (made on demand: importing TFDS is slow,
    and a class per call would register twice)."""
    if name in _CLASSES:
        return _CLASSES[name]
    import tensorflow_datasets as tfds

    shape, classes = SHAPES[name], CLASSES[name]

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        MANUAL_DOWNLOAD_INSTRUCTIONS = f"Pass the local copy: {prepare_hint(name)}."

        def __init__(self, *, source: Source | None = None, **kwargs: Any) -> None:
            self._source = source
            super().__init__(**kwargs)

        def _info(self) -> Any:
            meta = {}
            if self._source is not None:
                meta = {
                    "pixels": self._source.pixels,
                    "layout": self._source.layout,
                    "counts": dict(self._source.counts),
                }
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"{name} prepared by pnjax from local files (no TensorFlow).",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=shape, encoding_format="png"),
                        "label": tfds.features.ClassLabel(names=list(classes)),
                        "index": tfds.features.Scalar(dtype=np.int64),
                    }
                ),
                supervised_keys=("image", "label"),
                metadata=tfds.core.MetadataDict(meta),
            )

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            return {s: self._generate_examples(s) for s in ("train", "test")}

        def _generate_examples(self, split: str) -> Any:
            assert self._source is not None
            for _, i, label, data in self._source.records(split):
                yield i, {"image": data, "label": label, "index": i}

    _Builder.name = builder_name(name)
    _CLASSES[name] = _Builder
    return _Builder


_CLASSES: dict[str, Any] = {}


def prepared_dir(name: str, data_dir: str | os.PathLike[str]) -> Path:
    """Where pnjax's prepared copy of ``name`` lives: ``DIR/pnjax_<name>/<version>``."""
    return Path(data_dir) / builder_name(name) / VERSION


def leftovers(name: str, data_dir: str | os.PathLike[str]) -> list[Path]:
    """Folders a killed ``prepare`` left behind (TFDS's ``incomplete.*`` build folders)."""
    parent = Path(data_dir) / builder_name(name)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.is_dir() and "incomplete" in p.name)


def prepare(
    name: str,
    source_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Builds pnjax's TFDS copy of ``name`` from a local folder or tar, once.

    Args:
      name: ``'cifar10'`` or ``'fashion_mnist'``.
      source_path: the local copy (see :mod:`pnjax.data.sources` for the layouts).
      data_dir: the TFDS data folder (default :func:`default_data_dir`).
      overwrite: rebuild even if a complete copy exists.

    Returns:
      The prepared version folder. A complete copy already there is kept (unless
      ``overwrite``); half-built leftovers of a killed build are removed first.

    Raises:
      DataError: the source is missing, in no known layout, or damaged.
    """
    check_name(name)
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    target = prepared_dir(name, data_dir)
    from pnjax.data.images import check_prepared

    if not overwrite and target.is_dir():
        try:
            check_prepared(name, data_dir)
            return target
        except DataError:
            pass  # half-built: rebuild below
    for p in leftovers(name, data_dir):
        shutil.rmtree(p, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
    with opened(source_path, name) as root:
        source = SOURCES[name](root, source_path)
        import tensorflow_datasets as tfds

        builder = _builder_class(name)(
            source=source, data_dir=str(data_dir), file_format="array_record"
        )
        try:
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=str(root))
            )
        finally:
            for p in leftovers(name, data_dir):
                shutil.rmtree(p, ignore_errors=True)
    return target
