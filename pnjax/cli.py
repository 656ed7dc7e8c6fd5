"""The ``pnjax`` command: the paper's small experiments, with figures and a results.json.

    pnjax demo  [--out DIR]          # 2-D toy + a short kink run (under 3 minutes on 2 CPU cores)
    pnjax toy2d [--out DIR] [--lam]  # Section 2, Eq. 1
    pnjax kink  [--out DIR] [...]    # Section 3: re-initialization vs persistent training

Every command writes ``results.json`` and PNG figures to ``--out`` and prints a short table.
``toy2d`` and ``kink`` take ``--checkpoint-dir DIR`` (checkpoint after every persistent
iteration) and ``--resume`` (continue a killed run from its checkpoints; see
``docs/long_runs.md``). Bad arguments get a one-line error naming the value and the fix (exit
code 2, no traceback; set ``PNJAX_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

EPILOG = "Paper: Min, Persistent Neurons, arXiv:2007.01419. Docs: docs/ in the repository."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no traceback
        self.exit(2, f"pnjax: error: {message} (see '{self.prog} --help')\n")


def _nonneg_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be finite and >= 0, got {text!r}")
        return value

    return parse


def _pos_float(name: str):
    def parse(text: str) -> float:
        value = _nonneg_float(name)(text)
        if value == 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        return value

    return parse


def _int_at_least(name: str, lo: int, hi: int = 10**9):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {value}")
        if value > hi:
            raise argparse.ArgumentTypeError(f"{name} must be <= {hi}, got {value}")
        return value

    return parse


def _out_dir(text: str) -> Path:
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise argparse.ArgumentTypeError(
            f"cannot create output folder {text!r} ({why}); pass a writable --out"
        ) from None
    if not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(
            f"output folder {text!r} is not writable; pass a writable --out"
        )
    return path


def _folder_path(name: str):
    def parse(text: str) -> Path:
        if not text or "\0" in text:
            raise argparse.ArgumentTypeError(f"{name} must be a folder path, got {text!r}")
        path = Path(text)
        if path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{name} {text!r} is a file, not a folder; pass a folder path"
            )
        return path

    return parse


def _checkpointing(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint-dir",
        type=_folder_path("--checkpoint-dir"),
        default=None,
        metavar="DIR",
        help="checkpoint after every persistent iteration into DIR (default with --resume: "
        "OUT/checkpoints); a killed run continues with --resume",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run checkpointed in --checkpoint-dir (starts afresh if it holds "
        "none yet); the other arguments must be the same as the first time",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pnjax",
        description="Persistent neurons in JAX: reproduce the paper's small experiments.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def common(p: argparse.ArgumentParser, default_out: str) -> None:
        p.add_argument(
            "--out",
            type=_out_dir,
            default=default_out,
            help=f"folder for results.json and the figures (default: {default_out})",
        )
        p.add_argument("--quiet", action="store_true", help="no progress display")

    demo = sub.add_parser(
        "demo",
        help="the 2-D toy and a short kink run (about 1-3 minutes on 2 CPU cores)",
        description="Runs `toy2d` (paper settings) and a shortened `kink` (20 re-inits, one stuck "
        "seed, 10 persistent iterations, 50,000 steps each) and prints a summary table.",
        epilog=EPILOG,
    )
    common(demo, "pnjax-out/demo")

    toy = sub.add_parser(
        "toy2d",
        help="Section 2: GD on Eq. 1, plain vs persistent",
        description="Plain GD from (-0.335, -1.4) on Eq. 1 and persistent iterations with the "
        "plain solution(s) as anchors. Paper: plain ends at (2, -2), iteration 1 at (-2, -1).",
        epilog=EPILOG,
    )
    common(toy, "pnjax-out/toy2d")
    toy.add_argument("--lam", type=_nonneg_float("--lam"), default=0.1, help="λ (default 0.1)")
    toy.add_argument(
        "--iterations",
        type=_int_at_least("--iterations", 0, 100_000),
        default=1,
        help="persistent iterations after the plain run (default 1)",
    )
    toy.add_argument(
        "--steps",
        type=_int_at_least("--steps", 1),
        default=50_000,
        help="GD steps per run (default 50000)",
    )
    toy.add_argument("--lr", type=_pos_float("--lr"), default=1e-3, help="learning rate (1e-3)")
    _checkpointing(toy)

    kink = sub.add_parser(
        "kink",
        help="Section 3: 1-32-32-1 ReLU MLP, re-initializations vs persistent training",
        description="Trains --reinit He-initialized seeds plainly, then from each of the first "
        "--stuck-seeds stuck ones runs 1 plain + --iterations persistent runs, with two "
        "controls (random anchor directions; scaled-down first-layer init). The paper's full "
        "protocol is the default (100 re-inits, 99 iterations, 50,000 steps): measured 28 "
        "minutes on a shared 2-core machine without the controls (--no-controls), about twice "
        "that with them. A quick look: --reinit 20 --stuck-seeds 1 --iterations 10.",
        epilog=EPILOG,
    )
    common(kink, "pnjax-out/kink")
    kink.add_argument(
        "--reinit",
        type=_int_at_least("--reinit", 1, 100_000),
        default=100,
        help="number of re-initialized seeds (default 100)",
    )
    kink.add_argument(
        "--stuck-seeds",
        type=_int_at_least("--stuck-seeds", 0),
        default=5,
        help="stuck seeds to run persistent training from (default 5)",
    )
    kink.add_argument(
        "--iterations",
        type=_int_at_least("--iterations", 0, 100_000),
        default=99,
        help="persistent iterations after the plain run (default 99)",
    )
    kink.add_argument("--lam", type=_nonneg_float("--lam"), default=0.01, help="λ (default 0.01)")
    kink.add_argument(
        "--steps",
        type=_int_at_least("--steps", 1),
        default=50_000,
        help="GD steps per run (default 50000)",
    )
    kink.add_argument("--lr", type=_pos_float("--lr"), default=1e-3, help="learning rate (1e-3)")
    kink.add_argument(
        "--no-controls", action="store_true", help="skip the random-anchor and scaled-init controls"
    )
    _checkpointing(kink)
    from pnjax.data.cli import add_data_command
    from pnjax.experiments.images_cli import add_images_command

    add_data_command(sub, EPILOG)
    add_images_command(sub, EPILOG)
    return parser


def _say(quiet: bool):
    start = time.perf_counter()

    def say(msg: str) -> None:
        if not quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def cmd_toy2d(out: Path, lam: float, iterations: int, steps: int, lr: float, say) -> dict:
    from pnjax.experiments.toy2d import plot_toy2d, run_toy2d

    say(f"toy2d: plain + {iterations} persistent run(s) of {steps} GD steps, λ={lam}")
    _, res = run_toy2d(lam=lam, iterations=iterations, steps=steps, lr=lr)
    plot_toy2d(res["paths"], str(out / "toy2d.png"))
    summary = res["summary"]
    _write_json(out / "results.json", {"toy2d": summary})
    print("toy2d (Eq. 1)            end point            loss")
    for n, (pt, loss) in enumerate(
        zip(summary["final_points"], summary["final_loss"], strict=False)
    ):
        name = "plain" if n == 0 else f"persistent {n}"
        print(f"  {name:<16} ({pt[0]:+.3f}, {pt[1]:+.3f})    {loss:+.4f}")
    print(
        f"  paper: plain -> (2, -2), persistent 1 -> (-2, -1); champion: iteration "
        f"{summary['champion_iteration']}"
    )
    print(f"  wrote {out / 'results.json'} and {out / 'toy2d.png'}")
    return summary


def cmd_kink(out: Path, say, **kw: Any) -> dict:
    from pnjax.experiments.kink import plot_kink, run_kink

    summary, arrays = run_kink(progress=say, **kw)
    plot_kink(summary, arrays, str(out / "kink.png"))
    _write_json(out / "results.json", {"kink": summary})
    _print_kink(summary)
    print(f"  wrote {out / 'results.json'} and {out / 'kink.png'}")
    return summary


def _print_kink(s: dict) -> None:
    r = s["reinit"]
    print(f"kink (1-32-32-1 ReLU, {s['config']['steps']} steps)       ours        paper")
    print(f"  re-inits stuck (two affine pieces)  {r['stuck_fraction']:>8.0%}     most")
    print(f"  two-piece affine loss (stuck level) {s['two_piece_affine_loss']:>8.3f}     ~4.2")
    print(
        f"  best of {s['config']['num_reinit']} re-inits             {r['best_loss']:>8.3f}     0.33"
    )
    for p in s["persistent"]:
        print(
            f"  persistent, stuck seed {p['seed']:<3}: plain {p['plain_loss']:.3f} -> champion "
            f"{p['champion_loss']:.3f} (iteration {p['champion_iteration']}, "
            f"{p['fraction_unstuck']:.0%} of runs unstuck)   paper 0.10 (11th)"
        )
    for p in s["random_anchors"]:
        print(
            f"  control, random anchors, seed {p['seed']:<3}: champion {p['champion_loss']:.3f} "
            f"({p['fraction_unstuck']:.0%} unstuck)"
        )
    for p in s["scaled_init"]:
        print(
            f"  control, first layer x{p['factor']:<4} seed {p['seed']:<3}: loss {p['loss']:.3f}"
            f" ({'stuck' if p['stuck'] else 'unstuck'})"
        )


def _checkpoint_folder(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path | None:
    """The checkpoint folder of this command (None: no checkpointing), checked for use."""
    folder = getattr(args, "checkpoint_dir", None)
    resume = getattr(args, "resume", False)
    if folder is None and not resume:
        return None
    if folder is None:
        folder = args.out / "checkpoints"
    folder = folder / args.command
    holds = folder.is_dir() and any(folder.iterdir())
    if holds and not resume:
        parser.error(
            f"--checkpoint-dir {str(folder.parent)!r} already holds checkpoints of a {args.command} "
            "run; pass --resume to continue it, or an empty or new --checkpoint-dir to start afresh"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(
            f"cannot create checkpoint folder {str(folder)!r} ({e.strerror}); pass a writable "
            "--checkpoint-dir"
        )
    if not os.access(folder, os.W_OK):
        parser.error(
            f"checkpoint folder {str(folder)!r} is not writable; pass a writable --checkpoint-dir"
        )
    if resume and not holds:
        print(f"pnjax: no checkpoint in {str(folder)!r} yet; starting afresh", file=sys.stderr)
    return folder


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if hasattr(args, "handler"):  # commands defined in their own modules
        return args.handler(args, _say(getattr(args, "quiet", False)))
    say = _say(args.quiet)
    out: Path = args.out
    t0 = time.perf_counter()
    if args.command == "kink" and args.stuck_seeds > args.reinit:
        parser.error(
            f"--stuck-seeds {args.stuck_seeds} is more than --reinit {args.reinit}: the stuck "
            "seeds are drawn from the re-initialized ones; pass --stuck-seeds <= --reinit"
        )
    ckdir = _checkpoint_folder(args, parser)
    scope = contextlib.nullcontext()
    if ckdir is not None:
        from pnjax.fit import checkpoint_scope

        scope = checkpoint_scope(ckdir)
        say(f"checkpointing into {ckdir}")
    with scope:
        if args.command == "toy2d":
            cmd_toy2d(out, args.lam, args.iterations, args.steps, args.lr, say)
        elif args.command == "kink":
            cmd_kink(
                out,
                say,
                num_reinit=args.reinit,
                num_stuck=args.stuck_seeds,
                iterations=args.iterations,
                lam=args.lam,
                steps=args.steps,
                lr=args.lr,
                controls=not args.no_controls,
            )
        elif args.command == "demo":
            toy_out, kink_out = out / "toy2d", out / "kink"
            toy_out.mkdir(parents=True, exist_ok=True)
            kink_out.mkdir(parents=True, exist_ok=True)
            toy = cmd_toy2d(toy_out, 0.1, 1, 50_000, 1e-3, say)
            kink = cmd_kink(
                kink_out,
                say,
                num_reinit=20,
                num_stuck=1,
                iterations=10,
                lam=0.01,
                steps=50_000,
                lr=1e-3,
                controls=True,
                scale_factors=(0.25,),
            )
            _write_json(out / "results.json", {"toy2d": toy, "kink": kink})
    say(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the ``pnjax`` command; returns the exit code (0, 2 on bad input, 130 on Ctrl-C).

    Args:
      argv: the arguments (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except (ValueError, TypeError, OSError) as e:
        if os.environ.get("PNJAX_DEBUG", "0") not in ("", "0"):
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"pnjax: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with --resume)" if getattr(args, "checkpoint_dir", None) else ""
        print(f"pnjax: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
