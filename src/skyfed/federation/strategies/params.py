"""Validation of strategy parameters from the YAML: a bad value is a ConfigError that
names its key, `federation.strategy.params.<key>`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from skyfed.errors import ConfigError

PREFIX = "federation.strategy.params"


def bad(key: str, message: str) -> ConfigError:
    return ConfigError(f"{PREFIX}.{key}: {message}")


def number(key: str, value: Any, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    """A finite float in [lo, hi] (or (lo, hi] with lo_open)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(key, f"expected a number, got {value!r}")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise bad(key, f"must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise bad(key, f"must be <= {hi:g}, got {value:g}")
    return value


def integer(key: str, value: Any, lo: int | None = None, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"expected an integer, got {value!r}")
    if lo is not None and value < lo:
        raise bad(key, f"must be >= {lo}, got {value}")
    return value


def choice(key: str, value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise bad(key, f"expected one of {', '.join(options)}, got {value!r}")
    return value


def flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(key, f"expected true or false, got {value!r}")
    return value


def pair(key: str, value: Any, lo: float = 0.0, hi: float = 1.0) -> tuple[float, float]:
    """Two numbers in [lo, hi), e.g. Adam's betas."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise bad(key, f"expected two numbers, e.g. [0.9, 0.99], got {value!r}")
    out = tuple(number(key, v, lo, hi) for v in value)
    if any(v >= hi for v in out):
        raise bad(key, f"each must be < {hi:g}, got {list(value)!r}")
    return out  # type: ignore[return-value]
