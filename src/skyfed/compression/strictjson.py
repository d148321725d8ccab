"""Parse JSON that came over the network without letting it crash or stall the reader.

`json.loads` on hostile bytes can raise `RecursionError` (deeply nested arrays),
`ValueError` (an integer of more than 4,300 digits), return ``inf``/``nan``
(``Infinity``, ``NaN``, ``1e999``) or keep the last of two duplicate keys. `loads`
rejects all of it with a `WireFormatError`:

- the nesting depth is measured on the raw bytes (a vectorized bracket count outside
  strings) *before* the parser runs, so no input reaches Python's recursion limit;
- ``NaN``/``Infinity`` constants, non-finite floats, integers outside the signed 64-bit
  range (checked on the digit string, before conversion) and duplicate keys are refused;
- strings longer than `max_string` characters, and lone surrogates, are refused.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from skyfed.errors import WireFormatError

MAX_DEPTH = 16
MAX_STRING = 1 << 16
_INT64 = 1 << 63
_BLOCK = 1 << 20
_OPEN = np.zeros(256, dtype=np.int8)
_OPEN[ord("[")] = _OPEN[ord("{")] = 1
_OPEN[ord("]")] = _OPEN[ord("}")] = -1


def nesting_depth(raw: bytes) -> int:
    """The deepest bracket nesting of JSON text `raw`, brackets inside strings ignored.

    Linear time and bounded memory (numpy, in blocks of `_BLOCK` bytes, carrying the
    state across blocks): a quote opens or closes a string unless an odd run of
    backslashes precedes it. On valid JSON this is exact; on invalid JSON it is exact
    up to the first error, which is as far as the parser goes."""
    data = np.frombuffer(raw, dtype=np.uint8)
    depth = deepest = 0
    inside, run = False, 0  # in a string at the end of the last block; backslashes ending it
    for start in range(0, data.size, _BLOCK):
        a = data[start : start + _BLOCK]
        idx = np.arange(a.size, dtype=np.int64)
        last = np.maximum.accumulate(np.where(a == 0x5C, -1, idx))  # last non-backslash at or before i
        before = np.empty(a.size, dtype=np.int64)  # backslashes right before i
        before[0] = run
        prev = last[:-1]
        before[1:] = np.where(prev >= 0, idx[:-1] - prev, idx[:-1] + 1 + run)
        quote = (a == 0x22) & (before % 2 == 0)
        in_string = (np.cumsum(quote, dtype=np.int64) % 2).astype(bool) ^ inside
        steps = _OPEN[a].astype(np.int64)
        steps[in_string] = 0
        levels = np.cumsum(steps) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        inside = bool(in_string[-1])
        run = a.size - 1 - int(last[-1]) if last[-1] >= 0 else a.size + run
    return deepest


def _refuse_constant(name: str) -> Any:
    raise WireFormatError(f"the JSON constant {name} is not allowed")


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise WireFormatError(f"integer of {len(text)} characters is out of range")
    value = int(text)
    if not -_INT64 <= value < _INT64:
        raise WireFormatError(f"integer {value} is out of the signed 64-bit range")
    return value


def _parse_float(text: str) -> float:
    if len(text) > 64:
        raise WireFormatError(f"number of {len(text)} characters is too long")
    value = float(text)
    if not math.isfinite(value):
        raise WireFormatError(f"number {text} is not finite")
    return value


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise WireFormatError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def _check_strings(value: Any, max_string: int, escapes: bool) -> None:
    """Every string (keys included) at most `max_string` characters and, when the text
    has ``\\u`` escapes, valid Unicode (no lone surrogates); `value` is depth-bounded."""
    if isinstance(value, str):
        if len(value) > max_string:
            raise WireFormatError(f"a string of {len(value)} characters exceeds {max_string}")
        if escapes:
            value.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, max_string, escapes)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, max_string, escapes)
            _check_strings(v, max_string, escapes)


def loads(raw: bytes | bytearray | memoryview, what: str, max_depth: int = MAX_DEPTH, max_string: int = MAX_STRING) -> Any:
    """Parse `raw` (UTF-8 JSON) under the rules of the module docstring.

    Any failure is one `WireFormatError` whose message starts with `what`."""
    raw = bytes(raw)
    depth = nesting_depth(raw)
    if depth > max_depth:
        raise WireFormatError(f"{what}: JSON nested {depth} levels deep (at most {max_depth})")
    try:
        text = raw.decode("utf-8")
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
            object_pairs_hook=_unique_pairs,
        )
        _check_strings(value, max_string, b"\\u" in raw)
    except WireFormatError as exc:
        raise WireFormatError(f"{what}: {exc}") from None
    except (UnicodeError, ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise WireFormatError(f"{what}: {str(exc).splitlines()[0][:200]}") from None
    return value
