"""What federated LoRA adds to the server core (skyfed.federation.server.ServerCore).

Built only when a LoRA run has per-client ranks or exact aggregation (`lora_server`):

* per-client ranks (HetLoRA, skyfed.lora_ranks): each rank has its own spec and its own
  `Downlink` (delta downlink state per rank); a client's task carries the truncated
  adapter, its update is decoded at its rank and zero-padded to the server's rank;
* exact aggregation (FedEx-LoRA, skyfed.lora_exact): each accepted update's factors are
  kept for the round (an adapter's size each), and after the strategy publishes, the
  residual s (sum_i w_i B_i A_i - B A) is folded into the server model's base weights,
  logged, and sent to each client with its next task (`BaseSync`, `bundle`).

Every round in which factors were observed also reports the size of the residual
against the round's exact update (metrics.jsonl "lora": "gap"); `measure_only` reports it
without folding (bench/lora_exact.py measures plain factor averaging with it).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from skyfed.compression.channel import Downlink, fp32_bytes
from skyfed.compression.wire import TensorSpec
from skyfed.federation.messages import Update
from skyfed.lora_exact import BaseSync, apply_entries, bundle, entry_product, lora_layers, residual_entry
from skyfed.lora_ranks import client_ranks, pad_delta, truncate, truncated_spec

Params = dict[str, torch.Tensor]


class LoraServer:
    def __init__(
        self,
        model: torch.nn.Module,
        spec: dict[str, TensorSpec],
        strategy: Any,
        compression: Any,
        clients: list[str],
        ranks: dict[str, int] | None = None,
        exact: bool = False,
        measure_only: bool = False,
    ):
        self.model = model
        self.strategy = strategy
        self.layers = lora_layers(model)
        self.ranks = dict(ranks or {})
        self.specs = {r: truncated_spec(spec, r) for r in set(self.ranks.values())}
        self.downlinks = {r: Downlink.from_config(compression, s) for r, s in self.specs.items()}
        self.full_spec = spec
        self.exact = exact
        self.measure = exact or measure_only
        self.sync = BaseSync(model, self.layers, clients) if exact else None
        self.captured: list[tuple[float, Params]] = []
        self.start: Params | None = None  # the global adapter the round's updates started from
        self.window: dict[str, Any] = {}

    # ------------------------------------------------------------ per-client ranks

    def spec_for(self, client: str, default: dict[str, TensorSpec]) -> dict[str, TensorSpec]:
        r = self.ranks.get(client)
        return default if r is None else self.specs[r]

    def fp32_bytes(self, client: str) -> int:
        return fp32_bytes(self.spec_for(client, self.full_spec))

    def task_payload(self, client: str, downlink: Downlink, params: Params, round: int, version: int) -> bytes:
        """The client's task payload: its rank's adapter through its rank's downlink, and
        with exact aggregation the base weights' change it has not applied yet."""
        r = self.ranks.get(client)
        if r is not None:
            downlink, params = self.downlinks[r], truncate(params, r)
        payload = downlink.payload_for(client, params, round, version)
        if self.sync is None:
            return payload
        tensors, fields = self.sync.message(client, version)
        out = bundle(payload, tensors, fields)
        self.window.setdefault("base_bytes_down", {})[client] = len(out) - len(payload)
        self.window.setdefault("base_kind", {})[client] = fields["base_kind"]
        return out

    def pad(self, client: str, delta: Params, global_params: Params) -> Params:
        r = self.ranks.get(client)
        return delta if r is None else pad_delta(delta, global_params, r)

    def settle(self, sent: list[str], answered: list[str]) -> None:
        for dl in self.downlinks.values():
            dl.settle(sent, answered)
        if self.sync is not None:
            self.sync.settle(sent, answered)

    # ------------------------------------------------------------ exact aggregation

    def begin(self) -> None:
        """A new aggregate: forget the factors of a round that did not publish."""
        self.captured, self.start = [], None

    def observe(self, update: Update, global_params: Params) -> None:
        """Keep an accepted update's factors (global - delta) before it is folded."""
        if not self.measure:
            return
        if self.start is None:
            self.start = global_params
        weight = self.strategy.weight(update) if hasattr(self.strategy, "weight") else float(update.num_tokens)
        names = [n for l in self.layers for n in (l.a, l.b)]
        self.captured.append((float(weight), {n: global_params[n] - update.delta[n] for n in names}))

    @torch.no_grad()
    def published(self, params: Params, version: int) -> None:
        """After the strategy's step: the residual of each layer, folded into the base
        weights (exact) and logged for the clients; the gap goes to the metrics line."""
        captured, start = self.captured, self.start
        self.begin()
        if not captured or not self.measure:
            return
        total = sum(w for w, _ in captured)
        clients = [(w / total, f) for w, f in captured]
        entries, gap2, update2 = {}, 0.0, 0.0
        for layer in self.layers:
            entry = residual_entry(layer, clients, params)
            r = entry_product(entry)
            moved = layer.scaling * (params[layer.b] @ params[layer.a] - start[layer.b] @ start[layer.a])
            gap2 += float(r.double().pow(2).sum())
            update2 += float((r + moved).double().pow(2).sum())
            entries[layer.module] = entry
        self.window["gap"] = math.sqrt(gap2 / update2) if update2 > 0 else 0.0
        if self.sync is not None:
            apply_entries(self.model, {l.module: l for l in self.layers}, entries)
            self.sync.record(version, entries)

    # ------------------------------------------------------------ records and state

    def window_metrics(self) -> dict[str, Any]:
        """This window's fields for metrics.jsonl ("lora"), then forgotten."""
        out, self.window = self.window, {}
        if "base_bytes_down" in out:
            out["base_bytes_down_total"] = sum(out["base_bytes_down"].values())
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"downlinks": {r: dl.state_dict() for r, dl in self.downlinks.items()},
                "sync": self.sync.state_dict() if self.sync is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for r, s in state["downlinks"].items():
            self.downlinks[r].load_state_dict(s)
        if self.sync is not None and state.get("sync") is not None:
            self.sync.load_state_dict(state["sync"])


def lora_server(cfg: Any, model: torch.nn.Module, spec: dict[str, TensorSpec], strategy: Any) -> LoraServer | None:
    """The LoRA hook for a run with per-client ranks or exact aggregation, else None."""
    peft = cfg.model.peft
    if peft is None:
        return None
    ranks, exact = client_ranks(cfg), peft.aggregation == "exact"
    if not ranks and not exact:
        return None
    names = [c.name for c in cfg.federation.clients]
    return LoraServer(model, spec, strategy, cfg.compression, names, ranks, exact)
