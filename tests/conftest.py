import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory):
    """One tokenizer/shard cache for the whole session (tokenizers are trained once). Under
    pytest-xdist the workers share one folder beside their own temp roots: the cache writes
    each entry to a private folder and renames it into place, so concurrent writers are safe."""
    if "SKYFED_CACHE" not in os.environ:
        if "PYTEST_XDIST_WORKER" not in os.environ:
            folder = tmp_path_factory.mktemp("skyfed-cache")
        else:
            folder = tmp_path_factory.getbasetemp().parent / "skyfed-cache"
            folder.mkdir(exist_ok=True)
        os.environ["SKYFED_CACHE"] = str(folder)
    return Path(os.environ["SKYFED_CACHE"])


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `skyfed` CLI in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "skyfed", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


@pytest.fixture
def procs(tmp_path, monkeypatch):
    """Real skyfed server/client processes for a test, killed at its end (tests/grpc_harness.py)."""
    from grpc_harness import Procs

    if "SKYFED_CACHE" not in os.environ:
        monkeypatch.setenv("SKYFED_CACHE", str(tmp_path / "cache"))
    p = Procs(tmp_path)
    yield p
    p.close()


SPAWNS = ("run_cli(", "subprocess.", "Popen(", "WorkerPool(", "ray.init(")


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts processes (the real CLI, a gRPC server, workers) as
    `processes`, so `make test-fast` (-m "not processes") can leave them out."""
    import inspect

    for item in items:
        if "procs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.processes)
            continue
        try:
            source = inspect.getsource(item.function)
        except (OSError, TypeError, AttributeError):
            continue
        if any(s in source for s in SPAWNS):
            item.add_marker(pytest.mark.processes)
