"""C library calls that Python's standard library does not wrap (glibc, Linux).

`libc_function(name, argtypes)` is the function, or None where the C library has no
such symbol (another platform); callers then fall back to a portable way or to nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from typing import Any, Callable


def libc_function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Callable[..., Any] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


_SYNCFS = libc_function("syncfs", [ctypes.c_int])


def sync_filesystem(folder: str | Path) -> None:
    """Write everything written so far on the filesystem that holds `folder` to its disk:
    one `syncfs` call (Linux) for any number of files, instead of an fsync per file;
    `os.sync()` (every filesystem) where there is no syncfs or it fails."""
    if _SYNCFS is not None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            if _SYNCFS(fd) == 0:
                return
        finally:
            os.close(fd)
    os.sync()
