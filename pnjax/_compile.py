"""The one place where pnjax chooses XLA compile options for the CPU.

XLA:CPU's defaults are slow for small convolutional networks: jaxlib's YNNPACK fusion takes
over convolutions and runs some of their gradients (the first layer's weight gradient in
particular) at a few GFLOP/s. pnjax compiles its training steps with YNNPACK kept for dot
fusions only (a dot with the elementwise work around it), so convolutions go to Eigen, through
the ``compiler_options`` argument that ``jax.jit`` accepts. Dot fusions are what make many small
vmapped MLPs fast (1.4x over Eigen's dots for 100 kink-MLP chains). On GPU and TPU no option is
ever added. See ``docs/cpu_speed.md`` for the measurements behind each choice.

Use :func:`jit` exactly like ``jax.jit``::

    from pnjax import _compile

    step = _compile.jit(train_step, donate_argnums=(0,))   # or @_compile.jit as a decorator
    state, metrics = step(state, batch)

or pass the options yourself: ``jax.jit(f, compiler_options=cpu_compiler_options())``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax

__all__ = ["CPU_COMPILER_OPTIONS", "cpu_compiler_options", "jit"]

#: Options applied on the CPU. ``xla_cpu_experimental_ynn_fusion_type="LIBRARY_FUSION_TYPE_DOT"``
#: keeps YNNPACK for dot fusions and turns its convolutions off (they then go to Eigen, which is
#: several times faster for their gradients). The same in ``XLA_FLAGS``:
#: ``--xla_cpu_experimental_ynn_fusion_type=dot``.
CPU_COMPILER_OPTIONS: dict[str, Any] = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"
}

_DISABLE_ENV = "PNJAX_NO_CPU_COMPILER_OPTIONS"


@functools.cache
def _options_supported() -> bool:
    """Whether this jaxlib's CPU compiler accepts :data:`CPU_COMPILER_OPTIONS`."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_COMPILER_OPTIONS).lower(
            jax.ShapeDtypeStruct((), "float32")
        ).compile()
    except Exception:  # noqa: BLE001 - any failure means: do not use the options
        return False
    return True


def cpu_compiler_options(platform: str | None = None) -> dict[str, Any]:
    """Compile options pnjax uses on ``platform``.

    Args:
      platform: ``"cpu"``, ``"gpu"``, ``"cuda"``, ``"rocm"``, ``"tpu"``...; ``None`` means
        ``jax.default_backend()``.

    Returns:
      A new dict: :data:`CPU_COMPILER_OPTIONS` on the CPU (when this jaxlib accepts them and the
      environment variable ``PNJAX_NO_CPU_COMPILER_OPTIONS`` is unset or ``0``), otherwise empty.
    """
    if os.environ.get(_DISABLE_ENV, "0") not in ("", "0"):
        return {}
    if platform is None:
        platform = jax.default_backend()
    if platform != "cpu" or not _options_supported():
        return {}
    return dict(CPU_COMPILER_OPTIONS)


class _Jit:
    """``jax.jit(fn, **kwargs)`` built on first use, with pnjax's CPU options merged in.

    The platform is read on the first call (or ``lower``/``trace``/attribute access), not at
    wrap time, so wrapping at import time initializes no backend. Every other behaviour,
    caching per abstract signature included, is ``jax.jit``'s own.
    """

    def __init__(self, fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        self._fn = fn
        self._kwargs = kwargs
        self._jitted: Any = None
        functools.update_wrapper(self, fn)

    def _platform(self) -> str:
        device = self._kwargs.get("device")
        if device is not None:
            return device.platform
        backend = self._kwargs.get("backend")
        if backend is not None:
            return jax.devices(backend)[0].platform
        return jax.default_backend()

    @property
    def jitted(self) -> Any:
        """The underlying ``jax.jit`` object."""
        if self._jitted is None:
            kwargs = dict(self._kwargs)
            options = {
                **cpu_compiler_options(self._platform()),
                **(kwargs.pop("compiler_options", None) or {}),
            }
            self.compiler_options = options
            self._jitted = jax.jit(self._fn, compiler_options=options or None, **kwargs)
        return self._jitted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """Same as ``jax.jit(...).lower``."""
        return self.jitted.lower(*args, **kwargs)

    def trace(self, *args: Any, **kwargs: Any) -> Any:
        """Same as ``jax.jit(...).trace``."""
        return self.jitted.trace(*args, **kwargs)

    def eval_shape(self, *args: Any, **kwargs: Any) -> Any:
        """Same as ``jax.jit(...).eval_shape``."""
        return self.jitted.eval_shape(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fn", "_kwargs", "_jitted", "compiler_options"):
            raise AttributeError(name)
        return getattr(self.jitted, name)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        # Like a function: used as a method decorator, bind ``obj`` as the first argument.
        if obj is None:
            return self
        return functools.partial(self, obj)


def jit(fn: Callable[..., Any] | None = None, /, **jit_kwargs: Any) -> Any:
    """``jax.jit`` with pnjax's CPU compile options (none on GPU/TPU).

    Same call semantics as ``jax.jit``: ``static_argnums``/``static_argnames``,
    ``donate_argnums``/``donate_argnames``, ``in_shardings``/``out_shardings``, ``device``,
    ``backend``; one compilation per abstract input signature (shapes, dtypes, static values),
    ``.lower(...)``, ``.trace(...)``, ``.eval_shape(...)``; usable as ``@jit`` or
    ``@jit(static_argnames=...)``. A ``compiler_options`` argument is merged over pnjax's
    options (yours win).

    Args:
      fn: the function to compile; omit it to get a decorator.
      **jit_kwargs: any keyword argument of ``jax.jit``.

    Returns:
      A callable that behaves like ``jax.jit(fn, **jit_kwargs)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = jit(lambda x, n: x * n, static_argnums=1)
      >>> f(jnp.ones(3), 2)
      Array([2., 2., 2.], dtype=float32)
    """
    if fn is None:
        return functools.partial(jit, **jit_kwargs)
    return _Jit(fn, jit_kwargs)
