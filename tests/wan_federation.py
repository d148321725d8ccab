"""A real `skyfed server` and one `skyfed client` per link, over TLS with tokens, in a WanLab.

`wan_config` is the experiment both the deployment and the simulation read: the clients
named after the links, each link's rate and round trip as its cloud profile, and the
server in a cloud of its own (`hub`, unlimited, free) so that every transfer crosses a
rate-limited link and is billed. `run_wan` builds the lab, runs the federation to its
end, and returns the server's metrics lines, the relays' counters and logs and the veth
counters; the lab is torn down on every path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from skyfed.runtime.grpc.certs import make_dev_certs
from wan_lab import RELAY_PORT, SERVER_PORT, Link, WanLab

SRC = str(Path(__file__).resolve().parents[1] / "src")
HUB = {"uplink_mbps": 100_000.0, "downlink_mbps": 100_000.0, "rtt_ms": 0.0}


def wan_config(links: list[Link], rounds: int, model: str = "gpt2-tiny") -> dict[str, Any]:
    """The experiment (on top of the smoke preset) with the links as cloud profiles."""
    return {
        "threads": 1,
        "model": {"preset": model},
        "federation": {"rounds": rounds, "clients": [{"name": link.name} for link in links]},
        "clouds": {"server": "hub", "profiles": {"hub": HUB, **{link.name: link.profile() for link in links}}},
    }


def run_wan(folder: Path, links: list[Link], rounds: int, model: str = "gpt2-tiny", timeout_s: float = 600.0) -> dict[str, Any]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "wan.yaml"
    config.write_text(yaml.safe_dump(wan_config(links, rounds, model), sort_keys=False))
    certs = make_dev_certs(folder / "certs", [link.name for link in links], ["localhost", "127.0.0.1"])
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("SKYFED_CACHE", str(folder / "cache"))
    out = folder / "run"
    cli = [sys.executable, "-m", "skyfed"]
    with WanLab(folder, links, env) as lab:
        lab.start("server", lab.server_ns, cli + [
            "server", str(config), "--preset", "smoke", "--listen", f"127.0.0.1:{SERVER_PORT}",
            "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
            "--tokens", str(certs["tokens.yaml"]), "--out", str(out)])
        for link in links:
            lab.start(link.name, lab.client_ns[link.name], cli + [
                "client", "--server", f"localhost:{RELAY_PORT}", "--name", link.name,
                "--ca-cert", str(certs["ca.pem"]), "--token-file", str(certs["tokens.yaml"]), "--max-backoff", "1"])
        codes = lab.wait(["server", *(link.name for link in links)], timeout_s)
        bad = {k: c for k, c in codes.items() if c != 0}
        if bad:
            raise RuntimeError(f"exit codes {bad}\n" + "\n".join(f"----- {k}\n{lab.log(k)}" for k in codes))
        counters = lab.counters()
        relays = lab.stop_relays()
        described = lab.describe()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        **described,
        "config": str(config),
        "run_dir": str(out),
        "metrics": metrics,
        "summary": json.loads((out / "summary.json").read_text()),
        "veth": counters,
        "relays": {link.name: {"client_end": relays[f"relay-{link.name}"], "server_end": relays[f"tap-{link.name}"]} for link in links},
    }
