"""Time per XLA op of a JAX computation on the CPU, read from a ``jax.profiler`` trace."""

from __future__ import annotations

import collections
import glob
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax

# trace events that are not ops: loop containers, end markers, thread-pool bookkeeping
NOT_OPS = ("ThunkExecutor", "while", "end: ", "ThreadpoolListener", "SlinkyThreadPool")


def xla_op_nanoseconds(run: Callable[[], Any], reps: int = 1) -> collections.Counter[str]:
    """Nanoseconds per XLA op name (``dot.59``, ``ynn_fusion.1``, ...) over ``reps`` calls of
    ``run``, which must block until its results are ready."""
    tmp = tempfile.mkdtemp(prefix="pnjax_trace_")
    try:
        with jax.profiler.trace(tmp):
            for _ in range(reps):
                run()
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        ops: collections.Counter[str] = collections.Counter()
        if not files:
            return ops
        data = jax.profiler.ProfileData.from_file(files[0])
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                for ev in line.events:
                    if not ev.name.startswith(NOT_OPS):
                        ops[ev.name] += ev.duration_ns
        return ops
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
