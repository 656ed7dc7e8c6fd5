"""``pnjax data``: prepare image data sets once, and inspect prepared ones.

    pnjax data prepare cifar10 --from PATH [--data-dir DIR] [--overwrite]
    pnjax data prepare fashion_mnist --from /usr/share/datasets/fashion-mnist
    pnjax data info cifar10 [--data-dir DIR]     # counts, pixels, decode speed

``--data-dir`` defaults to ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``. Bad or missing
data gets a one-line error naming the problem and the fixing command (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pnjax.data.builders import DATASETS, default_data_dir


def add_data_command(sub: Any, epilog: str) -> None:
    """Registers ``pnjax data`` on the ``pnjax`` command's subparsers ``sub``."""
    data = sub.add_parser(
        "data",
        help="prepare image data sets (CIFAR-10, Fashion-MNIST) from local files",
        description="Builds tensorflow-datasets copies from local files, without TensorFlow "
        "(encoded images in array_record shards), and reads them back.",
        epilog=epilog,
    )
    data.set_defaults(handler=run_data)
    what = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(data))
    what.required = True
    prep = what.add_parser(
        "prepare",
        help="build a data set once from a local folder or tar",
        description="CIFAR-10 from cifar-10-batches-py/ (pickles), cifar-10-batches-bin/, or a "
        "folder or tar of train/<class>/ and test/<class>/ images (e.g. cifar10-jpeg.tar.gz: "
        "labels exact, pixels lossy JPEG); Fashion-MNIST from its four idx files.",
        epilog=epilog,
    )
    info = what.add_parser(
        "info", help="check a prepared data set and time its decoding", epilog=epilog
    )
    for p in (prep, info):
        p.add_argument("name", choices=DATASETS, help="data set")
        p.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            metavar="DIR",
            help=f"TFDS data folder (default: $TFDS_DATA_DIR, else {default_data_dir()})",
        )
    prep.add_argument(
        "--from", dest="source", required=True, metavar="PATH", help="folder or tar to read"
    )
    prep.add_argument("--overwrite", action="store_true", help="rebuild a complete copy too")


def run_data(args: argparse.Namespace, say: Any) -> int:
    """Runs ``pnjax data ACTION``; returns the exit code."""
    from pnjax.data.builders import prepare, prepared_dir
    from pnjax.data.images import check_prepared, load_images
    from pnjax.data.sources import DataError

    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    if args.data_command == "prepare":
        try:
            existed = check_prepared(args.name, data_dir) == prepared_dir(args.name, data_dir)
        except DataError:
            existed = False
        say(f"preparing {args.name} from {args.source} into {data_dir}")
        folder = prepare(args.name, args.source, data_dir, overwrite=args.overwrite)
        if existed and not args.overwrite:
            print(f"{args.name}: already prepared in {folder} (pass --overwrite to rebuild)")
    data = load_images(args.name, data_dir)
    print(
        f"{args.name} in {data.source}: {len(data.train_y)} train + {len(data.test_y)} test "
        f"images {list(data.train_x.shape[1:])}, pixels {data.pixels}; decoded in "
        f"{data.decode_seconds:.1f} s ({data.images_per_second:,.0f} images/s)"
        + (" when first read (now read back from the decoded copy)" if data.from_cache else ""),
        file=sys.stdout,
    )
    return 0
