"""What pnjax may do to a checkpoint folder, what it verifies, and what it refuses up front.

Each test here reproduces a way to lose a user's files or to get a silently wrong result that
pnjax 0.1.0 allowed (a foreign numbered folder deleted by the keep-last-N cleanup, a garbled
step metadata accepted, two writers on one folder, a read-only folder failing only after
training...).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
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


def _tiny():
    params = {"Dense_0": {"kernel": jnp.ones((2, 3)) * 0.3, "bias": jnp.zeros(3)}}

    def loss(p):
        return jnp.sum((p["Dense_0"]["kernel"].sum(0) + p["Dense_0"]["bias"] - 1.0) ** 2)

    return params, loss


def _chains():
    params, loss = _tiny()
    inits = jax.tree_util.tree_map(lambda x: jnp.stack([x, x + 0.1]), params)
    return inits, loss


class _Counter:
    """A loss that counts how often it is traced: 0 means nothing was compiled or trained."""

    def __init__(self, loss):
        self.loss, self.calls = loss, 0

    def __call__(self, p):
        self.calls += 1
        return self.loss(p)


def _fit(folder, **kw):
    params, loss = _tiny()
    args = dict(iterations=1, lam=0.1, steps=5, checkpoint_dir=folder) | kw
    return pnjax.persistent_fit(params, loss, optax.sgd(0.05), **args)


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ----------------------------------------------------------------------------- 1. data loss


def _user_folders(root: Path) -> dict[str, bytes]:
    for name in ("1", "2", "7", "2024"):
        (root / name).mkdir(parents=True)
        (root / name / "photo.jpg").write_bytes(name.encode() * 100)
    (root / "1000" / "meta").mkdir(parents=True)
    (root / "1000" / "meta" / "metadata").write_text("not pnjax's")
    return _tree(root)


def test_numbered_user_folders_are_never_deleted_or_renamed(tmp_path):
    before = _user_folders(tmp_path)
    for call in (
        lambda: ck.save_checkpoint(tmp_path, 3, {"a": jnp.ones(2)}, keep=1),
        lambda: _fit(tmp_path),
        lambda: pnjax.run_chains(
            *_chains(), optax.sgd(0.05), iterations=1, lam=0.1, steps=5, checkpoint_dir=tmp_path
        ),
    ):
        with pytest.raises(ValueError, match="pnjax did not write") as e:
            call()
        assert "'2024'" in str(e.value) and "empty or new folder" in str(e.value)
    assert _tree(tmp_path) == before
    # restoring ignores them: nothing to restore, nothing renamed, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.restore_checkpoint(tmp_path) is None
    assert _tree(tmp_path) == before and ck.checkpoint_steps(tmp_path) == []


def test_foreign_folders_next_to_own_steps_survive_cleanup_and_corruption(tmp_path):
    for s in range(3):
        ck.save_checkpoint(tmp_path, s, {"a": jnp.full(2, float(s))}, keep=2)
    (tmp_path / "9" / "meta").mkdir(parents=True)  # looks like a newer step, is not pnjax's
    (tmp_path / "9" / "meta" / "metadata").write_text("{}")
    mine = _tree(tmp_path / "9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not a corrupt step: it is not a step at all
        got = ck.restore_checkpoint(tmp_path, like={"a": jnp.zeros(2)})
    assert got.step == 2 and ck.checkpoint_steps(tmp_path) == [1, 2]
    with pytest.raises(ck.CheckpointFolderError, match="'9'"):
        ck.save_checkpoint(tmp_path, 3, {"a": jnp.ones(2)}, keep=1)
    assert _tree(tmp_path / "9") == mine and ck.checkpoint_steps(tmp_path) == [1, 2]


def test_other_foreign_entries_are_kept_with_a_warning(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.warns(UserWarning, match="entries pnjax did not write .*'notes.txt'"):
        for s in range(3):
            ck.save_checkpoint(tmp_path, s, {"a": jnp.ones(2)}, keep=1)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert ck.checkpoint_steps(tmp_path) == [2] and ck.foreign_entries(tmp_path) == ["notes.txt"]


def test_empty_checkpoint_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params, loss = _tiny()
    counted = _Counter(loss)
    with pytest.raises(ValueError, match="empty path would mean the current directory"):
        pnjax.persistent_fit(params, counted, optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                             checkpoint_dir="")  # fmt: skip
    with pytest.raises(ValueError, match="empty path"):
        pnjax.run_chains(*_chains(), optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                         checkpoint_dir="")  # fmt: skip
    with pytest.raises(ValueError, match="empty path"):
        ck.save_checkpoint("", 1, {"a": jnp.ones(2)})
    assert list(tmp_path.iterdir()) == [] and counted.calls == 0


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pnjax import checkpoint as ck
    lock = ck.open_checkpoint_dir(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_second_writer_is_refused_and_a_dead_owner_is_taken_over(tmp_path):
    folder = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        params, loss = _tiny()
        counted = _Counter(loss)
        with pytest.raises(ck.CheckpointLockedError, match=f"pid {holder.pid}") as e:
            pnjax.persistent_fit(params, counted, optax.sgd(0.1), iterations=1, lam=0.1,
                                 steps=5, checkpoint_dir=folder)  # fmt: skip
        assert "in use by another pnjax process" in str(e.value) and counted.calls == 0
        with pytest.raises(ck.CheckpointLockedError):
            ck.save_checkpoint(folder, 1, {"a": jnp.ones(2)})
        with pytest.raises(ck.CheckpointLockedError):
            pnjax.run_chains(*_chains(), optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                             checkpoint_dir=folder)  # fmt: skip
        assert ck.checkpoint_steps(folder) == []
    finally:
        holder.kill()
        holder.wait()
    # the owner died (SIGKILL): its lock file is left behind, with its pid, and is taken over
    assert json.loads((folder / ck.LOCK_NAME).read_text())["pid"] == holder.pid
    assert _fit(folder).resumed_from == 0
    assert not (folder / ck.LOCK_NAME).exists()  # released at the end of the run
    # a lock file naming a dead process, without an flock held, is stale as well
    (folder / ck.LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": "x"}))
    assert _fit(folder).resumed_from == 2


# ----------------------------------------------------------------------------- 4. checksums


def _edit_metadata(step_dir: Path, edit) -> None:
    """Changes the user metadata of a step, keeping the file valid JSON in the same layout."""
    f = step_dir / "meta" / "metadata"
    text = f.read_text()
    meta = json.loads(text)
    assert json.dumps(meta) == text, "the test assumes orbax writes json.dumps(meta)"
    old = dict(meta["metadata"])
    edit(meta["metadata"])
    assert meta["metadata"] != old
    f.write_text(json.dumps(meta))  # valid JSON, valid format: only the checksum can tell


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(done=m["done"] + 2),
        lambda m: m.update(champion_score=-1.0),
        lambda m: m.update(champion_iteration=(m["champion_iteration"] + 1) % 3),
    ],
    ids=["done", "champion_score", "champion_iteration"],
)
def test_edited_step_metadata_is_detected(tmp_path, edit):
    ref = _fit(tmp_path / "ref", iterations=2)
    _fit(tmp_path / "ck", iterations=2)
    newest = ck.checkpoint_steps(tmp_path / "ck")[-1]
    _edit_metadata(tmp_path / "ck" / str(newest), edit)
    with pytest.warns(UserWarning, match=f"step {newest} .* metadata fails its checksum"):
        got = _fit(tmp_path / "ck", iterations=2)
    assert got.resumed_from == 2  # the previous step, then the last iteration is rerun
    assert got.champion_iteration == ref.champion_iteration
    assert len(got.history["loss"]) == 3
    np.testing.assert_array_equal(got.history["loss"], ref.history["loss"])
    assert (tmp_path / "ck" / f"corrupt-{newest}").is_dir()


def test_garbled_step_marker_is_detected(tmp_path):
    for s in (1, 2):
        ck.save_checkpoint(tmp_path, s, {"a": jnp.full(3, float(s))}, {"s": s})
    (tmp_path / "2" / ck.STEP_MARK).write_text('{"writer": "pnjax", "step": 2')
    with pytest.warns(UserWarning, match="step 2 .* corrupt"):
        got = ck.restore_checkpoint(tmp_path)
    assert got.step == 1 and got.metadata == {"s": 1}


@pytest.mark.parametrize("damage", ["orbax_metadata", "extra_file", "missing_file"])
def test_every_file_a_restore_reads_is_checksummed(tmp_path, damage):
    for s in (1, 2):
        ck.save_checkpoint(tmp_path, s, {"a": jnp.full(3, float(s))}, {"s": s})
    step = tmp_path / "2"
    if damage == "orbax_metadata":
        f = step / "_CHECKPOINT_METADATA"
        f.write_text(f.read_text().replace("}", ', "x": 1}', 1))
    elif damage == "extra_file":
        (step / "state" / "stray").write_bytes(b"x")
    else:
        (step / "state" / "_METADATA").unlink()
    with pytest.warns(UserWarning, match="step 2 .* file\\(s\\) missing, added or failing"):
        got = ck.restore_checkpoint(tmp_path)
    assert got.step == 1 and got.metadata == {"s": 1}


# ----------------------------------------------------------------------------- 5. fingerprints


def test_run_chains_refuses_another_optimizer(tmp_path):
    inits, loss = _chains()
    kw = dict(iterations=1, lam=0.1, steps=5, checkpoint_dir=tmp_path)
    pnjax.run_chains(inits, loss, optax.adam(0.05), **kw)
    with pytest.raises(ValueError, match="optimizer_state: tree structure differ"):
        pnjax.run_chains(inits, loss, optax.sgd(0.05), **kw)


def test_hyperparameters_in_the_optimizer_state_are_fingerprinted(tmp_path):
    def opt(lr):
        return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)

    params, loss = _tiny()
    kw = dict(iterations=1, lam=0.1, steps=5, checkpoint_dir=tmp_path)
    pnjax.persistent_fit(params, loss, opt(0.05), **kw)
    with pytest.raises(ValueError, match="optimizer_init: values differ"):
        pnjax.persistent_fit(params, loss, opt(0.5), **kw)
    inits, _ = _chains()
    kw["checkpoint_dir"] = tmp_path / "chains"
    pnjax.run_chains(inits, loss, opt(0.05), **kw)
    with pytest.raises(ValueError, match="optimizer_init: values differ"):
        pnjax.run_chains(inits, loss, opt(0.5), **kw)


def test_both_drivers_use_one_fingerprint_helper(tmp_path, monkeypatch):
    seen = []
    real = ck.driver_fingerprint
    monkeypatch.setattr(
        ck, "driver_fingerprint", lambda d, *a, **k: seen.append(d) or real(d, *a, **k)
    )
    _fit(tmp_path / "a")
    pnjax.run_chains(*_chains(), optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                     checkpoint_dir=tmp_path / "b")  # fmt: skip
    assert seen == ["persistent_fit", "run_chains"]


# ----------------------------------------------------------------------------- 7. odd inputs


def test_callback_added_on_resume_is_refused_clearly(tmp_path):
    _fit(tmp_path, iterations=2)
    with pytest.raises(ValueError, match="written without a callback") as e:
        _fit(tmp_path, iterations=2, callback=lambda n, info: None)
    assert "final params of the 3 restored iterations were not kept" in str(e.value)
    # with the callback from the start, the replay gets real params
    seen = []
    _fit(tmp_path / "cb", iterations=1, callback=lambda n, info: None)
    _fit(tmp_path / "cb", iterations=1, callback=lambda n, info: seen.append(info["params"]))
    assert len(seen) == 2 and all(p is not None for p in seen)


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, np.array([True])])
def test_push_diverged_must_be_a_bool(value):
    params, loss = _tiny()
    with pytest.raises(TypeError, match="push_diverged must be True or False"):
        pnjax.persistent_fit(params, loss, optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                             push_diverged=value)  # fmt: skip
    with pytest.raises(TypeError, match="push_diverged must be True or False"):
        pnjax.run_chains(*_chains(), optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                         push_diverged=value)  # fmt: skip


def test_chains_result_says_it_was_resumed(tmp_path):
    inits, loss = _chains()
    kw = dict(iterations=2, lam=0.1, steps=5)
    plain = pnjax.run_chains(inits, loss, optax.sgd(0.05), **kw)
    first = pnjax.run_chains(inits, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw)
    again = pnjax.run_chains(inits, loss, optax.sgd(0.05), checkpoint_dir=tmp_path, **kw)
    assert plain.resumed_from == 0 and first.resumed_from == 0 and again.resumed_from == 3
    assert again.chain(1).resumed_from == 3
    np.testing.assert_array_equal(again.history["loss"], first.history["loss"])


# ----------------------------------------------------------------------------- 8. writability


@contextlib.contextmanager
def _read_only(folder: Path):
    """Makes ``folder`` read-only, for root as well (an immutable folder)."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root without chattr: cannot make a folder read-only")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path):
    params, loss = _tiny()
    counted = _Counter(loss)

    def fit(folder):
        return pnjax.persistent_fit(params, counted, optax.sgd(0.1), iterations=1, lam=0.1,
                                    steps=5, checkpoint_dir=folder)  # fmt: skip

    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro):
        with pytest.raises(ValueError, match="is not writable") as e:
            fit(ro)
        assert "must save" in str(e.value)
        with pytest.raises(ValueError, match="cannot create checkpoint folder"):
            fit(ro / "sub")
        with pytest.raises(ValueError, match="is not writable"):
            pnjax.run_chains(*_chains(), optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                             checkpoint_dir=ro)  # fmt: skip
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="which is a file, not a folder"):
        fit(f / "sub" / "deeper")
    assert counted.calls == 0 and list(ro.iterdir()) == []


def test_corrupt_newest_step_in_a_read_only_folder_falls_back_without_renaming(tmp_path):
    for s in (1, 2):
        ck.save_checkpoint(tmp_path, s, {"a": jnp.arange(5.0) * s}, {"s": s})
    _edit_metadata(tmp_path / "2", lambda m: m.update(s=7))
    before = _tree(tmp_path)
    with _read_only(tmp_path):
        with pytest.warns(UserWarning, match="step 2 .* left it in place"):
            got = ck.restore_checkpoint(tmp_path, like={"a": jnp.zeros(5)})
    assert got.step == 1 and got.metadata == {"s": 1} and _tree(tmp_path) == before


def test_finished_run_in_a_read_only_folder_can_be_read_back(tmp_path):
    done = _fit(tmp_path, iterations=1)
    (tmp_path / ck.LOCK_NAME).write_text("{}")  # as left by a killed run: the file is writable
    with _read_only(tmp_path):
        again = _fit(tmp_path, iterations=1)
    assert again.resumed_from == 2 and again.champion_iteration == done.champion_iteration
    shutil.rmtree(tmp_path / "2")  # as if killed during the last iteration: work is left
    with _read_only(tmp_path), pytest.raises(ValueError, match="is not writable"):
        _fit(tmp_path, iterations=1)


# ----------------------------------------------------------------------------- 9. inputs


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 2)])
def test_score_fn_must_return_a_scalar_checked_before_training(shape):
    params, loss = _tiny()
    counted = _Counter(loss)

    def score(p):
        return jnp.full(shape, loss(p))

    with pytest.raises(ValueError, match=re.escape(f"score_fn returned shape {shape}")):
        pnjax.persistent_fit(params, counted, optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                             score_fn=score)  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(f"score_fn returned shape {shape}")):
        pnjax.run_chains(*_chains(), optax.sgd(0.1), iterations=1, lam=0.1, steps=5,
                         score_fn=score)  # fmt: skip
    assert counted.calls == 0


@pytest.mark.parametrize(
    "data, what",
    [
        ([[0.0, 1.0], [2.0, 3.0]], "a float"),
        (([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]), "a float"),
        (3.0, "a float"),
        ("abc", "a str"),
        ((np.array(["a", "b"]), np.ones(2)), "dtype <U1"),
        ((np.float32(2.0),), "shape ()"),
    ],
)
def test_data_must_be_arrays_with_an_example_axis(data, what):
    params, _ = _tiny()

    def loss(p, batch):
        return jnp.sum(p["Dense_0"]["bias"] ** 2)

    with pytest.raises(ValueError, match="data must be a pytree of arrays") as e:
        pnjax.persistent_fit(params, loss, optax.sgd(0.1), iterations=1, lam=0.1, data=data,
                             batch_size=1, epochs=1)  # fmt: skip
    assert what in str(e.value)
    with pytest.raises(ValueError, match="data must be a pytree of arrays"):
        pnjax.run_chains(*_chains()[:1], loss, optax.sgd(0.1), iterations=1, lam=0.1, data=data,
                         batch_size=1, epochs=1)  # fmt: skip
