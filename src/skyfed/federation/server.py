"""The server core: the one place that holds and changes the global model.

`ServerCore` owns the federated parameters (one fp32 copy, shared with the evaluation
model's tensors on the CPU), the model version, the downlink (what each client holds),
the byte totals and the strategy. Every runtime and both loop policies go through it:

    task = core.task(client, round, steps, options)     # the global model, encoded
    got = core.accept(result, round=r, version=v)       # -> Update, or Rejection
    agg = core.new_aggregate(); agg.add(update)         # folded as it arrives (mean strategies)
    core.publish(agg.result(global_params, round))      # checked finite, then version += 1

`accept` validates everything a client controls before any of it reaches a strategy:
the transport's error field, the payload's framing, names, shapes and values
(`decode_payload`), the payload's own header (kind, round, client and base version
must match the push: an old update re-sent under a new round is refused), and the
token count it claims (positive, and at most what its task could have trained on).
`publish` refuses an aggregate that is not finite; the model then stays as it was.

A LoRA run with per-client ranks or exact aggregation adds a `skyfed.lora_server.LoraServer`
(`lora`): it truncates each task to the client's rank and pads its update back, keeps each
update's factors, and after `publish` folds the factor-averaging residual into the base
weights and sends it with the next tasks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from skyfed.compression.channel import Downlink, fp32_bytes
from skyfed.compression.payload import decode_checked
from skyfed.compression.slabs import SlabDelta, sliceable
from skyfed.compression.spill import SpilledPayload
from skyfed.compression.streamcheck import BlobCheck
from skyfed.compression.wire import Framed, TensorSpec, all_finite, read_header
from skyfed.errors import SkyfedError
from skyfed.federation.messages import ClientResult, TrainTask, Update
from skyfed.federation.strategies import Strategy
from skyfed.federation.strategies.base import AggregateResult, Params
from skyfed.federation.strategies.mean import MeanStrategy, RunningMean
from skyfed.model import get_params

log = logging.getLogger(__name__)


@dataclass
class Rejection:
    """Why a client's result did not become an update (one line, logged and recorded)."""

    client: str
    reason: str


class Aggregate:
    """One window's updates on their way to the strategy: folded into a running mean as
    they arrive (a `MeanStrategy`, `streaming`) or kept as a list (the others)."""

    def __init__(self, strategy: Strategy, spec: dict[str, TensorSpec], streaming: bool, observe=None):
        self.strategy = strategy
        self.observe = observe  # sees each update before it is folded (exact LoRA keeps its factors)
        self.running = RunningMean(spec) if streaming else None
        self.updates: list[Update] = []
        self.seconds = 0.0  # folding and the strategy's step

    def add(self, update: Update) -> None:
        if self.observe is not None:
            self.observe(update)
        if self.running is not None:
            t0 = time.perf_counter()
            self.strategy.fold(self.running, update)  # type: ignore[attr-defined]
            close = getattr(update.delta, "close", None)
            if close is not None:  # a spilled update: its file goes now
                close()
            update.delta = {}  # folded: the tensors can go
            self.seconds += time.perf_counter() - t0
        self.updates.append(update)

    def __len__(self) -> int:
        return len(self.updates)

    def result(self, global_params: Params, round: int) -> AggregateResult:
        t0 = time.perf_counter()
        if self.running is None:
            out = self.strategy.aggregate(global_params, self.updates, round)
        else:
            out = self.strategy.finish(global_params, self.running, round)  # type: ignore[attr-defined]
            self.running = None
        self.seconds += time.perf_counter() - t0
        return out


class ServerCore:
    def __init__(
        self,
        model: torch.nn.Module,
        param_names: list[str],
        strategy: Strategy,
        compression: Any | None = None,  # skyfed.config.CompressionConfig
        max_update_bytes: int | None = None,
        max_tokens_per_step: int | None = None,  # batch_size x seq_len: bounds a claimed token count
        lora: Any | None = None,  # skyfed.lora_server.LoraServer: per-client ranks, exact LoRA aggregation
    ):
        self.model = model
        self.param_names = list(param_names)
        self.strategy = strategy
        self.max_update_bytes = max_update_bytes
        self.max_tokens_per_step = max_tokens_per_step
        self.params: Params = {}
        self._bind(get_params(model, self.param_names))
        self.spec = {n: TensorSpec(tuple(t.shape), torch.float32) for n, t in self.params.items()}
        self.downlink = Downlink.from_config(compression, self.spec)
        self.version = 0
        self.local_steps: dict[str, int] = {}  # each client's steps per task, when not train.local_steps (the engine's)
        self.totals = {"bytes_up": 0, "bytes_down": 0}
        # Fold each update as it arrives (the module docstring); False keeps a list (same result).
        self.streaming = isinstance(strategy, MeanStrategy)
        self.lora = lora

    # ------------------------------------------------------------ the model

    def _bind(self, params: Params) -> None:
        """Make `params` the global model; on the CPU the model's tensors become these very
        tensors (one copy, not two). They are replaced on publish, never changed in place,
        so a strategy may keep an old version (FedAsync's bases)."""
        named = dict(self.model.named_parameters())
        self.params = {n: params[n].to(torch.float32).contiguous() for n in self.param_names}
        with torch.no_grad():
            for n, t in self.params.items():
                p = named[n]
                if p.device.type == "cpu" and p.dtype == torch.float32:
                    p.data = t
                else:
                    p.copy_(t)

    def publish(self, out: AggregateResult) -> None:
        """Adopt the strategy's new parameters as the next version; refused if not finite."""
        bad = [n for n in self.param_names if not all_finite(out.params[n])]
        if bad:
            raise SkyfedError(f"the aggregate is not finite in {bad[0]} (and {len(bad) - 1} more); the global model is unchanged")
        self._bind(out.params)
        self.version += 1
        if self.lora is not None:  # exact LoRA: fold the factor-averaging residual into the base weights
            self.lora.published(self.params, self.version)

    def new_aggregate(self) -> Aggregate:
        if self.lora is None:
            return Aggregate(self.strategy, self.spec, self.streaming)
        self.lora.begin()
        return Aggregate(self.strategy, self.spec, self.streaming, observe=lambda u: self.lora.observe(u, self.params))

    def fp32_bytes(self, client: str) -> int:
        """The bytes of `client`'s adapter or model as plain fp32 (its rank's, with LoRA ranks)."""
        return self.lora.fp32_bytes(client) if self.lora is not None else fp32_bytes(self.spec)

    # ------------------------------------------------------------ clients

    def task(self, client: str, round: int, steps: int, options: dict[str, Any]) -> TrainTask:
        """The task that brings `client` to the current model (downlink-encoded)."""
        if self.lora is not None:  # a client's LoRA rank; exact LoRA's base weights' change
            payload = self.lora.task_payload(client, self.downlink, self.params, round, self.version)
        else:
            payload = self.downlink.payload_for(client, self.params, round, self.version)
        return TrainTask(round, self.version, payload, steps, options)

    def settle(self, sent: list[str], answered: list[str]) -> None:
        """After a window: clients sent a task that did not answer get the whole model next
        time (their state is uncertain); encodings cached for this version are dropped."""
        self.downlink.settle(sent, answered)
        if self.lora is not None:
            self.lora.settle(sent, answered)

    def accept(self, result: ClientResult, round: int, version: int, steps: int | None = None) -> Update | Rejection:
        """Validate a client's result for the task (`round`, built from `version`, of
        `steps` local steps) it answers; a `Rejection` says why not, in one line."""
        try:
            return self._decode(result, round, version, steps)
        except SkyfedError as exc:
            return Rejection(result.client, str(exc))
        except Exception as exc:  # a bug or a hostile payload: still only a refusal
            log.exception("unexpected error while validating the update from %s", result.client)
            return Rejection(result.client, f"update from {result.client} could not be validated ({type(exc).__name__})")

    def _decode(self, result: ClientResult, round: int, version: int, steps: int | None) -> Update:
        who = f"update from {result.client}"
        if result.error is not None or result.payload is None:
            raise SkyfedError(result.error or f"{who}: no payload")
        if result.round != round:
            raise SkyfedError(f"{who}: answers round {result.round}, its task was round {round}")
        if result.base_version != version:
            raise SkyfedError(f"{who}: claims base version {result.base_version}, its task carried {version}")
        tokens = result.num_tokens
        if not isinstance(tokens, int) or tokens <= 0:
            raise SkyfedError(f"{who}: token count {tokens!r} is not a positive integer")
        if steps is not None and self.max_tokens_per_step is not None and tokens > steps * self.max_tokens_per_step:
            raise SkyfedError(
                f"{who}: claims {tokens} tokens, its task allows at most {steps * self.max_tokens_per_step}"
            )
        spec = self.spec if self.lora is None else self.lora.spec_for(result.client, self.spec)
        delta, header = self._tensors(result.payload, spec, who)
        expected = {"kind": "update", "round": round, "client": result.client, "base_version": version}
        for key, want in expected.items():
            if header.get(key) != want:
                raise SkyfedError(f"{who}: its payload says {key}={header.get(key)!r}, expected {want!r} (replayed or forged)")
        if self.lora is not None:  # a smaller LoRA rank: zero-padded to the server's (HetLoRA)
            delta = self.lora.pad(result.client, delta, self.params)
        return Update(
            client=result.client,
            round=result.round,
            base_version=result.base_version,
            delta=delta,
            num_tokens=tokens,
            train_loss=result.train_loss,
            holdout_loss=result.holdout_loss,
            bytes_up=len(result.payload),
        )

    def _tensors(self, payload: Any, spec: dict[str, TensorSpec], who: str) -> tuple[Any, dict[str, Any]]:
        """The validated delta and the payload's header, its CRC-32 checked once (on arrival
        for a gRPC push: `compression/framing.py`). When updates are folded one at a time
        (`streaming`, no LoRA server keeping them), a spilled payload (`compression/spill.py`)
        or an encoded one (int8, ...) is validated in full and handed on as a `SlabDelta`
        that decodes and folds slab by slab; a plain one in memory is read as views into its
        buffer; a chain that does not decode by slabs is decoded whole (a spilled one read
        back into memory first)."""
        verdict = getattr(payload, "verdict", None)  # a plain update checked as it arrived
        if verdict:
            raise SkyfedError(verdict)
        checked = verdict == ""
        slabs = self.streaming and self.lora is None
        if isinstance(payload, SpilledPayload):
            header, start = payload.header, payload.blob_start
            if slabs and sliceable(header):
                return SlabDelta(payload, header, start, spec, who, values_checked=checked), header
            payload = Framed(payload.read_all()).checked(header, start)
        header, blob = read_header(payload, self.max_update_bytes)
        if slabs and header.get("codecs") and sliceable(header):
            return SlabDelta(payload, header, len(payload) - len(blob), spec, who), header
        return decode_checked(header, blob, spec, what=who, views=True, values_checked=checked)

    def blob_check(self, header: dict[str, Any], what: str) -> BlobCheck | None:
        """For a receiver: this core's checks of a plain update's tensors and values, to run
        on its blob as the chunks arrive (`compression/streamcheck.py`); None for an
        encoded update, or with LoRA ranks (a client's shapes), checked here once it is in."""
        if header.get("codecs") or self.lora is not None:
            return None
        return BlobCheck(self.spec, int(header["blob_bytes"]), what)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Everything but the parameters (saved beside, as safetensors)."""
        state = {
            "version": self.version,
            "totals": dict(self.totals),
            "strategy": self.strategy.state_dict(),
            "downlink": self.downlink.state_dict(),
        }
        if self.lora is not None:
            state["lora"] = self.lora.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], params: Params) -> None:
        if set(params) != set(self.param_names):
            raise SkyfedError("the checkpoint does not match this experiment's model")
        self._bind(params)
        self.version = int(state["version"])
        self.totals = dict(state["totals"])
        self.strategy.load_state_dict(state["strategy"])
        saved = state.get("downlink")
        if saved is not None:
            self.downlink.load_state_dict(saved)
        else:
            self.downlink.settle([], [])
        if self.lora is not None and state.get("lora") is not None:
            self.lora.load_state_dict(state["lora"])
