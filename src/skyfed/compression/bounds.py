"""The largest payload a codec chain can produce for a model: a receiver refuses a larger
announcement before it allocates anything.

Exact per codec (the formulas of `Codec.nbytes`), with upper bounds where a size
varies: the safetensors header (every offset and dimension counted at 20 digits), the
JSON header (seeds at 63 bits, plus `HEADER_SLACK` for fields other layers add), a
`rank_by_round` schedule (its largest rank) and a global top-k (each tensor may keep
up to min(its size, the global k) values).
"""

from __future__ import annotations

import json
import math

from skyfed.compression.chain import SEP, Chain
from skyfed.compression.codecs import TopK, keep_count
from skyfed.compression.indices import index_bytes
from skyfed.compression.wire import _PREFIX, TensorSpec

HEADER_SLACK = 4096  # header fields other layers may add (privacy, secure aggregation)
_BIG = 2**64  # 20 digits: any offset, size, round or version
_ENTRY = len('"":{"dtype":"BF16","shape":[],"data_offsets":[,]},')


def _numel(shape: tuple[int, ...]) -> int:
    return int(math.prod(shape))


def _entry_bytes(name: str, ndim: int) -> int:
    """Upper bound of one tensor's entry in a safetensors header."""
    return len(json.dumps(name)) + _ENTRY + 21 * ndim + 2 * 20


def _tensor_bound(chain: Chain, key: str, shape: tuple[int, ...], global_k: int | None) -> int:
    """Bytes of one tensor's parts plus their safetensors header entries."""
    n = _numel(shape)
    codecs = chain.for_shape(shape)
    if not codecs:
        return 4 * n + _entry_bytes(key, len(shape))
    total = 0
    for i, c in enumerate(codecs):
        if isinstance(c, TopK) and c.scope == "global":
            k = n if global_k is None else min(n, global_k)
            total += index_bytes(k, n)
        else:
            k = c.carry_numel(n)
            total += c.nbytes(n)
        names = list(c.part_names) + ([c.carry] if i == len(codecs) - 1 and c.carry else [])
        total += sum(_entry_bytes(f"{key}{SEP}{i}.{p}", 1) for p in names)
        n = k
    return total + (4 * n if codecs[-1].carry else 0)


def _header_bound(chain: Chain, client_names: list[str]) -> int:
    specs = [{k: (_BIG if k == "seed" else v) for k, v in s.items()} for s in chain.specs()]
    longest = max(client_names, key=lambda s: len(json.dumps(s)), default="")
    head = dict(kind="update", round=_BIG, client=longest, base_version=_BIG, codecs=specs,
                format=1, blob_bytes=_BIG, crc32=_BIG)
    return _PREFIX.size + len(json.dumps(head, separators=(",", ":"))) + HEADER_SLACK


def _variants(chain: Chain) -> list[Chain]:
    """The chain of every round whose sizes may differ (a low-rank `rank_by_round`)."""
    first = chain.codecs[0] if chain.codecs else None
    schedule = getattr(first, "rank_by_round", ())
    if not schedule:
        return [chain]
    return [chain.for_round(r) for r in range(len(schedule))]


def max_payload_bytes(spec: dict[str, TensorSpec], chain: Chain, client_names: list[str] | None = None) -> int:
    """The most bytes an update of tensors `spec` through `chain` can take on the wire."""
    total_n = sum(_numel(s.shape) for s in spec.values())
    best = 0
    for variant in _variants(chain):
        first = variant.codecs[0] if variant.codecs else None
        global_k = keep_count(first.fraction, total_n) if isinstance(first, TopK) and first.scope == "global" else None
        blob = 8 + 2 + 7 + sum(_tensor_bound(variant, k, tuple(s.shape), global_k) for k, s in spec.items())
        best = max(best, blob + _header_bound(variant, client_names or []))
    return best
