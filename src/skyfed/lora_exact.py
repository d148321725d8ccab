"""Exact aggregation of LoRA adapters: fold the factor-averaging error into the base weights.

FedEx-LoRA: Singhal, Ponkshe and Vepakomma 2024, "FedEx-LoRA: Exact Aggregation for
Federated and Efficient Fine-Tuning of Foundation Models", arXiv:2410.09432.

FedAvg on a LoRA adapter averages A and B separately, and mean(B_i) mean(A_i) is not
mean(B_i A_i). With `model.peft.aggregation: exact` the server averages A and B as
usual and adds the residual

    R = s * (sum_i w_i B_i A_i - B A),   s = alpha / r,  (B, A) = the published adapter

to the frozen base weight W of each adapted layer, so that the new effective weight
W + R + s B A equals sum_i w_i (W + s B_i A_i), the token-weighted mean of the clients'
effective weights. FedEx-LoRA was chosen over FLoRA's stacking (Wang et al. 2024,
arXiv:2409.05976) because the adapter keeps its rank and its size on the wire, and
clients keep training the averaged adapter; FLoRA re-initialises the adapter every round
and also changes the base weights.

The base weights therefore change on the server, and every client must apply the same
change before it trains. R is sent in factored form: R = Bs As with
Bs = s [w_1 B_1 | ... | w_k B_k | -B] and As = [A_1; ...; A_k; A], rank (k + 1) r, which
is (k + 1) r (in + out) numbers against in x out for the dense R (sent dense when that is
smaller). The server logs each version's factors (`BaseSync`) and sends a client the
factors of the versions it has not applied, in order, or the targeted base weights
themselves when it does not know what the client holds (a failed round, a restarted
client) or when the factors would be larger. They travel in the task's payload beside
the adapter (`bundle`), so `bytes_down` counts them; they are plain fp32 (the downlink
codecs apply to the adapter only). Server and client apply the same factors with the
same operations, so their base weights stay equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from skyfed.compression.wire import load_blob, pack, read_header, value_error
from skyfed.errors import ConfigError, WireFormatError

Params = dict[str, torch.Tensor]
Entry = dict[str, torch.Tensor]  # one layer's residual: {"B": Bs, "A": As} or {"R": dense}
TASK_KIND = "lora_task"


@dataclass(frozen=True)
class LoraLayerInfo:
    module: str  # the LoRA layer's module path in the PEFT model
    a: str  # the parameter names of its A (r x in) and B (out x r)
    b: str
    scaling: float  # alpha / r of the server's rank
    fan_in_fan_out: bool  # the base weight is stored in x out (transformers' Conv1D)
    shape: tuple[int, ...]  # the base weight's shape

    @property
    def product_shape(self) -> tuple[int, int]:
        """The shape of B A (out x in)."""
        return (self.shape[1], self.shape[0]) if self.fan_in_fan_out else (self.shape[0], self.shape[1])


def lora_layers(model: torch.nn.Module) -> list[LoraLayerInfo]:
    """The LoRA layers of a PEFT model; ConfigError for a kind the exact fold does not handle."""
    from peft.tuners.lora import LoraLayer

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        a, b = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
        base = m.get_base_layer()
        if a not in trainable or b not in trainable or getattr(base, "weight", None) is None or base.weight.dim() != 2:
            raise ConfigError(
                f"model.peft: exact aggregation and per-client ranks handle LoRA on linear layers; "
                f"{name} ({type(base).__name__}) is not one: set model.peft.target_modules"
            )
        out.append(LoraLayerInfo(name, a, b, float(m.scaling["default"]), bool(m.fan_in_fan_out), tuple(base.weight.shape)))
    return out


def base_weight(model: torch.nn.Module, layer: LoraLayerInfo) -> torch.Tensor:
    return model.get_submodule(layer.module).get_base_layer().weight


# ---------------------------------------------------------------- the arithmetic


def residual_entry(layer: LoraLayerInfo, clients: list[tuple[float, Params]], published: Params) -> Entry:
    """The residual s (sum_i w_i B_i A_i - B A) of one layer, as stacked factors (or dense
    when that is smaller). `clients`: (normalized weight, the client's factors)."""
    b_stack = torch.cat([w * f[layer.b] for w, f in clients] + [-published[layer.b]], dim=1) * layer.scaling
    a_stack = torch.cat([f[layer.a] for _, f in clients] + [published[layer.a]], dim=0)
    if b_stack.numel() + a_stack.numel() < math.prod(layer.shape):
        return {"B": b_stack.contiguous(), "A": a_stack.contiguous()}
    return {"R": b_stack @ a_stack}


def entry_product(entry: Entry) -> torch.Tensor:
    """The entry's residual, out x in."""
    return entry["R"] if "R" in entry else entry["B"] @ entry["A"]


def weight_change(layer: LoraLayerInfo, entry: Entry) -> torch.Tensor:
    """The entry's residual laid out as the base weight."""
    product = entry_product(entry)
    return product.T if layer.fan_in_fan_out else product


@torch.no_grad()
def apply_entries(model: torch.nn.Module, layers: dict[str, LoraLayerInfo], entries: dict[str, Entry]) -> None:
    for module, entry in entries.items():
        w = base_weight(model, layers[module])
        w.add_(weight_change(layers[module], entry).to(w.device, w.dtype))


def effective_weight(model: torch.nn.Module, layer: LoraLayerInfo, adapter: Params | None = None) -> torch.Tensor:
    """W + s B A of one layer, laid out as the base weight (fp32, CPU); `adapter` overrides
    the model's own factors (tests and benchmarks)."""
    m = model.get_submodule(layer.module)
    a = adapter[layer.a] if adapter is not None else m.lora_A["default"].weight
    b = adapter[layer.b] if adapter is not None else m.lora_B["default"].weight
    product = layer.scaling * (b.detach().float().cpu() @ a.detach().float().cpu())
    return base_weight(model, layer).detach().float().cpu() + (product.T if layer.fan_in_fan_out else product)


# ---------------------------------------------------------------- the server's log


def _numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


class BaseSync:
    """The server's record of the residuals folded into its base weights (by model
    version) and of the base version each client holds; builds each client's message."""

    def __init__(self, model: torch.nn.Module, layers: list[LoraLayerInfo], clients: list[str]):
        self.model = model
        self.layers = {l.module: l for l in layers}
        self.clients = list(clients)
        self.log: dict[int, dict[str, Entry]] = {}
        self.held: dict[str, int] = {}  # client -> base version it holds, as far as the server knows
        self.met: set[str] = set()
        self.dense_numel = sum(math.prod(l.shape) for l in layers)

    def record(self, version: int, entries: dict[str, Entry]) -> None:
        self.log[version] = entries
        self._trim()

    def message(self, client: str, version: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, header fields) that bring `client`'s base weights to `version`: nothing,
        the factors of the versions it lacks ("delta"), or the base weights ("absolute")."""
        held = self.held.get(client) if client in self.met else 0  # a new client holds the pretrained base
        self.met.add(client)
        self.held[client] = version  # as the downlink does: forgotten again if the client fails (settle)
        if held == version:
            return {}, {"base_kind": "none", "base_to": version}
        missing = range(held + 1, version + 1) if held is not None else range(0)
        if held is not None and all(v in self.log for v in missing):
            tensors = {f"v{v}/{m}/{k}": t for v in missing for m, e in self.log[v].items() for k, t in e.items()}
            if _numel(tensors.values()) < self.dense_numel:
                return tensors, {"base_kind": "delta", "base_from": held, "base_to": version}
        tensors = {f"{m}/W": base_weight(self.model, l).detach().to("cpu", torch.float32).contiguous()
                   for m, l in self.layers.items()}
        return tensors, {"base_kind": "absolute", "base_to": version}

    def settle(self, sent: list[str], answered: list[str]) -> None:
        """Clients sent a task that did not answer hold an unknown base: the base weights next time."""
        for client in set(sent) - set(answered):
            self.held.pop(client, None)
        self._trim()

    def _trim(self) -> None:
        """Keep the versions a known client may still need, and at most the dense size."""
        floors = [self.held[c] for c in self.held] + ([0] if any(c not in self.met for c in self.clients) else [])
        floor = min(floors, default=max(self.log, default=0))
        self.log = {v: e for v, e in self.log.items() if v > floor}
        while self.log and _numel(t for e in self.log.values() for d in e.values() for t in d.values()) > self.dense_numel:
            del self.log[min(self.log)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "log": self.log, "held": dict(self.held), "met": sorted(self.met),
            "base": {m: base_weight(self.model, l).detach().to("cpu").clone() for m, l in self.layers.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log, self.held, self.met = dict(state["log"]), dict(state["held"]), set(state["met"])
        for m, t in state["base"].items():
            base_weight(self.model, self.layers[m]).copy_(t)


def bundle(adapter_payload: bytes, tensors: dict[str, torch.Tensor], fields: dict[str, Any]) -> bytes:
    """One payload: the adapter's own payload (bytes) beside the base weights' change."""
    parts = {"adapter": torch.frombuffer(bytearray(adapter_payload), dtype=torch.uint8), **tensors}
    return pack(parts, {"kind": TASK_KIND, **fields})


# ---------------------------------------------------------------- the client's side


class BaseReceiver:
    """A client's side: applies the base weights' change a task carries (all of it
    validated before any is applied) and returns the adapter's payload."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layers = {l.module: l for l in lora_layers(model)}
        self.version = 0  # the pretrained base weights from model.path

    def receive(self, payload: bytes, max_bytes: int | None, what: str = "global model") -> bytes:
        header, blob = read_header(payload, max_bytes)
        if header.get("kind") != TASK_KIND:
            raise WireFormatError(f"{what}: expected a LoRA task with the base weights' change "
                                  f"(model.peft.aggregation=exact), got kind={header.get('kind')!r}")
        tensors = load_blob(blob)
        adapter = tensors.pop("adapter", None)
        if adapter is None or adapter.dtype != torch.uint8 or adapter.dim() != 1:
            raise WireFormatError(f"{what}: the LoRA task carries no adapter payload")
        kind, to = header.get("base_kind"), header.get("base_to")
        if not isinstance(to, int) or isinstance(to, bool) or to < 0:
            raise WireFormatError(f"{what}: base_to={to!r} is not a model version")
        if kind == "none":
            if tensors or self.version != to:
                raise WireFormatError(f"{what}: this client's base weights are at version {self.version}, the server's at {to}")
        elif kind == "delta":
            self._apply_delta(tensors, header.get("base_from"), to, what)
        elif kind == "absolute":
            self._apply_absolute(tensors, what)
        else:
            raise WireFormatError(f"{what}: unknown base_kind {kind!r}")
        self.version = to
        return adapter.numpy().tobytes()

    def _check(self, name: str, t: torch.Tensor, shape: tuple[int, ...] | None, what: str) -> None:
        if t.dtype != torch.float32 or t.dim() != 2 or (shape is not None and tuple(t.shape) != shape):
            raise WireFormatError(f"{what}: base tensor {name!r} has shape {tuple(t.shape)} {t.dtype}, expected {shape} float32")
        problem = value_error(t)
        if problem is not None:
            raise WireFormatError(f"{what}: base tensor {name!r} {problem}")

    def _apply_delta(self, tensors: dict[str, torch.Tensor], frm: Any, to: int, what: str) -> None:
        if frm != self.version or not isinstance(frm, int) or frm >= to:
            raise WireFormatError(f"{what}: a base change from version {frm!r}, but this client's base weights are at {self.version}")
        entries: dict[int, dict[str, Entry]] = {}
        for name, t in tensors.items():
            parts = name.split("/")
            if len(parts) != 3 or not parts[0][1:].isdigit() or parts[1] not in self.layers or parts[2] not in ("A", "B", "R"):
                raise WireFormatError(f"{what}: unexpected base tensor {name[:80]!r}")
            v = int(parts[0][1:])
            if not frm < v <= to:
                raise WireFormatError(f"{what}: base tensor {name[:80]!r} is outside versions {frm + 1}..{to}")
            self._check(name, t, self.layers[parts[1]].product_shape if parts[2] == "R" else None, what)
            entries.setdefault(v, {}).setdefault(parts[1], {})[parts[2]] = t
        for v, layers in entries.items():
            for module, e in layers.items():
                out, inp = self.layers[module].product_shape
                ok = set(e) == {"R"} or (set(e) == {"A", "B"} and e["B"].shape[0] == out and e["A"].shape[1] == inp
                                         and e["B"].shape[1] == e["A"].shape[0])
                if not ok:
                    raise WireFormatError(f"{what}: the base change of version {v} for {module!r} is malformed")
        new = {m: base_weight(self.model, l).detach().float().cpu().clone() for m, l in self.layers.items()}
        for v in sorted(entries):
            for module, e in entries[v].items():
                new[module].add_(weight_change(self.layers[module], e))
        self._commit(new, what)

    def _apply_absolute(self, tensors: dict[str, torch.Tensor], what: str) -> None:
        want = {f"{m}/W" for m in self.layers}
        if set(tensors) != want:
            raise WireFormatError(f"{what}: the base weights sent do not match this model's LoRA layers")
        new = {}
        for m, layer in self.layers.items():
            t = tensors[f"{m}/W"]
            self._check(f"{m}/W", t, layer.shape, what)
            new[m] = t
        self._commit(new, what)

    @torch.no_grad()
    def _commit(self, new: dict[str, torch.Tensor], what: str) -> None:
        for m, t in new.items():
            problem = value_error(t)
            if problem is not None:
                raise WireFormatError(f"{what}: the change leaves the base weight of {m!r} that {problem}")
        for m, t in new.items():
            w = base_weight(self.model, self.layers[m])
            w.copy_(t.to(w.device, w.dtype))

    def state_dict(self) -> dict[str, Any]:
        return {"version": self.version,
                "base": {m: base_weight(self.model, l).detach().to("cpu").clone() for m, l in self.layers.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.version = int(state["version"])
        for m, t in state["base"].items():
            base_weight(self.model, self.layers[m]).copy_(t)
