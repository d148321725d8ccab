"""The server half of secure aggregation over a skyfed `Transport` (any runtime).

One secure round, as the round loop drives it:

    coord = SecAggCoordinator(spec, settings, max_tokens=steps * batch * seq)
    options = coord.setup(transport, selected, round, version)   # keys, then shares
    for name, extra in options.items():                          # the training tasks
        transport.send(name, TrainTask(round, version, model_payload, steps, {**strategy_options, **extra}))
    ... for each arriving result: coord.accept(result)           # folds the masked vector
    outcome = coord.finish(transport, round, version)            # unmask; SecAggError = refuse the round
    strategy.aggregate(params, [outcome.update], round)

Control messages are ordinary tasks and results (`participant.py`), so the simulated
network times and bills them like updates, and the gRPC front door checks them like
updates. Each stage waits for the expected clients up to `stage_timeout_s` on the
transport's clock; a client that does not answer, answers with an error, or sends a
message the protocol refuses drops out of the session (one log line; the message is
released with the reason, which the gRPC servicer tells the client). Relayed keys and
shares are filed under `ClientResult.client`, the identity the transport
authenticated; a message whose header or body names another client is refused.

`bytes_up` / `bytes_down` count each client's control bytes of the session: the framed
keys, shares and unmask messages both ways, and the shares bundle that rides its
training task's options (as JSON); the round loop adds them to the round's bytes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from skyfed.compression.wire import TensorSpec
from skyfed.errors import SecAggError, WireFormatError
from skyfed.federation.messages import ClientResult, TrainTask, Update
from skyfed.federation.transport import Transport
from skyfed.security.secagg.encoding import SecAggSettings, UpdateEncoder
from skyfed.security.secagg.messages import pack_control, unpack_control
from skyfed.security.secagg.payload import unpack_masked
from skyfed.security.secagg.server import SecAggServer

log = logging.getLogger(__name__)


@dataclass
class SecureOutcome:
    update: Update  # the token-weighted mean as one update, for the strategy
    survivors: list[str]
    dropped: list[str]
    tokens: dict[str, int]  # each survivor's public token count (its weight)


class SecAggCoordinator:
    def __init__(self, spec: dict[str, TensorSpec], settings: SecAggSettings, max_tokens: int,
                 stage_timeout_s: float | None = None, max_update_bytes: int | None = None,
                 on_other: Any = None):
        """`on_other(result)`: where a result that is not this stage's goes (the
        asynchronous loop keeps it for later); None ignores it (logged, released)."""
        self.spec = spec
        self.settings = settings
        self.max_tokens = max_tokens
        self.stage_timeout_s = stage_timeout_s
        self.max_update_bytes = max_update_bytes
        self.on_other = on_other
        self.server: SecAggServer | None = None
        self.encoder: UpdateEncoder | None = None
        self._results: dict[str, ClientResult] = {}
        # the session's control bytes per client (keys, shares, the shares bundle, unmask)
        self.bytes_up: dict[str, int] = {}
        self.bytes_down: dict[str, int] = {}

    def _exchange(self, transport: Transport, clients: list[str], stage: str, round: int, version: int,
                  body_for: Any, fold: Any) -> list[str]:
        """Send one control task to each client and fold each answer that arrives in time
        (`fold(name, body)`); the clients whose answer was folded. An answer that is
        malformed or that `fold` refuses (SecAggError) drops its client: one log line, and
        the transport tells the client why (`release`)."""
        for name in clients:
            payload = pack_control(stage, round, body_for(name))
            transport.send(name, TrainTask(round, version, payload, 0, {"secagg": {"stage": stage}}))
            self.bytes_down[name] = self.bytes_down.get(name, 0) + len(payload)
        waiting, folded = set(clients), []
        deadline = None if self.stage_timeout_s is None else transport.now() + self.stage_timeout_s
        while waiting:
            left = None if deadline is None else deadline - transport.now()
            if left is not None and left <= 0:
                break
            result = transport.receive(left)
            if result is None:
                break
            refusal = None
            if self.on_other is not None and (result.client not in waiting or result.round != round):
                self.on_other(result)  # another session's (or a training) result: kept, not released
                continue
            try:
                if result.client not in waiting or result.round != round:
                    log.warning("secure aggregation: ignored a result from %s (round %d) during the %s stage",
                                result.client, result.round, stage)
                    refusal = f"the round {round} {stage} stage is not waiting for it"
                    continue
                waiting.discard(result.client)
                if result.payload is not None:
                    self.bytes_up[result.client] = self.bytes_up.get(result.client, 0) + len(result.payload)
                if result.error is not None or result.payload is None:
                    log.warning("secure aggregation: %s dropped out at the %s stage: %s", result.client, stage, result.error)
                    continue
                # the sender is the identity the transport authenticated; the message must say so too
                fold(result.client, unpack_control(result.payload, stage, round, self.max_update_bytes, result.client))
                folded.append(result.client)
            except SecAggError as exc:
                refusal = str(exc)
                log.warning("secure aggregation: refused the round %d %s answer of %s: %s", round, stage, result.client, exc)
            finally:
                result.payload = None
                transport.release(result, refusal)
        if waiting:
            log.warning("secure aggregation: %s did not answer the round %d %s stage", sorted(waiting), round, stage)
        return folded

    def setup(self, transport: Transport, clients: list[str], round: int, version: int) -> dict[str, dict[str, Any]]:
        """Keys and shares; the options to merge into each remaining client's training task.
        Raises SecAggError (nobody trains; the round leaves the model unchanged) when too
        few clients complete the set-up."""
        self.encoder = UpdateEncoder(self.spec, self.settings, len(clients))
        self.server = server = SecAggServer(self.encoder.params(), round=round)
        self._results = {}
        self.bytes_up, self.bytes_down = {}, {}
        try:
            self._exchange(transport, clients, "keys", round, version, lambda _: {"clients": len(clients)}, server.receive_keys)
            roster = server.roster()
            self._exchange(transport, server_names(roster), "shares", round, version, lambda _: roster, server.receive_shares)
            sharers = server.close_sharing()
        except SecAggError:
            self.server = None  # no session this round
            raise
        options = {}
        for name in sharers:
            options[name] = {"secagg": {"stage": "mask", "bundle": server.bundle_for(name), "max_tokens": self.max_tokens}}
            # the shares addressed to this client ride its training task's options: control bytes too
            self.bytes_down[name] = self.bytes_down.get(name, 0) + option_bytes(options[name])
        return options

    def accept(self, result: ClientResult) -> bool:
        """Fold one masked update into the running sum; False (logged) when it is refused."""
        assert self.server is not None
        if result.error is not None or result.payload is None:
            return False
        try:
            masked, weight, _ = unpack_masked(result.payload, self.server.params, self.server.session, self.max_update_bytes)
            self.server.add_masked(result.client, masked, weight)
        except (SecAggError, WireFormatError) as exc:
            log.warning("secure aggregation: refused the masked update of %s: %s", result.client, exc)
            return False
        self._results[result.client] = ClientResult(result.client, result.round, result.base_version, None,
                                                    result.num_tokens, result.train_loss)
        return True

    def finish(self, transport: Transport, round: int, version: int) -> SecureOutcome:
        """Unmask with the survivors' shares; the mean update. Raises SecAggError (the
        round must then leave the model unchanged) when too few survived."""
        server, encoder = self.server, self.encoder
        assert server is not None and encoder is not None
        request = server.unmask_request()
        self._exchange(transport, request["survivors"], "unmask", round, version, lambda _: request, server.receive_unmask)
        result = server.finish()
        mean = encoder.decode_mean(result.ring_sum, result.total_weight)
        kept = [self._results[n] for n in result.survivors]
        tokens = sum(r.num_tokens for r in kept)
        loss = sum(r.train_loss * max(r.num_tokens, 1) for r in kept) / sum(max(r.num_tokens, 1) for r in kept)
        update = Update("secagg", round, version, mean, tokens, loss)
        return SecureOutcome(update, result.survivors, result.dropped, {r.client: r.num_tokens for r in kept})


def server_names(roster: dict[str, Any]) -> list[str]:
    return sorted(roster["clients"])


def option_bytes(options: dict[str, Any]) -> int:
    """The bytes of a task's options as the gRPC task header carries them (JSON)."""
    return len(json.dumps(options).encode())
