"""Handing memory the allocator keeps after it is freed back to the operating system."""

from __future__ import annotations

import contextlib
import ctypes
import functools


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def release_free_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc keeps them after a load's
    temporaries are freed: measured 590 -> 420 MB RSS for the default model)."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
