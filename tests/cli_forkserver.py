"""`skyfed` CLI processes forked from a server that has already imported torch and transformers.

A fresh `python -m skyfed` spends about 4 s of CPU importing torch and transformers
before it does anything, and the end-to-end tests start many CLI processes. So the
tests start them from a `multiprocessing` fork server (one per pytest worker) that
imported those modules once: every child is still its own process with its own argv,
environment, working directory, stdout and stderr, and runs `skyfed.cli.main` as
`python -m skyfed` does after its imports. Servers and clients talk real gRPC on
loopback and can be killed with SIGKILL, as before.

`SKYFED_TEST_EXEC=1` starts every CLI process with `python -m skyfed` instead. Tests of
the import path itself (tests/test_lazy_imports.py) always start a fresh interpreter.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Imported once in the fork server; every CLI process forked from it starts with them.
PRELOAD = ["skyfed.cli", "skyfed.model", "skyfed.api", "skyfed.runtime.grpc.commands"]
EXEC = os.environ.get("SKYFED_TEST_EXEC") == "1"
TESTS = Path(__file__).resolve().parent

_context: multiprocessing.context.BaseContext | None = None
_lock = threading.Lock()


def _fork_context() -> multiprocessing.context.BaseContext:
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def _main(args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str | None, instrument: str | None) -> None:
    """The child: this process's argv, environment, directory and output, then the CLI
    (after importing the test module `instrument`, which wraps parts of the client)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    out = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out if stderr is None else os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), 2)
    sys.argv = ["skyfed", *args]
    if instrument is not None:
        importlib.import_module(instrument)
    from skyfed.cli import main

    main()  # exits with the CLI's code (multiprocessing turns SystemExit into the exit code)


class CliProcess:
    """A forked CLI process with the parts of `subprocess.Popen` the tests use."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path | None = None,
                 instrument: str | None = None):
        self.args = ["skyfed", *args]
        self._proc = _fork_context().Process(
            target=_main,
            args=(list(args), dict(env), str(cwd), str(stdout), None if stderr is None else str(stderr), instrument),
            daemon=True,  # ended (SIGTERM) when the pytest worker exits, should a test leave one running
        )
        self._proc.start()
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode  # reads the exit status once the process has ended

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self._proc.exitcode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()


def start(args: list[str], env: dict[str, str], cwd: Path, stdout, stderr=None, fresh: bool = False,
          instrument: str | None = None):
    """A CLI process: forked from the preloaded server, or `python -m skyfed` when `fresh`
    or under SKYFED_TEST_EXEC=1. `stdout` is a path (appended to); `stderr` another, or
    None to share stdout's file. `instrument`: a module of tests/ imported before the CLI
    runs (executed as the script `tests/<instrument>.py` in a fresh interpreter)."""
    if not (EXEC or fresh):
        return CliProcess(args, env, cwd, Path(stdout), None if stderr is None else Path(stderr), instrument)
    command = [sys.executable, "-m", "skyfed"] if instrument is None else [sys.executable, str(TESTS / f"{instrument}.py")]
    with open(stdout, "ab") as out, open(stderr or os.devnull, "ab") as err:
        return subprocess.Popen([*command, *args], stdout=out,
                                stderr=subprocess.STDOUT if stderr is None else err, env=env, cwd=cwd)


def run(args: list[str], env: dict[str, str], cwd: Path | None = None, timeout: float = 300,
        fresh: bool = False) -> subprocess.CompletedProcess:
    """One CLI run to its end, like `subprocess.run(..., capture_output=True, text=True)`."""
    with tempfile.TemporaryDirectory(prefix="skyfed-cli-") as tmp:
        out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
        proc = start(args, env, Path(cwd or os.getcwd()), out, err, fresh=fresh)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            raise
        return subprocess.CompletedProcess(proc.args, code, out.read_text(errors="replace"), err.read_text(errors="replace"))
