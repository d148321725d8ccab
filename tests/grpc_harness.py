"""Real processes on loopback for the gRPC tests: free ports, dev certs, the CLI, polling.

Nothing here sleeps to wait for an outcome: `wait_for` polls a condition in a bounded
loop and fails with the processes' logs when the bound passes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import cli_forkserver
from skyfed.runtime.grpc.certs import make_dev_certs

SRC = str(Path(__file__).resolve().parents[1] / "src")  # the tree under test, whatever the cwd
SMOKE = ["--preset", "smoke", "--set", "threads=1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dev_certs(folder: Path, clients: list[str]) -> dict[str, Path]:
    return make_dev_certs(folder, clients, ["localhost", "127.0.0.1"])


class Procs:
    """Spawned CLI processes with their logs; all killed at teardown."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "SKYFED_CACHE": os.environ.get("SKYFED_CACHE", str(folder / "cache")),
                    "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def start(self, label: str, args: list[str], env: dict[str, str] | None = None, instrument: str | None = None):
        """Run the skyfed CLI with `args` in a process forked from the preloaded server
        (tests/cli_forkserver.py); `env` adds variables, `instrument` names a test module
        that wraps parts of the client first."""
        env = {**self.env, **(env or {})}
        p = cli_forkserver.start(args, env, self.folder, self.folder / f"{label}.log", instrument=instrument)
        self.procs[label] = p
        return p

    def log(self, label: str) -> str:
        path = self.folder / f"{label}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(f"----- {k}\n{self.log(k)[-3000:]}" for k in self.procs)

    def pid(self, label: str) -> int:
        return self.procs[label].pid

    def kill(self, label: str) -> None:
        p = self.procs[label]
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)

    def wait_exit(self, label: str, timeout: float) -> int:
        try:
            return self.procs[label].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{label} did not exit within {timeout}s\n{self.logs()}") from None

    def wait_for(self, what: str, cond: Callable[[], bool], timeout: float = 240.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if cond():
                return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def server_args(cfg: list[str], port: int, certs: dict[str, Path] | None, out: Path, *extra: str) -> list[str]:
    """TLS with tokens when `certs` is given; else plaintext and `--open` (no tokens)."""
    tls = ["--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]), "--tokens", str(certs["tokens.yaml"])] if certs else ["--insecure", "--open"]
    return ["server", *cfg, "--listen", f"127.0.0.1:{port}", *tls, "--out", str(out), *extra]


def client_args(name: str, port: int, certs: dict[str, Path] | None, *extra: str) -> list[str]:
    """A client that keeps trying to reach the server for 300 s (unless `extra` says
    otherwise): a loaded machine running tests in parallel can take over a minute to
    start a server that loads a model."""
    tls = ["--ca-cert", str(certs["ca.pem"]), "--token-file", str(certs["tokens.yaml"])] if certs else ["--insecure"]
    patience = [] if "--connect-timeout" in extra else ["--connect-timeout", "300"]
    return ["client", "--server", f"localhost:{port}", "--name", name, *tls, "--max-backoff", "1", *patience, *extra]


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
