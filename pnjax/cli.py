"""The ``pnjax`` command: the paper's small experiments, with figures and a results.json.

    pnjax demo  [--out DIR]          # 2-D toy + a short kink run (under 3 minutes on 2 CPU cores)
    pnjax toy2d [--out DIR] [--lam]  # Section 2, Eq. 1
    pnjax kink  [--out DIR] [...]    # Section 3: re-initialization vs persistent training

Every command writes ``results.json`` and PNG figures to ``--out`` and prints a short table.
``toy2d`` and ``kink`` take ``--checkpoint-dir DIR`` (checkpoint after every persistent
iteration) and ``--resume`` (continue a killed run from its checkpoints, refused unless every
other setting is the same; see ``docs/long_runs.md``). Bad arguments, and runs that would not
fit in memory, get a one-line error naming the value and the fix (exit code 2, no traceback;
set ``PNJAX_DEBUG=1`` to see one) before anything is written. Ctrl-C stops a run at once (exit
code 130; with checkpoints, ``--resume`` continues it). A run in which every training diverged
writes its results (``null`` for the non-finite numbers: ``results.json`` is strict JSON) and
exits with code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pnjax import __version__

EPILOG = "Paper: Min, Persistent Neurons, arXiv:2007.01419. Docs: docs/ in the repository."


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no traceback
        self.exit(2, f"pnjax: error: {message} (see '{self.prog} --help')\n")


_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32


def _nonneg_float(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"{name} must be finite and >= 0, got {text!r}")
        if value > _FLOAT32_MAX:  # the runs compute in float32
            raise argparse.ArgumentTypeError(
                f"{name} must fit in float32 (<= {_FLOAT32_MAX:.4g}), got {text!r}"
            )
        if 0 < value < _FLOAT32_TINY:  # a float32 subnormal or 0: XLA flushes them to 0
            raise argparse.ArgumentTypeError(
                f"{name} {text!r} is too small for float32 (it would be computed as 0); use 0 "
                f"or a value >= {_FLOAT32_TINY:.4g}"
            )
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


def _creatable(path: Path) -> str:
    """Why ``path`` cannot be (created and) written as a folder, or ``''``; creates nothing."""
    if path.exists():
        if not path.is_dir():
            return "it is a file"
        return "" if os.access(path, os.W_OK | os.X_OK) else "not writable"
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{str(parent)!r} is a file"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{str(parent)!r} is not writable"
            return ""
    return ""


def _out_dir(text: str) -> Path:
    """Checks ``--out`` (an empty path would mean the current folder); creates nothing: the
    folder is made only once the whole command line has been accepted."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"--out must name a folder, got {text!r}; pass e.g. --out pnjax-out/run1"
        )
    path = Path(text)
    why = _creatable(path)
    if why == "not writable":
        raise argparse.ArgumentTypeError(
            f"output folder {text!r} is not writable; pass a writable --out"
        )
    if why:
        raise argparse.ArgumentTypeError(
            f"cannot create output folder {text!r} ({why}); pass a writable --out"
        )
    return path


def _folder_path(name: str):
    def parse(text: str) -> Path:
        if not text.strip() or "\0" in text:
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
    parser.add_argument("--version", action="version", version=f"pnjax {__version__}")
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


def _strict(obj: Any) -> Any:
    """``obj`` with NaN and inf replaced by ``None``: strict JSON has no NaN (``null`` means the
    number is not finite, e.g. a diverged run's loss)."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): _strict(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return _strict(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    try:
        value = float(obj)
    except (TypeError, ValueError):
        return str(obj)
    return value if math.isfinite(value) else None


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_strict(obj), indent=2, allow_nan=False))
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


def _num(x: Any, spec: str) -> str:
    """``x`` formatted with ``spec``; ``'diverged'`` for ``None`` (a non-finite number)."""
    return "diverged" if x is None else format(x, spec)


def _print_kink(s: dict) -> None:
    r = s["reinit"]
    n = s["config"]["num_reinit"]
    print(f"kink (1-32-32-1 ReLU, {s['config']['steps']} steps)       ours        paper")
    if r.get("diverged"):
        print(f"  re-inits diverged (loss not finite) {r['diverged']:>5} of {n}     -")
    print(f"  re-inits stuck (two affine pieces)  {_num(r['stuck_fraction'], '>8.0%')}     most")
    print(f"  two-piece affine loss (stuck level) {s['two_piece_affine_loss']:>8.3f}     ~4.2")
    print(f"  best of {n} re-inits             {_num(r['best_loss'], '>8.3f')}     0.33")
    for p in s["persistent"]:
        print(
            f"  persistent, stuck seed {p['seed']:<3}: plain {_num(p['plain_loss'], '.3f')} -> "
            f"champion {_num(p['champion_loss'], '.3f')} (iteration {p['champion_iteration']}, "
            f"{_num(p['fraction_unstuck'], '.0%')} of runs unstuck, {sum(p['diverged'])} "
            "diverged)   paper 0.10 (11th)"
        )
    for p in s["random_anchors"]:
        print(
            f"  control, random anchors, seed {p['seed']:<3}: champion "
            f"{_num(p['champion_loss'], '.3f')} ({_num(p['fraction_unstuck'], '.0%')} unstuck)"
        )
    for p in s["scaled_init"]:
        verdict = "diverged" if p["stuck"] is None else "stuck" if p["stuck"] else "unstuck"
        print(
            f"  control, first layer x{p['factor']:<4} seed {p['seed']:<3}: loss "
            f"{_num(p['loss'], '.3f')} ({verdict})"
        )


SETTINGS_FILE = "pnjax-cli-settings.json"
_NOT_SETTINGS = ("command", "out", "quiet", "resume", "checkpoint_dir")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """Every setting of the command that shapes its results (not where they are written)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}


def _settings_record(args: argparse.Namespace) -> str:
    body = {"command": args.command, "settings": _settings(args)}
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return json.dumps({**body, "sha256": digest}, indent=2, sort_keys=True)


def _check_settings(folder: Path, args: argparse.Namespace) -> str:
    """Why ``--resume`` must not continue the run in ``folder`` ('' if it may)."""
    try:
        saved = json.loads((folder / SETTINGS_FILE).read_text())
        body = {"command": saved["command"], "settings": saved["settings"]}
        ok = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if ok != saved["sha256"]:
            raise ValueError("checksum")
    except FileNotFoundError:
        return (
            f"{str(folder)!r} holds checkpoints without a record of their settings ("
            f"{SETTINGS_FILE}; older pnjax versions did not write it), so --resume cannot "
            "check them; start afresh with an empty or new --checkpoint-dir"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return (
            f"the settings record {str(folder / SETTINGS_FILE)!r} is damaged; start afresh "
            "with an empty or new --checkpoint-dir"
        )
    now = _settings(args)
    diffs = [
        f"--{k.replace('_', '-')}: {saved['settings'].get(k)!r} in the checkpoint, "
        f"{now.get(k)!r} now"
        for k in sorted(set(now) | set(saved["settings"]))
        if saved["settings"].get(k) != now.get(k)
    ]
    if diffs:
        return (
            "--resume with other settings than the checkpointed run ("
            + "; ".join(diffs)
            + "); pass the same arguments to resume it, or an empty or new --checkpoint-dir "
            "to start afresh"
        )
    return ""


def _checkpoint_folder(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[Path | None, bool]:
    """The checkpoint folder of this command (None: no checkpointing) and whether the run
    starts afresh; checks it for use and creates nothing (``_prepare_folders`` does)."""
    folder = getattr(args, "checkpoint_dir", None)
    resume = getattr(args, "resume", False)
    if folder is None and not resume:
        return None, True
    if folder is None:
        folder = args.out / "checkpoints"
    folder = folder / args.command
    if folder.exists() and not folder.is_dir():
        parser.error(f"checkpoint folder {str(folder)!r} is a file; pass a folder --checkpoint-dir")
    holds = folder.is_dir() and any(c.name != "pnjax.lock" for c in folder.iterdir())
    if holds and not resume:
        parser.error(
            f"--checkpoint-dir {str(folder.parent)!r} already holds checkpoints of a {args.command} "
            "run; pass --resume to continue it, or an empty or new --checkpoint-dir to start afresh"
        )
    why = _creatable(folder)
    if why:
        parser.error(
            f"cannot create or write checkpoint folder {str(folder)!r} ({why}); pass a writable "
            "--checkpoint-dir"
        )
    if holds:
        why = _check_settings(folder, args)
        if why:
            parser.error(why)
    elif resume:
        print(f"pnjax: no checkpoint in {str(folder)!r} yet; starting afresh", file=sys.stderr)
    return folder, not holds


# Memory a run needs (pnjax 0.1.0, jax 0.10.2, CPU; peak resident size measured by
# benchmarks/cli_memory.py, see docs/long_runs.md): a process with JAX and the kink experiment
# loaded, and what every step or seed adds.
BASE_BYTES = 450e6  # measured: 340 MB (toy2d), 442 MB (kink, 25 re-inits of 10 steps)
TOY_BYTES_PER_STEP = 12.5  # measured: 340 -> 391 MB from 4e6 to 8e6 steps (curve, trajectory)
KINK_BYTES_PER_STEP_SEED = 8.0  # the re-init scan keeps each step's loss (4 B), copied once
KINK_BYTES_PER_SEED = 17e3  # measured: 442 -> 475 MB from 25 to 2,000 re-inits
KINK_REINIT_CHUNK = 25


def estimate_memory(args: argparse.Namespace) -> tuple[float, str]:
    """Bytes of memory the command needs at its peak, and what dominates them."""
    if args.command == "toy2d":
        return BASE_BYTES + TOY_BYTES_PER_STEP * args.steps, f"--steps {args.steps}"
    if args.command == "kink":
        chunk = min(args.reinit, KINK_REINIT_CHUNK)
        steps = KINK_BYTES_PER_STEP_SEED * args.steps * chunk
        seeds = KINK_BYTES_PER_SEED * args.reinit
        what = f"--steps {args.steps}" if steps >= seeds else f"--reinit {args.reinit}"
        return BASE_BYTES + steps + seeds, what
    return BASE_BYTES + TOY_BYTES_PER_STEP * 50_000 + KINK_BYTES_PER_SEED * 20, "demo"


def available_memory() -> float | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), else ``None``."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def _check_memory(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    need, what = estimate_memory(args)
    have = available_memory()
    if have is not None and need > 0.8 * have:
        parser.error(
            f"this run needs about {need / 1e9:.1f} GB of memory ({what}), more than the "
            f"{0.8 * have / 1e9:.1f} GB it may use here (80% of the {have / 1e9:.1f} GB "
            "available); use fewer --steps or --reinit"
        )


def _prepare_folders(
    args: argparse.Namespace, parser: argparse.ArgumentParser, ckdir: Path | None, fresh: bool
) -> None:
    """Creates ``--out`` and the checkpoint folder (with its settings record), once the whole
    command line has been accepted."""
    for folder, flag in ((args.out, "--out"), (ckdir, "--checkpoint-dir")):
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(
                f"cannot create folder {str(folder)!r} ({e.strerror}); pass a writable {flag}"
            )
    if ckdir is not None and fresh:
        (ckdir / SETTINGS_FILE).write_text(_settings_record(args))


def _in_worker(fn: Callable[[], Any]) -> Any:
    """``fn()`` run in a worker thread while this (main) thread waits.

    A compiled JAX program does not return to Python until it ends, so a Ctrl-C sent to a
    process whose main thread runs one would wait for it (minutes for a long run). Waiting here
    instead, the main thread gets the ``KeyboardInterrupt`` at once.
    """
    box: dict[str, Any] = {}
    context = contextvars.copy_context()  # e.g. the checkpoint scope; threads start without it

    def target() -> None:
        try:
            box["value"] = context.run(fn)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            box["error"] = e

    worker = threading.Thread(target=target, name="pnjax-run", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


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
    _check_memory(args, parser)
    ckdir, fresh = _checkpoint_folder(args, parser)
    _prepare_folders(args, parser, ckdir, fresh)  # nothing was written before this line
    args.checkpointed = ckdir is not None
    scope = contextlib.nullcontext()
    if ckdir is not None:
        from pnjax.checkpoint import lock_folder
        from pnjax.fit import checkpoint_scope

        lock = lock_folder(ckdir)  # a second process on this folder stops here, before training
        scope = checkpoint_scope(ckdir)
        say(f"checkpointing into {ckdir}")
    failed = ""
    with scope:
        if args.command == "toy2d":
            toy = _in_worker(
                lambda: cmd_toy2d(out, args.lam, args.iterations, args.steps, args.lr, say)
            )
            if toy.get("champion_iteration", 0) < 0:
                failed = "every run diverged (loss not finite); lower --lr"
        elif args.command == "kink":
            kink = _in_worker(
                lambda: cmd_kink(
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
            )
            if kink.get("reinit", {}).get("stuck_fraction", 0) is None:
                failed = (
                    f"every one of the {args.reinit} re-initialized runs diverged (loss not "
                    "finite); lower --lr"
                )
        elif args.command == "demo":
            toy_out, kink_out = out / "toy2d", out / "kink"
            toy_out.mkdir(parents=True, exist_ok=True)
            kink_out.mkdir(parents=True, exist_ok=True)

            def demo() -> None:
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

            _in_worker(demo)
    say(f"done in {time.perf_counter() - t0:.0f}s")
    if ckdir is not None:
        lock.release()
    if failed:
        print(f"pnjax: {failed} (results in {str(out / 'results.json')!r})", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the ``pnjax`` command; returns the exit code (0; 1 when every run diverged; 2 on
    bad input, before anything is written; 130 on Ctrl-C).

    Args:
      argv: the arguments (default ``sys.argv[1:]``). Without ``argv`` (the command line), a
        Ctrl-C ends the process at once, leaving the checkpoints of the finished iterations;
        with ``argv`` (a call from Python) it returns 130 and the interrupted run's worker
        thread finishes its current compiled call in the background.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _run(args, parser)
    except KeyboardInterrupt:
        if getattr(args, "checkpointed", False):
            hint = "; continue it with the same command line plus --resume"
        else:
            hint = "; nothing was checkpointed (pass --checkpoint-dir DIR to make a run resumable)"
        print(f"pnjax: interrupted{hint}", file=sys.stderr, flush=True)
        if argv is None:
            sys.stdout.flush()
            os._exit(130)  # the worker thread may be inside a compiled program: do not wait
        return 130
    except Exception as e:
        from pnjax.checkpoint import CheckpointLockedError

        message = " ".join(str(e).split()) or type(e).__name__
        if "RESOURCE_EXHAUSTED" in message:  # XLA could not allocate: the estimate was short
            message = f"out of memory ({message[:200]}); use fewer --steps or --reinit" + (
                "; continue with --resume" if getattr(args, "checkpointed", False) else ""
            )
        elif not isinstance(e, (ValueError, TypeError, OSError, CheckpointLockedError)):
            raise
        if os.environ.get("PNJAX_DEBUG", "0") not in ("", "0"):
            raise
        print(f"pnjax: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
