"""Cloud profiles, the simulated network and clock model, and the egress bill.

A `CloudProfile` says how fast a cloud computes, how fast and how far its network is,
what a GB leaving it costs and how often it is unavailable. `CloudNetwork` turns the
profiles of an experiment's clients (and of the server's cloud) into per-transfer
times, per-client compute times and an egress ledger; the simulated transport
(`skyfed.runtime.inprocess`) uses it to run a clock. See docs/clouds.md.

Prices are public list prices for internet egress (the first pricing tier, USD per
GB, 1 GB = 1e9 bytes), as listed on the providers' pricing pages below (cross-checked in
November 2026 against public pricing summaries; re-check before you budget):

- aws   $0.09/GB  "Data Transfer OUT From Amazon EC2 To Internet, first 10 TB / month"
        (the first 100 GB/month are free), https://aws.amazon.com/ec2/pricing/on-demand/
- gcp   $0.12/GB  Premium Tier internet egress, 0-1 TiB / month, North America / Europe
        (Google bills per GiB), https://cloud.google.com/vpc/network-pricing
- azure $0.087/GB internet egress routed over the Microsoft network, 100 GB - 10 TB / month
        (the first 100 GB/month are free), https://azure.microsoft.com/pricing/details/bandwidth/
- onprem $0: your own uplink has no per-GB price.

Free tiers and volume discounts are not modelled: the bill is bytes x first-tier price.
Compute speeds, bandwidths and round-trip times of the built-in profiles are
ASSUMPTIONS (typical figures for a GPU VM talking over the public internet), not
measurements: override them in the experiment's `clouds.profiles` section.
"""

from __future__ import annotations

import logging
import re
import zlib
from typing import Any
from dataclasses import dataclass, field, replace

import numpy as np

from skyfed.errors import ConfigError

log = logging.getLogger(__name__)

GB = 1e9  # bytes in a billed GB


@dataclass(frozen=True)
class CloudProfile:
    """One cloud (or on-prem site) as seen from the federation server."""

    name: str
    speed: float = 1.0  # compute speed relative to the reference accelerator (see clouds.reference_*)
    tokens_per_s: float | None = None  # measured training throughput for this model; overrides speed
    uplink_mbps: float = 1000.0  # megabits per second leaving the cloud (assumption)
    downlink_mbps: float = 1000.0  # megabits per second entering the cloud (assumption)
    rtt_ms: float = 50.0  # round trip to the server's cloud (assumption)
    egress_usd_per_gb: float = 0.0  # internet egress list price, first tier
    unavailability: float = 0.0  # probability of being down in a given round


# Egress prices: see the module docstring for sources. Everything else: assumptions.
BUILTIN_PROFILES: dict[str, CloudProfile] = {
    "aws": CloudProfile("aws", speed=1.0, uplink_mbps=1000, downlink_mbps=1000, rtt_ms=20, egress_usd_per_gb=0.09),
    "gcp": CloudProfile("gcp", speed=1.0, uplink_mbps=1000, downlink_mbps=1000, rtt_ms=40, egress_usd_per_gb=0.12),
    "azure": CloudProfile("azure", speed=0.8, uplink_mbps=500, downlink_mbps=500, rtt_ms=60, egress_usd_per_gb=0.087),
    "onprem": CloudProfile("onprem", speed=0.25, uplink_mbps=100, downlink_mbps=300, rtt_ms=30, egress_usd_per_gb=0.0),
}

_FIELDS = ("speed", "tokens_per_s", "uplink_mbps", "downlink_mbps", "rtt_ms", "egress_usd_per_gb", "unavailability")


def resolve_profiles(user: dict[str, dict]) -> dict[str, CloudProfile]:
    """Built-in profiles updated by the user's `clouds.profiles` (a dict of field dicts).

    A user entry named like a built-in overrides its fields; another name starts from
    the built-in named in its `base`, or from the neutral defaults of `CloudProfile`."""
    profiles = dict(BUILTIN_PROFILES)
    for name, spec in user.items():
        spec = {k: v for k, v in spec.items() if v is not None}
        base_name = spec.pop("base", None)
        if base_name is not None and base_name not in BUILTIN_PROFILES:
            raise ConfigError(
                f"clouds.profiles.{name}.base: unknown built-in profile {base_name!r}; "
                f"available: {', '.join(BUILTIN_PROFILES)}"
            )
        base = BUILTIN_PROFILES.get(base_name or name, CloudProfile(name))
        unknown = set(spec) - set(_FIELDS)
        if unknown:
            raise ConfigError(f"clouds.profiles.{name}: unknown field(s) {sorted(unknown)}")
        profiles[name] = replace(base, name=name, **spec)
    return profiles


@dataclass(frozen=True)
class Outage:
    """`target` (a client or a cloud) is down in rounds `first`..`last` (inclusive, 0-based
    as in metrics.jsonl)."""

    target: str
    first: int
    last: int

    def covers(self, client: str, cloud: str, round: int) -> bool:
        return self.target in (client, cloud) and self.first <= round <= self.last


_OUTAGE = re.compile(r"^\s*([^:\s]+)\s*:\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def parse_outage(item: str | dict) -> Outage:
    """`"gcp:5-7"`, `"gcp:5"` or `{target: gcp, rounds: [5, 7]}` (rounds 5, 6 and 7)."""
    if isinstance(item, str):
        m = _OUTAGE.match(item)
        if not m:
            raise ConfigError(f"clouds.outages: {item!r} is not TARGET:FIRST[-LAST], e.g. 'gcp:5-7'")
        first = int(m.group(2))
        last = int(m.group(3)) if m.group(3) is not None else first
        target = m.group(1)
    else:
        target, rounds = item["target"], item["rounds"]
        if isinstance(rounds, int):
            rounds = [rounds, rounds]
        if len(rounds) != 2:
            raise ConfigError(f"clouds.outages: rounds of {target!r} must be FIRST or [FIRST, LAST], got {rounds}")
        first, last = int(rounds[0]), int(rounds[1])
    if last < first:
        raise ConfigError(f"clouds.outages: {target!r} rounds {first}-{last}: the last round is before the first")
    return Outage(target, first, last)


@dataclass
class Timing:
    """Simulated seconds of one client's task: download + compute + upload."""

    download_s: float
    compute_s: float
    upload_s: float
    start_s: float  # when the client started (it may have been busy with an earlier task)

    @property
    def total_s(self) -> float:
        return self.download_s + self.compute_s + self.upload_s

    def as_dict(self) -> dict[str, float]:
        return {
            "download_s": self.download_s, "compute_s": self.compute_s, "upload_s": self.upload_s,
            "total_s": self.total_s, "start_s": self.start_s, "arrival_s": self.start_s + self.total_s,
        }


@dataclass
class CloudNetwork:
    """The clouds of one experiment: who runs where, and what each transfer costs in time and money.

    Time model (per task): download = RTT/2 + bytes*8 / min(server uplink, client downlink);
    compute = tokens / throughput; upload = RTT/2 + bytes*8 / min(client uplink, server downlink),
    with the client's RTT to the server. Transfers do not contend for bandwidth.
    Throughput = `tokens_per_s` of the profile if given, else `speed` x the reference
    throughput (`reference_tokens_per_s`, or `reference_flops` / (6 x parameters), the
    usual training-FLOPs estimate of Kaplan et al. 2020, "Scaling Laws for Neural
    Language Models").

    Egress: bytes leaving a cloud are billed at its price; a client's upload to its
    cloud's account, the model sent to a client to the server cloud's account. A client in
    the server's own cloud is assumed to be in the same region and is not billed
    (`same_cloud_free`).
    """

    client_cloud: dict[str, str]
    profiles: dict[str, CloudProfile]
    server_cloud: str
    num_params: int = 0
    reference_flops: float = 1e14
    reference_tokens_per_s: float | None = None
    same_cloud_free: bool = True
    outages: list[Outage] = field(default_factory=list)
    seed: int = 0
    egress_bytes: dict[str, int] = field(default_factory=dict)  # cumulative, per cloud

    def __post_init__(self) -> None:
        for name in [self.server_cloud, *self.client_cloud.values()]:
            if name not in self.profiles:
                raise ConfigError(
                    f"unknown cloud {name!r}: define it under clouds.profiles or use one of {', '.join(sorted(self.profiles))}"
                )
        known = set(self.client_cloud) | set(self.client_cloud.values())
        for o in self.outages:
            if o.target not in known:
                raise ConfigError(f"clouds.outages: {o.target!r} is neither a client nor a cloud of this experiment")
        self.egress_bytes = {c: self.egress_bytes.get(c, 0) for c in self.clouds()}

    def clouds(self) -> list[str]:
        """The clouds in play: the server's, then the clients' in configuration order."""
        out = [self.server_cloud]
        for c in self.client_cloud.values():
            if c not in out:
                out.append(c)
        return out

    def profile(self, client: str) -> CloudProfile:
        return self.profiles[self.client_cloud[client]]

    @property
    def server(self) -> CloudProfile:
        return self.profiles[self.server_cloud]

    # ---------------------------------------------------------------- time

    def throughput(self, client: str) -> float:
        p = self.profile(client)
        if p.tokens_per_s is not None:
            return p.tokens_per_s
        if self.reference_tokens_per_s is not None:
            return p.speed * self.reference_tokens_per_s
        return p.speed * self.reference_flops / (6.0 * max(1, self.num_params))

    def download_s(self, client: str, nbytes: int) -> float:
        p = self.profile(client)
        mbps = min(self.server.uplink_mbps, p.downlink_mbps)
        return p.rtt_ms / 2000.0 + nbytes * 8 / (mbps * 1e6)

    def upload_s(self, client: str, nbytes: int) -> float:
        p = self.profile(client)
        mbps = min(p.uplink_mbps, self.server.downlink_mbps)
        return p.rtt_ms / 2000.0 + nbytes * 8 / (mbps * 1e6)

    def compute_s(self, client: str, tokens: int) -> float:
        return tokens / self.throughput(client)

    # ---------------------------------------------------------------- failures

    def unavailable_reason(self, client: str, round: int) -> str | None:
        """Why `client` is down in `round` (a scripted outage or its profile's probability), or None."""
        cloud = self.client_cloud[client]
        for o in self.outages:
            if o.covers(client, cloud, round):
                return f"scripted outage of {o.target} in rounds {o.first}-{o.last}"
        p = self.profile(client).unavailability
        if p > 0:
            # One draw per (seed, round, cloud): every client of a cloud goes down together.
            u = np.random.default_rng([self.seed, round, zlib.crc32(cloud.encode())]).random()
            if u < p:
                return f"{cloud} unavailable (probability {p:g})"
        return None

    # ---------------------------------------------------------------- money

    def bill_download(self, client: str, nbytes: int) -> None:
        """The server sends `nbytes` to `client`: egress of the server's cloud."""
        if not (self.same_cloud_free and self.client_cloud[client] == self.server_cloud):
            self.egress_bytes[self.server_cloud] += nbytes

    def bill_upload(self, client: str, nbytes: int) -> None:
        """`client` sends `nbytes` to the server: egress of the client's cloud."""
        cloud = self.client_cloud[client]
        if not (self.same_cloud_free and cloud == self.server_cloud):
            self.egress_bytes[cloud] += nbytes

    def state_dict(self) -> dict[str, Any]:
        return {"egress_bytes": dict(self.egress_bytes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.egress_bytes.update({c: int(n) for c, n in state["egress_bytes"].items() if c in self.egress_bytes})

    def egress_cost_usd(self) -> dict[str, float]:
        """Cumulative USD per cloud and `total`: bytes x price per GB / 1e9."""
        costs = {c: n * self.profiles[c].egress_usd_per_gb / GB for c, n in self.egress_bytes.items()}
        costs["total"] = sum(costs.values())
        return costs


def network_from_config(cfg, num_params: int) -> CloudNetwork:
    """The `CloudNetwork` of an `ExperimentConfig` (its `clouds` and `federation.clients`)."""
    c = cfg.clouds
    profiles = resolve_profiles({name: spec.model_dump() for name, spec in c.profiles.items()})
    return CloudNetwork(
        client_cloud={s.name: (s.cloud or s.name) for s in cfg.federation.clients},
        profiles=profiles,
        server_cloud=c.server,
        num_params=num_params,
        reference_flops=c.reference_tflops * 1e12,
        reference_tokens_per_s=c.reference_tokens_per_s,
        same_cloud_free=c.same_cloud_free,
        outages=[parse_outage(o if isinstance(o, str) else o.model_dump()) for o in c.outages],
        seed=cfg.seed,
    )

