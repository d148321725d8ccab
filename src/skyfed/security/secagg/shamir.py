"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

Shamir 1979, "How to Share a Secret", CACM 22(11). A secret s is the constant term of a
random polynomial of degree t - 1; holder x receives (x, f(x)). Any t shares give s by
Lagrange interpolation at 0; fewer give nothing. The prime 2^521 - 1 (a Mersenne prime)
exceeds every 32-byte secret, so one field element carries one secret. Coefficients
come from `secrets` (the OS's CSPRNG).
"""

from __future__ import annotations

import secrets

from skyfed.errors import SecAggError

PRIME = 2**521 - 1
SECRET_BYTES = 32
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # 66


def split(secret: bytes, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` for the holders at x-coordinates `xs` (distinct, >= 1)."""
    if len(secret) != SECRET_BYTES:
        raise SecAggError(f"secure aggregation: a shared secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or min(xs) < 1:
        raise SecAggError(f"secure aggregation: cannot share among x = {xs} with threshold {threshold}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def _lagrange_at(points: list[tuple[int, int]], at: int) -> int:
    total = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        total = (total + yj * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: dict[int, bytes], threshold: int, what: str) -> bytes:
    """The secret from at least `threshold` shares. Shares beyond the threshold must lie
    on the same polynomial, so one wrong share among more than t is detected."""
    if len(shares) < threshold:
        raise SecAggError(f"secure aggregation: {what}: {len(shares)} shares, {threshold} needed")
    points = []
    for x, raw in sorted(shares.items()):
        if len(raw) != SHARE_BYTES:
            raise SecAggError(f"secure aggregation: {what}: a share must be {SHARE_BYTES} bytes, got {len(raw)}")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise SecAggError(f"secure aggregation: {what}: a share is outside the field")
        points.append((x, y))
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _lagrange_at(base, x) != y:
            raise SecAggError(f"secure aggregation: {what}: the shares are inconsistent (one is wrong)")
    secret = _lagrange_at(base, 0)
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise SecAggError(f"secure aggregation: {what}: the shares do not encode a {SECRET_BYTES}-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")
