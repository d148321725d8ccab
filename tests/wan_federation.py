"""A real `skyfed server` and one `skyfed client` per link, over TLS with tokens, in a WanLab.

`wan_config` is the experiment both the deployment and the simulation read: the clients
named after the links, each link's rate and round trip as its cloud profile, and the
server in a cloud of its own (`hub`, unlimited, free) so that every transfer crosses a
rate-limited link and is billed. `run_wan` fills SKYFED_CACHE with the server's tokenizer
and shards first, gives each client a small text of its own (`--data`), builds the lab,
runs the federation to its end, and returns the server's metrics lines, the relays'
counters and logs and the veth counters; the lab is torn down on every path.
"""

from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from skyfed.runtime.grpc.certs import make_dev_certs
from wan_lab import RELAY_PORT, SERVER_PORT, Link, WanLab

SRC = str(Path(__file__).resolve().parents[1] / "src")
WARM = "import sys; from skyfed.config import load_config; from skyfed.runtime.setup import prepare_data; prepare_data(load_config(sys.argv[1], 'smoke'))"
HUB = {"uplink_mbps": 100_000.0, "downlink_mbps": 100_000.0, "rtt_ms": 0.0}


def wan_config(links: list[Link], rounds: int, model: str = "gpt2-tiny") -> dict[str, Any]:
    """The experiment (on top of the smoke preset) with the links as cloud profiles."""
    return {
        "threads": 1,
        "model": {"preset": model},
        "federation": {"rounds": rounds, "clients": [{"name": link.name} for link in links]},
        "clouds": {"server": "hub", "profiles": {"hub": HUB, **{link.name: link.profile() for link in links}}},
    }


def client_texts(folder: Path, names: list[str], nbytes: int = 50_000) -> dict[str, Path]:
    """Each client's own local data (`skyfed client --data`): its slice of the bundled
    WikiText-2 train text, so that a client tokenizes 50 kB and not the whole corpus."""
    import skyfed

    with lzma.open(Path(skyfed.__file__).parent / "data" / "wikitext2" / "train.txt.xz", "rt", encoding="utf-8") as f:
        text = f.read(nbytes * len(names))
    (folder / "data").mkdir(exist_ok=True)
    out = {}
    for i, name in enumerate(names):
        out[name] = folder / "data" / f"{name}.txt"
        out[name].write_text(text[i * nbytes:(i + 1) * nbytes], encoding="utf-8")
    return out


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
    # Tokenizer and token shards into SKYFED_CACHE once, so that four processes do not each build them at start.
    subprocess.run([sys.executable, "-c", WARM, str(config)], env=env, check=True, capture_output=True, timeout=timeout_s)
    data = client_texts(folder, [link.name for link in links])
    with WanLab(folder, links, env) as lab:
        lab.start("server", lab.server_ns, cli + [
            "server", str(config), "--preset", "smoke", "--listen", f"127.0.0.1:{SERVER_PORT}",
            "--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
            "--tokens", str(certs["tokens.yaml"]), "--out", str(out)])
        for link in links:
            lab.start(link.name, lab.client_ns[link.name], cli + [
                "client", "--server", f"localhost:{RELAY_PORT}", "--name", link.name, "--data", str(data[link.name]),
                "--ca-cert", str(certs["ca.pem"]), "--token-file", str(certs["tokens.yaml"]), "--max-backoff", "1",
                "--connect-timeout", str(timeout_s)])  # a loaded host may take > 60 s to start the server
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
