"""Checkpoints of a training loop's state: atomic, last few kept, verified, owned, locked.

Generic functions over any pytree "loop state" (params, optimizer state, an
:class:`~pnjax.AnchorBank`, histories, typed PRNG keys...) plus a JSON metadata dict. Storage is
`orbax-checkpoint <https://orbax.readthedocs.io>`_ (imported lazily, only when a checkpoint is
written or read, so ``import pnjax`` stays light): one numbered *step* folder per save, written
under a temporary name and renamed when complete (a save killed half-way leaves no step), the
last ``keep`` steps kept.

What pnjax promises about a checkpoint folder (see ``docs/long_runs.md``):

- **It only deletes or renames what it wrote.** Every step folder pnjax writes holds a marker
  file, ``pnjax-step.json``; only marked step folders (and pnjax's own temporary folders) are
  ever deleted or moved aside. A folder holding digit-named entries that pnjax did not write is
  refused (:class:`CheckpointFolderError`); other foreign entries are left alone, with a warning.
- **It verifies everything a resume reads.** The marker holds the SHA-256 of every file of
  the step (its metadata JSON and orbax's files), and the metadata holds every leaf's shape,
  dtype and SHA-256, so a step whose files were truncated, garbled, added or removed after the
  fact is detected on restore:
  :func:`restore_checkpoint` then warns, moves the bad step aside (``corrupt-<step>``; left in
  place when the folder cannot be written) and falls back to the previous good one.
- **One writer at a time.** A writer holds ``pnjax.lock`` (an ``flock`` on a file holding its
  pid); a second process is refused with :class:`CheckpointLockedError`. The lock of a process
  that died is taken over.

A loop that wants to resume::

    from pnjax import checkpoint as ckpt

    found = ckpt.restore_checkpoint(folder, like=lambda meta: template_state)
    state, start = (found.state, found.metadata["next"]) if found else (initial, 0)
    for i in range(start, n):
        state = one_iteration(state, i)
        ckpt.save_checkpoint(folder, i + 1, state, {"next": i + 1, "fingerprint": fp})

:func:`config_fingerprint` / :func:`check_fingerprint` refuse to resume a checkpoint written by a
different configuration; :func:`driver_fingerprint` is the one both pnjax drivers use.
:func:`open_checkpoint_dir` checks a folder (path, ownership, writability) and locks it before
any training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:  # POSIX advisory locks; elsewhere the lock falls back to the pid in the file
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

PyTree = Any
FORMAT_VERSION = 2
STEP_MARK = "pnjax-step.json"
LOCK_NAME = "pnjax.lock"
_WRITER = "pnjax"
# pnjax's own leftovers: a step being written (``5.pnjax-tmp``, and orbax's temporary folder
# for it), a step being replaced (``5.pnjax-old``)
_OWN_TEMP = re.compile(r"^\d+\.pnjax-(tmp|old)(\..*)?$")
_CORRUPT = re.compile(r"^corrupt-\d+(-\d+)?$")

__all__ = [
    "Checkpoint",
    "CheckpointCorruptError",
    "CheckpointFolderError",
    "CheckpointLockedError",
    "FolderLock",
    "check_fingerprint",
    "checkpoint_steps",
    "config_fingerprint",
    "driver_fingerprint",
    "fingerprint_differences",
    "foreign_entries",
    "lock_folder",
    "open_checkpoint_dir",
    "restore_checkpoint",
    "save_checkpoint",
    "tree_fingerprint",
]


class CheckpointCorruptError(RuntimeError):
    """A checkpoint step could not be read back or failed its checksums."""


class CheckpointFolderError(ValueError):
    """A checkpoint folder that cannot be used: a bad path, not writable, or holding folders
    that pnjax did not write where it numbers its steps."""


class CheckpointLockedError(RuntimeError):
    """Another live process holds the checkpoint folder's lock."""


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


def _checkpointer() -> Any:
    import orbax.checkpoint as ocp

    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


# ----------------------------------------------------------------------------- the folder


def _check_dir(directory: str | os.PathLike[str]) -> Path:
    """The folder as an absolute path; refuses ``''``, a file, and a path under a file."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f"checkpoint directory must be a str or path, got {type(directory).__name__}."
        )
    text = os.fspath(directory)
    if not isinstance(text, str) or not text.strip() or "\0" in text:
        raise CheckpointFolderError(
            f"checkpoint directory must name a folder, got {text!r}; an empty path would mean "
            "the current directory. Pass a folder of its own, e.g. 'runs/exp1'."
        )
    path = Path(text).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointFolderError(
            f"checkpoint directory {str(path)!r} is a file; pass a folder path."
        )
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise CheckpointFolderError(
                    f"checkpoint directory {str(path)!r} is under {str(parent)!r}, which is a "
                    "file, not a folder; pass a folder path."
                )
            break
    return path


def _is_own_step(child: Path) -> bool:
    return child.name.isdigit() and child.is_dir() and (child / STEP_MARK).is_file()


def _is_own(child: Path) -> bool:
    name = child.name
    if name == LOCK_NAME:
        return True
    if name.isdigit() or _CORRUPT.match(name):
        return child.is_dir() and (child / STEP_MARK).is_file()
    return bool(_OWN_TEMP.match(name)) and child.is_dir()


def foreign_entries(directory: str | os.PathLike[str]) -> list[str]:
    """Names of the entries of ``directory`` that pnjax did not write (sorted; ``[]`` if none).

    pnjax's own entries are marked step folders (they hold ``pnjax-step.json``), marked steps
    moved aside as ``corrupt-<step>``, the lock file ``pnjax.lock`` and its temporary folders
    ``<step>.pnjax-tmp*`` / ``<step>.pnjax-old*``.
    """
    path = _check_dir(directory)
    if not path.is_dir():
        return []
    return sorted(c.name for c in path.iterdir() if not _is_own(c))


def _check_foreign(path: Path) -> None:
    """Refuses digit-named entries pnjax did not write; warns about other foreign entries."""
    if not path.is_dir():
        return
    foreign = foreign_entries(path)
    numbered = [n for n in foreign if n.split(".")[0].isdigit()]
    if numbered:
        shown = ", ".join(repr(n) for n in numbered[:8]) + (", ..." if len(numbered) > 8 else "")
        raise CheckpointFolderError(
            f"checkpoint folder {str(path)!r} holds {len(numbered)} numbered entr"
            f"{'y' if len(numbered) == 1 else 'ies'} that pnjax did not write ({shown}); pnjax "
            "names its step folders by number and never deletes or renames what it did not write "
            "(steps written before pnjax marked them are not recognized either). Use an empty "
            "or new folder for checkpoints."
        )
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:8]) + (", ..." if len(foreign) > 8 else "")
        warnings.warn(
            f"checkpoint folder {str(path)!r} also holds entries pnjax did not write ({shown}); "
            "they are left alone, but a folder of its own for checkpoints is safer.",
            UserWarning,
            stacklevel=3,
        )


def _make_folder(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointFolderError(
            f"cannot create checkpoint folder {str(path)!r} ({e.strerror or e}); pass a folder "
            "that can be created and written."
        ) from None


# ----------------------------------------------------------------------------- the lock

_HELD: dict[str, weakref.ReferenceType[FolderLock]] = {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    except OSError:
        return False
    return True


def _read_owner(lock: Path) -> dict[str, Any]:
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _locked_message(path: Path, owner: Mapping[str, Any]) -> str:
    who = f"pid {owner.get('pid', '?')}"
    if owner.get("host") and owner.get("host") != socket.gethostname():
        who += f" on {owner['host']}"
    if isinstance(owner.get("time"), (int, float)):
        who += ", since " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["time"]))
    return (
        f"checkpoint folder {str(path)!r} is in use by another pnjax process ({who}); two "
        "writers would overwrite each other's checkpoints. Wait for it to finish or stop it, or "
        f"use another folder (if no such process runs, delete {str(path / LOCK_NAME)!r})."
    )


class FolderLock:
    """The write lock of a checkpoint folder, held by this process.

    Get one with :func:`open_checkpoint_dir`. The lock file ``pnjax.lock`` holds the owner's pid,
    host and start time; the lock itself is an ``flock`` on it, so it is released by the
    operating system when the process dies, and a later writer takes a stale lock over. Within
    one process the lock is re-entrant (a driver holding it may call :func:`save_checkpoint`).
    It is released by :meth:`release`, at the end of a ``with`` block, or when the last
    reference to it goes away.

    Attributes:
      path: the folder.
      writable: whether the folder could be written (a read-only folder gets an unlocked
        ``FolderLock`` with ``writable=False``: it can be read, not written).
      reason: why it cannot be written (``''`` when it can).
    """

    def __init__(self, path: Path, fd: int | None, writable: bool, reason: str = "") -> None:
        self.path, self._fd, self.writable, self.reason = path, fd, writable, reason
        self._pid = os.getpid()

    def release(self) -> None:
        """Releases the lock (removes the lock file); a no-op if not held (or in a forked child,
        which must not remove its parent's lock)."""
        fd, self._fd = self._fd, None
        if fd is None or os.getpid() != self._pid:
            return
        key = _key(self.path)
        if key in _HELD and _HELD[key]() in (self, None):
            del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_NAME)
        with contextlib.suppress(OSError):
            os.close(fd)

    def require_writable(self, why: str = "this run has work left to checkpoint") -> None:
        """Raises :class:`CheckpointFolderError` unless the folder can be written."""
        if not self.writable:
            raise CheckpointFolderError(
                f"checkpoint folder {str(self.path)!r} is not writable ({self.reason}) and {why}; "
                "a finished run can be read back from a read-only folder, but a run that trains "
                "must save. Pass a writable checkpoint folder (or copy this one somewhere "
                "writable)."
            )

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _try_flock(fd: int) -> bool | None:
    """``True``: locked; ``False``: held by another process; ``None``: no flock here."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # e.g. ENOLCK / EOPNOTSUPP on some network file systems
    return True


def _acquire(path: Path) -> FolderLock:
    lock = path / LOCK_NAME
    for _ in range(100):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return FolderLock(path, None, False, e.strerror or str(e))
            raise CheckpointFolderError(
                f"cannot write the lock file {str(lock)!r} ({e.strerror or e}); pass a writable "
                "checkpoint folder."
            ) from None
        if not os.access(path, os.W_OK | os.X_OK):  # e.g. a lock file left in a folder since
            os.close(fd)  # made read-only: the file opens, the folder cannot take a new step
            return FolderLock(path, None, False, "the folder is read-only")
        got = _try_flock(fd)
        if got is False:
            owner = _read_owner(lock)
            os.close(fd)
            raise CheckpointLockedError(_locked_message(path, owner))
        if got is None:  # no advisory locks: trust the pid in the file
            owner = _read_owner(lock)
            pid = owner.get("pid")
            same_host = owner.get("host") in (None, socket.gethostname())
            if isinstance(pid, int) and pid != os.getpid() and same_host and _pid_alive(pid):
                os.close(fd)
                raise CheckpointLockedError(_locked_message(path, owner))
        try:  # the file may have been removed by a releasing owner between open and flock
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        os.fsync(fd)
        return FolderLock(path, fd, True)
    raise CheckpointLockedError(_locked_message(path, _read_owner(lock)))  # pragma: no cover


def _lock(path: Path) -> FolderLock:
    """This process's lock on ``path`` (re-entrant), or an unlocked read-only handle."""
    key = _key(path)
    ref = _HELD.get(key)
    held = ref() if ref is not None else None
    if held is not None and held._fd is not None:
        return held
    got = _acquire(path)
    if got.writable:
        _HELD[key] = weakref.ref(got)
    return got


def _key(path: Path) -> str:
    """One key per folder, however it is spelled (symbolic links resolved)."""
    try:
        return str(path.resolve())
    except OSError:
        return str(path)


def lock_folder(directory: str | os.PathLike[str]) -> FolderLock:
    """Takes the write lock of any folder (created if missing), e.g. a folder of checkpoint
    folders; see :class:`FolderLock`.

    Raises:
      CheckpointFolderError: a bad path, or a folder that cannot be created or written.
      CheckpointLockedError: another live process holds the lock.
    """
    path = _check_dir(directory)
    _make_folder(path)
    lock = _lock(path)
    lock.require_writable("a lock must be taken in it")
    return lock


def open_checkpoint_dir(directory: str | os.PathLike[str]) -> FolderLock:
    """Checks a checkpoint folder before any training, creates it, and takes its write lock.

    Refuses (before anything is trained) an empty path, a path that is a file or lies under a
    file, a folder that cannot be created, and a folder holding numbered entries pnjax did not
    write; warns about other foreign entries; refuses a folder whose lock another live process
    holds. An existing folder that cannot be written but holds checkpoint steps is returned with
    ``writable=False`` (it can be read: call :meth:`FolderLock.require_writable` once it is
    known that the run must save); one that holds none is refused.

    Args:
      directory: the checkpoint folder.

    Returns:
      A :class:`FolderLock`; keep a reference while writing (the lock is released when the last
      reference goes away, or by :meth:`FolderLock.release`).

    Raises:
      CheckpointFolderError: a bad path, a folder that cannot be created, or foreign numbered
        entries.
      CheckpointLockedError: another live process writes this folder.
    """
    path = _check_dir(directory)
    _make_folder(path)
    _check_foreign(path)
    lock = _lock(path)
    if not lock.writable and not checkpoint_steps(path):
        lock.require_writable("it holds no checkpoint to read back")
    return lock


# ----------------------------------------------------------------------------- steps


def checkpoint_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The complete steps pnjax wrote in ``directory``, ascending; ``[]`` if none or no folder.

    Only marked step folders count (they hold ``pnjax-step.json``, written last, before the
    folder gets its number); other digit-named folders are not steps.
    """
    path = _check_dir(directory)
    if not path.is_dir():
        return []
    return sorted(int(c.name) for c in path.iterdir() if _is_own_step(c))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (but the marker), by relative POSIX path."""
    return {
        f.relative_to(folder).as_posix(): _sha256_file(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.relative_to(folder).as_posix() != STEP_MARK
    }


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_own(child: Path) -> None:
    """Deletes a folder pnjax wrote (never anything else)."""
    if _is_own(child) and child.name != LOCK_NAME:
        shutil.rmtree(child, ignore_errors=True)


def save_checkpoint(
    directory: str | os.PathLike[str],
    step: int,
    state: PyTree,
    metadata: Mapping[str, Any] | None = None,
    *,
    keep: int = 2,
) -> Path:
    """Saves ``state`` and ``metadata`` as step ``step`` of ``directory``, atomically.

    The step is written under a temporary name, marked as pnjax's (``pnjax-step.json``, holding
    the SHA-256 of each of the step's files) and renamed when complete; then only the newest
    ``keep`` of pnjax's steps are kept. A step number that already exists is replaced. Nothing
    that pnjax did not write is deleted or renamed; a folder holding numbered entries pnjax did
    not write is refused. The folder's lock is held during the save (see
    :func:`open_checkpoint_dir`).

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
      ValueError: a negative step or ``keep < 1``; :class:`CheckpointFolderError` for a folder
        that cannot be used.
      CheckpointLockedError: another process writes this folder.
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
    step = int(step)
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "treedef": str(treedef),
        "leaves": infos,
        "metadata": user,
    }

    lock: FolderLock | None = open_checkpoint_dir(path)
    try:
        lock.require_writable("a checkpoint is being saved")  # type: ignore[union-attr]
        return _save_locked(path, step, arrays, meta, int(keep))
    finally:
        lock = None  # releases the lock unless a driver holds it


def _save_locked(
    path: Path, step: int, arrays: dict[str, np.ndarray], meta: dict[str, Any], keep: int
) -> Path:
    import orbax.checkpoint as ocp

    final, tmp, old = path / str(step), path / f"{step}.pnjax-tmp", path / f"{step}.pnjax-old"
    for leftover in path.iterdir():  # a save killed half-way (no other process writes here)
        if _OWN_TEMP.match(leftover.name):
            _remove_own(leftover)
    ckptr = _checkpointer()
    try:
        ckptr.save(
            tmp,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(arrays), meta=ocp.args.JsonSave(meta)
            ),
        )
        if hasattr(ckptr, "wait_until_finished"):
            ckptr.wait_until_finished()
    finally:
        ckptr.close()
    mark = {
        "writer": _WRITER,
        "format": FORMAT_VERSION,
        "step": step,
        "meta_sha256": _sha256_file(tmp / "meta" / "metadata"),
        "files": _file_hashes(tmp),  # every file a restore reads, orbax's own included
    }
    with open(tmp / STEP_MARK, "w") as f:
        f.write(json.dumps(mark))
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # an own step (foreign numbered entries were refused above)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(path)
    _remove_own(old)
    for s in checkpoint_steps(path)[:-keep]:
        _remove_own(path / str(s))
    return final


def _read_step(path: Path, step: int) -> tuple[list[Any], dict[str, Any]]:
    """Reads and verifies one step; raises CheckpointCorruptError on any problem."""
    import orbax.checkpoint as ocp

    folder = path / str(step)
    try:
        mark = json.loads((folder / STEP_MARK).read_text())
        if not isinstance(mark, dict) or mark.get("writer") != _WRITER or mark.get("step") != step:
            raise ValueError(f"unexpected marker {str(mark)[:100]!r}")
        if _sha256_file(folder / "meta" / "metadata") != mark.get("meta_sha256"):
            raise ValueError("the step's metadata fails its checksum")
        files, want = _file_hashes(folder), mark.get("files")
        if files != want:
            if not isinstance(want, dict):
                raise ValueError("the step's marker lists no file checksums")
            bad = sorted(k for k in set(files) | set(want) if files.get(k) != want.get(k))
            raise ValueError(
                f"{len(bad)} file(s) missing, added or failing their checksums ({bad[:3]})"
            )
        meta = json.loads((folder / "meta" / "metadata").read_text())
        if meta.get("format") != FORMAT_VERSION or meta.get("step") != step:
            raise ValueError(f"unexpected format/step in metadata ({meta.get('format')!r})")
        ckptr = _checkpointer()
        try:
            raw = ckptr.restore(folder, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
        finally:
            ckptr.close()
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


def _quarantine(path: Path, step: int) -> Path | None:
    """Moves an own corrupt step aside; ``None`` when the folder cannot be written or is in use
    by another process (the step is then left in place)."""
    try:
        lock = _lock(path)
    except (CheckpointLockedError, CheckpointFolderError):
        return None
    try:
        if not lock.writable:
            return None
        target = path / f"corrupt-{step}"
        n = 0
        while target.exists():
            n += 1
            target = path / f"corrupt-{step}-{n}"
        (path / str(step)).rename(target)
    except OSError:
        return None
    finally:
        lock = None  # type: ignore[assignment]
    return target


def restore_checkpoint(
    directory: str | os.PathLike[str],
    like: PyTree | Callable[[dict[str, Any]], PyTree] | None = None,
    *,
    step: int | None = None,
    quarantine: bool = True,
) -> Checkpoint | None:
    """Restores the newest good step of ``directory`` (or ``step``), or ``None`` if none.

    Only steps pnjax wrote are read (see :func:`checkpoint_steps`). A step that cannot be read
    or fails its checksums (its metadata's, or any leaf's) triggers a ``UserWarning`` naming it,
    is moved aside to ``corrupt-<step>`` (with ``quarantine=True``, when the folder can be
    written) and the previous step is tried.

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
                + (
                    f"moved it to {moved.name!r} and "
                    if moved
                    else "left it in place (the folder cannot be written now) and "
                    if quarantine
                    else ""
                )
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


def _program_or_none(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - an optimizer whose init cannot run here: structure only
        return None


def driver_fingerprint(
    driver: str,
    config: Mapping[str, Any],
    *,
    optimizer: Any,
    params: PyTree,
    **trees: PyTree,
) -> dict[str, Any]:
    """The fingerprint :func:`pnjax.persistent_fit` and :func:`pnjax.run_chains` store.

    :func:`config_fingerprint` of ``config`` and ``trees``, plus the driver's name and the
    optimizer: the structure, shapes and dtypes of its state (``optimizer_state``: Adam and SGD
    differ) and a hash of the values of its initial state (``optimizer_init``: hyperparameters
    kept in the state, as with ``optax.inject_hyperparams``, are covered; ones closed over in
    a function, like ``optax.sgd(lr)``'s ``lr``, cannot be seen).

    Args:
      driver: the driver's name, e.g. ``'persistent_fit'``.
      config: plain settings, as for :func:`config_fingerprint`.
      optimizer: the Optax ``GradientTransformation`` (``init(params)`` is evaluated).
      params: one model's params (no chain axis), the optimizer's ``init`` argument.
      **trees: further pytrees, as for :func:`config_fingerprint`.

    Returns:
      A JSON-ready dict.
    """
    out = config_fingerprint({"driver": driver, **config}, **trees)
    out["optimizer_state"] = tree_fingerprint(jax.eval_shape(optimizer.init, params), values=False)
    state0 = _program_or_none(optimizer.init, params)
    out["optimizer_init"] = None if state0 is None else tree_fingerprint(state0)
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
