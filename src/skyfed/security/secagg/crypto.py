"""The primitives secure aggregation uses, all from the `cryptography` package.

- X25519 key agreement, then HKDF-SHA256 to a 32-byte key bound to a purpose, the
  session and the (ordered) pair of client names;
- a ChaCha20 keystream (the encryption of zeros) read as ring elements mod 2^bits: the
  pseudo-random generator that expands a 32-byte seed into a mask;
- AES-256-GCM to encrypt Shamir shares to one recipient (authenticated: a forged or
  misdirected share fails to open);
- SHA-256 digests (the commitment to a self-mask seed).

Nothing here is hand-written cryptography; only the glue.
"""

from __future__ import annotations

import base64
import binascii
import json
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from skyfed.errors import SecAggError

KEY_BYTES = 32
_NONCE_GCM = 12
_NONCE_CHACHA = bytes(16)  # counter 0, nonce 0: every seed is used for one stream only
RING_DTYPES = {16: np.dtype("<u2"), 32: np.dtype("<u4")}


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_private(raw: bytes) -> X25519PrivateKey:
    try:
        return X25519PrivateKey.from_private_bytes(raw)
    except ValueError as exc:
        raise SecAggError(f"secure aggregation: not an X25519 private key: {exc}") from None


def load_public(raw: bytes) -> X25519PublicKey:
    try:
        return X25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise SecAggError(f"secure aggregation: not an X25519 public key: {exc}") from None


def pair_context(purpose: str, session: bytes, a: str, b: str) -> bytes:
    """HKDF info: the purpose and the unordered pair, so both ends derive the same key."""
    lo, hi = sorted((a, b))
    return json.dumps(["skyfed/secagg", purpose, base64.b64encode(session).decode(), lo, hi]).encode()


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: str, session: bytes, a: str, b: str) -> bytes:
    """X25519 shared secret of the pair (a, b), expanded by HKDF-SHA256 to 32 bytes."""
    try:
        shared = private.exchange(load_public(peer_public))
    except ValueError as exc:  # a low-order public key gives an all-zero secret
        raise SecAggError(f"secure aggregation: key agreement of {a!r} and {b!r} failed: {exc}") from None
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session, info=pair_context(purpose, session, a, b))
    return hkdf.derive(shared)


def keystream(seed: bytes, length: int, bits: int) -> np.ndarray:
    """`length` pseudo-random ring elements mod 2^bits: ChaCha20(seed) applied to zeros."""
    dtype = RING_DTYPES[bits]
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE_CHACHA), mode=None).encryptor()
    stream = encryptor.update(bytes(length * dtype.itemsize))
    return np.frombuffer(stream, dtype=dtype)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: a fresh random 96-bit nonce followed by ciphertext and tag."""
    nonce = os.urandom(_NONCE_GCM)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes, what: str) -> bytes:
    if len(blob) < _NONCE_GCM + 16:
        raise SecAggError(f"secure aggregation: {what} is truncated ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:_NONCE_GCM], blob[_NONCE_GCM:], aad)
    except InvalidTag:
        raise SecAggError(f"secure aggregation: {what} failed authentication (forged, corrupted or misdirected)") from None


def digest(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


def random_seed() -> bytes:
    return os.urandom(KEY_BYTES)


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise SecAggError(f"secure aggregation: {what} must be a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise SecAggError(f"secure aggregation: {what} is not valid base64") from None
