"""What the invariant mode does with a call it cannot make invariant: run PyTorch's own kernel and say so
once (a warning naming the op and why), or raise under `strict=True`; plus the guard that lets the
overrides call PyTorch's kernels themselves without re-entering the overrides.

Both are shared by every override (detmoe/invariant/aten_ops.py, attention.py, transformers_hooks.py).
"""
from __future__ import annotations

import contextlib
import re
import threading
import warnings
from typing import Iterator


class InvariantModeWarning(UserWarning):
    """An op ran on PyTorch's own (possibly batch-variant) kernel inside `invariant_mode()`."""


class NotInvariantError(RuntimeError):
    """Raised under `invariant_mode(strict=True)` where an op would fall back to a batch-variant kernel."""


_local = threading.local()
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()
_strict_entries = 0   # how many active `invariant_mode(strict=True)` entries (process-wide, as the overrides are)


def set_strict_entries(n: int) -> None:
    global _strict_entries
    _strict_entries = n


def strict() -> bool:
    return _strict_entries > 0


def inside_override() -> bool:
    """True while this thread runs an override's body: its own torch calls go to PyTorch's kernels."""
    return getattr(_local, "depth", 0) > 0


@contextlib.contextmanager
def override_body() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def fall_back(op: str, reason: str) -> None:
    """Record that `op` runs on PyTorch's kernel for `reason`: raise under strict, else warn once per
    (op, reason) in the process (reasons that differ only in numbers, such as shapes, count as one)."""
    message = (f"invariant_mode: {op} ran on PyTorch's own kernel, which may give a row other bits in "
               f"another batch: {reason}")
    if strict():
        raise NotInvariantError(message)
    kind = (op, re.sub(r"\d+", "#", reason))   # once per kind of reason: shapes and lengths vary by step
    with _warned_lock:
        if kind in _warned:
            return
        _warned.add(kind)
    warnings.warn(message, InvariantModeWarning, stacklevel=3)


def forget_warnings() -> None:
    """Warn again for every (op, reason) (tests)."""
    with _warned_lock:
        _warned.clear()
