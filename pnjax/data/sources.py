"""Readers of image classification data as users have it on disk, checked as they are read.

Each reader turns a local copy into records ``(split, index, label, png_or_jpeg_bytes)`` for the
TFDS builders in :mod:`pnjax.data.builders`; nothing here downloads anything. CIFAR-10 comes
from any of

- ``cifar-10-batches-py/`` (the original pickles ``data_batch_1..5``, ``test_batch``),
- ``cifar-10-batches-bin/`` (``data_batch_1..5.bin``, ``test_batch.bin``: records of one label
  byte and 3,072 pixel bytes, channel-major),
- a folder of class-named images ``train/<class>/*`` and ``test/<class>/*`` (e.g. the JPEG copy
  ``cifar10-jpeg.tar.gz``: labels exact, pixels a lossy JPEG re-encoding),

each either as a folder or as a ``.tar``/``.tar.gz`` of one. Fashion-MNIST comes from the four
idx files (``train-images-idx3-ubyte[.gz]`` ...). Anything wrong (a folder in none of these
layouts, a truncated tar, a short batch file, an image that does not decode or has the wrong
size) raises :class:`DataError` with one line saying what and how to fix it.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm")
ORIGINAL = "original"
LOSSY_JPEG = "lossy JPEG"

Record = tuple[str, int, int, bytes]


class DataError(ValueError):
    """Bad or missing data; the message is one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A checked local copy of a data set.

    Attributes:
      name: ``'cifar10'`` or ``'fashion_mnist'``.
      layout: which on-disk form was found (``'cifar-10-batches-py'``, ``'cifar-10-batches-bin'``,
        ``'image-folder'``, ``'idx'``).
      pixels: ``'original'`` or ``'lossy JPEG'`` (some images were JPEG-encoded).
      root: the folder read (inside a temporary extraction for a tar).
      records: ``records(split)`` returns a fresh iterator of ``(split, index, label, bytes)``
        over ``split`` (``'train'`` or ``'test'``), the bytes an encoded image (PNG for array
        sources, the file's own bytes for image files).
      counts: number of images per split.
    """

    name: str
    layout: str
    pixels: str
    root: Path
    records: Callable[[str], Iterator[Record]]
    counts: dict[str, int]


def prepare_hint(name: str, path: str | Path | None = None) -> str:
    """The command that (re)builds data set ``name``."""
    src = str(path) if path is not None else "PATH"
    return f"`pnjax data prepare {name} --from {src} --data-dir DIR`"


def png_bytes(image: np.ndarray) -> bytes:
    """Losslessly encodes a ``[H, W]`` or ``[H, W, C]`` uint8 array as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    arr = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decodes PNG/JPEG bytes to a ``[H, W, C]`` uint8 array (``C`` = 1 for grayscale).

    Raises:
      DataError: the bytes are not a decodable image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode {what} ({' '.join(str(e).split())})") from None
    return arr[..., None] if arr.ndim == 2 else arr


@contextmanager
def opened(path: str | Path, name: str) -> Iterator[Path]:
    """Yields a folder holding ``path``'s contents: ``path`` itself, or a tar extracted to a
    temporary folder (removed afterwards).

    Raises:
      DataError: ``path`` does not exist, or is a file that is not a complete tar archive.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(
            f"--from {str(path)!r} does not exist; pass the folder or tar of {name}, e.g. "
            f"{prepare_hint(name, '../shared/data/cifar10-jpeg.tar.gz' if name == 'cifar10' else '/usr/share/datasets/fashion-mnist')}"
        )
    if path.is_dir():
        yield path
        return
    tmp = Path(tempfile.mkdtemp(prefix="pnjax-data-"))
    try:
        try:
            with tarfile.open(path) as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as e:
            why = " ".join(str(e).split()) or type(e).__name__
            raise DataError(
                f"{str(path)!r} is not a complete tar archive ({why}): the file is truncated or "
                f"damaged; copy it again, then rerun {prepare_hint(name, path)}"
            ) from None
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def _find(root: Path, test: Callable[[Path], bool], depth: int = 3) -> Path | None:
    """The first folder at most ``depth`` levels under ``root`` (``root`` included) passing
    ``test``, breadth first, in sorted order."""
    level = [root]
    for _ in range(depth + 1):
        for d in level:
            if test(d):
                return d
        level = sorted(c for d in level for c in d.iterdir() if c.is_dir())
    return None


def _has(names: tuple[str, ...]) -> Callable[[Path], bool]:
    return lambda d: all((d / n).is_file() for n in names)


def _is_image_folder(d: Path) -> bool:
    return (d / "train").is_dir() and (d / "test").is_dir()


_PY = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
_BIN = tuple(f"{b}.bin" for b in _PY)


def cifar10_source(root: Path, origin: str | Path) -> Source:
    """Finds and checks CIFAR-10 under ``root`` (an opened ``origin``).

    Raises:
      DataError: no known layout under ``root``, or a damaged file.
    """
    if (d := _find(root, _has((*_PY, "test_batch")))) is not None:
        return _cifar_arrays(d, "cifar-10-batches-py", _read_pickle, _PY, "test_batch", origin)
    if (d := _find(root, _has((*_BIN, "test_batch.bin")))) is not None:
        return _cifar_arrays(d, "cifar-10-batches-bin", _read_bin, _BIN, "test_batch.bin", origin)
    if (d := _find(root, _is_image_folder)) is not None:
        return _image_folder(d, "cifar10", CIFAR10_CLASSES, (32, 32, 3), origin)
    raise DataError(
        f"{str(origin)!r} holds no CIFAR-10: expected cifar-10-batches-py/ (data_batch_1..5, "
        "test_batch), cifar-10-batches-bin/ (data_batch_1..5.bin, test_batch.bin) or "
        "train/<class>/ and test/<class>/ image folders (as a folder or a tar); pass one with "
        f"{prepare_hint('cifar10')}"
    )


def _read_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], np.uint8)
        y = np.asarray(d[b"labels"], np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{str(path)!r} is not a CIFAR-10 batch pickle ({type(e).__name__}: "
            f"{' '.join(str(e).split())}): copy cifar-10-batches-py/ again"
        ) from None
    if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
        raise DataError(
            f"{str(path)!r} holds data of shape {list(x.shape)} and {len(y)} labels, not "
            "[N, 3072] and N: copy cifar-10-batches-py/ again"
        )
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def _read_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, np.uint8)
    if raw.size == 0 or raw.size % 3073:
        raise DataError(
            f"{str(path)!r} has {raw.size} bytes, not a whole number of 3,073-byte records "
            "(truncated?): copy cifar-10-batches-bin/ again"
        )
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, 0].astype(np.int64)


def _cifar_arrays(d, layout, reader, train_files, test_file, origin) -> Source:
    parts = {"train": [reader(d / f) for f in train_files], "test": [reader(d / test_file)]}
    arrays = {
        s: (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]))
        for s, ps in parts.items()
    }
    for s, (_, y) in arrays.items():
        if y.min() < 0 or y.max() > 9:
            raise DataError(
                f"{str(d)!r} ({s}) has labels outside 0..9: not CIFAR-10; pass the CIFAR-10 "
                f"batches with {prepare_hint('cifar10')}"
            )

    def records(split: str) -> Iterator[Record]:
        x, y = arrays[split]
        for i in range(len(y)):
            yield split, i, int(y[i]), png_bytes(x[i])

    counts = {s: len(y) for s, (_, y) in arrays.items()}
    return Source("cifar10", layout, ORIGINAL, d, records, counts)


def _image_folder(
    d: Path, name: str, classes: tuple[str, ...], shape: tuple[int, ...], origin
) -> Source:
    """``train/<class>/*`` and ``test/<class>/*``, every class present in both splits."""
    files: dict[str, list[tuple[Path, int]]] = {}
    jpeg = False
    for split in ("train", "test"):
        found = sorted(c.name for c in (d / split).iterdir() if c.is_dir())
        unknown = [c for c in found if c not in classes]
        missing = [c for c in classes if c not in found]
        if unknown or missing:
            what = (f"unknown class folder(s) {unknown}" if unknown else "") + (
                ("; " if unknown else "") + f"missing class folder(s) {missing}" if missing else ""
            )
            raise DataError(
                f"{str(d / split)!r}: {what}; the class folders must be exactly {list(classes)}"
                f" (label order); fix the folder, then rerun {prepare_hint(name, origin)}"
            )
        rows = []
        for label, c in enumerate(classes):
            imgs = sorted(
                p for p in (d / split / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not imgs:
                raise DataError(
                    f"{str(d / split / c)!r} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                    f"fix the folder, then rerun {prepare_hint(name, origin)}"
                )
            jpeg = jpeg or any(p.suffix.lower() in (".jpg", ".jpeg") for p in imgs)
            rows += [(p, label) for p in imgs]
        files[split] = rows

    def records(split: str) -> Iterator[Record]:
        for i, (p, label) in enumerate(files[split]):
            data = p.read_bytes()
            rel = p.relative_to(d)
            what = f"image {str(rel)!r} in {str(origin)!r}"
            try:
                arr = decode_image(data, what)
            except DataError as e:
                raise DataError(
                    f"{e}; replace or delete it, then rerun {prepare_hint(name, origin)}"
                ) from None
            if arr.shape != shape:
                raise DataError(
                    f"{what} has shape {list(arr.shape)}, not {list(shape)}; replace or "
                    f"delete it, then rerun {prepare_hint(name, origin)}"
                )
            yield split, i, label, data

    counts = {s: len(r) for s, r in files.items()}
    return Source(name, "image-folder", LOSSY_JPEG if jpeg else ORIGINAL, d, records, counts)


_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_file(d: Path, stem: str) -> Path | None:
    for suffix in ("", ".gz"):
        if (d / (stem + suffix)).is_file():
            return d / (stem + suffix)
    return None


def read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array.

    Raises:
      DataError: a bad magic number or a size that does not match the header.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib_error()) as e:
        raise DataError(
            f"{str(path)!r} cannot be read ({' '.join(str(e).split())}): truncated? copy the "
            "idx files again"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DataError(f"{str(path)!r} is not a uint8 idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise DataError(
            f"{str(path)!r} holds {len(body)} bytes of data, its header says {dims} = "
            f"{int(np.prod(dims))}: truncated; copy the idx files again"
        )
    return np.frombuffer(body, np.uint8).reshape(dims)


def fashion_mnist_source(root: Path, origin: str | Path) -> Source:
    """Finds and checks the Fashion-MNIST idx files under ``root``.

    Raises:
      DataError: the four idx files are not found, or one is damaged.
    """
    stems = [s for pair in _IDX.values() for s in pair]
    d = _find(root, lambda p: all(_idx_file(p, s) is not None for s in stems))
    if d is None:
        raise DataError(
            f"{str(origin)!r} holds no Fashion-MNIST idx files ({', '.join(stems)}, optionally "
            "gzipped); install them with `apt-get install -y dataset-fashion-mnist` and run "
            f"{prepare_hint('fashion_mnist', '/usr/share/datasets/fashion-mnist')}"
        )
    arrays = {}
    for split, (xs, ys) in _IDX.items():
        x, y = read_idx(_idx_file(d, xs)), read_idx(_idx_file(d, ys))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or (len(y) and y.max() > 9):
            raise DataError(
                f"{str(d)!r}: {split} images {list(x.shape)} and labels {list(y.shape)} do not "
                "match (expected [N, 28, 28] and [N] with labels 0..9); copy the idx files again"
            )
        arrays[split] = (x, y)

    def records(split: str) -> Iterator[Record]:
        x, y = arrays[split]
        for i in range(len(y)):
            yield split, i, int(y[i]), png_bytes(x[i])

    counts = {s: len(y) for s, (_, y) in arrays.items()}
    return Source("fashion_mnist", "idx", ORIGINAL, d, records, counts)


SOURCES = {"cifar10": cifar10_source, "fashion_mnist": fashion_mnist_source}
