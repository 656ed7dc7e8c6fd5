"""Image data sets as uint8 arrays, the paper's validation/test split, normalization, augmentation.

:func:`load_images` reads a prepared copy (pnjax's ``pnjax_<name>`` from
:func:`pnjax.data.builders.prepare`, or the TFDS catalog's ``<name>`` prepared as
``array_record``) with ``tfds.data_source`` and decodes every image once into one
``[N, H, W, C]`` uint8 array per split. The training step converts a batch to float and
normalizes it (:func:`normalize`), and for ResNet-18 augments it first (:func:`augment`), both
pure functions that run inside the compiled step.

The paper's split (Min, arXiv 2007.01419, Section 4): the 10,000 test images are cut at random
into 5,000 validation and 5,000 test images (:func:`split_test`, seeded).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pnjax.data.builders import (
    CLASSES,
    SHAPES,
    VERSION,
    builder_name,
    check_name,
    default_data_dir,
    leftovers,
    prepared_dir,
)
from pnjax.data.sources import DataError, decode_image, prepare_hint


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A decoded image classification data set.

    Attributes:
      name: ``'cifar10'`` or ``'fashion_mnist'``.
      train_x: ``[N_train, H, W, C]`` uint8.
      train_y: ``[N_train]`` int32 labels.
      test_x: ``[N_test, H, W, C]`` uint8 (the paper cuts it into validation and test).
      test_y: ``[N_test]`` int32.
      classes: class names in label order.
      pixels: ``'original'`` or ``'lossy JPEG'``: say so wherever a result uses the latter.
      source: the prepared folder read.
      decode_seconds: wall time of reading and decoding every image (the first time).
      from_cache: the arrays came from the decoded copy saved beside the shards
        (``pnjax-decoded.npz``, written by the first :func:`load_images`).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    pixels: str
    source: str
    decode_seconds: float = 0.0
    from_cache: bool = False

    @property
    def images_per_second(self) -> float:
        """Decoded images per second of :func:`load_images`."""
        n = len(self.train_y) + len(self.test_y)
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")


def _fix(name: str, data_dir: Path) -> str:
    return f"run `pnjax data prepare {name} --from PATH --data-dir {data_dir}`"


def check_prepared(name: str, data_dir: str | os.PathLike[str]) -> Path:
    """The folder of a complete prepared copy of ``name`` in ``data_dir`` (pnjax's first, then the
    TFDS catalog's).

    Raises:
      DataError: none there, or one half-built (a killed build, a missing or empty shard).
    """
    check_name(name)
    data_dir = Path(data_dir).expanduser()
    candidates = [prepared_dir(name, data_dir)]
    catalog = data_dir / name
    if catalog.is_dir():
        candidates += sorted(
            (p for p in catalog.iterdir() if p.is_dir() and "incomplete" not in p.name),
            reverse=True,
        )
    for folder in candidates:
        if not folder.is_dir():
            continue
        info = folder / "dataset_info.json"
        if not info.is_file():
            raise DataError(
                f"{str(folder)!r} is half-built (no dataset_info.json); {_fix(name, data_dir)}"
            )
        try:
            meta = json.loads(info.read_text())
        except (OSError, ValueError):
            raise DataError(
                f"{str(folder)!r} has a damaged dataset_info.json; {_fix(name, data_dir)}"
            ) from None
        fmt = meta.get("fileFormat", "tfrecord")
        if fmt != "array_record":
            raise DataError(
                f"{str(folder)!r} holds {name} as {fmt}, which needs TensorFlow to read; "
                f"{_fix(name, data_dir)} (array_record, no TensorFlow)"
            )
        for split in meta.get("splits", []):
            lengths = [int(n) for n in split.get("shardLengths", [])]
            shards = sorted(folder.glob(f"*-{split['name']}.array_record-*"))
            if len(shards) != len(lengths) or any(p.stat().st_size == 0 for p in shards):
                raise DataError(
                    f"{str(folder)!r} is half-built: split {split['name']!r} has "
                    f"{len(shards)} of {len(lengths)} shard file(s); {_fix(name, data_dir)}"
                )
        return folder
    if leftovers(name, data_dir):
        raise DataError(
            f"{name} in {str(data_dir)!r} is half-built (a build was interrupted: "
            f"{leftovers(name, data_dir)[0].name}); {_fix(name, data_dir)}"
        )
    raise DataError(
        f"no prepared {name} in {str(data_dir)!r} (looked for {builder_name(name)}/{VERSION} "
        f"and the TFDS catalog's {name}/); {_fix(name, data_dir)}"
    )


def load_images(name: str = "cifar10", data_dir: str | os.PathLike[str] | None = None) -> ImageData:
    """Reads a prepared data set and decodes it once into uint8 arrays.

    The first call decodes every image (``tfds.data_source``, PIL) and saves the arrays beside
    the shards (``pnjax-decoded.npz``, uncompressed); later calls read that file back.

    Args:
      name: ``'cifar10'`` or ``'fashion_mnist'``.
      data_dir: the TFDS data folder (default ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``).

    Returns:
      An :class:`ImageData`; the order of each split is the source's (CIFAR-10: batch order).

    Raises:
      DataError: nothing prepared, half-built or damaged shards, an undecodable image.
    """
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    folder = check_prepared(name, data_dir)
    cache = folder / DECODED
    found = _read_cache(cache, folder)
    if found is not None:
        arrays, pixels, seconds = found
        from_cache = True
    else:
        t0 = time.perf_counter()
        arrays, pixels = _decode(folder, name, data_dir)
        seconds = time.perf_counter() - t0
        from_cache = False
        _write_cache(cache, arrays, pixels, seconds)
    return ImageData(
        name=name,
        train_x=arrays["train"][0],
        train_y=arrays["train"][1],
        test_x=arrays["test"][0],
        test_y=arrays["test"][1],
        classes=CLASSES[name],
        pixels=pixels,
        source=str(folder),
        decode_seconds=seconds,
        from_cache=from_cache,
    )


DECODED = "pnjax-decoded.npz"


def _read_cache(cache: Path, folder: Path) -> tuple[dict, str, float] | None:
    """The decoded arrays saved beside the shards, if complete and newer than them."""
    try:
        if cache.stat().st_mtime < (folder / "dataset_info.json").stat().st_mtime:
            return None
        with np.load(cache, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}
        for s, (x, y) in arrays.items():
            if x.dtype != np.uint8 or len(x) != len(y) or len(y) != meta["counts"][s]:
                return None
        return arrays, str(meta["pixels"]), float(meta["decode_seconds"])
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
        return None


def _write_cache(cache: Path, arrays: dict, pixels: str, seconds: float) -> None:
    """Saves the decoded arrays (uncompressed) so later runs skip decoding; best effort."""
    meta = {
        "pixels": pixels,
        "decode_seconds": seconds,
        "counts": {s: int(len(y)) for s, (_, y) in arrays.items()},
    }
    tmp = cache.with_name(cache.name + ".tmp.npz")
    try:
        np.savez(
            tmp,
            meta=np.asarray(json.dumps(meta)),
            **{f"{s}_{k}": a for s, (x, y) in arrays.items() for k, a in (("x", x), ("y", y))},
        )
        tmp.replace(cache)
    except OSError:  # a read-only data folder: decode every time
        tmp.unlink(missing_ok=True)


def _decode(folder: Path, name: str, data_dir: Path) -> tuple[dict, str]:
    """Reads every example with ``tfds`` (no TensorFlow) and decodes its image."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder_from_directory(str(folder))
        meta = builder.info.metadata or {}
        pixels = str(meta.get("pixels", "original"))
        sources = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})
        arrays = {}
        for split in ("train", "test"):
            ds = sources[split]
            n = len(ds)
            x = np.empty((n, *SHAPES[name]), np.uint8)
            y = np.empty((n,), np.int32)
            order = np.empty((n,), np.int64)
            chunk = 2048
            for lo in range(0, n, chunk):
                rows = ds.__getitems__(list(range(lo, min(n, lo + chunk))))
                for j, row in enumerate(rows, start=lo):
                    img = decode_image(row["image"], f"image {j} of {split} in {str(folder)!r}")
                    if img.shape != x.shape[1:]:
                        raise DataError(
                            f"image {j} of {split} in {str(folder)!r} has shape "
                            f"{list(img.shape)}, not {list(x.shape[1:])}; {_fix(name, data_dir)}"
                        )
                    x[j], y[j] = img, row["label"]
                    order[j] = row["index"] if "index" in row else j
            perm = np.argsort(order, kind="stable")
            arrays[split] = (x[perm], y[perm])
    except DataError as e:
        raise DataError(f"{e}; the prepared copy is damaged: {_fix(name, data_dir)}") from None
    except Exception as e:  # noqa: BLE001 - array_record/TFDS errors on damaged shards
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise DataError(
            f"cannot read {name} from {str(folder)!r} ({type(e).__name__}: {why}); "
            f"{_fix(name, data_dir)}"
        ) from None
    return arrays, pixels


def split_test(num: int, seed: int, val_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cuts ``num`` test images at random into validation and test indices.

    The permutation depends on ``seed`` only, so every method run with one seed is judged on the
    same images. Paper: 10,000 -> 5,000 validation + 5,000 test.

    Args:
      num: number of images in the original test split.
      seed: the experiment seed.
      val_size: validation images (default ``num // 2``).

    Returns:
      ``(val_idx, test_idx)``: sorted int64 arrays partitioning ``range(num)``.
    """
    val_size = num // 2 if val_size is None else int(val_size)
    if not 0 < val_size < num:
        raise ValueError(f"val_size must be in 1..{num - 1}, got {val_size}.")
    perm = np.random.default_rng([int(seed), 0x5B117]).permutation(num)
    return np.sort(perm[:val_size]), np.sort(perm[val_size:])


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of uint8 images on the [0, 1] scale.

    Computed exactly from each channel's histogram of the 256 pixel values:
    ``mean_c = Σ_v h_c(v) v / (255 n)``, ``std_c = sqrt(Σ_v h_c(v) (v / 255 - mean_c)² / n)``
    over all ``n`` pixels of all images.

    Args:
      x: ``[N, H, W, C]`` uint8 (the training set).

    Returns:
      ``(mean, std)``, each ``[C]`` float32.
    """
    if x.dtype != np.uint8:
        raise ValueError(f"channel_stats takes uint8 images, got {x.dtype}.")
    c = x.shape[-1]
    flat = x.reshape(-1, c)
    v = np.arange(256, dtype=np.float64) / 255.0
    mean, std = np.empty(c), np.empty(c)
    for i in range(c):
        h = np.bincount(flat[:, i], minlength=256).astype(np.float64)
        n = h.sum()
        mean[i] = h @ v / n
        std[i] = np.sqrt(h @ (v - mean[i]) ** 2 / n)
    return mean.astype(np.float32), std.astype(np.float32)


def normalize(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """``(x / 255 - mean) / std`` in float32; ``x`` ``[..., C]`` uint8, ``mean``/``std`` ``[C]``."""
    return (x.astype(jnp.float32) / 255.0 - mean) / std


def augment(key: jax.Array, x: jax.Array, pad: int = 4) -> jax.Array:
    """Random crop after zero padding, and random horizontal flip, per image.

    Each image ``[H, W, C]`` is padded with ``pad`` zeros on every side and cropped back to
    ``H x W`` at an offset ``(dy, dx)`` drawn uniformly from ``{0..2 pad}²``, then mirrored left
    to right with probability 1/2. A pure function of ``key``: jit it or call it inside a
    compiled training step.

    Args:
      key: a PRNG key.
      x: ``[B, H, W, C]`` images (any dtype; uint8 stays uint8).
      pad: padding before the crop (4 for CIFAR).

    Returns:
      ``[B, H, W, C]``, the same dtype.
    """
    b, h, w, c = x.shape
    k_off, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (b,))
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, off, flip):
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def fix_hint(name: str, path: str | None = None) -> str:
    """The command that prepares ``name`` (for messages)."""
    return prepare_hint(name, path)
