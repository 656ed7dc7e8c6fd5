"""How often plain training ends at the "two affine pieces" solution on the 1-D kink data.

The paper's Section 3 set-up (Min, arXiv 2007.01419): ``KinkMLP`` (1-32-32-1 ReLU, He-normal
weights, zero biases), mean squared error, full-batch ``optax.sgd(1e-3, momentum=0.9)``, 50,000
steps, 100 He-initialized seeds. Seed ``s`` is initialized as
``KinkMLP().init(jax.random.key(s), x)``; all seeds train at once (``jax.vmap`` over the initial
params, ``jax.lax.scan`` over the steps, one ``jax.jit``).

Runs: ``make_kink_data(gap=g)`` for each ``--gaps`` value (default ``1.0`` and the no-gap control
``0.0``), plus a second control, the main run's curve with its gap filled in
(``make_kink_data(gap=0.0, wiggle_gap=1.0)``). For each run it reports the fraction of seeds
that are stuck (``pnjax.data.is_stuck``: affine on each side of ``(-r, r)`` to ``atol``, with
``r = gap``; for the control ``r`` is the main run's gap, a looser test), the same fraction by
loss (final loss within ``rtol`` of ``two_piece_affine_loss``), the loss distribution and the best
loss. Results go to ``benchmarks/results/kink_stuck_rate.json`` and ``.png``.

Usage::

    python benchmarks/kink_stuck_rate.py                  # full protocol (~2 min per gap on 2 CPUs)
    python benchmarks/kink_stuck_rate.py --quick          # 20 seeds x 5,000 steps, smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax.data import (
    affine_check_grid,
    affine_deviation,
    make_kink_data,
    two_piece_affine_loss,
)
from pnjax.models import KinkMLP

RESULTS = Path(__file__).resolve().parent / "results"


def init_params(model: KinkMLP, seeds: np.ndarray, x: np.ndarray) -> Any:
    """He-initialized params of every seed, stacked on a leading axis of size ``len(seeds)``.

    Seed ``s`` gets ``model.init(jax.random.key(s), x)``; the vmapped call returns the same values.
    """
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))
    return jax.vmap(lambda k: model.init(k, x))(keys)


def train_all(
    model: KinkMLP,
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    steps: int,
    record_every: int,
    lr: float,
    momentum: float,
) -> tuple[Any, jax.Array, jax.Array]:
    """Full-batch GD with momentum on the MSE for every chain at once.

    Args:
      model: the network.
      params: stacked params, leading axis C (chains).
      x: inputs ``[N, 1]``.
      y: targets ``[N, 1]``.
      steps: number of optimizer steps T (a multiple of ``record_every``).
      record_every: the loss is recorded every this many steps.
      lr: learning rate.
      momentum: heavy-ball momentum.

    Returns:
      ``(final_params, history, final_loss)``: params with leading axis C, the loss after steps
      ``record_every, 2·record_every, ..., T`` with shape ``[C, T / record_every]``, and the final
      loss ``[C]``.
    """
    tx = optax.sgd(lr, momentum=momentum)
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def loss_fn(p: Any) -> jax.Array:
        return jnp.mean((model.apply(p, xj) - yj) ** 2)

    def one_chain(p: Any) -> tuple[Any, jax.Array, jax.Array]:
        def step(carry: Any, _: None) -> tuple[Any, None]:
            p, s = carry
            g = jax.grad(loss_fn)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        def block(carry: Any, _: None) -> tuple[Any, jax.Array]:
            carry, _ = jax.lax.scan(step, carry, None, length=record_every)
            return carry, loss_fn(carry[0])

        (p, _), hist = jax.lax.scan(block, (p, tx.init(p)), None, length=steps // record_every)
        return p, hist, loss_fn(p)

    return jax.jit(jax.vmap(one_chain))(params)


def run_gap(
    gap: float, radius: float, args: argparse.Namespace, data_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Trains all seeds on the data with this gap and summarizes the outcome."""
    x, y = make_kink_data(args.num_points, gap=gap, **data_kwargs)
    model = KinkMLP()
    seeds = np.arange(args.seeds)
    params = init_params(model, seeds, x)
    tag = f"gap={gap}, wiggle_gap={data_kwargs.get('wiggle_gap', gap)}"
    print(f"[{tag}] {args.seeds} seeds x {args.steps} steps ...", flush=True)
    t0 = time.perf_counter()
    final, hist, loss = train_all(
        model,
        params,
        x,
        y,
        steps=args.steps,
        record_every=args.record_every,
        lr=args.lr,
        momentum=args.momentum,
    )
    loss = np.asarray(jax.block_until_ready(loss))
    wall = time.perf_counter() - t0
    hist = np.asarray(hist)
    grid = affine_check_grid(x, args.grid)
    pred = np.asarray(jax.vmap(lambda p: model.apply(p, grid))(final))[..., 0]
    dev = np.asarray(affine_deviation(pred, grid, radius=radius))
    stuck = dev <= args.atol
    ref = two_piece_affine_loss(x, y)
    ref_cont = two_piece_affine_loss(x, y, continuous=True)
    stuck_by_loss = np.abs(loss - ref) <= args.rtol * ref
    finite = np.isfinite(loss)
    summary = {
        "gap": gap,
        "radius": radius,
        "two_piece_affine_loss": ref,
        "two_piece_affine_loss_continuous_at_0": ref_cont,
        "constant_fit_loss": float(np.var(y.astype(np.float64))),
        "stuck_fraction": float(stuck.mean()),
        "stuck_fraction_by_loss": float(stuck_by_loss.mean()),
        "criteria_agree_fraction": float((stuck == stuck_by_loss).mean()),
        "num_nonfinite": int((~finite).sum()),
        "stuck_loss_median": float(np.median(loss[stuck])) if stuck.any() else None,
        "stuck_loss_range": [float(loss[stuck].min()), float(loss[stuck].max())]
        if stuck.any()
        else None,
        "nonstuck_loss_median": float(np.median(loss[~stuck])) if (~stuck).any() else None,
        "best_loss": float(np.nanmin(loss)),
        "best_seed": int(seeds[np.nanargmin(loss)]),
        "loss_quantiles": {
            str(q): float(np.nanquantile(loss, q)) for q in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
        },
        "stuck_seeds": [int(s) for s in seeds[stuck]],
        "final_loss": [float(v) for v in loss],
        "affine_deviation": [float(v) for v in dev],
        "train_wall_s_incl_compile": wall,
    }
    print(
        f"[{tag}] {wall:.1f}s  stuck {summary['stuck_fraction']:.2f} "
        f"(by loss {summary['stuck_fraction_by_loss']:.2f})  two-piece ref {ref:.4f}  "
        f"median loss {summary['loss_quantiles']['0.5']:.4f}  best {summary['best_loss']:.4f} "
        f"(seed {summary['best_seed']})",
        flush=True,
    )
    arrays = {
        "x": x,
        "y": y,
        "grid": grid[:, 0],
        "pred": pred,
        "hist": hist,
        "loss": loss,
        "stuck": stuck,
    }
    return {"summary": summary, "arrays": arrays}


def check_seed_derivation(seeds: list[int], x: np.ndarray) -> bool:
    """True if the vmapped init equals ``KinkMLP().init(jax.random.key(s), x)`` for each seed."""
    model = KinkMLP()
    batched = init_params(model, np.asarray(seeds), x)
    for i, s in enumerate(seeds):
        single = model.init(jax.random.key(s), x)
        same = jax.tree.map(lambda a, b, i=i: bool(jnp.array_equal(a[i], b)), batched, single)
        if not all(jax.tree.leaves(same)):
            return False
    return True


def _label(s: dict[str, Any]) -> str:
    """Short name of a run for plots."""
    if s["gap"] == s.get("wiggle_gap", s["gap"]):
        return f"gap={s['gap']}"
    return f"gap={s['gap']} (gap-{s['wiggle_gap']} curve filled in)"


def plot(results: list[dict[str, Any]], path: Path, num_examples: int = 3) -> None:
    """Loss histograms, loss histories and a few predictors over the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = max(3, len(results))
    fig, axes = plt.subplots(2, ncol, figsize=(5.5 * ncol, 9))
    ax = axes[0, 0]
    all_loss = np.concatenate([r["arrays"]["loss"] for r in results])
    lo, hi = np.nanmin(all_loss), np.nanmax(all_loss)
    bins = np.logspace(np.log10(lo * 0.8), np.log10(hi * 1.25), 40)
    for r in results:
        s = r["summary"]
        ax.hist(
            r["arrays"]["loss"],
            bins=bins,
            alpha=0.5,
            label=f"{_label(s)}: stuck {100 * s['stuck_fraction']:.0f}%",
        )
    s0 = results[0]["summary"]
    ax.axvline(
        s0["two_piece_affine_loss"],
        ls="--",
        lw=1,
        color="k",
        label="two-affine-piece fit, main run",
    )
    ax.set_xscale("log")
    ax.set_xlabel("final training MSE")
    ax.set_ylabel("seeds")
    ax.set_title(f"final loss of {len(results[0]['arrays']['loss'])} seeds")
    ax.legend(fontsize=7)

    for ax, r in zip(axes[0, 1:], results, strict=False):
        hist, s = r["arrays"]["hist"], r["summary"]
        steps = np.arange(1, hist.shape[1] + 1) * s["steps"] / hist.shape[1]
        for h, st in zip(hist, r["arrays"]["stuck"], strict=True):
            ax.plot(steps, h, color="tab:red" if st else "tab:blue", alpha=0.3, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training MSE")
        ax.set_title(f"{_label(s)}: loss histories (red: stuck)", fontsize=9)
    for ax in axes[0, 1 + len(results) :]:
        ax.axis("off")

    for ax, r in zip(axes[1], results, strict=False):
        a, s = r["arrays"], r["summary"]
        ax.scatter(a["x"][:, 0], a["y"][:, 0], s=12, color="k", zorder=3, label="data")
        for i in np.flatnonzero(a["stuck"])[:num_examples]:
            ax.plot(
                a["grid"],
                a["pred"][i],
                color="tab:red",
                alpha=0.7,
                label=f"seed {i} (stuck) {a['loss'][i]:.3f}",
            )
        best = int(np.nanargmin(a["loss"]))
        ax.plot(
            a["grid"],
            a["pred"][best],
            color="tab:green",
            label=f"seed {best} (best) {a['loss'][best]:.3f}",
        )
        if s["gap"] > 0:
            ax.axvspan(-s["gap"], s["gap"], color="0.9", zorder=0)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        ax.set_title(f"{_label(s)}: predictors (final MSE)", fontsize=9)
        ax.legend(fontsize=7)
    for ax in axes[1, len(results) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--steps", type=int, default=50_000)
    ap.add_argument("--record-every", type=int, default=500)
    ap.add_argument(
        "--gaps",
        type=float,
        nargs="+",
        default=[1.0, 0.0],
        help="first one is the main run; 0.0 is the no-gap control",
    )
    ap.add_argument("--num-points", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--grid", type=int, default=601, help="grid points for the affine check")
    ap.add_argument("--atol", type=float, default=0.05, help="is_stuck tolerance (units of y)")
    ap.add_argument(
        "--rtol",
        type=float,
        default=0.01,
        help="stuck by loss: |loss - two_piece| <= rtol * two_piece",
    )
    ap.add_argument(
        "--no-filled-control",
        dest="filled_control",
        action="store_false",
        help="skip the control with the main run's curve and the gap filled in",
    )
    ap.add_argument("--quick", action="store_true", help="20 seeds x 5,000 steps")
    ap.add_argument("--out", type=Path, default=RESULTS / "kink_stuck_rate.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps = 20, 5_000
    if args.steps % args.record_every:
        ap.error("--steps must be a multiple of --record-every")

    data_kwargs: dict[str, Any] = {}  # make_kink_data defaults
    main_gap = args.gaps[0]
    specs = [(g, g) for g in args.gaps]  # (gap, wiggle_gap): the generator's own data
    if args.filled_control and main_gap > 0:
        specs.append((0.0, main_gap))  # the main run's curve with its gap filled in
    results = []
    for gap, wiggle_gap in specs:
        radius = gap if gap > 0 else (main_gap if main_gap > 0 else 1.0)
        r = run_gap(gap, radius, args, {**data_kwargs, "wiggle_gap": wiggle_gap})
        r["summary"]["steps"] = args.steps
        r["summary"]["wiggle_gap"] = wiggle_gap
        r["summary"]["data_call"] = (
            f"make_kink_data({args.num_points}, gap={gap}, wiggle_gap={wiggle_gap})"
        )
        results.append(r)

    x_main, _ = make_kink_data(args.num_points, gap=main_gap, **data_kwargs)
    stuck_main = results[0]["summary"]["stuck_seeds"]
    suggested = stuck_main[:5]
    derivation_ok = check_seed_derivation(suggested, x_main) if suggested else None

    out = {
        "command": " ".join(["python", "benchmarks/kink_stuck_rate.py", *sys.argv[1:]]),
        "setup": {
            "model": "KinkMLP features=(32, 32, 1), He-normal weights, zero biases",
            "init": "params_s = KinkMLP().init(jax.random.key(s), x), s = 0..seeds-1",
            "optimizer": f"optax.sgd({args.lr}, momentum={args.momentum}), full batch",
            "loss": "mean squared error",
            "steps": args.steps,
            "seeds": args.seeds,
            "num_points": args.num_points,
            "data": "each run's data_call; other make_kink_data arguments at their defaults",
            "stuck_criterion": f"affine_deviation(pred on {args.grid}-point grid, radius) <= "
            f"{args.atol}",
            "stuck_by_loss_criterion": f"|loss - two_piece_affine_loss| <= {args.rtol} * it",
        },
        "suggested_stuck_seeds_for_persistent": suggested,
        "seed_derivation_checked": derivation_ok,
        "runs": [r["summary"] for r in results],
        "environment": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "device": str(jax.devices()[0]),
            "platform": platform.platform(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    png = args.out.with_suffix(".png")
    plot(results, png)
    print(f"suggested stuck seeds: {suggested} (derivation checked: {derivation_ok})")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
