"""Client authentication: per-client secrets from a tokens file, sessions after registration.

A tokens file is YAML (a mapping ``name: token``; one ``name: token`` per line is the
same thing). Tokens and session ids are compared with `hmac.compare_digest` so that
timing says nothing about how much of a guess was right.
"""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

import yaml

from skyfed.errors import AuthError, ConfigError


def load_tokens(path: str | Path) -> dict[str, str]:
    """{client name: token} from a YAML tokens file; a clear error names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokens file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tokens file {path}: not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"tokens file {path}: expected one 'name: token' line per client")
    tokens: dict[str, str] = {}
    for name, token in data.items():
        if not isinstance(token, (str, int)) or not str(token).strip():
            raise ConfigError(f"tokens file {path}: client {name!r} has an empty or non-text token")
        if len(str(token)) < 8:
            raise ConfigError(f"tokens file {path}: the token of client {name!r} is shorter than 8 characters")
        tokens[str(name)] = str(token)
    return tokens


def read_client_token(path: str | Path, name: str) -> str:
    """A client's token file: the token alone, or a tokens file that has `name` in it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"token file not found: {path}")
    text = path.read_text(encoding="utf-8").strip()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    if isinstance(data, dict):
        if name not in data:
            raise ConfigError(f"token file {path} has no token for client {name!r}")
        return str(data[name])
    if not text:
        raise ConfigError(f"token file {path} is empty")
    return text


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def check_token(tokens: dict[str, str] | None, name: str, token: str) -> None:
    """Raise AuthError for an unknown client or a wrong token (no tokens file: names only)."""
    if tokens is None:
        return
    expected = tokens.get(name)
    # compare against something even for an unknown name, so both paths cost the same
    ok = same_secret(token, expected if expected is not None else secrets.token_hex(16))
    if expected is None or not ok:
        raise AuthError(f"client {name!r}: unknown client or wrong token")


def new_session_id() -> str:
    return secrets.token_urlsafe(24)
