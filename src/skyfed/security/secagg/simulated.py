"""Secure aggregation inside one process: every stage of the protocol, with real keys,
shares, masks and bytes, run over updates the caller already holds.

This is the short route, for benchmarks (bench/secagg.py) and for a simulation that
does not send the control messages through its transport: where a round's arrived
updates would go to the strategy, pass them through `secure_mean` and hand the
strategy the one `Update` it returns (its delta is the token-weighted mean recovered
from the ring sum, its tokens the survivors' total)::

    updates = [secure_mean(updates, selected, spec, settings_from_config(cfg.security.secagg), round).update]

The route that runs the protocol exactly as a deployment does, with control messages
over the transport, is `coordinator.SecAggCoordinator` with `participant.SecAggParticipant`.
Clients in `participants` without an update are dropouts after set-up: the survivors'
shares remove their masks. Too many dropouts raise `SecAggError`, and the caller must
leave the model unchanged.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skyfed.compression.wire import TensorSpec
from skyfed.errors import SecAggError
from skyfed.federation.messages import Update
from skyfed.security.secagg.client import SecAggClient
from skyfed.security.secagg.encoding import SecAggSettings, UpdateEncoder
from skyfed.security.secagg.server import SecAggServer


def settings_from_config(section: Any) -> SecAggSettings:
    """`security.secagg` (pydantic) -> SecAggSettings."""
    return SecAggSettings(section.ring_bits, section.threshold, section.neighbours, section.clip, section.bound,
                          section.rounding)


def message_bytes(msg: dict[str, Any]) -> int:
    """The size of a control message as JSON (how it rides TrainTask.options / ClientResult.meta)."""
    return len(json.dumps(msg, separators=(",", ":")).encode())


@dataclass
class SecureRound:
    update: Update | None  # the mean as one update (None when there was nothing to sum)
    survivors: list[str]
    dropped: list[str]
    bytes_up: dict[str, int] = field(default_factory=dict)  # per client, all stages (masked vector included)
    bytes_down: dict[str, int] = field(default_factory=dict)  # per client: roster, shares bundle, unmask request
    masked_bytes: int = 0  # one masked vector
    client_s: dict[str, float] = field(default_factory=dict)  # per client: protocol CPU time
    server_s: float = 0.0  # the server's protocol time (folding, rebuilding, unmasking)

    def metrics(self) -> dict[str, Any]:
        return {"secagg_survivors": len(self.survivors), "secagg_dropped": len(self.dropped),
                "secagg_bytes_up": sum(self.bytes_up.values()), "secagg_bytes_down": sum(self.bytes_down.values()),
                "secagg_server_s": round(self.server_s, 4),
                "secagg_client_s_max": round(max(self.client_s.values(), default=0.0), 4)}


def relative_weights(tokens: dict[str, int], use_tokens: bool = True) -> dict[str, float]:
    """Public weights n_i / n_max in (0, 1] (or all 1 without token weighting)."""
    if not use_tokens:
        return {name: 1.0 for name in tokens}
    top = max(tokens.values(), default=0)
    if top <= 0:
        raise SecAggError("secure aggregation: token weights need at least one client with tokens")
    return {name: max(n, 1) / top for name, n in tokens.items()}


def secure_mean(updates: list[Update], participants: list[str], spec: dict[str, TensorSpec],
                settings: SecAggSettings, round: int, use_tokens: bool = True, seed: int = 0) -> SecureRound:
    """Run the whole protocol among `participants` over the arrived `updates`."""
    arrived = {u.client: u for u in updates}
    if not set(arrived) <= set(participants):
        raise SecAggError(f"secure aggregation: updates from clients outside the session: {sorted(set(arrived) - set(participants))}")
    encoder = UpdateEncoder(spec, settings, len(participants))
    params = encoder.params()
    server = SecAggServer(params, round=round)
    up = {name: 0 for name in participants}
    down = {name: 0 for name in participants}
    cpu = {name: 0.0 for name in participants}
    clients: dict[str, SecAggClient] = {}
    server_s = 0.0

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        cpu[name] += time.perf_counter() - t0
        return out

    for name in participants:
        clients[name] = SecAggClient(name, params)
        msg = timed(name, clients[name].advertise)
        up[name] += message_bytes(msg)
        server.receive_keys(name, msg)
    roster = server.roster()
    for name in participants:
        down[name] += message_bytes(roster)
        msg = timed(name, clients[name].share_keys, roster)
        up[name] += message_bytes(msg)
        server.receive_shares(name, msg)
    server.close_sharing()
    weights = relative_weights({n: u.num_tokens for n, u in arrived.items()}, use_tokens)
    masked_bytes = 0
    for name in participants:
        bundle = server.bundle_for(name)
        down[name] += message_bytes(bundle)
        if name not in arrived:
            continue  # dropped after set-up: its masked vector never comes
        rng = np.random.default_rng([seed, round, participants.index(name)])
        ring = timed(name, encoder.encode, arrived[name].delta, weights[name], rng)
        masked = timed(name, clients[name].mask, bundle, ring)
        masked_bytes = len(masked)
        up[name] += masked_bytes
        t0 = time.perf_counter()
        server.add_masked(name, masked, weights[name])
        server_s += time.perf_counter() - t0
    request = server.unmask_request()
    for name in request["survivors"]:
        down[name] += message_bytes(request)
        msg = timed(name, clients[name].unmask, request)
        up[name] += message_bytes(msg)
        server.receive_unmask(name, msg)
    t0 = time.perf_counter()
    result = server.finish()
    mean = encoder.decode_mean(result.ring_sum, result.total_weight)
    server_s += time.perf_counter() - t0
    kept = [arrived[n] for n in result.survivors]
    tokens = sum(u.num_tokens for u in kept)
    loss = sum(u.train_loss * max(u.num_tokens, 1) for u in kept) / sum(max(u.num_tokens, 1) for u in kept)
    update = Update(
        client="secagg", round=round, base_version=max(u.base_version for u in kept), delta=mean,
        num_tokens=tokens, train_loss=loss if math.isfinite(loss) else float("nan"),
        bytes_up=sum(up[n] for n in result.survivors), staleness=max(u.staleness for u in kept),
    )
    return SecureRound(update, result.survivors, result.dropped, up, down, masked_bytes, cpu, server_s)
