"""The deployment commands of the `skyfed` CLI: server, client, certs (thin: parse, call, print)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from skyfed.errors import ConfigError


def _verbose() -> None:
    logging.getLogger("skyfed").setLevel(logging.INFO)


def add_commands(app: typer.Typer) -> None:
    @app.command()
    def server(
        config: Optional[Path] = typer.Argument(None, help="experiment YAML"),
        listen: str = typer.Option("0.0.0.0:7443", "--listen", help="HOST:PORT to serve on"),
        preset: Optional[str] = typer.Option(None, "--preset", "-p", help="named experiment preset"),
        set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set federation.rounds=5"),
        tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="server certificate (PEM)", envvar="SKYFED_TLS_CERT"),
        tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="server private key (PEM)", envvar="SKYFED_TLS_KEY"),
        client_ca: Optional[Path] = typer.Option(None, "--client-ca", help="CA that signs client certificates (mutual TLS)", envvar="SKYFED_CLIENT_CA"),
        tokens: Optional[Path] = typer.Option(None, "--tokens", help="per-client secrets: YAML 'name: token' lines (required unless --open)", envvar="SKYFED_TOKENS_FILE"),
        open_: bool = typer.Option(False, "--open", help="run without tokens: anyone who knows a client's name may join (logged as a warning)"),
        insecure: bool = typer.Option(False, "--insecure", help="serve PLAINTEXT (no TLS)"),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="run directory (default runs/NAME-TIME)"),
        resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last complete round"),
        join_timeout: float = typer.Option(300.0, "--join-timeout", help="seconds to wait for every client before starting with a quorum (federation.min_clients)"),
        chunk_mib: float = typer.Option(1.0, "--chunk-mib", help="stream chunk size in MiB"),
        flow_window_mib: float = typer.Option(4.0, "--flow-window-mib", help="HTTP/2 flow-control window per upload in MiB: the most unread data one upload holds in the server; raise it on long fat links with tuned TCP buffers (0: gRPC's automatic window)"),
        metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="serve Prometheus /metrics and a status page (/) on this port (needs prometheus-client)"),
        metrics_bind: str = typer.Option("127.0.0.1", "--metrics-bind", help="address for --metrics-port (0.0.0.0: every interface)"),
        metrics_linger: float = typer.Option(0.0, "--metrics-linger", help="keep serving metrics this many seconds after the run is over"),
        stream_timeout: float = typer.Option(900.0, "--stream-timeout", help="cancel any call running longer than this (seconds)"),
        idle_timeout: float = typer.Option(60.0, "--idle-timeout", help="cancel a call whose peer sends or takes nothing for this long (seconds)"),
        max_calls_per_client: int = typer.Option(4, "--max-calls-per-client", help="calls in progress at once per client; more are refused"),
        max_calls_per_peer: int = typer.Option(32, "--max-calls-per-peer", help="calls in progress at once per peer IP address; more are refused"),
        session_ttl: float = typer.Option(600.0, "--session-ttl", help="--open: a name stays with its address until its session is silent this long (seconds)"),
    ) -> None:
        """Run the aggregation server of a real deployment (gRPC)."""
        from skyfed.config import load_config, refuse_attack
        from skyfed.runtime.grpc.auth import check_token_choice

        check_token_choice(tokens, open_)  # no tokens and no --open: one line and exit 2, before anything else
        _verbose()
        cfg = load_config(config, preset, set_)
        refuse_attack(cfg, "skyfed server")  # attacks are for simulation only
        from skyfed.runtime.grpc.limits import CallBounds  # the runtime (torch, grpc) once the config is valid
        from skyfed.runtime.grpc.server import ServerOptions, run_server

        bounds = CallBounds(max_calls_per_client, max_calls_per_peer, stream_timeout, idle_timeout, session_ttl)
        opts = ServerOptions(listen, tls_cert, tls_key, client_ca, tokens, insecure, out, resume, join_timeout, int(chunk_mib * 2**20),
                             metrics_port=metrics_port, metrics_bind=metrics_bind, metrics_linger_s=metrics_linger,
                             open=open_, bounds=bounds, flow_window_bytes=int(flow_window_mib * 2**20))
        run_dir, summary = run_server(cfg, opts)
        typer.echo(f"done: {summary['rounds']} rounds, val_ppl {summary['final']['val_ppl']:.2f}; run directory {run_dir.path}")

    @app.command()
    def client(
        server: str = typer.Option(..., "--server", help="HOST:PORT of the skyfed server"),
        name: str = typer.Option(..., "--name", help="this client's name in federation.clients"),
        data: Optional[Path] = typer.Option(None, "--data", help="local training data (file, folder or .jsonl); default: this client's partition of the configured corpus"),
        ca_cert: Optional[Path] = typer.Option(None, "--ca-cert", help="CA that signed the server certificate (default: system roots)", envvar="SKYFED_CA_CERT"),
        tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="client certificate (mutual TLS)", envvar="SKYFED_TLS_CERT"),
        tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="client private key (mutual TLS)", envvar="SKYFED_TLS_KEY"),
        token: Optional[str] = typer.Option(None, "--token", help="this client's secret", envvar="SKYFED_TOKEN"),
        token_file: Optional[Path] = typer.Option(None, "--token-file", help="file with this client's secret (or a tokens file)", envvar="SKYFED_TOKEN_FILE"),
        insecure: bool = typer.Option(False, "--insecure", help="connect in PLAINTEXT (no TLS)"),
        connect_timeout: float = typer.Option(60.0, "--connect-timeout", help="give up if the server cannot be reached at first for this long"),
        give_up: float = typer.Option(600.0, "--give-up", help="give up after the server has been unreachable this long"),
        max_backoff: float = typer.Option(30.0, "--max-backoff", help="cap of the exponential reconnect backoff (seconds)"),
    ) -> None:
        """Join a skyfed server as one cloud and train on local data until the server says it is over."""
        from skyfed.runtime.grpc.auth import read_client_token
        from skyfed.runtime.grpc.client import ClientOptions, run_client

        _verbose()
        if token is not None and token_file is not None:
            raise ConfigError("pass --token (SKYFED_TOKEN) or --token-file (SKYFED_TOKEN_FILE), not both")
        secret = read_client_token(token_file, name) if token_file is not None else (token or "")
        opts = ClientOptions(server, name, secret, data, ca_cert, tls_cert, tls_key, insecure,
                             connect_timeout_s=connect_timeout, give_up_s=give_up, max_backoff_s=max_backoff)
        out = run_client(opts)
        typer.echo(f"done: client {name} trained rounds {out['rounds_trained']}")

    @app.command()
    def certs(
        out: Path = typer.Argument(..., help="folder for the CA, certificates, keys and tokens.yaml"),
        clients: str = typer.Option("aws,gcp,azure", "--clients", help="comma-separated client names"),
        hosts: str = typer.Option("localhost,127.0.0.1", "--hosts", help="server DNS names / IPs for the certificate"),
    ) -> None:
        """Create a development CA, a server certificate, client certificates and a tokens file."""
        from skyfed.runtime.grpc.certs import make_dev_certs

        paths = make_dev_certs(out, [c.strip() for c in clients.split(",") if c.strip()], [h.strip() for h in hosts.split(",") if h.strip()])
        for name, path in paths.items():
            typer.echo(f"{name:>20}  {path}")
