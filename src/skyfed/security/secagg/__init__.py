"""Secure aggregation: the server learns only the sum of the clients' updates.

Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS; SecAgg+ share groups from Bell et al. 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS. Transport-agnostic: the client and
server are state machines over plain dicts and bytes (see client.py, server.py);
docs/security.md says what each party learns and what composes with it.

The protocol itself needs only numpy and cryptography; the names that touch tensors
(`RingLayout`, `UpdateEncoder`, `SecAggSettings`) load torch on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from skyfed.security.secagg.client import SecAggClient
from skyfed.security.secagg.compat import check_compatible, check_strategy, check_uplink
from skyfed.security.secagg.fixedpoint import FixedPoint, clip
from skyfed.security.secagg.server import SecAggResult, SecAggServer
from skyfed.security.secagg.session import SecAggParams

_LAZY = {"RingLayout": "layout", "UpdateEncoder": "encoding", "SecAggSettings": "encoding"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"skyfed.security.secagg.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = [
    "FixedPoint", "RingLayout", "SecAggClient", "SecAggParams", "SecAggResult", "SecAggServer", "SecAggSettings",
    "UpdateEncoder", "check_compatible", "check_strategy", "check_uplink", "clip",
]
