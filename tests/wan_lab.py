"""Network namespaces, rate-limited links and delay relays: a WAN on one Linux host.

One namespace for the server and one per client. Each client namespace is joined to the
server's by its own veth pair, rate-limited by `tc tbf` on both ends (the client end's
egress is the client's uplink, the server end's egress its downlink). The kernel may have
no netem, so the delay is a user-space relay (tests/wan_relay.py) in each client
namespace that holds every chunk for half the round trip, both ways; a second relay with
no delay (a tap) in the server namespace stamps the times at the server's end of the link.

    client --localhost:7000--> relay (+rtt/2) --veth, tbf up--> tap --127.0.0.1:7443--> server
    client <------------------ relay (+rtt/2) <--veth, tbf down-- tap <------------------ server

Every name carries the process id and a random tag, so runs in parallel do not collide;
`WanLab.close` kills what it started and deletes the namespaces (which takes their links
and qdiscs with them), and is safe to call on a half-built lab. Needs root, `ip` and `tc`:
`skip_reason()` says why a host cannot.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RELAY = Path(__file__).with_name("wan_relay.py")
SERVER_PORT = 7443  # the server, on 127.0.0.1 of its namespace
RELAY_PORT = 7000  # the relay on each client's localhost, and the tap on the server's end of each link


@dataclass(frozen=True)
class Link:
    """A client and its link to the server (the same numbers as its cloud profile)."""

    name: str
    up_mbps: float
    down_mbps: float
    rtt_ms: float

    def profile(self) -> dict[str, float]:
        return {"uplink_mbps": self.up_mbps, "downlink_mbps": self.down_mbps, "rtt_ms": self.rtt_ms}


def tbf_burst_bytes(mbps: float) -> int:
    """The token bucket: 4 ms at the rate, at least 32 KiB (a few full-size segments)."""
    return max(32 * 1024, int(mbps * 1e6 / 8 * 0.004))


def _sh(*argv: str) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {out.stderr.strip() or out.returncode}")
    return out.stdout


def skip_reason() -> str | None:
    """Why namespaces with tbf links cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces and tc qdiscs"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (iproute2)"
    ns = f"sfw-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1mbit", "burst", "32kb", "latency", "100ms")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot build a namespace with a tbf link here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    return None


class WanLab:
    """The namespaces, links and relays of one run; `with WanLab(...) as lab:` tears all down."""

    def __init__(self, folder: Path, links: list[Link], env: dict[str, str] | None = None):
        self.folder, self.links = Path(folder), links
        self.env = env or dict(os.environ)
        self.tag = f"sfw-{os.getpid()}-{secrets.token_hex(3)}"
        self.server_ns = f"{self.tag}-srv"
        self.client_ns = {link.name: f"{self.tag}-c{i}" for i, link in enumerate(links)}
        self.namespaces: list[str] = []
        self.procs: dict[str, subprocess.Popen] = {}
        self.relays: dict[str, Path] = {}  # label -> stats file

    def __enter__(self) -> "WanLab":
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ build

    def _netns(self, name: str) -> None:
        _sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        _sh("ip", "-n", name, "link", "set", "lo", "up")

    def build(self) -> None:
        self._netns(self.server_ns)
        for i, link in enumerate(self.links, start=1):
            ns, far = self.client_ns[link.name], f"c{i}"
            self._netns(ns)
            _sh("ip", "link", "add", "wan0", "netns", ns, "type", "veth", "peer", "name", far, "netns", self.server_ns)
            for where, dev, addr, mbps in ((ns, "wan0", f"10.77.{i}.2/30", link.up_mbps), (self.server_ns, far, f"10.77.{i}.1/30", link.down_mbps)):
                _sh("ip", "-n", where, "addr", "add", addr, "dev", dev)
                _sh("ip", "-n", where, "link", "set", dev, "up")
                _sh("ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                    "rate", f"{int(mbps * 1e6)}bit", "burst", str(tbf_burst_bytes(mbps)), "latency", "400ms")
            self._relay(f"tap-{link.name}", self.server_ns, f"10.77.{i}.1:{RELAY_PORT}", f"127.0.0.1:{SERVER_PORT}", 0.0, f"127.0.1.{i}")
            self._relay(f"relay-{link.name}", ns, f"127.0.0.1:{RELAY_PORT}", f"10.77.{i}.1:{RELAY_PORT}", link.rtt_ms / 2)
        for label in self.relays:
            self._wait_file(self.folder / f"{label}.ready", label)

    def _relay(self, label: str, ns: str, listen: str, connect: str, delay_ms: float, bind: str | None = None) -> None:
        stats = self.folder / f"{label}.json"
        argv = [sys.executable, str(RELAY), "--listen", listen, "--connect", connect, "--delay-ms", str(delay_ms),
                "--stats", str(stats), "--ready", str(self.folder / f"{label}.ready")]
        self.start(label, ns, argv + (["--bind", bind] if bind else []))
        self.relays[label] = stats

    def _wait_file(self, path: Path, label: str, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while not path.exists():
            if self.procs[label].poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{label} did not start:\n{self.log(label)}")
            time.sleep(0.02)

    # ------------------------------------------------------------------ processes

    def start(self, label: str, ns: str, argv: list[str]) -> subprocess.Popen:
        """Run `argv` in namespace `ns` (`ip netns exec` execs it: the pid is the command's)."""
        log = open(self.folder / f"{label}.log", "ab")
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=log, stderr=subprocess.STDOUT,
                             env=self.env, cwd=self.folder)
        log.close()
        self.procs[label] = p
        return p

    def log(self, label: str) -> str:
        path = self.folder / f"{label}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def wait(self, labels: list[str], timeout: float) -> dict[str, int]:
        end = time.monotonic() + timeout
        codes = {}
        for label in labels:
            try:
                codes[label] = self.procs[label].wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                logs = "\n".join(f"----- {k}\n{self.log(k)}" for k in labels)
                raise RuntimeError(f"{label} did not finish within {timeout:.0f} s\n{logs}") from None
        return codes

    def stop_relays(self) -> dict[str, dict]:
        """SIGTERM the relays and read their counters and logs."""
        for label in self.relays:
            p = self.procs[label]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        self.wait(list(self.relays), 30)
        return {label: json.loads(path.read_text()) for label, path in self.relays.items()}

    # ------------------------------------------------------------------ counters

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes and packets through each veth (layer 2: payload + TCP/IP/Ethernet headers +
        ACKs) and what each tbf dropped, per client."""
        out = {}
        for i, link in enumerate(self.links, start=1):
            ends = {"client": (self.client_ns[link.name], "wan0"), "server": (self.server_ns, f"c{i}")}
            row = {}
            for side, (ns, dev) in ends.items():
                s = json.loads(_sh("ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev))[0]["stats64"]
                q = json.loads(_sh("ip", "netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", dev))[0]
                row.update({f"{side}_tx_bytes": s["tx"]["bytes"], f"{side}_tx_packets": s["tx"]["packets"],
                            f"{side}_tbf_drops": q.get("drops", 0)})
            out[link.name] = row
        return out

    def describe(self) -> dict:
        return {"links": [asdict(link) for link in self.links],
                "tbf_burst_bytes": {link.name: {"up": tbf_burst_bytes(link.up_mbps), "down": tbf_burst_bytes(link.down_mbps)} for link in self.links},
                "namespaces": self.namespaces}

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Kill every process still running, then delete the namespaces (links and qdiscs go with them)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
        for p in self.procs.values():
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.namespaces = []
