"""Seconds spent compiling (tracing, lowering, XLA), so timings can leave them out.

JAX reports each compilation's phases to `jax.monitoring`; `seconds()` is
their running total in this process. A timed region subtracts the
compilation it contained: `c0 = seconds(); ...; compiled = seconds() - c0`.
"""

from __future__ import annotations

import threading

import jax

_EVENTS = frozenset(
  {
    '/jax/core/compile/jaxpr_trace_duration',
    '/jax/core/compile/jaxpr_to_mlir_module_duration',
    '/jax/core/compile/backend_compile_duration',
  }
)
_total = [0.0]
_lock = threading.Lock()
_registered = [False]


def _listen(event: str, duration: float, **_) -> None:
  if event in _EVENTS:
    with _lock:
      _total[0] += duration


def seconds() -> float:
  """Compilation seconds so far in this process (counting starts at the first call)."""
  with _lock:
    if not _registered[0]:
      jax.monitoring.register_event_duration_secs_listener(_listen)
      _registered[0] = True
    return _total[0]
