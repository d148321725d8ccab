"""Client authentication: per-client secrets, sessions, call metadata, certificate names.

A tokens file is YAML (a mapping ``name: token``; one ``name: token`` per line is the
same thing). Tokens and session ids are compared with `hmac.compare_digest` so that
timing says nothing about how much of a guess was right.

Every call carries its identity in gRPC metadata (`call_metadata`): the protocol
version, the client name, and the token (Register) or the session id (later calls).
The server checks it before it reads a single request message. With mutual TLS the
client certificate must name the client (`certificate_names`).
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import yaml

from skyfed.errors import AuthError, ConfigError

log = logging.getLogger(__name__)

META_PROTOCOL = "skyfed-protocol"
META_NAME = "skyfed-name"
META_TOKEN = "skyfed-token"
META_SESSION = "skyfed-session"


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


def check_token_choice(tokens_file: str | Path | None, open_: bool) -> None:
    """ConfigError unless exactly one of a tokens file and `--open` is given."""
    if tokens_file is not None and open_:
        raise ConfigError("--open and --tokens contradict each other: pass one of them")
    if tokens_file is None and not open_:
        raise ConfigError(
            "the server needs per-client tokens: pass --tokens FILE (`skyfed certs DIR` writes one), "
            "or --open to let anyone who knows a client's name join"
        )


def require_tokens(tokens_file: str | Path | None, open_: bool) -> dict[str, str] | None:
    """The server's tokens, or None when it is told to run `--open` (logged); ConfigError otherwise."""
    check_token_choice(tokens_file, open_)
    if open_:
        log.warning("--open: no tokens; any client that can reach this server and knows a configured name can join")
        return None
    return load_tokens(tokens_file)


def call_metadata(protocol_version: int, name: str, *, token: str | None = None, session: str | None = None) -> list[tuple[str, str]]:
    """The metadata a client sends with a call: the token for Register, the session afterwards."""
    meta = [(META_PROTOCOL, str(protocol_version)), (META_NAME, name)]
    if token is not None:
        meta.append((META_TOKEN, token))
    if session is not None:
        meta.append((META_SESSION, session))
    return meta


def metadata_dict(metadata: Iterable | None) -> dict[str, str]:
    """{key: value} of a call's metadata (text values only; the first of a repeated key)."""
    out: dict[str, str] = {}
    for item in metadata or ():
        key, value = item[0], item[1]
        if isinstance(value, str) and key not in out:
            out[key] = value
    return out


def certificate_names(auth_context: Mapping[str, Sequence[bytes]]) -> list[str] | None:
    """The names a client certificate vouches for: its DNS subject alternative names, or,
    when it has none, its common name (RFC 6125's order). None without a client certificate."""
    from cryptography import x509

    pems = auth_context.get("x509_pem_cert")
    if not pems:
        return None
    cert = x509.load_pem_x509_certificate(pems[0])
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [str(n) for n in sans.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns = []
    if dns:
        return dns
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]


def check_certificate(auth_context: Mapping[str, Sequence[bytes]], name: str, required: bool) -> None:
    """AuthError unless the client certificate names `name` (with mutual TLS, `required`)."""
    if not required:
        return
    names = certificate_names(auth_context)
    if names is None:
        raise AuthError(f"client {name!r}: no client certificate on this connection")
    if name not in names:
        raise AuthError(f"client {name!r}: the client certificate is issued to {', '.join(names) or 'nobody'}, not {name!r}")
