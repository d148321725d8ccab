"""What travels between the engine and the clients, whatever the transport.

`payload` fields hold real wire bytes (see `skyfed.compression.wire`); their lengths
are the bytes counted on the network. An update's delta follows the DiLoCo sign
convention: delta = theta_start - theta_end (what a client's local training subtracted
from the global model), so the outer step is `theta -= lr * mean(delta)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainTask:
    """Server -> client: train from this model for `steps` local steps."""

    round: int
    version: int  # global model version the payload encodes
    payload: bytes
    steps: int
    options: dict[str, Any] = field(default_factory=dict)  # strategy extras, e.g. prox_mu


@dataclass
class ClientResult:
    """Client -> server: an encoded update, or the reason there is none."""

    client: str
    round: int
    base_version: int
    payload: bytes | None
    num_tokens: int = 0
    train_loss: float = float("nan")
    holdout_loss: float | None = None  # loss on the client's own held-out slice
    compute_s: float = 0.0  # measured local training time
    error: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Update:
    """A decoded, validated client update, ready for a strategy."""

    client: str
    round: int
    base_version: int
    delta: dict[str, torch.Tensor]
    num_tokens: int
    train_loss: float
    holdout_loss: float | None = None
    bytes_up: int = 0
    staleness: int = 0
