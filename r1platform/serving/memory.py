"""The serving process's memory stays bounded however many large requests arrive at once.

Two things held memory after 20 concurrent 32 MB bodies (690 MiB, long after they were
answered): every body was in memory at once, twice (its chunks, then the joined copy) plus its
parsed arrays; and glibc kept the freed memory in the heaps of the threads that parsed them.

- :class:`BodyBudget`: a large body (over ``PARSE_IN_THREAD_BYTES``) takes its size from a
  budget before it is read and gives it back once answered; when the budget is spent the next
  one waits, unread (uvicorn stops reading a socket whose body is not consumed), so the bytes
  held for large bodies never pass the budget.
- :func:`mmap_large_buffers` (at start): glibc serves every allocation of 1 MiB or more with
  its own mapping, given back to the system when freed. By default glibc raises that threshold
  to the largest block freed (up to 32 MiB), after which body-sized buffers come from its heaps,
  which it keeps: that was most of the 690 MiB.
- :func:`release_free_memory`: once no large body is held, glibc's free pages go back to the
  system (``malloc_trim``). Both do nothing where there is no glibc.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
from collections.abc import AsyncIterator

log = logging.getLogger(__name__)


#: glibc's mallopt parameter number for the mmap threshold, and the threshold used.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1024 * 1024


def _glibc(function: str):
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _glibc("malloc_trim")
_MALLOPT = _glibc("mallopt")


def mmap_large_buffers() -> bool:
    """Blocks of 1 MiB or more get their own mapping, returned when freed (glibc only)."""
    if _MALLOPT is None:
        return False
    return bool(_MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def release_free_memory() -> None:
    """Give the allocator's free pages back to the system (glibc; otherwise nothing)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class BodyBudget:
    """At most ``total`` bytes of large request bodies held at once, across requests."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        size = min(size, self.total)
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + size <= self.total)
            self.used += size
        try:
            yield
        finally:
            async with self._changed:
                self.used -= size
                self._changed.notify_all()
                idle = self.used == 0
            if idle and size:
                # In a thread: trimming a large heap takes milliseconds.
                asyncio.get_running_loop().run_in_executor(None, release_free_memory)
