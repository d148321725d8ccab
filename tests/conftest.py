import os
import subprocess
from pathlib import Path

import pytest

# Four pytest-xdist workers share two cores and most tests start more processes. torch's
# OpenMP threads spin while they wait for work: on the oversubscribed machine a gpt2-micro
# training step took 250 ms of CPU with two threads, 3 ms with one. So every process of
# the suite (workers, CLI runs, servers, clients) gets one thread (skyfed's `threads: null`
# is torch's default, which follows OMP_NUM_THREADS) and waiting threads sleep. Set
# before anything imports torch; a test that sets `threads` keeps its own.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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


_warmed = False


@pytest.hookimpl(trylast=True)  # after the session fixtures (shared_cache) are set up
def pytest_runtest_setup(item):
    """Under pytest-xdist, before a worker's first test from a module that uses the smoke
    preset: tokenize the smoke preset's corpus into the shared cache, once for all workers
    (the first to get the file lock does it, the others wait and reuse it). Without it the
    workers, starting together, each trained the same tokenizer and tokenized the same
    corpus (about 20 s of CPU each on a cold cache)."""
    global _warmed
    if _warmed or "PYTEST_XDIST_WORKER" not in os.environ or "SKYFED_CACHE" not in os.environ:
        return
    import inspect

    try:
        if "smoke" not in inspect.getsource(item.module):
            return
        from filelock import FileLock

        from skyfed.config import load_config
        from skyfed.runtime.setup import prepare_data
    except (ImportError, OSError, TypeError):  # the SkyPilot venv has no skyfed
        return
    _warmed = True
    folder = Path(os.environ["SKYFED_CACHE"])
    with FileLock(str(folder / "smoke-warm.lock")):
        if not (folder / "smoke-warm.done").exists():
            prepare_data(load_config(preset="smoke"))
            (folder / "smoke-warm.done").touch()


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run the real `skyfed` CLI in a process of its own, forked from the preloaded server
    (tests/cli_forkserver.py), or `python -m skyfed` in a fresh interpreter when `fresh`;
    its stdout and stderr come back as text."""
    import cli_forkserver

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return cli_forkserver.run(list(args), env, cwd=cwd, timeout=timeout, fresh=fresh)


def run_clis(*calls: list[str], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Several `run_cli` calls at once, each its own process (most of a CLI run that fails
    early is importing torch and transformers): their results, in the order given."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda args: run_cli(*args, timeout=timeout), calls))


@pytest.fixture
def procs(tmp_path, monkeypatch):
    """Real skyfed server/client processes for a test, killed at its end (tests/grpc_harness.py)."""
    from grpc_harness import Procs

    if "SKYFED_CACHE" not in os.environ:
        monkeypatch.setenv("SKYFED_CACHE", str(tmp_path / "cache"))
    p = Procs(tmp_path)
    yield p
    p.close()


SPAWNS = ("run_cli(", "run_clis(", "cli_forkserver.", "subprocess.", "Popen(", "WorkerPool(", "ray.init(")
TESTS = str(ROOT / "tests")


def _code_names(code) -> set[str]:
    """The global names a function's code (and the lambdas and comprehensions in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _code_names(const)
    return names


def _spawns(fn, seen: set) -> bool:
    """Whether `fn`, or a function of tests/ that it calls (at any depth), starts a process:
    a test that calls a helper such as `run_smoke` which calls `run_cli` spawns too."""
    import inspect

    if inspect.isclass(fn):  # a helper class of tests/ (a peer process, say): its methods
        if fn in seen or not (inspect.getsourcefile(fn) or "").startswith(TESTS):
            return False
        seen.add(fn)
        return any(_spawns(m, seen) for m in vars(fn).values() if inspect.isfunction(m))
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None or fn in seen or not code.co_filename.startswith(TESTS):
        return False
    seen.add(fn)
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if any(s in source for s in SPAWNS):
        return True
    scope = getattr(fn, "__globals__", {})
    return any(_spawns(scope[n], seen) for n in _code_names(code) if inspect.isfunction(scope.get(n)) or inspect.isclass(scope.get(n)))


def pytest_collection_modifyitems(config, items):
    """Mark every test that starts processes (the real CLI, a gRPC server, workers, Ray),
    itself, through a helper of tests/ or through a fixture, as `processes`, so that
    `make test-fast` (-m "not processes") leaves them out."""
    for item in items:
        if "procs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.processes)
            continue
        seen: set = set()
        fixtures = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        funcs = [getattr(item, "function", None)] + [defs[-1].func for defs in fixtures.values() if defs]
        if any(f is not None and _spawns(f, seen) for f in funcs):
            item.add_marker(pytest.mark.processes)
    _longest_modules_first(items)


def _longest_modules_first(items) -> None:
    """Order the modules longest first, each module's tests in their own order: pytest-xdist
    (`--dist loadfile`) hands out modules in this order, so the long ones do not start
    last and run alone at the end. A module's length is its seconds in
    tests/module_seconds.json (from a full run: tests/module_seconds.py), else an estimate
    of 10 s for each test that starts processes."""
    import json

    known = json.loads((ROOT / "tests" / "module_seconds.json").read_text())
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.path.name, []).append(item)

    def seconds(name: str) -> float:
        if name in known:
            return known[name]
        return 10.0 * sum(1 for item in modules[name] if item.get_closest_marker("processes"))

    order = sorted(modules, key=lambda name: -seconds(name))  # stable: ties keep collection order
    items[:] = [item for name in order for item in modules[name]]
