"""Checkpoints of a training loop's state: atomic, last few kept, corruption-checked.

Generic functions over any pytree "loop state" (params, optimizer state, an
:class:`~pnjax.AnchorBank`, histories, typed PRNG keys...) plus a JSON metadata dict. Storage is
`orbax-checkpoint <https://orbax.readthedocs.io>`_ (imported lazily, only when a checkpoint is
written or read, so ``import pnjax`` stays light): one numbered *step* folder per save, written
to a temporary folder and renamed when complete (a save killed half-way leaves no step), the last
``keep`` steps kept.

Every leaf's shape, dtype and SHA-256 are stored in the metadata, so a step whose files were
truncated or garbled after the fact is detected on restore; :func:`restore_checkpoint` then
warns, moves the bad step aside (``corrupt-<step>``) and falls back to the previous good one.

A loop that wants to resume::

    from pnjax import checkpoint as ckpt

    found = ckpt.restore_checkpoint(folder, like=lambda meta: template_state)
    state, start = (found.state, found.metadata["next"]) if found else (initial, 0)
    for i in range(start, n):
        state = one_iteration(state, i)
        ckpt.save_checkpoint(folder, i + 1, state, {"next": i + 1, "fingerprint": fp})

:func:`config_fingerprint` / :func:`check_fingerprint` refuse to resume a checkpoint written by a
different configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
FORMAT_VERSION = 1

__all__ = [
    "Checkpoint",
    "CheckpointCorruptError",
    "check_fingerprint",
    "checkpoint_steps",
    "config_fingerprint",
    "fingerprint_differences",
    "restore_checkpoint",
    "save_checkpoint",
    "tree_fingerprint",
]


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step could not be read back or failed its checksums."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A restored checkpoint.

    Attributes:
      step: the step number it was saved under.
      state: the loop state (unflattened into the template's structure when one was given,
        otherwise the list of leaves).
      metadata: the metadata dict passed to :func:`save_checkpoint`.
      path: the step's folder.
    """

    step: int
    state: PyTree
    metadata: dict[str, Any]
    path: Path


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _leaf_bytes_hash(arr: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(str(arr.dtype).encode())
    h.update(str(tuple(arr.shape)).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _to_numpy(leaf: Any, where: str) -> tuple[np.ndarray, dict[str, Any]]:
    info: dict[str, Any] = {}
    if _is_key(leaf):
        info["key_impl"] = str(jax.random.key_impl(leaf))
        leaf = jax.random.key_data(leaf)
    if isinstance(leaf, (bool, int, float)) and not isinstance(leaf, np.generic):
        info["python"] = type(leaf).__name__
    arr = np.asarray(jax.device_get(leaf))
    if arr.dtype.kind not in "biufc" and arr.dtype != jnp.bfloat16:
        raise TypeError(
            f"cannot checkpoint the leaf at {where}: dtype {arr.dtype} is not numeric; keep only "
            "arrays and numbers in the state and put other values in the metadata."
        )
    info.update(shape=list(arr.shape), dtype=str(arr.dtype), sha256=_leaf_bytes_hash(arr))
    return arr, info


def _manager(directory: Path, keep: int | None, *, read_only: bool = False) -> Any:
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=False,
        create=not read_only,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def _check_dir(directory: str | os.PathLike[str]) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint directory must be a str or path, got {type(directory).__name__}."
        )
    path = Path(directory).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint directory {str(path)!r} is a file; pass a folder path.")
    return path


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The complete (committed) steps in ``directory``, ascending; ``[]`` if none or no folder."""
    path = _check_dir(directory)
    if not path.is_dir():
        return []
    steps = []
    for child in path.iterdir():
        if child.is_dir() and child.name.isdigit() and (child / "meta").is_dir():
            steps.append(int(child.name))
    return sorted(steps)


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    state: PyTree,
    metadata: Mapping[str, Any] | None = None,
    *,
    keep: int = 2,
) -> Path:
    """Saves ``state`` and ``metadata`` as step ``step`` of ``directory``, atomically.

    The step is written to a temporary folder and renamed when complete; only the newest
    ``keep`` steps are kept. A step number that already exists is replaced.

    Args:
      directory: the checkpoint folder (created if missing).
      step: a non-negative int; later saves should use larger numbers.
      state: any pytree of arrays, numbers and typed PRNG keys (zero-size arrays included).
      metadata: JSON-serializable dict (NaN and inf allowed), returned as is on restore.
      keep: how many steps to keep (>= 1; 2 lets a corrupt newest step fall back).

    Returns:
      The step's folder.

    Raises:
      TypeError: a non-numeric leaf or non-JSON metadata.
      ValueError: a negative step or ``keep < 1``.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}.")
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}.")
    path = _check_dir(directory)
    user = dict(metadata or {})
    try:
        json.dumps(user)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint metadata must be JSON-serializable: {e}") from None
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    arrays: dict[str, np.ndarray] = {}
    infos = []
    for i, (kp, leaf) in enumerate(flat):
        arr, info = _to_numpy(leaf, jax.tree_util.keystr(kp) or "<root>")
        infos.append(info)
        if arr.size:
            arrays[f"leaf_{i:06d}"] = arr
    if not arrays:  # orbax needs at least one non-empty array
        arrays["_empty"] = np.zeros((1,), np.uint8)
    meta = {
        "format": FORMAT_VERSION,
        "step": int(step),
        "treedef": str(treedef),
        "leaves": infos,
        "metadata": user,
    }
    import orbax.checkpoint as ocp

    path.mkdir(parents=True, exist_ok=True)
    mgr = _manager(path, int(keep))
    try:
        if int(step) in mgr.all_steps():
            mgr.delete(int(step))
            mgr.reload()
        mgr.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        mgr.wait_until_finished()
    finally:
        mgr.close()
    return path / str(int(step))


def _read_step(path: Path, step: int) -> tuple[list[Any], dict[str, Any]]:
    """Reads and verifies one step; raises CheckpointCorruptError on any problem."""
    import orbax.checkpoint as ocp

    try:
        meta = json.loads((path / str(step) / "meta" / "metadata").read_text())
        if meta.get("format") != FORMAT_VERSION or meta.get("step") != step:
            raise ValueError(f"unexpected format/step in metadata ({meta.get('format')!r})")
        mgr = _manager(path, None, read_only=True)
        try:
            raw = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
        finally:
            mgr.close()
        arrays = raw.state
        leaves: list[Any] = []
        for i, info in enumerate(meta["leaves"]):
            shape, dtype = tuple(info["shape"]), jnp.dtype(info["dtype"])
            if math.prod(shape) == 0:
                arr = np.zeros(shape, dtype)
            else:
                arr = np.asarray(arrays[f"leaf_{i:06d}"])
            if arr.shape != shape or arr.dtype != dtype or _leaf_bytes_hash(arr) != info["sha256"]:
                raise ValueError(f"leaf {i} fails its checksum (shape/dtype/values changed)")
            if "key_impl" in info:
                leaf: Any = jax.random.wrap_key_data(arr, impl=info["key_impl"])
            elif "python" in info:
                leaf = {"bool": bool, "int": int, "float": float}[info["python"]](arr.item())
            else:
                leaf = arr
            leaves.append(leaf)
    except Exception as e:  # noqa: BLE001 - any read failure means: this step is unusable
        raise CheckpointCorruptError(f"{type(e).__name__}: {e}") from e
    return leaves, meta


def _quarantine(path: Path, step: int) -> Path:
    target = path / f"corrupt-{step}"
    n = 0
    while target.exists():
        n += 1
        target = path / f"corrupt-{step}-{n}"
    (path / str(step)).rename(target)
    return target


def restore_checkpoint(
    directory: str | os.PathLike[str],
    like: PyTree | Callable[[dict[str, Any]], PyTree] | None = None,
    *,
    step: int | None = None,
    quarantine: bool = True,
) -> Checkpoint | None:
    """Restores the newest good step of ``directory`` (or ``step``), or ``None`` if none.

    A step that cannot be read or fails its checksums triggers a ``UserWarning`` naming it,
    is moved aside to ``corrupt-<step>`` (with ``quarantine=True``) and the previous step is
    tried.

    Args:
      directory: the checkpoint folder; a missing folder means no checkpoint.
      like: the template pytree whose structure the state is unflattened into (leaf shapes
        may differ, e.g. a history that grows), or a function ``like(metadata) -> template``
        that may raise (e.g. on a configuration mismatch; such errors propagate), or ``None``
        to get the flat list of leaves. Leaves come back as NumPy arrays where the template
        holds NumPy arrays or ``None``, as ``jax.Array`` where it holds JAX arrays, typed keys
        as typed keys.
      step: restore exactly this step (no fallback).
      quarantine: move corrupt steps aside so later saves do not collide with them.

    Returns:
      A :class:`Checkpoint`, or ``None`` when the folder holds no usable step.

    Raises:
      ValueError: the template's structure does not match the checkpoint (a different number
        of leaves).
      CheckpointCorruptError: ``step`` was given and that step is unusable.
    """
    path = _check_dir(directory)
    steps = checkpoint_steps(path)
    if step is not None:
        if step not in steps:
            return None
        steps = [step]
    for s in reversed(steps):
        try:
            leaves, meta = _read_step(path, s)
        except CheckpointCorruptError as e:
            if step is not None:
                raise
            moved = _quarantine(path, s) if quarantine else None
            warnings.warn(
                f"checkpoint step {s} in {str(path)!r} is corrupt or half-written ({e}); "
                + (f"moved it to {moved.name!r} and " if moved else "")
                + "falling back to the previous step.",
                UserWarning,
                stacklevel=2,
            )
            continue
        user = meta["metadata"]
        template = like(user) if callable(like) else like
        if template is None:
            return Checkpoint(s, leaves, user, path / str(s))
        t_leaves, t_def = jax.tree_util.tree_flatten(template)
        if len(t_leaves) != len(leaves):
            raise ValueError(
                f"checkpoint step {s} in {str(path)!r} holds {len(leaves)} leaves but the template "
                f"has {len(t_leaves)}; it was saved from a different state structure "
                f"({meta['treedef'][:200]}). Restore with the matching template or use an empty "
                "folder."
            )
        out = []
        for t, leaf in zip(t_leaves, leaves, strict=True):
            if isinstance(t, jax.Array) and not _is_key(t) and isinstance(leaf, np.ndarray):
                leaf = jnp.asarray(leaf)
            out.append(leaf)
        return Checkpoint(s, jax.tree_util.tree_unflatten(t_def, out), user, path / str(s))
    return None


def tree_fingerprint(tree: PyTree, *, values: bool = True) -> dict[str, Any]:
    """A JSON-ready description of a pytree: structure, leaf shapes/dtypes, a hash of values.

    Args:
      tree: any pytree of arrays (typed keys allowed).
      values: include the SHA-256 of all leaf values (costs one pass over the data).

    Returns:
      ``{'structure': str, 'leaves': [[shape, dtype], ...], 'sha256': str}``.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    desc: dict[str, Any] = {"structure": str(treedef), "leaves": []}
    h = hashlib.sha256()
    for leaf in leaves:
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        shape = [int(d) for d in getattr(leaf, "shape", np.shape(leaf))]
        dtype = str(getattr(leaf, "dtype", None) or np.asarray(leaf).dtype)
        desc["leaves"].append([shape, dtype])
        if values:
            h.update(_leaf_bytes_hash(np.asarray(jax.device_get(leaf))).encode())
    if values:
        desc["sha256"] = h.hexdigest()
    return desc


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return _jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.ndarray, jax.Array)):
        return tree_fingerprint(value)
    return repr(value)


def config_fingerprint(config: Mapping[str, Any], **trees: PyTree) -> dict[str, Any]:
    """A JSON-ready fingerprint of a run's configuration, for :func:`check_fingerprint`.

    Args:
      config: plain settings (numbers, strings, tuples...; other objects by ``repr``).
      **trees: pytrees described by :func:`tree_fingerprint` (structure, shapes, dtypes and a
        hash of the values), e.g. ``init_params=params, key=key, data=data``. ``None`` is kept
        as ``None``.

    Returns:
      A dict to store in the checkpoint metadata.
    """
    out = {k: _jsonable(v) for k, v in config.items()}
    for name, tree in trees.items():
        out[name] = None if tree is None else tree_fingerprint(tree)
    return out


def fingerprint_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty if they match)."""
    diffs = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and "structure" in a and "structure" in b:
            if a["structure"] != b["structure"]:
                what = "tree structure"
            elif a["leaves"] != b["leaves"]:
                what = "leaf shapes/dtypes"
            else:
                what = "values"
            diffs.append(f"{k}: {what} differ")
        else:
            diffs.append(f"{k}: {a!r} in the checkpoint, {b!r} now")
    return diffs


def check_fingerprint(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], directory: Any
) -> None:
    """Raises ``ValueError`` naming what differs unless ``saved == current``.

    Args:
      saved: the fingerprint stored in the checkpoint.
      current: the fingerprint of the run that wants to resume.
      directory: the checkpoint folder (named in the message).
    """
    if saved == current:
        return
    diffs = fingerprint_differences(saved or {}, current)
    raise ValueError(
        f"checkpoint folder {str(directory)!r} holds a run with a different configuration ("
        + "; ".join(diffs)
        + "). Pass the same settings to resume it, or use an empty checkpoint folder (or "
        "delete this one) to start afresh."
    )
