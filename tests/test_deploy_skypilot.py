"""Every SkyPilot task YAML under deploy/skypilot/ loads through SkyPilot's own API.

No cloud call is made: usage collection is off, and any connection attempt other than
to loopback while the YAMLs load fails the test. Skipped when SkyPilot (the optional
`skypilot` extra) is not installed.
"""

from __future__ import annotations

import os
import shlex
import socket
from pathlib import Path

import pytest

from conftest import ROOT

os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")
sky = pytest.importorskip("sky", reason="SkyPilot is not installed (pip install 'skyfed[skypilot]')")
from sky.utils import yaml_utils  # noqa: E402

DEPLOY = ROOT / "deploy" / "skypilot"
CLIENTS = {"aws": ("AWS", "s3://"), "gcp": ("GCP", "gs://"), "azure": ("Azure", "https://")}
OVERRIDES = [("SKYFED_CONFIG", "configs/exp.yaml"), ("SKYFED_SERVER", "fl.example.org:7443")]


@pytest.fixture
def no_network(monkeypatch):
    """Fail on any connection that is not to loopback."""
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
            raise AssertionError(f"loading a task YAML tried the network: {address}")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def load(name: str, overrides=OVERRIDES) -> "sky.Task":
    return sky.Task.from_yaml_config(yaml_utils.read_yaml(str(DEPLOY / name)), env_overrides=list(overrides))


def skyfed_command(script: str, sub: str) -> list[str]:
    """The `skyfed SUB ...` command line of a run script, continuation lines joined."""
    joined = script.replace("\\\n", " ")
    for line in joined.splitlines():
        words = shlex.split(line)
        if len(words) > 1 and words[0].endswith("/skyfed") and words[1] == sub:
            return words
    raise AssertionError(f"no `skyfed {sub}` in:\n{script}")


def option(words: list[str], flag: str) -> str:
    assert flag in words, f"{flag} missing from {' '.join(words)}"
    return words[words.index(flag) + 1]


def test_every_yaml_is_known_here():
    assert sorted(p.name for p in DEPLOY.glob("*.yaml")) == ["aws.yaml", "azure.yaml", "gcp.yaml", "server.yaml"]


def test_every_yaml_loads_with_sky_from_yaml(no_network, tmp_path):
    for path in sorted(DEPLOY.glob("*.yaml")):
        text = path.read_text()
        for var, value in OVERRIDES:  # the required variables, filled in as `--env` would
            text = text.replace(f"{var}: null", f"{var}: {value}")
        filled = tmp_path / path.name
        filled.write_text(text)
        task = sky.Task.from_yaml(str(filled))
        assert task.name.startswith("skyfed-") and task.run and task.setup


def test_server_yaml_opens_the_port_and_runs_the_tls_server(no_network):
    task = load("server.yaml")
    (res,) = list(task.resources)
    assert res.ports == ["7443"] and res.cpus == "8+" and res.memory == "32+"
    assert task.envs["SKYFED_PORT"] == "7443" and task.envs["SKYFED_CONFIG"] == "configs/exp.yaml"
    assert 'torch==2.13.0' in task.setup and '".[ops]"' in task.setup and task.envs["TORCH_INDEX_URL"].endswith("/whl/cpu")
    words = skyfed_command(task.run, "server")
    assert option(words, "--listen") == "0.0.0.0:$SKYFED_PORT"
    mounted = {Path(dst).name: src for dst, src in task.file_mounts.items()}
    for flag, fname in [("--tls-cert", "server.pem"), ("--tls-key", "server.key"), ("--client-ca", "ca.pem"), ("--tokens", "tokens.yaml")]:
        assert option(words, flag) == f"~/.skyfed/{fname}" and f"~/.skyfed/{fname}" in task.file_mounts
        assert mounted[fname] == f"certs/{fname}"  # uploaded from the operator's certs/, never inline
    assert option(words, "--metrics-port") == "$SKYFED_METRICS_PORT" and "--metrics-bind" not in words  # loopback only
    assert "--insecure" not in words and task.secrets == {}


@pytest.mark.parametrize("cloud", sorted(CLIENTS))
def test_client_yaml_is_pinned_to_its_cloud_with_its_data_mount(no_network, cloud):
    cloud_name, scheme = CLIENTS[cloud]
    task = load(f"{cloud}.yaml")
    (res,) = list(task.resources)
    assert str(res.cloud) == cloud_name and res.accelerators and not res.ports
    assert task.envs["SKYFED_NAME"] == cloud and task.envs["SKYFED_SERVER"] == "fl.example.org:7443"
    data = task.storage_mounts["/data"]
    assert data.source == task.envs["DATA_BUCKET"] and data.source.startswith(scheme) and cloud in data.source
    assert data.mode.value == "MOUNT"
    assert [ref.name for ref in task.managed_secret_refs] == ["SKYFED_TOKEN"]  # from --secret, redacted
    assert "SKYFED_TOKEN" not in task.envs
    words = skyfed_command(task.run, "client")
    assert option(words, "--server") == "$SKYFED_SERVER" and option(words, "--name") == "$SKYFED_NAME"
    assert option(words, "--data") == "/data" and "--insecure" not in words
    assert "--token" not in words and "--token-file" not in words  # the CLI reads SKYFED_TOKEN itself
    for flag, dst, src in [("--ca-cert", "~/.skyfed/ca.pem", "certs/ca.pem"),
                           ("--tls-cert", "~/.skyfed/client.pem", f"certs/client-{cloud}.pem"),
                           ("--tls-key", "~/.skyfed/client.key", f"certs/client-{cloud}.key")]:
        assert option(words, flag) == dst and task.file_mounts[dst] == src
    # the secret arrives as SkyPilot's --secret does
    task = sky.Task.from_yaml_config(yaml_utils.read_yaml(str(DEPLOY / f"{cloud}.yaml")), env_overrides=OVERRIDES,
                                     secrets_overrides=[("SKYFED_TOKEN", "s3cr3t-token")])
    assert task.secrets["SKYFED_TOKEN"].get_secret_value() == "s3cr3t-token" and not task.managed_secret_refs


@pytest.mark.parametrize("name,var", [("server.yaml", "SKYFED_CONFIG"), ("aws.yaml", "SKYFED_SERVER")])
def test_required_variables_must_be_given(no_network, name, var):
    with pytest.raises(ValueError, match=var):
        load(name, [o for o in OVERRIDES if o[0] != var])


def test_the_guide_launches_every_yaml():
    guide = (DEPLOY / "README.md").read_text()
    for name in ("server", "aws", "gcp", "azure"):
        assert f"sky launch -c skyfed-{name} deploy/skypilot/{name}.yaml" in guide
