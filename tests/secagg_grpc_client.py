"""`skyfed client` with test instruments, for tests/test_secagg_grpc.py.

    python tests/secagg_grpc_client.py client --server HOST:PORT --name NAME ...   (the CLI's arguments)

or imported first in a CLI process forked for the tests (tests/cli_forkserver.py, `instrument`).

The client is the real one; three methods are wrapped:

- SECAGG_DUMP=DIR: right before it masks an update, the client saves DIR/NAME-rROUND.pt
  with the global model it received, its unmasked delta and its token count (the
  test's reference for the secure sum), and it appends every task it pulls and every
  result it pushes to DIR/NAME-wire.jsonl: direction, round, stage and bytes (the
  payload, plus the secure-aggregation options a training task carries as JSON).
- SECAGG_DIE_ROUNDS=R[,R...]: in these rounds the process SIGKILLs itself after its
  set-up (keys and shares sent), once it has trained and masked its update and before
  it pushes it: a deterministic dropout after masking.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from skyfed.cli import main
from skyfed.compression.channel import DownlinkReceiver
from skyfed.runtime.grpc.client import FederationSession
from skyfed.runtime.grpc.transport import stage_of
from skyfed.security.secagg.coordinator import option_bytes
from skyfed.security.secagg.participant import SecAggParticipant

DUMP = Path(os.environ["SECAGG_DUMP"]) if os.environ.get("SECAGG_DUMP") else None
DIE = {int(r) for r in os.environ.get("SECAGG_DIE_ROUNDS", "").split(",") if r.strip()}
_held: dict[str, torch.Tensor] = {}


def _wire(name: str, **row) -> None:
    if DUMP is not None:
        with open(DUMP / f"{name}-wire.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def _receive(self, *args, **kwargs):
    params = _original_receive(self, *args, **kwargs)
    _held.clear()
    _held.update({k: v.clone() for k, v in params.items()})
    return params


def _masked_payload(self, task, delta, tokens):
    if DUMP is not None:
        torch.save({"global": dict(_held), "delta": {k: v.detach().clone() for k, v in delta.items()}, "tokens": tokens},
                   DUMP / f"{self.name}-r{task.round}.pt")
    payload = _original_masked(self, task, delta, tokens)
    if task.round in DIE:
        os.kill(os.getpid(), signal.SIGKILL)
    return payload


def _pull(self, *args, **kwargs):
    pulled = _original_pull(self, *args, **kwargs)
    if pulled.task is not None:
        task, stage = pulled.task, stage_of(pulled.task)
        extra = option_bytes({"secagg": task.options["secagg"]}) if stage == "update" and "secagg" in task.options else 0
        _wire(self.opts.name, dir="down", round=task.round, stage=stage, payload=len(task.payload), options=extra)
    return pulled


def _push(self, result):
    _wire(self.opts.name, dir="up", round=result.round, stage=result.meta.get("secagg_stage", "update"),
          payload=len(result.payload or b""))
    return _original_push(self, result)


_original_receive, DownlinkReceiver.receive = DownlinkReceiver.receive, _receive
_original_masked, SecAggParticipant.masked_payload = SecAggParticipant.masked_payload, _masked_payload
_original_pull, FederationSession.pull = FederationSession.pull, _pull
_original_push, FederationSession.push = FederationSession.push, _push

if __name__ == "__main__":
    main()
