"""skyfed.libc: the C library calls that the standard library lacks, and their fallbacks."""

import ctypes
import os

import skyfed.libc as libc


def test_a_missing_symbol_is_none_and_a_present_one_is_called():
    assert libc.libc_function("no_such_function_in_any_libc", []) is None
    getpid = libc.libc_function("getpid", [])
    assert getpid is not None and getpid() == os.getpid()


def test_sync_filesystem_flushes_with_syncfs_or_falls_back_to_os_sync(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(libc.os, "sync", lambda: calls.append("sync"))
    libc.sync_filesystem(tmp_path)
    assert calls == ([] if libc._SYNCFS is not None else ["sync"])  # syncfs succeeds on a real folder
    failing = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(lambda fd: -1)
    monkeypatch.setattr(libc, "_SYNCFS", failing)
    libc.sync_filesystem(tmp_path)
    assert calls[-1] == "sync"
