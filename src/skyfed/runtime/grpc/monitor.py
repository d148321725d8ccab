"""Prometheus metrics and a status page for `skyfed server --metrics-port PORT`.

    skyfed server exp.yaml ... --metrics-port 9090                  # 127.0.0.1:9090
    curl -s localhost:9090/metrics                                  # Prometheus text format
    open http://localhost:9090/                                     # status page (refreshes itself)

`ServerMonitor` is three things at once:

- an engine observer (`round_start`, `round_end` -> {}): the current round and model
  version, round duration and aggregation time (histograms), validation loss and
  perplexity, and the engine's rejected updates by reason;
- the servicer's counting hooks (`registered`, `seen`, `task_sent`, `update_received`,
  `refused`): bytes out and in per client (model and update payload bytes, counted once a
  stream is complete), registrations, gRPC refusals by status code;
- a small HTTP server (stdlib `http.server`, one thread): `/metrics` (prometheus-client,
  its own registry), `/` or `/status` (statuspage.py) and `/status.json`.

Client gauges are read from the transport's registry at each request. A client counts as
*connected* while it trains the current round (its task pulled, no update yet) or made
an RPC within `connected_window_s`. No token, session id, certificate or data path is
ever exposed; client names are the only identities shown.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from skyfed.errors import ConfigError

log = logging.getLogger(__name__)

ROUND_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
AGG_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, float("inf"))


class NullMonitor:
    """The servicer's default: every hook does nothing (no --metrics-port)."""

    def registered(self, client: str) -> None: ...
    def seen(self, client: str) -> None: ...
    def task_sent(self, client: str, round: int, nbytes: int) -> None: ...
    def update_received(self, client: str, round: int, nbytes: int) -> None: ...
    def refused(self, reason: str) -> None: ...


NO_MONITOR = NullMonitor()


def rejection_reason(message: str) -> str:
    """A small label for an engine rejection message (metrics.jsonl "rejected")."""
    m = message.lower()
    if "max_update_bytes" in m:
        return "too_large"
    if "crc" in m:
        return "crc"
    if re.search(r"\bnan\b|\binf\b|non-finite", m):
        return "non_finite"
    if "refused by the server" in m or "framing" in m or "truncated" in m or "magic" in m:
        return "wire_format"
    if "shape" in m or "dtype" in m or "name" in m:
        return "spec_mismatch"
    return "other"


class ServerMonitor(NullMonitor):
    def __init__(self, transport: Any, rounds: int, connected_window_s: float = 120.0):
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError:
            raise ConfigError("--metrics-port needs the 'prometheus-client' package (pip install 'skyfed[ops]')") from None
        self.transport = transport
        self.rounds = rounds
        self.connected_window_s = connected_window_s
        self.started = time.time()
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # monotonic time of each client's last RPC
        self._task_round: dict[str, int] = {}  # the round of the last task each client pulled
        self._update_round: dict[str, int] = {}  # the round of the last update received
        self._bytes_in: dict[str, int] = {}
        self._bytes_out: dict[str, int] = {}
        self._train_loss: dict[str, float] = {}
        self.round: int | None = None
        self.version = 0
        self.history: list[dict[str, float]] = []  # one entry per round: round, val_loss, val_ppl, duration_s
        self.finished = False
        self._http: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

        r = self.registry = CollectorRegistry()
        self.g_round = Gauge("skyfed_round", "current round (or asynchronous window)", registry=r)
        self.g_version = Gauge("skyfed_model_version", "version of the global model", registry=r)
        self.g_rounds = Gauge("skyfed_rounds_configured", "federation.rounds", registry=r)
        self.g_clients = Gauge("skyfed_clients", "clients by state: configured, registered, connected, in_round", ["state"], registry=r)
        self.g_client_up = Gauge("skyfed_client_connected", "1 if the client is connected", ["client"], registry=r)
        self.g_client_seen = Gauge("skyfed_client_last_seen_seconds", "seconds since the client's last RPC", ["client"], registry=r)
        self.c_registrations = Counter("skyfed_registrations", "successful registrations", ["client"], registry=r)
        self.c_in = Counter("skyfed_bytes_received", "update payload bytes received from each client", ["client"], registry=r)
        self.c_out = Counter("skyfed_bytes_sent", "model payload bytes sent to each client", ["client"], registry=r)
        self.c_updates = Counter("skyfed_updates_received", "updates received (streams complete)", ["client"], registry=r)
        self.c_refused = Counter("skyfed_refusals", "RPCs refused by the servicer, by gRPC status", ["reason"], registry=r)
        self.c_rejected = Counter("skyfed_rejected_updates", "updates rejected in a round (metrics.jsonl rejected)", ["reason"], registry=r)
        self.h_round = Histogram("skyfed_round_duration_seconds", "wall time of a round", buckets=ROUND_BUCKETS, registry=r)
        self.h_agg = Histogram("skyfed_aggregation_seconds", "folding and the strategy's step, per round", buckets=AGG_BUCKETS, registry=r)
        self.g_val_loss = Gauge("skyfed_val_loss", "validation loss after the last round", registry=r)
        self.g_val_ppl = Gauge("skyfed_val_ppl", "validation perplexity after the last round", registry=r)
        self.g_rounds.set(rounds)
        for name in transport.client_names():
            for metric in (self.c_registrations, self.c_in, self.c_out, self.c_updates):
                metric.labels(client=name)  # every client appears from the start, at 0

    # ------------------------------------------------------------ servicer hooks

    def seen(self, client: str) -> None:
        with self._lock:
            self._seen[client] = time.monotonic()

    def registered(self, client: str) -> None:
        self.seen(client)
        self.c_registrations.labels(client=client).inc()

    def task_sent(self, client: str, round: int, nbytes: int) -> None:
        with self._lock:
            self._task_round[client] = round
            self._bytes_out[client] = self._bytes_out.get(client, 0) + nbytes
        self.c_out.labels(client=client).inc(nbytes)

    def update_received(self, client: str, round: int, nbytes: int) -> None:
        with self._lock:
            self._update_round[client] = round
            self._bytes_in[client] = self._bytes_in.get(client, 0) + nbytes
        self.c_in.labels(client=client).inc(nbytes)
        self.c_updates.labels(client=client).inc()

    def refused(self, reason: str) -> None:
        self.c_refused.labels(reason=reason).inc()

    # ------------------------------------------------------------ engine observer

    def round_start(self, round: int) -> None:
        self.round = round
        self.g_round.set(round)

    def round_end(self, round: int, record: dict[str, Any], outcome: Any) -> dict[str, Any]:
        self.version = int(record.get("version", self.version))
        self.g_version.set(self.version)
        duration = float(record.get("wall_time_s", 0.0))
        self.h_round.observe(duration)
        self.h_agg.observe(float(record.get("aggregate_s", 0.0)))
        for message in (record.get("rejected") or {}).values():
            self.c_rejected.labels(reason=rejection_reason(str(message))).inc()
        entry = {"round": round, "duration_s": duration}
        for key, gauge in (("val_loss", self.g_val_loss), ("val_ppl", self.g_val_ppl)):
            if isinstance(record.get(key), (int, float)):
                gauge.set(record[key])
                entry[key] = float(record[key])
        with self._lock:
            self.history.append(entry)
            self._train_loss.update({c: float(v) for c, v in (record.get("train_loss") or {}).items()})
        return {}

    # ------------------------------------------------------------ views

    def client_rows(self) -> list[dict[str, Any]]:
        """One row per configured client (what the status page and /status.json show)."""
        now = time.monotonic()
        rows = []
        with self._lock:
            for name in self.transport.client_names():
                rec = self.transport.clients[name]
                seen = self._seen.get(name)
                in_round = self.round is not None and self._task_round.get(name) == self.round
                submitted = self.round is not None and self._update_round.get(name) == self.round
                registered = rec.session is not None
                training = in_round and not submitted and not self.finished
                connected = registered and (training or (seen is not None and now - seen <= self.connected_window_s))
                rows.append({
                    "client": name,
                    "registered": registered,
                    "connected": connected,
                    "last_seen_s": None if seen is None else round(now - seen, 1),
                    "in_round": in_round,
                    "submitted": submitted,
                    "rounds_submitted": len(rec.rounds_submitted),
                    "registrations": rec.registrations,
                    "bytes_in": self._bytes_in.get(name, 0),
                    "bytes_out": self._bytes_out.get(name, 0),
                    "train_loss": self._train_loss.get(name),
                })
        return rows

    def _refresh(self) -> list[dict[str, Any]]:
        self.finished = self.finished or bool(getattr(self.transport, "done", False))
        rows = self.client_rows()
        self.g_clients.labels(state="configured").set(len(rows))
        self.g_clients.labels(state="registered").set(sum(r["registered"] for r in rows))
        self.g_clients.labels(state="connected").set(sum(r["connected"] for r in rows))
        self.g_clients.labels(state="in_round").set(sum(r["in_round"] for r in rows))
        for r in rows:
            self.g_client_up.labels(client=r["client"]).set(1 if r["connected"] else 0)
            if r["last_seen_s"] is not None:
                self.g_client_seen.labels(client=r["client"]).set(r["last_seen_s"])
        return rows

    def status(self) -> dict[str, Any]:
        rows = self._refresh()
        with self._lock:
            history = [dict(h) for h in self.history]
        return {
            "state": "finished" if self.finished else ("waiting for clients" if self.round is None else "training"),
            "round": self.round,
            "rounds": self.rounds,
            "version": self.version,
            "uptime_s": round(time.time() - self.started, 1),
            "clients": rows,
            "history": history,
        }

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        self._refresh()
        return generate_latest(self.registry)

    # ------------------------------------------------------------ HTTP

    def serve(self, bind: str, port: int) -> int:
        """Serve /metrics, / (status page) and /status.json on bind:port in a thread; the port bound."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from skyfed.runtime.grpc.statuspage import render_status_page

        monitor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype = monitor.metrics_text(), CONTENT_TYPE_LATEST
                elif path in ("/", "/status"):
                    body, ctype = render_status_page(monitor.status()).encode("utf-8"), "text/html; charset=utf-8"
                elif path == "/status.json":
                    body, ctype = json.dumps(monitor.status()).encode("utf-8"), "application/json"
                else:
                    self.send_error(404, "not found: try /, /status.json or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics http: " + format, *args)

        try:
            self._http = ThreadingHTTPServer((bind, port), Handler)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port} on {bind}: cannot bind ({exc.strerror or exc})") from None
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, name="skyfed-metrics", daemon=True)
        self._thread.start()
        bound = self._http.server_address[1]
        log.info("metrics on http://%s:%d/metrics, status page on http://%s:%d/", bind, bound, bind, bound)
        return bound

    def close(self, linger_s: float = 0.0) -> None:
        """Keep serving `linger_s` more seconds (a last scrape sees the final values), then stop."""
        self.finished = True
        if self._http is None:
            return
        if linger_s > 0:
            log.info("run over; serving metrics for %.0f s more", linger_s)
            time.sleep(linger_s)
        self._http.shutdown()
        self._http.server_close()
        self._http = None
