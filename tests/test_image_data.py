"""Image data: TFDS builders on a few real images, the paper's split, augmentation, bad data.

Fixtures are cut from the real data at hand (``../shared/data/cifar10-jpeg.tar.gz``, the Debian
``dataset-fashion-mnist`` idx files) into a temporary folder; genuine CIFAR-10 pickles and
binary batches are written from those real pixels in the original formats.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from pnjax.cli import main
from pnjax.data import DataError, augment, channel_stats, load_images, prepare, split_test
from pnjax.data.sources import CIFAR10_CLASSES, read_idx

ROOT = Path(__file__).resolve().parents[1]
_CANDIDATES = [
    Path(os.environ.get("PNJAX_SHARED_DATA", "/nonexistent")),
    ROOT.parent / "shared" / "data",
    ROOT.parent.parent / "shared" / "data",
]
CIFAR_TAR = next((p / "cifar10-jpeg.tar.gz" for p in _CANDIDATES if (p / "cifar10-jpeg.tar.gz").is_file()), None)  # fmt: skip
FASHION = Path("/usr/share/datasets/fashion-mnist")
PER_CLASS = 2

needs_cifar = pytest.mark.skipif(CIFAR_TAR is None, reason="cifar10-jpeg.tar.gz not at hand")


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """``cifar10-jpeg/{train,test}/<class>/000k.jpg``, k < PER_CLASS, from the real tar."""
    if CIFAR_TAR is None:
        pytest.skip("cifar10-jpeg.tar.gz not at hand")
    d = tmp_path_factory.mktemp("jpeg")
    wanted = {
        f"cifar10-jpeg/{s}/{c}/{k:04d}.jpg"
        for s in ("train", "test")
        for c in CIFAR10_CLASSES
        for k in range(PER_CLASS)
    }
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            if member.name in wanted:
                tar.extract(member, d, filter="data")
                wanted.discard(member.name)
                if not wanted:
                    break
    assert not wanted
    return d / "cifar10-jpeg"


def _decoded(tree: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for label, c in enumerate(CIFAR10_CLASSES):
        for k in range(PER_CLASS):
            xs.append(np.asarray(Image.open(tree / split / c / f"{k:04d}.jpg")))
            ys.append(label)
    return np.stack(xs), np.asarray(ys)


@pytest.fixture(scope="module")
def jpeg_tar(jpeg_tree, tmp_path_factory):
    path = tmp_path_factory.mktemp("tar") / "tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(jpeg_tree, arcname="cifar10-jpeg")
    return path


@pytest.fixture(scope="module")
def prepared(jpeg_tar, tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    prepare("cifar10", jpeg_tar, d)
    return d


def _batches(tree: Path, out: Path, binary: bool) -> tuple[np.ndarray, np.ndarray, Path]:
    """Genuine CIFAR-10 batches (5 train + test) of the real pixels in ``tree``."""
    x, y = _decoded(tree, "train")
    tx, ty = _decoded(tree, "test")
    folder = out / ("cifar-10-batches-bin" if binary else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    parts = np.array_split(np.arange(len(y)), 5)
    files = [(f"data_batch_{i + 1}", x[p], y[p]) for i, p in enumerate(parts)]
    files.append(("test_batch", tx, ty))
    for name, xi, yi in files:
        rows = xi.transpose(0, 3, 1, 2).reshape(len(xi), -1)
        if binary:
            rec = np.concatenate([yi[:, None].astype(np.uint8), rows], axis=1)
            rec.tofile(folder / f"{name}.bin")
        else:
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": rows, b"labels": yi.tolist(), b"batch_label": b"x"}, f)
    return x, tx, folder


def _cli(*args: str, capsys) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


@needs_cifar
def test_jpeg_tar_builds_and_reads_back_the_real_pixels_and_labels(prepared, jpeg_tree):
    data = load_images("cifar10", prepared)
    x, y = _decoded(jpeg_tree, "train")
    tx, ty = _decoded(jpeg_tree, "test")
    assert data.train_x.dtype == np.uint8 and data.train_x.shape == (10 * PER_CLASS, 32, 32, 3)
    np.testing.assert_array_equal(data.train_x, x)
    np.testing.assert_array_equal(data.train_y, y)
    np.testing.assert_array_equal(data.test_x, tx)
    np.testing.assert_array_equal(data.test_y, ty)
    assert data.pixels == "lossy JPEG" and data.images_per_second > 0


@needs_cifar
def test_decoded_copy_is_reused_and_a_damaged_one_ignored(prepared):
    first = load_images("cifar10", prepared)
    again = load_images("cifar10", prepared)
    assert again.from_cache and again.decode_seconds == first.decode_seconds
    np.testing.assert_array_equal(again.train_x, first.train_x)
    np.testing.assert_array_equal(again.test_y, first.test_y)
    cache = next(prepared.glob("pnjax_cifar10/1.0.0/pnjax-decoded.npz"))
    cache.write_bytes(cache.read_bytes()[:1000])
    third = load_images("cifar10", prepared)
    assert not third.from_cache
    np.testing.assert_array_equal(third.train_x, first.train_x)


@needs_cifar
@pytest.mark.parametrize("binary", [False, True])
def test_original_batches_build_with_exact_pixels(jpeg_tree, tmp_path, binary):
    x, tx, folder = _batches(jpeg_tree, tmp_path / "src", binary)
    prepare("cifar10", folder.parent, tmp_path / "tfds")
    data = load_images("cifar10", tmp_path / "tfds")
    np.testing.assert_array_equal(data.train_x, x)  # PNG in the shards: lossless
    np.testing.assert_array_equal(data.test_x, tx)
    assert data.pixels == "original"


@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install -y dataset-fashion-mnist")
def test_fashion_mnist_from_real_idx_files(tmp_path):
    src = tmp_path / "idx"
    src.mkdir()
    want = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # fmt: skip
        a = read_idx(FASHION / f"{stem}.gz")[:12]
        want[stem] = a
        dims = b"".join(int(n).to_bytes(4, "big") for n in a.shape)
        (src / stem).write_bytes(bytes([0, 0, 8, a.ndim]) + dims + a.tobytes())
    prepare("fashion_mnist", src, tmp_path / "tfds")
    data = load_images("fashion_mnist", tmp_path / "tfds")
    np.testing.assert_array_equal(data.train_x[..., 0], want["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(data.train_y, want["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.test_x[..., 0], want["t10k-images-idx3-ubyte"])
    assert data.train_x.shape == (12, 28, 28, 1) and data.pixels == "original"


@needs_cifar
def test_cli_prepare_twice_and_info(jpeg_tar, tmp_path, capsys):
    d = str(tmp_path / "tfds")
    code, text = _cli(
        "data", "prepare", "cifar10", "--from", str(jpeg_tar), "--data-dir", d, capsys=capsys
    )
    assert code == 0 and "lossy JPEG" in text and "images/s" in text
    code, text = _cli(
        "data", "prepare", "cifar10", "--from", str(jpeg_tar), "--data-dir", d, capsys=capsys
    )
    assert code == 0 and "already prepared" in text
    code, text = _cli("data", "info", "cifar10", "--data-dir", d, capsys=capsys)
    assert code == 0 and f"{10 * PER_CLASS} train" in text


def _one_error_line(code: int, text: str, *needles: str) -> None:
    lines = [ln for ln in text.splitlines() if ln.startswith("pnjax: error:")]
    assert code == 2, text
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], lines[0]


def test_error_missing_source_and_nothing_prepared(tmp_path, capsys):
    code, text = _cli("data", "prepare", "cifar10", "--from", str(tmp_path / "nope"),
                      "--data-dir", str(tmp_path), capsys=capsys)  # fmt: skip
    _one_error_line(code, text, "does not exist", "pnjax data prepare cifar10")
    code, text = _cli("data", "info", "cifar10", "--data-dir", str(tmp_path), capsys=capsys)
    _one_error_line(code, text, "no prepared cifar10", "pnjax data prepare cifar10")
    # the experiment never falls back to random data
    code, text = _cli("images", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"),
                      "--quiet", capsys=capsys)  # fmt: skip
    _one_error_line(code, text, "no prepared cifar10", "pnjax data prepare cifar10")
    assert not (tmp_path / "o" / "results.json").exists()


def test_error_wrong_folder(tmp_path, capsys):
    (tmp_path / "src" / "stuff").mkdir(parents=True)
    (tmp_path / "src" / "stuff" / "a.txt").write_text("x")
    code, text = _cli("data", "prepare", "cifar10", "--from", str(tmp_path / "src"),
                      "--data-dir", str(tmp_path / "d"), capsys=capsys)  # fmt: skip
    _one_error_line(code, text, "holds no CIFAR-10", "cifar-10-batches-py")
    code, text = _cli("data", "prepare", "fashion_mnist", "--from", str(tmp_path / "src"),
                      "--data-dir", str(tmp_path / "d"), capsys=capsys)  # fmt: skip
    _one_error_line(code, text, "no Fashion-MNIST idx files", "dataset-fashion-mnist")


@needs_cifar
def test_error_wrong_class_folders(jpeg_tree, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(jpeg_tree, src)
    (src / "train" / "cat").rename(src / "train" / "kitten")
    code, text = _cli("data", "prepare", "cifar10", "--from", str(src),
                      "--data-dir", str(tmp_path / "d"), capsys=capsys)  # fmt: skip
    _one_error_line(
        code, text, "unknown class folder(s) ['kitten']", "missing class folder(s) ['cat']"
    )


@needs_cifar
def test_error_truncated_tar(jpeg_tar, tmp_path, capsys):
    raw = jpeg_tar.read_bytes()
    bad = tmp_path / "cut.tar.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    code, text = _cli("data", "prepare", "cifar10", "--from", str(bad),
                      "--data-dir", str(tmp_path / "d"), capsys=capsys)  # fmt: skip
    _one_error_line(code, text, "not a complete tar archive", "truncated", "pnjax data prepare")
    assert not (tmp_path / "d" / "pnjax_cifar10" / "1.0.0").exists()


@needs_cifar
def test_error_undecodable_image(jpeg_tree, tmp_path, capsys):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(jpeg_tree, src)
    (src / "test" / "dog" / "0001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, text = _cli("data", "prepare", "cifar10", "--from", str(src),
                      "--data-dir", str(tmp_path / "d"), capsys=capsys)  # fmt: skip
    _one_error_line(code, text, "cannot decode image 'test/dog/0001.jpg'", "pnjax data prepare")
    assert not (tmp_path / "d" / "pnjax_cifar10" / "1.0.0").exists()


@needs_cifar
def test_error_short_binary_batch(jpeg_tree, tmp_path, capsys):
    _, _, folder = _batches(jpeg_tree, tmp_path / "src", binary=True)
    f = folder / "data_batch_3.bin"
    f.write_bytes(f.read_bytes()[:-100])
    code, text = _cli("data", "prepare", "cifar10", "--from", str(folder),
                      "--data-dir", str(tmp_path / "d"), capsys=capsys)  # fmt: skip
    _one_error_line(code, text, "data_batch_3.bin", "truncated")


@needs_cifar
def test_error_half_built_then_prepare_repairs(prepared, jpeg_tar, tmp_path, capsys):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(prepared, d)
    shard = next((d / "pnjax_cifar10" / "1.0.0").glob("*-train.array_record-*"))
    shard.unlink()
    code, text = _cli("data", "info", "cifar10", "--data-dir", str(d), capsys=capsys)
    _one_error_line(code, text, "half-built", "pnjax data prepare cifar10")
    # a killed build leaves only TFDS's incomplete.* folder
    shutil.rmtree(d / "pnjax_cifar10" / "1.0.0")
    (d / "pnjax_cifar10" / "incomplete.AB12CD_1.0.0").mkdir()
    code, text = _cli("data", "info", "cifar10", "--data-dir", str(d), capsys=capsys)
    _one_error_line(code, text, "half-built", "interrupted", "pnjax data prepare cifar10")
    code, text = _cli(
        "data", "prepare", "cifar10", "--from", str(jpeg_tar), "--data-dir", str(d), capsys=capsys
    )
    assert code == 0 and not (d / "pnjax_cifar10" / "incomplete.AB12CD_1.0.0").exists()


def test_catalog_tfrecord_copy_is_named_not_read(tmp_path, capsys):
    v = tmp_path / "cifar10" / "3.0.2"
    v.mkdir(parents=True)
    (v / "dataset_info.json").write_text('{"fileFormat": "tfrecord", "splits": []}')
    code, text = _cli("data", "info", "cifar10", "--data-dir", str(tmp_path), capsys=capsys)
    _one_error_line(code, text, "needs TensorFlow", "pnjax data prepare cifar10")


def test_split_is_the_papers_and_seeded():
    val, test = split_test(10_000, seed=3)
    assert len(val) == len(test) == 5_000
    assert np.array_equal(np.sort(np.concatenate([val, test])), np.arange(10_000))
    again = split_test(10_000, seed=3)
    assert np.array_equal(again[0], val) and np.array_equal(again[1], test)
    other = split_test(10_000, seed=4)[0]
    assert not np.array_equal(other, val)
    # a random cut, not a block: both halves span the whole range
    assert val.min() < 100 and val.max() > 9_900
    with pytest.raises(ValueError, match="val_size"):
        split_test(10, 0, val_size=10)


def test_channel_stats_match_numpy():
    x = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    mean, std = channel_stats(x)
    ref = x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, ref.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, ref.std(0), rtol=1e-5)


def test_augment_is_a_padded_crop_or_its_mirror_and_a_pure_function_of_the_key():
    x = jnp.asarray(np.random.default_rng(1).integers(1, 256, (16, 8, 8, 3), dtype=np.uint8))
    f = jax.jit(augment)
    a, b = f(jax.random.key(0), x), f(jax.random.key(0), x)
    assert a.dtype == jnp.uint8 and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(f(jax.random.key(1), x), a)
    padded = np.pad(np.asarray(x), ((0, 0), (4, 4), (4, 4), (0, 0)))
    flips = shifts = 0
    for i in range(len(x)):
        windows = [
            (dy, dx, m)
            for dy in range(9)
            for dx in range(9)
            for m in (False, True)
            if np.array_equal(
                (lambda w: w[:, ::-1] if m else w)(padded[i, dy : dy + 8, dx : dx + 8]), a[i]
            )
        ]
        assert windows, f"image {i} is no crop of the padded input"
        flips += windows[0][2]
        shifts += (windows[0][0], windows[0][1]) != (4, 4)
    assert 0 < flips < len(x) and shifts > 0


def test_decode_error_names_the_image():
    from pnjax.data.sources import decode_image, png_bytes

    img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    np.testing.assert_array_equal(decode_image(png_bytes(img)), img)
    buf = io.BytesIO(b"junk")
    with pytest.raises(DataError, match="cannot decode my image"):
        decode_image(buf.getvalue(), "my image")
