"""The paper's image experiments (Section 4) with the controls it lacks, on real data.

One *run* is one seed and one method, each given the same number of training runs ``1 + N``
from the same initialization and data order, judged on held-out images (the CIFAR-10 test set
cut at random into validation and test halves, :func:`pnjax.data.split_test`):

- ``persistent``: Algorithm 1 (full model: all layers, Eq. 4; partial: one random layer, Eq. 5),
  championship by validation accuracy;
- ``reshuffle``: λ = 0 with a new data order every run (``shuffle='per_iteration'``), best by
  validation: what picking the best of ``N + 1`` noisy runs gives with no anchors at all;
- ``random_anchors``: the same penalty, each anchor replaced by a random direction with the
  same per-layer norms (:func:`pnjax.experiments.kink.random_direction_anchor`);
- ``restarts``: ``N + 1`` fresh initializations (the first is the shared one), best by
  validation.

Everything goes through the public drivers: :func:`pnjax.persistent_fit` (``data=``,
``batch_size=``, ``epochs=``, ``score_fn=`` = minus validation accuracy, ``checkpoint_dir=``,
``anchor_fn=``), one call per run and, for ``restarts``, one ``iterations=0`` call per
initialization. Every call checkpoints after each iteration, so a killed experiment continues
where it stopped when the same command is run again.

Protocols (:data:`PROTOCOLS`): ``paper`` is DESIGN.md section 4 (for an accelerator); ``cpu``
is a reduction that runs LeNet-5 in about 9 minutes per seed, setting and method on 2 CPU
cores. See ``docs/images.md``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pnjax import _compile
from pnjax.data.images import ImageData, augment, channel_stats, normalize, split_test
from pnjax.experiments.kink import random_direction_anchor
from pnjax.fit import persistent_fit
from pnjax.models import AlexNet, LeNet5, ResNet18

MODELS = ("lenet5", "alexnet", "resnet18")
MODES = ("full", "partial")
METHODS = ("persistent", "reshuffle", "random_anchors", "restarts")

# DESIGN.md section 4; the paper's numbers, accuracy in percent (val, test).
PAPER = {
    ("lenet5", "full", 0.2): {"plain": (70.74, 69.94), "persistent": (71.64, 71.78)},
    ("lenet5", "full", 0.05): {"plain": (71.58, 71.48), "persistent": (72.76, 73.22)},
    ("lenet5", "partial", None): {"plain": (72.94, 72.60), "persistent": (73.60, 73.22)},
    ("alexnet", "partial", None): {"plain": (80.46, 78.92), "persistent": (80.74, 79.44)},
    ("resnet18", "partial", None): {"plain": (92.20, 91.94), "persistent": (92.40, 92.18)},
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The settings of one experiment.

    Attributes:
      epochs: passes over the training images per run.
      iterations: ``N``: persistent iterations after the plain run (every method gets
        ``1 + N`` runs).
      lam: λ of the persistent penalty.
      batch_size: mini-batch size.
      lr: Adam learning rate.
      init_std: ``None``: PyTorch's default initialization (``U(±1/sqrt(fan_in))`` for every
        kernel and bias); else every kernel and bias drawn from ``N(0, init_std²)``.
      train_size: use the first this many training images (``None``: all).
      augment: random crop (pad 4) and flip inside the step (ResNet-18).
    """

    epochs: int
    iterations: int
    lam: float
    batch_size: int
    lr: float = 1e-3
    init_std: float | None = None
    train_size: int | None = None
    augment: bool = False


# The paper does not state the number of epochs of its full-model LeNet-5 runs, nor the number
# of persistent iterations of its partial runs; pnjax uses its partial runs' 150 epochs and
# its full runs' 20 runs (1 plain + 19 persistent) for both.
PROTOCOLS: dict[tuple[str, str, str], Protocol] = {
    ("paper", "lenet5", "full"): Protocol(150, 19, 0.01, 256, init_std=0.2),
    ("paper", "lenet5", "partial"): Protocol(150, 19, 0.001, 256),
    ("paper", "alexnet", "full"): Protocol(150, 19, 0.01, 128),
    ("paper", "alexnet", "partial"): Protocol(150, 19, 0.001, 128),
    ("paper", "resnet18", "full"): Protocol(350, 19, 0.01, 128, augment=True),
    ("paper", "resnet18", "partial"): Protocol(350, 19, 0.001, 128, augment=True),
    # CPU: 10 runs x 8 epochs of LeNet-5 (195 steps an epoch) took 9 min on 2 quiet cores.
    ("cpu", "lenet5", "full"): Protocol(8, 9, 0.01, 256, init_std=0.2),
    ("cpu", "lenet5", "partial"): Protocol(8, 9, 0.001, 256),
    # AlexNet at about 0.13 s a step: 5 runs x 3 epochs ~ 15 minutes.
    ("cpu", "alexnet", "full"): Protocol(3, 4, 0.01, 128),
    ("cpu", "alexnet", "partial"): Protocol(3, 4, 0.001, 128),
    # ResNet-18 at about 6 s a step on a CPU: a smoke run only (2 runs x 20 steps).
    ("cpu", "resnet18", "full"): Protocol(1, 1, 0.01, 128, train_size=2560, augment=True),
    ("cpu", "resnet18", "partial"): Protocol(1, 1, 0.001, 128, train_size=2560, augment=True),
}


def get_protocol(name: str, model: str, mode: str, **overrides: Any) -> Protocol:
    """The protocol ``name`` (``'cpu'`` or ``'paper'``) of ``model`` in ``mode``, with the
    non-``None`` ``overrides`` applied (``init_std=0`` means PyTorch's default init)."""
    key = (name, model, mode)
    if key not in PROTOCOLS:
        raise ValueError(
            f"no protocol {name!r} for model {model!r} in mode {mode!r}; protocols: cpu, paper; "
            f"models: {', '.join(MODELS)}; modes: {', '.join(MODES)}."
        )
    kw = {k: v for k, v in overrides.items() if v is not None}
    if kw.get("init_std") == 0:
        kw["init_std"] = None  # PyTorch's default initialization
    return dataclasses.replace(PROTOCOLS[key], **kw)


def make_model(model: str, num_classes: int = 10) -> nn.Module:
    """The Flax module for ``'lenet5'``, ``'alexnet'`` or ``'resnet18'``."""
    if model == "lenet5":
        return LeNet5(num_classes=num_classes)
    if model == "alexnet":
        return AlexNet(num_classes=num_classes)
    if model == "resnet18":
        return ResNet18(num_classes=num_classes)
    raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}.")


def redraw_init(params: Any, key: jax.Array, std: float | None) -> Any:
    """Re-draws every kernel and the bias beside it.

    ``std=None``: PyTorch's default for ``Linear``/``Conv`` layers, ``U(-b, b)`` with ``b = 1 /
    sqrt(fan_in)`` (``fan_in`` = the kernel's size without its output axis) for kernel and bias;
    else ``N(0, std²)`` for both. Leaves of layers without a kernel (BatchNorm scale and bias)
    are kept.
    """

    def visit(tree: Any, k: jax.Array) -> Any:
        if not isinstance(tree, dict):
            return tree
        out = dict(tree)
        if "kernel" in tree and not isinstance(tree["kernel"], dict):
            kern = tree["kernel"]
            fan_in = int(np.prod(kern.shape[:-1]))
            for i, name in enumerate(("kernel", "bias")):
                if name not in tree:
                    continue
                leaf, lk = tree[name], jax.random.fold_in(k, i)
                if std is None:
                    b = 1.0 / math.sqrt(fan_in)
                    out[name] = jax.random.uniform(lk, leaf.shape, leaf.dtype, -b, b)
                else:
                    out[name] = std * jax.random.normal(lk, leaf.shape, leaf.dtype)
        for i, (name, sub) in enumerate(sorted(tree.items())):
            if isinstance(sub, dict):
                out[name] = visit(sub, jax.random.fold_in(k, 1000 + i))
        return out

    return visit(jax.tree_util.tree_map(lambda x: x, params), key)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Model, loss and evaluation of one experiment (pure functions)."""

    module: nn.Module
    has_state: bool
    init: Callable[[jax.Array], tuple[Any, Any]]
    loss_fn: Callable[..., Any]
    accuracy: Callable[..., jax.Array]


def _chunk(n: int, most: int = 500) -> int:
    """The largest divisor of ``n`` that is at most ``most``."""
    return max(d for d in range(1, min(n, most) + 1) if n % d == 0)


def make_problem(
    model: str, proto: Protocol, mean: np.ndarray, std: np.ndarray, sample: np.ndarray,
    aug_seed: int = 0,
) -> Problem:  # fmt: skip
    """Builds the loss (cross entropy on normalized images) and the accuracy of ``model``.

    Args:
      model: ``'lenet5'``, ``'alexnet'`` or ``'resnet18'``.
      proto: the protocol (initialization, augmentation).
      mean, std: ``[C]`` per-channel statistics of the training images (:func:`channel_stats`).
      sample: ``[1, H, W, C]`` uint8, for shapes.
      aug_seed: seed of the augmentation stream.

    Returns:
      A :class:`Problem`. Without state ``loss_fn(params, batch)``; ResNet-18 carries a state
      ``{'batch_stats': ..., 'aug_step': int32}`` and ``loss_fn(params, state, batch) -> (loss,
      state)``; the augmentation key of a step is ``fold_in(key(aug_seed), aug_step)``.
      ``accuracy(params, state, x, y)`` is the fraction of ``x`` ``[n, H, W, C]`` uint8
      classified as ``y``.
    """
    module = make_model(model)
    mean, std = jnp.asarray(mean), jnp.asarray(std)
    has_state = model == "resnet18"
    if proto.augment and not has_state:
        raise ValueError(
            f"augmentation draws its key from a step counter in the model state; {model} has "
            "none (only resnet18 augments)."
        )

    def init(key: jax.Array) -> tuple[Any, Any]:
        x = normalize(jnp.asarray(sample), mean, std)
        variables = module.init(
            jax.random.fold_in(key, 1), x, **({"train": False} if has_state else {})
        )
        params = redraw_init(variables["params"], key, proto.init_std)
        if not has_state:
            return params, None
        return params, {
            "batch_stats": variables["batch_stats"],
            "aug_step": jnp.zeros((), jnp.int32),
        }

    def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    if has_state:

        def loss_fn(params, state, batch):
            x = batch["x"]
            if proto.augment:
                key = jax.random.fold_in(jax.random.key(aug_seed), state["aug_step"])
                x = augment(key, x)
            logits, upd = module.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                normalize(x, mean, std),
                train=True,
                mutable=["batch_stats"],
            )
            new = {"batch_stats": upd["batch_stats"], "aug_step": state["aug_step"] + 1}
            return xent(logits, batch["y"]), new

    else:

        def loss_fn(params, batch):
            logits = module.apply({"params": params}, normalize(batch["x"], mean, std))
            return xent(logits, batch["y"])

    def accuracy(params, state, x, y):
        n = x.shape[0]
        c = _chunk(n)

        def one(xy):
            xs, ys = xy
            v = {"params": params}
            kw = {}
            if has_state:
                v["batch_stats"] = state["batch_stats"]
                kw["train"] = False
            logits = module.apply(v, normalize(xs, mean, std), **kw)
            return jnp.sum(jnp.argmax(logits, -1) == ys)

        hits = jax.lax.map(one, (x.reshape(n // c, c, *x.shape[1:]), y.reshape(n // c, c)))
        return jnp.sum(hits) / n

    # jitted: eager, the dozens of small random draws each compile (minutes on a loaded CPU)
    return Problem(module, has_state, jax.jit(init), loss_fn, accuracy)


@dataclasses.dataclass(frozen=True)
class Splits:
    """uint8 train / validation / test arrays of one seed."""

    train: dict[str, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]


def make_splits(data: ImageData, seed: int, train_size: int | None) -> Splits:
    """The training images (the first ``train_size``) and the seed's validation/test cut."""
    n = len(data.train_y) if train_size is None else min(train_size, len(data.train_y))
    val_idx, test_idx = split_test(len(data.test_y), seed)
    train = {"x": data.train_x[:n], "y": data.train_y[:n].astype(np.int32)}
    return Splits(
        train,
        (data.test_x[val_idx], data.test_y[val_idx].astype(np.int32)),
        (data.test_x[test_idx], data.test_y[test_idx].astype(np.int32)),
    )


def _layer_name(res: Any, n: int) -> str:
    idx = int(res.history["layer"][n])
    if idx >= 0:
        return res.layer_names[idx]
    mask = res.history.get("layer_mask")
    if idx == -1 or mask is None:
        return "all"
    return "+".join(name for name, on in zip(res.layer_names, mask[n], strict=True) if on)


def run_method(
    problem: Problem,
    splits: Splits,
    proto: Protocol,
    *,
    seed: int,
    method: str,
    mode: str,
    checkpoint_dir: Path,
    say: Callable[[str], None] = lambda s: None,
    with_fit: bool = False,
) -> Any:
    """Trains one seed with one method; returns its JSON-ready record.

    Rerun on a finished checkpoint folder, it trains nothing: every iteration is restored.

    Returns:
      ``{'seed', 'method', 'champion_iteration', 'history': [{'iteration', 'val_acc',
      'test_acc', 'loss', 'layer', 'seconds'}, ...]}`` (accuracies as fractions, ``seconds`` the
      wall time of that iteration's run and evaluation); with ``with_fit=True`` the pair
      ``(entry, fits)``, ``fits`` the list of :class:`pnjax.FitResult` of the method's
      ``persistent_fit`` calls (one, or one per restart).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    timing_file = checkpoint_dir / "seconds.json"
    seconds = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    val_x, val_y = (jnp.asarray(a) for a in splits.val)
    test_x, test_y = (jnp.asarray(a) for a in splits.test)
    # compiled as the drivers compile the validation score (pnjax's CPU options: convolutions
    # in Eigen); benchmarks/eval_compile.py: same accuracies, LeNet-5 2.7x faster, AlexNet 13%
    # slower than jax.jit
    acc = _compile.jit(problem.accuracy)
    init_key = jax.random.key(seed)
    data_key = jax.random.fold_in(jax.random.key(seed), 0xDA7A)
    optimizer = optax.adam(proto.lr)
    rows: list[dict[str, Any]] = []
    clock = [time.perf_counter()]
    total = proto.iterations + 1

    if problem.has_state:

        def score_fn(params, state):
            return -problem.accuracy(params, state, val_x, val_y)
    else:

        def score_fn(params):
            return -problem.accuracy(params, None, val_x, val_y)

    def record(n: int, info: dict[str, Any], tag: str) -> None:
        state = info.get("model_state")
        val = -float(info["score"])
        test = (
            float(acc(info["params"], state, test_x, test_y))
            if info["params"] is not None
            else float("nan")
        )
        now = time.perf_counter()
        if not info.get("resumed"):
            seconds[tag] = now - clock[0]
            timing_file.write_text(json.dumps(seconds))
        clock[0] = now
        rows.append(
            {
                "iteration": len(rows),
                "val_acc": val,
                "test_acc": test,
                "loss": float(info["loss"]),
                "layer": "all",
                "seconds": float(seconds.get(tag, 0.0)),
            }
        )
        say(
            f"seed {seed} {method}: run {len(rows)}/{total}"
            f"{' (from checkpoint)' if info.get('resumed') else ''}: val {val:.4f} test "
            f"{test:.4f} loss {float(info['loss']):.4f}"
        )

    common = dict(
        data=splits.train,
        batch_size=proto.batch_size,
        epochs=proto.epochs,
        score_fn=score_fn,
        layers=None if mode == "full" else "random",
    )

    def fit(params0, state0, *, key, folder, iterations, lam, tag, **kw):
        return persistent_fit(
            params0,
            problem.loss_fn,
            optimizer,
            iterations=iterations,
            lam=lam,
            key=key,
            checkpoint_dir=folder,
            model_state=state0,
            callback=lambda n, info: record(n, info, tag(n)),
            **common,
            **kw,
        )

    params0, state0 = problem.init(init_key)
    fits: list[Any] = []
    if method == "restarts":
        champ, best = -1, -math.inf
        for r in range(total):
            p, s = (params0, state0) if r == 0 else problem.init(jax.random.fold_in(init_key, r))
            res = fit(p, s, key=data_key, folder=checkpoint_dir / f"restart-{r:03d}",
                      iterations=0, lam=0.0, tag=lambda n, r=r: str(r))  # fmt: skip
            fits.append(res)
            rows[-1]["layer"] = "none"
            if res.champion_iteration == 0 and rows[-1]["val_acc"] > best:
                champ, best = r, rows[-1]["val_acc"]
        champion_iteration = champ
    else:
        kw: dict[str, Any] = {}
        lam = proto.lam
        if method == "reshuffle":
            lam, kw["shuffle"] = 0.0, "per_iteration"
        elif method == "random_anchors":
            kw["anchor_fn"] = random_direction_anchor
        res = fit(params0, state0, key=data_key, folder=checkpoint_dir / "fit",
                  iterations=proto.iterations, lam=lam, tag=str, **kw)  # fmt: skip
        fits.append(res)
        for n, row in enumerate(rows):
            row["layer"] = _layer_name(res, n) if method != "reshuffle" else "none"
        champion_iteration = int(res.champion_iteration)
    entry = {
        "seed": seed,
        "method": method,
        "champion_iteration": champion_iteration,
        "history": rows,
    }
    return (entry, fits) if with_fit else entry


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean and standard error over seeds of the plain and champion test accuracy
    and of the gain (champion - plain, paired by seed); the standard error is ``None`` for a
    single seed."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method and r["champion_iteration"] >= 0]
        if not rs:
            continue
        plain = np.array([r["history"][0]["test_acc"] for r in rs])
        champ = np.array([r["history"][r["champion_iteration"]]["test_acc"] for r in rs])

        def ms(a: np.ndarray) -> dict[str, float | None]:
            # one seed has no standard error: None (JSON null), never NaN
            se = float(a.std(ddof=1) / math.sqrt(len(a))) if len(a) > 1 else None
            return {"mean": float(a.mean()), "se": se}

        out[method] = {
            "seeds": [r["seed"] for r in rs],
            "plain_test_acc": ms(plain),
            "champion_test_acc": ms(champ),
            "gain": ms(champ - plain),
        }
    return out


# config entries that may differ between experiments merged into one table
_MERGE_FREE = ("seeds", "methods", "jax", "backend")


def _one_or_all(values: Any) -> Any:
    """The value if all agree, else the sorted list of the different ones."""
    vs = sorted(set(map(str, values)))
    return vs[0] if len(vs) == 1 else vs


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ``results.json`` from several ``pnjax images`` runs of the same setting.

    Seeds (or methods) of one setting can run as separate processes or on separate machines,
    each with its own ``--out``; this joins their ``runs`` and recomputes ``summary`` (mean and
    standard error over all seeds, gains paired by seed). The configs must agree on everything
    but ``seeds``, ``methods`` and the versions; a seed-method pair may appear once only.

    Raises:
      ValueError: no parts, configs that differ (named, with both values), or a seed-method
        pair that appears twice.
    """
    if not parts:
        raise ValueError("merge_results needs at least one results.json")
    base = parts[0]["config"]
    runs: list[dict[str, Any]] = []
    seen: dict[tuple[int, str], int] = {}
    for i, part in enumerate(parts):
        cfg = part["config"]
        for key in sorted(set(base) | set(cfg)):
            if key not in _MERGE_FREE and base.get(key) != cfg.get(key):
                raise ValueError(
                    f"results {i} differs from results 0 in config {key!r}: "
                    f"{cfg.get(key)!r} against {base.get(key)!r}; only runs of one setting "
                    "(model, mode, protocol, data, init) can be merged"
                )
        for r in part["runs"]:
            pair = (r["seed"], r["method"])
            if pair in seen:
                raise ValueError(
                    f"seed {pair[0]} method {pair[1]!r} appears in results {seen[pair]} and "
                    f"results {i}; merge each seed-method run once"
                )
            seen[pair] = i
            runs.append(r)
    runs.sort(key=lambda r: (r["seed"], list(METHODS).index(r["method"])))
    seeds = sorted({r["seed"] for r in runs})
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    return {
        "config": {**base, "seeds": seeds, "methods": methods,
                   "jax": _one_or_all(p["config"].get("jax") for p in parts),
                   "backend": _one_or_all(p["config"].get("backend") for p in parts)},
        "paper": parts[0].get("paper", {}),
        "runs": runs,
        "summary": summarize(runs),
        "seconds": float(sum(p.get("seconds", 0.0) for p in parts)),
        "merged_from": len(parts),
    }  # fmt: skip


def plot_images(results: dict[str, Any], path_png: str | Path) -> None:
    """The paper's Figures 7-11: validation and test error per iteration, plain run as lines.

    One panel per method; for each seed the validation (red) and test (blue) error of every
    run, the plain run's as horizontal lines, the championship circled.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = results["runs"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, axes = plt.subplots(1, max(1, len(methods)), figsize=(4.2 * max(1, len(methods)), 3.6),
                             sharey=True, squeeze=False)  # fmt: skip
    for ax, method in zip(axes[0], methods, strict=False):
        for r in (r for r in runs if r["method"] == method):
            it = [h["iteration"] for h in r["history"]]
            val = [100 * (1 - h["val_acc"]) for h in r["history"]]
            test = [100 * (1 - h["test_acc"]) for h in r["history"]]
            ax.plot(it, val, "r--", lw=1, marker=".", alpha=0.8)
            ax.plot(it, test, "b--", lw=1, marker=".", alpha=0.8)
            ax.axhline(val[0], color="r", lw=0.8, alpha=0.5)
            ax.axhline(test[0], color="b", lw=0.8, alpha=0.5)
            c = r["champion_iteration"]
            if c >= 0:
                ax.plot([c], [val[c]], "ko", mfc="none", ms=8)
        ax.set_title(method)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("restart" if method == "restarts" else "iteration")
    axes[0][0].set_ylabel("error (%)  red: validation, blue: test")
    cfg = results.get("config", {})
    fig.suptitle(
        f"{cfg.get('model', '')} {cfg.get('mode', '')} on {cfg.get('dataset', '')} "
        f"({cfg.get('pixels', '')} pixels), protocol {cfg.get('protocol', '')}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def run_images(
    data: ImageData,
    *,
    model: str,
    mode: str,
    protocol: str,
    proto: Protocol,
    seeds: Sequence[int],
    methods: Sequence[str],
    out: Path,
    checkpoint_dir: Path,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Runs every seed and method, writing ``out/results.json`` after each; returns it."""
    out = Path(out)
    splits0 = make_splits(data, seeds[0] if seeds else 0, proto.train_size)
    mean, std = channel_stats(splits0.train["x"])
    problem = make_problem(model, proto, mean, std, splits0.train["x"][:1])
    results: dict[str, Any] = {
        "config": {
            "model": model,
            "mode": mode,
            "protocol": protocol,
            "dataset": data.name,
            "pixels": data.pixels,
            "source": data.source,
            **dataclasses.asdict(proto),
            "train_images": int(len(splits0.train["y"])),
            "val_images": int(len(splits0.val[1])),
            "test_images": int(len(splits0.test[1])),
            "seeds": list(seeds),
            "methods": list(methods),
            "optimizer": "adam",
            "jax": jax.__version__,
            "backend": jax.default_backend(),
        },
        "paper": {k: v for k, v in (PAPER.get((model, mode, proto.init_std)) or {}).items()},
        "runs": [],
    }
    t0 = time.perf_counter()
    for seed in seeds:
        splits = make_splits(data, seed, proto.train_size)
        for method in methods:
            say(f"seed {seed}, {method}: {proto.iterations + 1} runs of {proto.epochs} epoch(s)")
            rec = run_method(
                problem, splits, proto, seed=seed, method=method, mode=mode,
                checkpoint_dir=Path(checkpoint_dir) / f"seed-{seed}" / method, say=say,
            )  # fmt: skip
            results["runs"].append(rec)
            results["summary"] = summarize(results["runs"])
            results["seconds"] = time.perf_counter() - t0
            tmp = out / "results.json.tmp"
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out / "results.json")
    return results
