"""User mistakes at the drivers' front door: a clear error before any work, or a working run.

Most tests check that ``loss_fn`` is never even traced: the refusal comes first.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pnjax
from pnjax.cli import build_parser

X = jnp.linspace(-1.0, 1.0, 16).reshape(8, 2)
Y = X[:, 0] - 2.0 * X[:, 1] + 0.5
DATA = (X, Y)
P0 = {"a": {"w": jnp.zeros((2,))}, "b": {"c": jnp.zeros(())}}
KW = {"iterations": 1, "lam": 0.01}


def full_loss(p):
    return jnp.mean((X @ p["a"]["w"] + p["b"]["c"] - Y) ** 2)


def batch_loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["a"]["w"] + p["b"]["c"] - y) ** 2)


def chains(tree, c=2):
    return jax.tree_util.tree_map(lambda x: jnp.stack([x] * c), tree)


def traced(fn, calls):
    """``fn`` that records every call (a trace, under jit)."""

    def wrapped(*args):
        calls.append(1)
        return fn(*args)

    functools.update_wrapper(wrapped, fn)
    return wrapped


DRIVERS = {
    "persistent_fit": lambda loss, opt, **kw: pnjax.persistent_fit(P0, loss, opt, **KW, **kw),
    "run_chains": lambda loss, opt, **kw: pnjax.run_chains(chains(P0), loss, opt, **KW, **kw),
}


# 1 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_full_batch_loss_with_data_is_refused_before_tracing(driver):
    calls = []
    with pytest.raises(TypeError, match=r"with data=, loss_fn must take \(params, batch\)"):
        DRIVERS[driver](traced(full_loss, calls), optax.sgd(0.1), data=DATA, batch_size=4,
                        epochs=1)  # fmt: skip
    assert calls == []
    with pytest.raises(TypeError, match=r"without data=, loss_fn must take \(params\)"):
        DRIVERS[driver](traced(batch_loss, calls), optax.sgd(0.1), steps=2)
    assert calls == []
    # *args and functools.partial are read through, not refused
    from pnjax._checks import check_loss_signature

    check_loss_signature(lambda *a: 0.0, has_state=False, minibatch=True)
    check_loss_signature(functools.partial(lambda s, p, b: 0.0, 2.0), has_state=False,
                         minibatch=True)  # fmt: skip


# 2 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("minibatch", [False, True])
def test_vector_score_fn_is_refused_before_training(driver, minibatch):
    calls = []
    form = (
        {"data": DATA, "batch_size": 4, "epochs": 1}
        if minibatch
        else {"steps": 2}
    )  # fmt: skip
    loss = traced(batch_loss if minibatch else full_loss, calls)
    with pytest.raises(ValueError, match=r"score_fn returned shape \(2,\).*must return a scalar"):
        DRIVERS[driver](loss, optax.sgd(0.1), score_fn=lambda p: p["a"]["w"], **form)
    assert calls == []


# 3 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_optimizer_factory_or_other_object_is_refused(driver):
    calls = []
    loss = traced(full_loss, calls)
    with pytest.raises(TypeError, match=r"optimizer=optax.adam is the factory.*optax.adam\(1e-3\)"):
        DRIVERS[driver](loss, optax.adam, steps=2)
    for bad in ("adam", 0.1, None):
        with pytest.raises(TypeError, match=r"optimizer must be an optax.GradientTransformation"):
            DRIVERS[driver](loss, bad, steps=2)
    assert calls == []


# 4 -------------------------------------------------------------------------------------------


def test_bad_keywords_are_refused_like_persistent_fit_refuses_them(tmp_path):
    calls = []
    loss = traced(full_loss, calls)
    for keep in (2.5, "x", None):
        for driver in DRIVERS:
            with pytest.raises(ValueError, match=rf"checkpoint_keep must be an int >= 1.*{keep}"):
                DRIVERS[driver](loss, optax.sgd(0.1), steps=2, checkpoint_dir=tmp_path / "ck",
                                checkpoint_keep=keep)  # fmt: skip
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())
    with pytest.raises(TypeError, match=r"mesh must be a jax.sharding.Mesh.*'x' \(str\)"):
        DRIVERS["run_chains"](loss, optax.sgd(0.1), steps=2, mesh="x")
    for driver in DRIVERS:
        with pytest.raises(TypeError, match=r"jit must be callable like jax.jit.*'x'"):
            DRIVERS[driver](loss, optax.sgd(0.1), steps=2, jit="x")
    assert calls == []
    bank = pnjax.AnchorBank.create(P0, capacity=2).push(P0)
    with pytest.raises(ValueError, match=r"layer index 7 is out of range.*list/tuple of layer"):
        pnjax.persistent_penalty(P0, bank, 0.1, layers=7)
    with pytest.raises(ValueError, match=r"layer index 7 is out of range"):
        pnjax.persistent_bias(bank, 0.1, layers=7)
    # an index selects a layer, as it does in the drivers (layers=1 is layer 'b')
    p = {"a": {"w": jnp.ones((2,))}, "b": {"c": jnp.ones(())}}
    bank = pnjax.AnchorBank.create(p, capacity=2).push(p)
    assert float(pnjax.persistent_penalty(p, bank, 0.1, layers=1)) == pytest.approx(
        float(pnjax.persistent_penalty(p, bank, 0.1, layers="b"))
    )
    tx = pnjax.persistent_bias(bank, 0.1, layers=1)
    g, _ = tx.update(jax.tree_util.tree_map(jnp.zeros_like, p), tx.init(p), p)
    assert float(g["b"]["c"]) == pytest.approx(0.1) and float(jnp.sum(g["a"]["w"])) == 0.0


# 5 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("driver", DRIVERS)
def test_integer_param_leaves_are_kept_and_the_rest_is_trained(driver):
    p0 = {**P0, "count": {"n": jnp.asarray(7, jnp.int32)}}

    def loss(p, batch=DATA):
        return batch_loss(p, batch) + 0.0 * p["count"]["n"]

    if driver == "persistent_fit":  # full batch, with L-BFGS's value_fn on the float leaves
        res = pnjax.persistent_fit(p0, loss, optax.lbfgs(), steps=10, **KW)
    else:
        res = pnjax.run_chains(chains(p0), loss, optax.sgd(0.1), data=DATA, batch_size=4,
                               epochs=5, **KW)  # fmt: skip
    start = float(batch_loss(P0, DATA))
    assert np.all(np.asarray(res.history["loss"]) < 0.5 * start)
    assert np.all(np.asarray(res.champion["count"]["n"]) == 7)
    assert np.asarray(res.champion["count"]["n"]).dtype == np.int32


# 6 -------------------------------------------------------------------------------------------


OPTIMIZERS = {
    "lbfgs": lambda: optax.lbfgs(),
    "reduce_on_plateau": lambda: optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau()),
}


@pytest.mark.parametrize(
    "driver,opt,minibatch",
    [
        ("persistent_fit", "lbfgs", False), ("persistent_fit", "lbfgs", True),
        ("persistent_fit", "reduce_on_plateau", False),
        ("persistent_fit", "reduce_on_plateau", True),
        ("run_chains", "lbfgs", False), ("run_chains", "reduce_on_plateau", True),
    ],
)  # fmt: skip
def test_optimizers_that_take_value_and_value_fn(driver, opt, minibatch):
    form = (
        {"data": DATA, "batch_size": 4, "epochs": 3}
        if minibatch
        else {"steps": 10}
    )  # fmt: skip
    res = DRIVERS[driver](batch_loss if minibatch else full_loss, OPTIMIZERS[opt](), **form)
    start = float(full_loss(P0))
    loss = np.asarray(res.history["loss"])
    assert np.all(np.isfinite(loss)) and np.all(loss < 0.5 * start), (loss, start)


# 7 -------------------------------------------------------------------------------------------


def test_warns_once_for_persistent_bias_inside_the_optimizer():
    bank = pnjax.AnchorBank.create(P0, capacity=2)
    inner = [
        optax.chain(pnjax.persistent_bias(bank, 0.1), optax.sgd(0.1)),
        optax.chain(
            optax.inject_hyperparams(pnjax.persistent_bias)(bank=bank, lam=0.1), optax.sgd(0.1)
        ),  # fmt: skip
    ]
    for driver in DRIVERS:
        for opt in inner:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                # the warning comes before the other checks: a bad capacity then stops the call
                with pytest.raises(ValueError, match="capacity"):
                    DRIVERS[driver](full_loss, opt, steps=2, capacity=0)
            ours = [w for w in seen if "persistent_bias" in str(w.message)]
            assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
            assert "penalized twice" in str(ours[0].message)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*persistent_bias.*")
            with pytest.raises(ValueError, match="capacity"):
                DRIVERS[driver](full_loss, optax.sgd(0.1), steps=2, capacity=0)


# 8 -------------------------------------------------------------------------------------------


FLOAT_OPTIONS = [
    ("toy2d", "--lam"), ("toy2d", "--lr"), ("kink", "--lam"), ("kink", "--lr"),
    ("images", "--lam"), ("images", "--init-std"),
]  # fmt: skip


@pytest.mark.parametrize("command,option", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["1e40", "1e-50", "1e-40", "nan", "-inf"])
def test_cli_float_options_must_be_finite_float32(command, option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, f"{option}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err and value in err
    assert build_parser().parse_args([command, option, "0.5"]) is not None
