"""Checkpoints: generic save/restore, corruption fallback, resume of persistent_fit after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("orbax.checkpoint")

import pnjax  # noqa: E402
from pnjax import checkpoint as ck  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The problem solved by the child processes and by the in-process reference runs.
PROBLEM = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax

    X = jnp.linspace(-1, 1, 64).reshape(32, 2)
    Y = jnp.sin(3 * X[:, :1]) * X[:, 1:]

    def init():
        k1, k2 = jax.random.split(jax.random.key(0))
        return {
            "Dense_0": {"kernel": jax.random.normal(k1, (2, 8)), "bias": jnp.zeros(8)},
            "Dense_1": {"kernel": jax.random.normal(k2, (8, 1)) / 3, "bias": jnp.zeros(1)},
        }

    def loss(p, batch=None):
        x, y = (X, Y) if batch is None else batch
        h = jnp.tanh(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
        return jnp.mean((h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"] - y) ** 2)

    FULL = dict(iterations=3, lam=0.05, steps=500, key=jax.random.key(3))
    MINI = dict(iterations=1, lam=0.05, data=(X, Y), batch_size=8, epochs=6,
                checkpoint_every_epochs=2, key=jax.random.key(4), shuffle="per_iteration")
    """
)

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, optax, jax
    sys.path.insert(0, os.path.dirname(__file__))
    from problem import init, loss, FULL, MINI
    import pnjax
    from pnjax import checkpoint as ck

    mode, folder, out = sys.argv[1], sys.argv[2], sys.argv[3]
    kill = len(sys.argv) > 4
    kw = FULL if mode == "full" else MINI

    def suicide():
        os.kill(os.getpid(), signal.SIGKILL)

    def jit(fn):
        compiled, calls = pnjax.fit._default_jit()(fn), [0]

        def call(*args):
            out = compiled(*args)  # dispatched asynchronously: the iteration is in flight
            calls[0] += 1
            if kill and mode == "full" and calls[0] == 3:
                suicide()  # die inside iteration 2 (iterations 0 and 1 are checkpointed)
            return out

        return call

    if kill and mode == "mini":
        real = ck.save_checkpoint
        def save(directory, step, state, metadata=None, **k):
            path = real(directory, step, state, metadata, **k)
            # die right after the first mid-iteration save of iteration 1
            if metadata["done"] == 1 and metadata["partial_epochs"] > 0:
                suicide()
            return path
        ck.save_checkpoint = save

    res = pnjax.persistent_fit(init(), loss, optax.adam(1e-2), checkpoint_dir=folder,
                               jit=jit, callback=lambda n, info: None, **kw)
    np.savez(out, resumed=res.resumed_from, champion_iteration=res.champion_iteration,
             **{"h_" + k: v for k, v in res.history.items()},
             **{f"c_{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(res.champion))},
             **{f"b_{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(res.bank))})
    """
)


@pytest.fixture(scope="module")
def problem_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("problem")
    (d / "problem.py").write_text(PROBLEM)
    (d / "child.py").write_text(CHILD)
    return d


def _problem(problem_dir):
    sys.path.insert(0, str(problem_dir))
    try:
        import problem  # noqa: PLC0415
    finally:
        sys.path.remove(str(problem_dir))
    return problem


def _child(problem_dir, mode, folder, out, kill=False):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    args = [sys.executable, str(problem_dir / "child.py"), mode, str(folder), str(out)]
    return subprocess.run(
        args + (["kill"] if kill else []), env=env, capture_output=True, text=True, timeout=300
    )


def _as_npz_dict(res):
    d = {"champion_iteration": res.champion_iteration}
    d |= {"h_" + k: v for k, v in res.history.items()}
    d |= {f"c_{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(res.champion))}
    d |= {f"b_{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(res.bank))}
    return d


def _assert_bit_equal(got, want):
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k, strict=True)


@pytest.mark.parametrize("mode", ["full", "mini"])
def test_sigkill_mid_iteration_then_resume_equals_uninterrupted(problem_dir, tmp_path, mode):
    prob = _problem(problem_dir)
    folder = tmp_path / "ckpt"
    killed = _child(problem_dir, mode, folder, tmp_path / "never.npz", kill=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "never.npz").exists()
    latest = ck.restore_checkpoint(folder)
    assert latest is not None
    meta = latest.metadata
    if mode == "full":
        assert meta["done"] == 2 and meta["partial_epochs"] == 0  # died inside iteration 2
    else:
        assert meta["done"] == 1 and meta["partial_epochs"] == 2  # mid-iteration checkpoint
    resumed = _child(problem_dir, mode, folder, tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = dict(np.load(tmp_path / "resumed.npz"))
    assert int(got["resumed"]) == meta["done"]
    kw = prob.FULL if mode == "full" else prob.MINI
    ref = pnjax.persistent_fit(
        prob.init(), prob.loss, optax.adam(1e-2), checkpoint_dir=tmp_path / "ref", **kw
    )
    _assert_bit_equal(got, _as_npz_dict(ref))


def test_save_restore_roundtrip_all_leaf_kinds(tmp_path):
    state = {
        "f32": jnp.arange(6.0).reshape(2, 3),
        "bf16": jnp.ones(3, jnp.bfloat16) / 3,
        "f16": np.full((2,), 0.1, np.float16),
        "i32": jnp.arange(4, dtype=jnp.int32),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 3), np.float32),
        "key": jax.random.key(7),
        "n": 3,
        "x": 2.5,
        "bank": pnjax.AnchorBank.create({"w": jnp.ones(2)}, 3).push({"w": jnp.ones(2)}),
    }
    ck.save_checkpoint(tmp_path, 5, state, {"note": "hi", "inf": float("inf")})
    got = ck.restore_checkpoint(tmp_path, like=state)
    assert got.step == 5 and got.metadata["note"] == "hi" and got.metadata["inf"] == float("inf")
    for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(state)[0],
        jax.tree_util.tree_leaves(got.state),
        strict=True,
    ):
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(jax.random.key_data(a), jax.random.key_data(b))
        else:
            assert type(a) is type(b) or isinstance(b, jax.Array), p
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), strict=True)
    assert isinstance(got.state["bank"], pnjax.AnchorBank) and int(got.state["bank"].count) == 1


def test_keeps_last_two_and_replaces_same_step(tmp_path):
    for s in range(4):
        ck.save_checkpoint(tmp_path, s, {"a": jnp.full(2, float(s))}, {"s": s})
    assert ck.checkpoint_steps(tmp_path) == [2, 3]
    ck.save_checkpoint(tmp_path, 3, {"a": jnp.full(2, 9.0)}, {"s": "again"})
    got = ck.restore_checkpoint(tmp_path, like={"a": jnp.zeros(2)})
    assert got.metadata == {"s": "again"} and float(got.state["a"][0]) == 9.0


def test_template_mismatch_and_bad_args(tmp_path):
    ck.save_checkpoint(tmp_path, 0, {"a": jnp.ones(2)})
    with pytest.raises(ValueError, match="holds 1 leaves but the template has 2"):
        ck.restore_checkpoint(tmp_path, like={"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        ck.save_checkpoint(tmp_path, -1, {"a": 1.0})
    with pytest.raises(TypeError, match="not numeric"):
        ck.save_checkpoint(tmp_path, 1, {"a": np.array(["x"])})
    with pytest.raises(TypeError, match="JSON"):
        ck.save_checkpoint(tmp_path, 1, {"a": 1.0}, {"f": object()})
    assert ck.restore_checkpoint(tmp_path / "missing") is None


def _data_files(step_dir: Path) -> list[Path]:
    return sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )


@pytest.mark.parametrize("damage", ["truncate", "garble", "metadata"])
def test_corrupt_newest_step_falls_back_to_previous(tmp_path, damage):
    for s in (1, 2):
        ck.save_checkpoint(tmp_path, s, {"a": jnp.arange(50.0) * s}, {"s": s})
    if damage == "metadata":
        (tmp_path / "2" / "meta" / "metadata").write_text('{"format": 1, "st')
    else:
        for f in _data_files(tmp_path / "2"):
            raw = bytearray(f.read_bytes())
            if damage == "truncate":
                f.write_bytes(raw[: len(raw) // 2])
            else:
                raw[-8:] = bytes(255 - b for b in raw[-8:])
                f.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="step 2 .* corrupt or half-written"):
        got = ck.restore_checkpoint(tmp_path, like={"a": jnp.zeros(50)})
    assert got.step == 1 and got.metadata == {"s": 1}
    np.testing.assert_array_equal(got.state["a"], np.arange(50.0))
    assert ck.checkpoint_steps(tmp_path) == [1] and (tmp_path / "corrupt-2").is_dir()
    ck.save_checkpoint(tmp_path, 2, {"a": jnp.zeros(50)})  # the step number is free again


def test_half_written_step_is_ignored(tmp_path):
    ck.save_checkpoint(tmp_path, 1, {"a": jnp.ones(2)})
    tmp = tmp_path / "2.orbax-checkpoint-tmp-123"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "junk").write_bytes(b"\0" * 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.restore_checkpoint(tmp_path).step == 1


def _tiny():
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)) * 0.3, "bias": jnp.zeros(3)}}

    def loss(p):
        return jnp.sum((p["Dense_0"]["kernel"].sum(0) + p["Dense_0"]["bias"] - 1.0) ** 2)

    return params, loss


def test_persistent_fit_resumes_and_refuses_other_configuration(tmp_path):
    params, loss = _tiny()
    kw = dict(iterations=3, lam=0.1, steps=30)
    ref = pnjax.persistent_fit(params, loss, optax.sgd(0.05), **kw)
    done = pnjax.persistent_fit(params, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw)
    assert done.resumed_from == 0
    _assert_bit_equal(_as_npz_dict(done), _as_npz_dict(ref))
    # a finished run comes back from its checkpoint without training
    again = pnjax.persistent_fit(params, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw)
    assert again.resumed_from == 4 and "resumed from a checkpoint after 4" in again.summary
    _assert_bit_equal(_as_npz_dict(again), _as_npz_dict(ref))
    # corrupt the newest step: resumes from the previous one (3 iterations) and reruns the last
    for f in _data_files(tmp_path / str(ck.checkpoint_steps(tmp_path)[-1])):
        f.write_bytes(f.read_bytes()[:3])
    with pytest.warns(UserWarning, match="corrupt"):
        fixed = pnjax.persistent_fit(params, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw)
    assert fixed.resumed_from == 3
    _assert_bit_equal(_as_npz_dict(fixed), _as_npz_dict(ref))
    for change, what in [
        ({"lam": 0.2}, "lam: 0.1 in the checkpoint, 0.2 now"),
        ({"steps": 31}, "steps: 30 in the checkpoint, 31 now"),
        ({"iterations": 2}, "holds 4 finished runs .* pass iterations >= 3"),
        ({"capacity": 9}, "capacity: 'default' in the checkpoint, 9 now"),
        ({"layers": ("Dense_0",)}, "layers"),
    ]:
        with pytest.raises(ValueError, match=what) as e:
            pnjax.persistent_fit(
                params, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw | change
            )
        assert "empty checkpoint folder" in str(e.value)
    other = jax.tree_util.tree_map(lambda x: x + 1, params)
    with pytest.raises(ValueError, match="init_params: values differ"):
        pnjax.persistent_fit(other, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw)
    wide = {"Dense_0": {"kernel": jnp.ones((2, 4)), "bias": jnp.zeros(4)}}
    with pytest.raises(ValueError, match="init_params: leaf shapes/dtypes differ"):
        pnjax.persistent_fit(wide, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw)
    with pytest.raises(ValueError, match="optimizer_state"):
        pnjax.persistent_fit(params, loss, optax.adam(0.05), checkpoint_dir=tmp_path, **kw)


def test_callback_is_replayed_on_resume(tmp_path):
    params, loss = _tiny()
    kw = dict(iterations=2, lam=0.1, steps=20, checkpoint_dir=tmp_path)
    first, second = [], []
    pnjax.persistent_fit(params, loss, optax.sgd(0.05), callback=lambda n, i: first.append(i), **kw)
    pnjax.persistent_fit(
        params, loss, optax.sgd(0.05), callback=lambda n, i: second.append(i), **kw
    )
    assert [i["score"] for i in first] == [i["score"] for i in second]
    assert all(i["resumed"] for i in second)
    for a, b in zip(first, second, strict=True):
        assert a["champion_iteration"] == b["champion_iteration"]
        np.testing.assert_array_equal(
            np.asarray(a["params"]["Dense_0"]["kernel"]), b["params"]["Dense_0"]["kernel"]
        )


def test_checkpoint_scope_numbers_calls(tmp_path):
    params, loss = _tiny()
    with pnjax.fit.checkpoint_scope(tmp_path):
        pnjax.persistent_fit(params, loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=5)
        pnjax.persistent_fit(params, loss, optax.sgd(0.05), iterations=0, lam=0.0, steps=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit-000", "fit-001"]
    with pnjax.fit.checkpoint_scope(tmp_path):
        r = pnjax.persistent_fit(params, loss, optax.sgd(0.05), iterations=1, lam=0.1, steps=5)
    assert r.resumed_from == 2


def test_checkpoint_argument_errors(tmp_path):
    params, loss = _tiny()
    kw = dict(iterations=1, lam=0.1, steps=5)
    with pytest.raises(ValueError, match="checkpoint_every_epochs needs the mini-batch form"):
        pnjax.persistent_fit(params, loss, optax.sgd(0.1), checkpoint_dir=tmp_path,
                             checkpoint_every_epochs=2, **kw)  # fmt: skip
    with pytest.raises(TypeError, match="checkpoint_dir must be a folder path"):
        pnjax.persistent_fit(params, loss, optax.sgd(0.1), checkpoint_dir=3, **kw)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        pnjax.persistent_fit(params, loss, optax.sgd(0.1), checkpoint_dir=f, **kw)
    with pytest.raises(ValueError, match="checkpoint_keep must be an int >= 1"):
        pnjax.persistent_fit(params, loss, optax.sgd(0.1), checkpoint_dir=tmp_path,
                             checkpoint_keep=0, **kw)  # fmt: skip


def test_metadata_is_json(tmp_path):
    params, loss = _tiny()
    pnjax.persistent_fit(params, loss, optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                         checkpoint_dir=tmp_path)  # fmt: skip
    step = ck.checkpoint_steps(tmp_path)[-1]
    meta = json.loads((tmp_path / str(step) / "meta" / "metadata").read_text())
    assert meta["metadata"]["done"] == 2 and meta["metadata"]["fingerprint"]["lam"] == 0.1
