"""Valid skyfed payloads and hostile mutations of them, for the fuzz tests and bench/fuzz.py.

`valid_case(rng)` builds a random model spec, random tensors and a random codec chain
(every codec of `compression.codecs`, alone and chained) and encodes them. `mutate(rng,
payload)` returns a corrupted copy made by one of `MUTATIONS`: bit flips, truncation,
extension, substitution of a header value (outer wire header or inner safetensors
header) by a hostile JSON token, raw hostile text spliced into a header, hostile float
values written into the tensor data, and random prefix fields. Unless the mutation is
meant to break the checksum, the blob length and CRC-32 are recomputed so the
corruption reaches the parsers behind the CRC check.
"""

from __future__ import annotations

import json
import random
import struct
import zlib
from collections.abc import Callable

import torch

from skyfed.compression.chain import Chain
from skyfed.compression.payload import encode_payload
from skyfed.compression.wire import TensorSpec

PREFIX = struct.Struct("<6sHI")

# Every chain shape the project supports (see tests/test_codecs.py).
CHAINS: list[list] = [
    [],
    ["fp32"],
    ["fp16"],
    ["bf16"],
    [{"name": "int8", "block": 16}],
    [{"name": "int8", "block": 64, "stochastic": True, "seed": 3}],
    [{"name": "int4", "block": 8}],
    [{"name": "sign", "block": 32}],
    [{"name": "lowrank", "rank": 2}],
    [{"name": "lowrank", "rank": 3, "rank_by_round": [1, 2]}],
    [{"name": "topk", "fraction": 0.1}],
    [{"name": "topk", "fraction": 0.2, "scope": "global"}],
    [{"name": "randk", "fraction": 0.3, "seed": 5}],
    [{"name": "topk", "fraction": 0.1}, {"name": "int8", "block": 16}],
    [{"name": "topk", "fraction": 0.25}, {"name": "int4", "block": 16}],
    [{"name": "topk", "fraction": 0.25}, "fp16"],
    [{"name": "randk", "fraction": 0.5, "seed": 1}, {"name": "sign", "block": 16}],
    [{"name": "lowrank", "rank": 2}, {"name": "int8", "block": 32}],
    [{"name": "lowrank", "rank": 2}, {"name": "topk", "fraction": 0.5}, {"name": "int8", "block": 8}],
]

HOSTILE_TOKENS: list[str] = [
    "Infinity", "-Infinity", "NaN", "1e999", "-1e999", "1e308", "3.4e38", "-0", "0", "1", "-1", "0.5",
    "9" * 5000, "-" + "9" * 5000, "9223372036854775807", "9223372036854775808", "-9223372036854775809",
    "18446744073709551616", "4294967295", "4294967296", "2147483648", "-4294967296", "1099511627776",
    "[" * 100_000 + "]" * 100_000, "[" * 20 + "]" * 20, "{\"a\":" * 5000 + "1" + "}" * 5000,
    "null", "true", "false", '""', '"x"', '"' + "x" * 70_000 + '"', '"\\ud800"', '"\\u0000"',
    "{}", "[]", "[1,2,3]", "[-1]", "[0,0]", "[0,4294967296]", "[1e30]", "[Infinity]", '{"a":1}',
    '"F64"', '"BOOL"', '"I64"', '"U8"', '"F16"', '"int8"', '"topk"', '"lowrank"', '"global"',
    "[2,3,4,5,6,7,8,9,10]", "[9223372036854775807,0]", "[0,9223372036854775807,4]",
]

# raw text spliced into a header; '"\\"' repeated is an unterminated string full of escaped
# quotes (a backtracking string regex is quadratic on it)
SPLICES = ["[" * 100_000, "{" * 50_000, ",", ":", '"', "\\", "\xff", '"' + '\\"' * 50_000]

HOSTILE_FLOATS = [float("nan"), float("inf"), float("-inf"), 3e38, -3.4e38, 1e31, -1e31, 1e-45, -0.0]


def random_spec(rng: random.Random) -> dict[str, TensorSpec]:
    """One matrix and one vector, small, shapes at random."""
    return {
        "w": TensorSpec((rng.randint(1, 24), rng.randint(1, 24)), torch.float32),
        "b": TensorSpec((rng.randint(1, 40),), torch.float32),
    }


def random_tensors(rng: random.Random, spec: dict[str, TensorSpec]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    return {n: torch.randn(s.shape, generator=gen) * 10 ** rng.uniform(-4, 2) for n, s in spec.items()}


def valid_case(rng: random.Random, chain_specs: list | None = None) -> tuple[bytes, dict[str, TensorSpec], dict[str, torch.Tensor], Chain]:
    """(payload, spec, tensors, chain) for random tensors through a random chain."""
    spec = random_spec(rng)
    tensors = random_tensors(rng, spec)
    chain = Chain.from_specs(chain_specs if chain_specs is not None else rng.choice(CHAINS))
    payload = encode_payload(tensors, chain, kind="update", round=rng.randrange(100), client="aws", base_version=0)
    return payload, spec, tensors, chain


# ------------------------------------------------------------ framing helpers


def split(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """(prefix, outer header bytes, blob) of a well-formed payload."""
    _, _, head_len = PREFIX.unpack_from(payload, 0)
    return payload[: PREFIX.size], payload[PREFIX.size : PREFIX.size + head_len], payload[PREFIX.size + head_len :]


def join(head: bytes, blob: bytes, fix: bool = True) -> bytes:
    """A payload around `head` and `blob`; with `fix`, blob_bytes and crc32 are made to
    match `blob` when `head` is still a JSON object holding them."""
    if fix:
        head = _refix(head, blob)
    return PREFIX.pack(b"SKYFED", 1, len(head)) + head + blob


def _refix(head: bytes, blob: bytes) -> bytes:
    try:
        h = json.loads(head)
    except Exception:
        return head
    if not isinstance(h, dict):
        return head
    text = head
    for key, value in (("blob_bytes", len(blob)), ("crc32", zlib.crc32(blob))):
        old = h.get(key)
        if isinstance(old, int) and not isinstance(old, bool):
            text = text.replace(f'"{key}":{old}'.encode(), f'"{key}":{value}'.encode(), 1)
    return text


def inner_split(blob: bytes) -> tuple[bytes, bytes]:
    """(safetensors header JSON, tensor data) of a blob."""
    (n,) = struct.unpack_from("<Q", blob, 0)
    return blob[8 : 8 + n], blob[8 + n :]


def inner_join(meta: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(meta)) + meta + data


# ------------------------------------------------------------ JSON substitution

_SENTINEL = "\x00SKYFED-FUZZ\x00"


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def substitute(rng: random.Random, text: bytes, token: str | None = None) -> bytes:
    """`text` (JSON) with one node (or a new key) replaced by a hostile token, or a key deleted."""
    doc = json.loads(text)
    token = token if token is not None else rng.choice(HOSTILE_TOKENS)
    paths = _paths(doc)
    path = rng.choice(paths)
    action = rng.random()
    if not path or action < 0.15:  # add a key to an object, or replace the whole document
        parent = _get(doc, path)
        if isinstance(parent, dict):
            parent[rng.choice(["__metadata__", "extra", "format", "codecs", "kind", "w", "b", "w::0.q"])] = _SENTINEL
        elif not path:
            return token.encode()
        else:
            _set(doc, path, _SENTINEL)
    elif action < 0.22 and isinstance(path[-1], str):  # delete a key
        del _get(doc, path[:-1])[path[-1]]
        return json.dumps(doc, separators=(",", ":")).encode()
    else:
        _set(doc, path, _SENTINEL)
    out = json.dumps(doc, separators=(",", ":"))
    return out.replace(json.dumps(_SENTINEL), token, 1).encode()


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


def _set(doc, path, value) -> None:
    _get(doc, path[:-1])[path[-1]] = value


# ------------------------------------------------------------ mutations


def flip_bits(rng: random.Random, p: bytes) -> bytes:
    b = bytearray(p)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def flip_blob_bits_fixed_crc(rng: random.Random, p: bytes) -> bytes:
    _, head, blob = split(p)
    return join(head, flip_bits(rng, blob))


def truncate(rng: random.Random, p: bytes) -> bytes:
    return p[: rng.randrange(len(p))]


def extend(rng: random.Random, p: bytes) -> bytes:
    return p + rng.randbytes(rng.randint(1, 64))


def truncate_blob_fixed_crc(rng: random.Random, p: bytes) -> bytes:
    _, head, blob = split(p)
    return join(head, blob[: rng.randrange(len(blob))])


def outer_value(rng: random.Random, p: bytes) -> bytes:
    _, head, blob = split(p)
    return join(substitute(rng, head), blob)


def inner_value(rng: random.Random, p: bytes) -> bytes:
    _, head, blob = split(p)
    meta, data = inner_split(blob)
    return join(head, inner_join(substitute(rng, meta), data))


def _splice(rng: random.Random, text: bytes) -> bytes:
    token = rng.choice(HOSTILE_TOKENS + SPLICES).encode("utf-8", "surrogatepass")
    i = rng.randrange(len(text) + 1)
    return text[:i] + token + text[i:]


def outer_raw(rng: random.Random, p: bytes) -> bytes:
    _, head, blob = split(p)
    return join(_splice(rng, head), blob, fix=False)


def inner_raw(rng: random.Random, p: bytes) -> bytes:
    _, head, blob = split(p)
    meta, data = inner_split(blob)
    return join(head, inner_join(_splice(rng, meta), data))


def tensor_values(rng: random.Random, p: bytes) -> bytes:
    """Hostile floats (NaN, Inf, 3e38, ...) or random bytes written into the tensor data."""
    _, head, blob = split(p)
    meta, data = inner_split(blob)
    d = bytearray(data)
    if len(d) >= 4:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(d) // 4) * 4
            if rng.random() < 0.7:
                d[i : i + 4] = struct.pack("<f", rng.choice(HOSTILE_FLOATS))
            else:
                d[i : i + 4] = rng.randbytes(4)
    return join(head, inner_join(meta, bytes(d)))


def prefix_fields(rng: random.Random, p: bytes) -> bytes:
    """A random format version, outer header length or inner header length."""
    b = bytearray(p)
    which = rng.randrange(3)
    if which == 0:
        struct.pack_into("<H", b, 6, rng.choice([0, 2, 65535]))
    elif which == 1:
        struct.pack_into("<I", b, 8, rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)]))
    else:
        _, head, blob = split(p)
        blob = bytearray(blob)
        struct.pack_into("<Q", blob, 0, rng.choice([0, 1, 2**63, 2**64 - 1, rng.randrange(len(blob) + 16)]))
        return join(head, bytes(blob))
    return bytes(b)


MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "flip_bits": flip_bits,
    "flip_blob_bits_fixed_crc": flip_blob_bits_fixed_crc,
    "truncate": truncate,
    "extend": extend,
    "truncate_blob_fixed_crc": truncate_blob_fixed_crc,
    "outer_value": outer_value,
    "inner_value": inner_value,
    "outer_raw": outer_raw,
    "inner_raw": inner_raw,
    "tensor_values": tensor_values,
    "prefix_fields": prefix_fields,
}
# header-value substitutions are the richest source of defects: drawn more often
WEIGHTS = {"outer_value": 4, "inner_value": 4, "tensor_values": 2, "flip_blob_bits_fixed_crc": 2}


def mutate(rng: random.Random, payload: bytes) -> tuple[str, bytes]:
    """(mutation name, mutated payload)."""
    names = list(MUTATIONS)
    name = rng.choices(names, weights=[WEIGHTS.get(n, 1) for n in names])[0]
    return name, MUTATIONS[name](rng, payload)


def describe(data: bytes, limit: int = 160) -> str:
    """A short printable excerpt of an input, for reports."""
    text = data[:limit].decode("latin-1").encode("unicode_escape").decode()
    return text + (f"... ({len(data)} bytes)" if len(data) > limit else "")
