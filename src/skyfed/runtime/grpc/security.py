"""TLS credentials and channel options for the server and the clients.

TLS is the default; plaintext needs an explicit `--insecure` and logs a warning.
Mutual TLS: the server passes `--client-ca` (clients must present a certificate it
signed) and each client passes `--tls-cert/--tls-key`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc

from skyfed.errors import ConfigError

log = logging.getLogger(__name__)

MESSAGE_MARGIN = 64 * 2**20  # room for the registration reply (config + tokenizer files)
# The server's HTTP/2 flow-control window per stream: the most unread data one upload
# holds in the server (`skyfed server --flow-window-mib`). gRPC's automatic window (BDP
# probing) grew it so that 400 MB uploads over loopback cost the server 0.15-0.3x the
# model beyond the running sum (`bench/transport.py`); 4 MiB cost about 0.1x and moved
# as fast there. 4 MiB per RTT is about what one TCP flow gets with Linux's default
# socket buffers (tcp_rmem max 6 MiB); on a long fat link with tuned buffers, raise it
# (or 0: gRPC's automatic window).
FLOW_WINDOW_BYTES = 4 * 2**20


def channel_options(chunk_bytes: int) -> list[tuple[str, int]]:
    """Message limits sized to one chunk plus margin (streams carry any total size) and keepalive."""
    limit = max(MESSAGE_MARGIN, 2 * chunk_bytes + 2**20)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(chunk_bytes: int, flow_window_bytes: int = FLOW_WINDOW_BYTES) -> list[tuple[str, int]]:
    """The channel options, but a server receives at most a chunk (plus margin) per message
    (clients send small requests and chunks of the size the server tells them), and each
    stream's flow-control window is fixed at `flow_window_bytes` (0: gRPC's automatic one)."""
    receive = ("grpc.max_receive_message_length", 2 * chunk_bytes + 2**20)
    window = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", flow_window_bytes)] if flow_window_bytes > 0 else []
    return [o for o in channel_options(chunk_bytes) if o[0] != receive[0]] + [
        receive,
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
        *window,
    ]


def _read(path: Path | str | None, what: str) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    return p.read_bytes()


def server_credentials(
    cert: Path | None, key: Path | None, client_ca: Path | None, insecure: bool
) -> grpc.ServerCredentials | None:
    """TLS (mutual when `client_ca` is given), or None for plaintext with `insecure`."""
    if insecure:
        if cert or key or client_ca:
            raise ConfigError("--insecure cannot be combined with --tls-cert/--tls-key/--client-ca")
        log.warning("--insecure: the server accepts PLAINTEXT connections; updates and tokens travel unencrypted")
        return None
    if cert is None or key is None:
        raise ConfigError(
            "TLS is the default: pass --tls-cert and --tls-key (create dev ones with `skyfed certs DIR`), "
            "or --insecure for plaintext"
        )
    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    ca = _read(client_ca, "--client-ca")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    ca_cert: Path | None, cert: Path | None, key: Path | None, insecure: bool
) -> grpc.ChannelCredentials | None:
    """TLS credentials (the system roots unless `ca_cert`), or None for plaintext with `insecure`."""
    if insecure:
        if ca_cert or cert or key:
            raise ConfigError("--insecure cannot be combined with --ca-cert/--tls-cert/--tls-key")
        log.warning("--insecure: connecting in PLAINTEXT; the token and updates travel unencrypted")
        return None
    if (cert is None) != (key is None):
        raise ConfigError("mutual TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_cert, "--ca-cert"),
        private_key=_read(key, "--tls-key"),
        certificate_chain=_read(cert, "--tls-cert"),
    )
