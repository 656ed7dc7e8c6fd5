"""``pnjax images``: the paper's CIFAR-10 experiments with controls, one command each.

    pnjax images --model lenet5 --mode full --protocol cpu --seeds 0 1 2 \\
        --methods persistent reshuffle random_anchors restarts --data-dir DIR --out DIR

writes ``OUT/results.json`` (after every seed and method) and ``OUT/images.png``, checkpoints
every training run under ``OUT/checkpoints`` (or ``--checkpoint-dir``), and continues a killed
experiment when the same command is run again. See ``docs/images.md``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pnjax.experiments.images import METHODS, MODELS, MODES


def add_images_command(sub: Any, epilog: str) -> None:
    """Registers ``pnjax images`` on the ``pnjax`` command's subparsers ``sub``."""
    from pnjax.cli import _folder_path, _int_at_least, _nonneg_float, _out_dir

    p = sub.add_parser(
        "images",
        help="Section 4: LeNet-5 / AlexNet / ResNet-18 on CIFAR-10, persistent vs controls",
        description="Trains each seed with each method (persistent; reshuffle: λ=0, new data "
        "order per run; random_anchors: random anchor directions; restarts: fresh inits), "
        "every method 1+N runs, championship by validation accuracy, judged on held-out test "
        "images. Protocol 'paper' is the paper's (for an accelerator); 'cpu' a reduction "
        "(LeNet-5 about 9 minutes per seed and method on 2 cores). Rerun the same command to "
        "continue a killed run.",
        epilog=epilog,
    )
    p.set_defaults(handler=run_images_command)
    p.add_argument("--model", choices=MODELS, default="lenet5", help="network (lenet5)")
    p.add_argument("--mode", choices=MODES, default="full", help="full (Eq. 4) or partial (Eq. 5)")
    p.add_argument("--protocol", choices=("cpu", "paper"), default="cpu", help="settings (cpu)")
    p.add_argument(
        "--dataset", choices=("cifar10", "fashion_mnist"), default="cifar10", help="(cifar10)"
    )
    p.add_argument(
        "--seeds", type=_int_at_least("--seeds", 0), nargs="+", default=[0], help="seeds (0)"
    )
    p.add_argument(
        "--methods", choices=METHODS, nargs="+", default=list(METHODS), help="(all four)"
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, metavar="DIR",
        help="TFDS data folder holding the prepared data set (default: $TFDS_DATA_DIR, else "
        "~/tensorflow_datasets)",
    )  # fmt: skip
    p.add_argument(
        "--out", type=_out_dir, default="pnjax-out/images", help="output folder (pnjax-out/images)"
    )
    p.add_argument(
        "--checkpoint-dir", type=_folder_path("--checkpoint-dir"), default=None, metavar="DIR",
        help="checkpoints of every run (default OUT/checkpoints); rerun to resume",
    )  # fmt: skip
    p.add_argument(
        "--init-std", type=_nonneg_float("--init-std"), default=None,
        help="kernels and biases from N(0, s^2); 0 = PyTorch's default init",
    )  # fmt: skip
    p.add_argument("--epochs", type=_int_at_least("--epochs", 1), default=None)
    p.add_argument("--iterations", type=_int_at_least("--iterations", 0, 10_000), default=None)
    p.add_argument("--lam", type=_nonneg_float("--lam"), default=None, help="λ")
    p.add_argument("--batch-size", type=_int_at_least("--batch-size", 1), default=None)
    p.add_argument(
        "--train-size", type=_int_at_least("--train-size", 1), default=None,
        help="use the first N training images only",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress display")

    m = sub.add_parser(
        "images-merge",
        help="join several `pnjax images` runs of one setting (e.g. one seed each) into one table",
        description="Reads RUN/results.json of each RUN folder (each written by `pnjax images` "
        "with the same model, mode, protocol and data, e.g. one seed per process), joins their "
        "runs, recomputes the mean and standard error over all seeds, and writes "
        "OUT/results.json and OUT/images.png.",
        epilog=epilog,
    )
    m.set_defaults(handler=run_images_merge_command)
    m.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="pnjax images --out folders")
    m.add_argument("--out", type=_out_dir, required=True, help="folder for the merged results")
    m.add_argument("--quiet", action="store_true", help="print nothing but errors")


def _print_summary(title: str, results: dict[str, Any]) -> None:
    print(title)
    print(f"  {'method':<16}{'plain':>16}{'champion':>16}{'gain':>16}")
    for method, s in results["summary"].items():

        def f(d: dict[str, float]) -> str:
            se = "n/a" if d["se"] is None else f"{100 * d['se']:.2f}"
            return f"{100 * d['mean']:.2f} ± {se}"

        print(f"  {method:<16}{f(s['plain_test_acc']):>16}{f(s['champion_test_acc']):>16}"
              f"{f(s['gain']):>16}")  # fmt: skip


def run_images_merge_command(args: argparse.Namespace, say: Any) -> int:
    """Runs ``pnjax images-merge``; returns the exit code."""
    import json

    from pnjax.experiments.images import merge_results, plot_images

    parts = []
    for run in args.runs:
        path = run / "results.json"
        if not path.is_file():
            raise ValueError(
                f"{str(path)!r} does not exist: RUN must be the --out folder of a `pnjax images` "
                "run that finished at least one seed and method"
            )
        try:
            parts.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(path)!r} is not valid JSON ({e}); rerun that experiment") from e
        if not isinstance(parts[-1], dict) or "runs" not in parts[-1] or "config" not in parts[-1]:
            raise ValueError(f"{str(path)!r} is not a `pnjax images` results.json")
    merged = merge_results(parts)
    merged["merged_paths"] = [str(r) for r in args.runs]
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "results.json.tmp"
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(args.out / "results.json")
    plot_images(merged, args.out / "images.png")
    if not args.quiet:
        cfg = merged["config"]
        _print_summary(
            f"{cfg['model']} {cfg['mode']}, protocol {cfg['protocol']}, {cfg['pixels']} pixels "
            f"(test accuracy, %; mean ± s.e. over seeds {cfg['seeds']})",
            merged,
        )
        print(f"  wrote {args.out / 'results.json'} and {args.out / 'images.png'}")
    return 0


def run_images_command(args: argparse.Namespace, say: Any) -> int:
    """Runs ``pnjax images``; returns the exit code."""
    import jax

    from pnjax.data.images import load_images
    from pnjax.experiments.images import get_protocol, plot_images, run_images

    if args.dataset == "fashion_mnist" and args.model != "lenet5":
        raise ValueError(
            f"--model {args.model} needs 32x32 colour images; with --dataset fashion_mnist use "
            "--model lenet5"
        )
    proto = get_protocol(
        args.protocol, args.model, args.mode, init_std=args.init_std, epochs=args.epochs,
        iterations=args.iterations, lam=args.lam, batch_size=args.batch_size,
        train_size=args.train_size,
    )  # fmt: skip
    data = load_images(args.dataset, args.data_dir)
    say(
        f"{data.name}: {len(data.train_y)} train + {len(data.test_y)} test images "
        f"({data.pixels} pixels) decoded in {data.decode_seconds:.1f} s "
        f"({data.images_per_second:,.0f} images/s){' when first read' if data.from_cache else ''}"
        f"; backend {jax.default_backend()}"
    )
    if proto.batch_size > min(len(data.train_y), proto.train_size or len(data.train_y)):
        raise ValueError(
            f"--batch-size {proto.batch_size} is larger than the training set; pass a smaller "
            "--batch-size or a larger --train-size"
        )
    ckdir = args.checkpoint_dir or args.out / "checkpoints"
    if not jax.config.jax_compilation_cache_dir:
        # every run of one experiment compiles the same programs: keep them on disk
        jax.config.update("jax_compilation_cache_dir", str(ckdir / "jax-cache"))
    say(f"checkpoints in {ckdir} (rerun the same command to continue after a kill)")
    results = run_images(
        data, model=args.model, mode=args.mode, protocol=args.protocol, proto=proto,
        seeds=args.seeds, methods=args.methods, out=args.out, checkpoint_dir=ckdir, say=say,
    )  # fmt: skip
    plot_images(results, args.out / "images.png")
    _print_summary(
        f"{args.model} {args.mode}, protocol {args.protocol}, {data.pixels} pixels "
        f"(test accuracy, %; mean ± s.e. over seeds {args.seeds})",
        results,
    )
    print(f"  wrote {args.out / 'results.json'} and {args.out / 'images.png'}")
    return 0
