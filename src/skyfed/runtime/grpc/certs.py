"""`skyfed certs DIR`: a development CA, a server certificate and client certificates.

Made with the `cryptography` library (ECDSA P-256, SHA-256, valid one year). Also
writes `tokens.yaml` with a random secret per client. For trying TLS and mutual TLS
in one step; production deployments should use their own PKI.

Files: ca.pem ca.key server.pem server.key client-NAME.pem client-NAME.key tokens.yaml
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from skyfed.errors import ConfigError

VALID_DAYS = 365


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "skyfed dev"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _cert(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, sans=None, usage=None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_dev_certs(out: str | Path, clients: list[str], hosts: list[str]) -> dict[str, Path]:
    """Write a dev CA, a server cert for `hosts` and one cert per client; return the paths."""
    out = Path(out)
    if not clients or not hosts:
        raise ConfigError("skyfed certs: --clients and --hosts must each name at least one entry")
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("skyfed dev CA", ca_key, _name("skyfed dev CA"), ca_key, ca=True)
    files = {"ca.pem": ca_cert}
    keys = {"ca.key": ca_key}
    server_key = ec.generate_private_key(ec.SECP256R1())
    files["server.pem"] = _cert(
        hosts[0], server_key, ca_cert.subject, ca_key, ca=False, sans=[_san(h) for h in hosts], usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    keys["server.key"] = server_key
    for name in clients:
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"client-{name}.pem"] = _cert(name, key, ca_cert.subject, ca_key, ca=False, sans=[x509.DNSName(name)], usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        keys[f"client-{name}.key"] = key
    paths: dict[str, Path] = {}
    for fname, cert in files.items():
        (out / fname).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[fname] = out / fname
    for fname, key in keys.items():
        _write_key(out / fname, key)
        paths[fname] = out / fname
    tokens = out / "tokens.yaml"
    tokens.write_text("".join(f"{name}: {secrets.token_urlsafe(24)}\n" for name in clients))
    os.chmod(tokens, 0o600)
    paths["tokens.yaml"] = tokens
    return paths
