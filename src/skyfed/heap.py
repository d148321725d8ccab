"""Give the C heap's free memory back to the operating system after an update.

An upload arrives as many 1 MiB messages, each a `bytes` object made on whichever
gRPC worker thread handles the call, and a large update is folded through slab-sized
buffers; glibc keeps memory freed by each thread in that thread's arena, so after a
few updates the server holds tens of MiB it no longer uses (`bench/transport.py`
measured 30-80 MiB at 400 MB updates). `malloc_trim(0)` (glibc) returns the free pages
of every arena; elsewhere this does nothing. Called once per update (after its upload,
after its fold), not per chunk.
"""

from __future__ import annotations

import ctypes

from skyfed.libc import libc_function

_TRIM = libc_function("malloc_trim", [ctypes.c_size_t])


def release_free_memory() -> None:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`); a no-op elsewhere."""
    if _TRIM is not None:
        _TRIM(0)
