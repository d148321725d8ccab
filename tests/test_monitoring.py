"""`skyfed server --metrics-port`: Prometheus /metrics and the status page.

The end-to-end test scrapes a real server (three real clients over TLS, credentials from
environment variables, plus one intruder with a wrong token) and checks every counter
against metrics.jsonl; the unit test drives `ServerMonitor` directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from html.parser import HTMLParser

import pytest

pytest.importorskip("prometheus_client", reason="prometheus-client is not installed (pip install 'skyfed[ops]')")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from conftest import ROOT  # noqa: E402
from grpc_harness import SMOKE, dev_certs, free_port, metrics  # noqa: E402
from skyfed.federation.messages import ClientResult  # noqa: E402
from skyfed.runtime.grpc.monitor import ServerMonitor, rejection_reason  # noqa: E402
from skyfed.runtime.grpc.statuspage import render_status_page  # noqa: E402
from skyfed.runtime.grpc.transport import GrpcTransport  # noqa: E402

CLIENTS = ["aws", "gcp", "azure"]


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.headers["Content-Type"], r.read().decode("utf-8")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from Prometheus text, parsed by prometheus-client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Page(HTMLParser):
    """The status page's client table rows, its external references and its SVG points."""

    def __init__(self, text: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.refs: list[str] = []
        self.points = 0
        self.refresh = None
        self._cell: list[str] | None = None
        self._in_tbody = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.refs.append(a[key])
        if tag == "meta" and a.get("http-equiv") == "refresh":
            self.refresh = a["content"]
        if tag == "tbody":
            self._in_tbody = True
        if tag == "tr" and self._in_tbody:
            self.rows.append([])
        if tag == "td" and self._in_tbody:
            self._cell = []
        if tag == "polyline":
            self.points = len(a["points"].split())
        if tag == "script":
            self.refs.append("script")

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "tbody":
            self._in_tbody = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_monitor_counts_and_serves(tmp_path):
    transport = GrpcTransport(["aws", "<b>gcp</b>"])
    mon = ServerMonitor(transport, rounds=3)
    port = mon.serve("127.0.0.1", 0)
    try:
        transport.register("aws", "session-secret-123", 10)
        mon.registered("aws")
        mon.round_start(0)
        mon.task_sent("aws", 0, 1000)
        mon.task_sent("aws", 0, 24)
        mon.update_received("aws", 0, 500)
        mon.refused("UNAUTHENTICATED")
        mon.refused("UNAUTHENTICATED")
        mon.round_end(0, {"version": 1, "wall_time_s": 2.5, "aggregate_s": 0.02, "val_loss": 3.0, "val_ppl": 20.0,
                          "train_loss": {"aws": 3.5}, "rejected": {"<b>gcp</b>": "update from gcp: CRC-32 mismatch"}}, None)
        mon.round_start(1)
        mon.round_end(1, {"version": 2, "wall_time_s": 1.5, "aggregate_s": 0.01, "val_loss": 2.5, "val_ppl": 12.0}, None)
        ctype, text = get(f"http://127.0.0.1:{port}/metrics")
        assert ctype.startswith("text/plain")
        m = samples(text)
        assert m[("skyfed_bytes_sent_total", (("client", "aws"),))] == 1024
        assert m[("skyfed_bytes_received_total", (("client", "aws"),))] == 500
        assert m[("skyfed_bytes_received_total", (("client", "<b>gcp</b>"),))] == 0
        assert m[("skyfed_registrations_total", (("client", "aws"),))] == 1
        assert m[("skyfed_refusals_total", (("reason", "UNAUTHENTICATED"),))] == 2
        assert m[("skyfed_rejected_updates_total", (("reason", "crc"),))] == 1
        assert m[("skyfed_round", ())] == 1 and m[("skyfed_model_version", ())] == 2
        assert m[("skyfed_round_duration_seconds_count", ())] == 2 and m[("skyfed_round_duration_seconds_sum", ())] == 4.0
        assert m[("skyfed_aggregation_seconds_count", ())] == 2
        assert m[("skyfed_val_ppl", ())] == 12.0 and m[("skyfed_val_loss", ())] == 2.5
        assert m[("skyfed_clients", (("state", "registered"),))] == 1
        assert m[("skyfed_clients", (("state", "configured"),))] == 2
        assert m[("skyfed_clients", (("state", "connected"),))] == 1  # aws: an RPC just now

        ctype, html = get(f"http://127.0.0.1:{port}/")
        assert ctype.startswith("text/html")
        page = Page(html)
        assert page.refresh == "5" and page.points == 2
        assert [r[0] for r in page.rows] == ["aws", "<b>gcp</b>"]  # escaped: shown as text
        assert "<b>gcp</b>" not in html and "&lt;b&gt;gcp&lt;/b&gt;" in html
        assert page.rows[0][1:3] == ["yes", "yes"] and page.rows[1][1:3] == ["no", "no"]
        assert all(ref in ("metrics", "status.json") for ref in page.refs)  # self-contained
        assert "session-secret-123" not in html and "session-secret-123" not in text
        _, js = get(f"http://127.0.0.1:{port}/status.json")
        status = json.loads(js)
        assert [h["val_ppl"] for h in status["history"]] == [20.0, 12.0] and status["round"] == 1
        assert "session-secret-123" not in js
        with pytest.raises(urllib.error.HTTPError, match="404"):
            get(f"http://127.0.0.1:{port}/secrets")
    finally:
        mon.close()


def test_rejection_reasons():
    assert rejection_reason("update from aws: 70000 bytes exceeds federation.max_update_bytes=10") == "too_large"
    assert rejection_reason("refused by the server: update from aws: CRC-32 mismatch") == "crc"
    assert rejection_reason("update from aws: tensor h.0 has NaN or Inf values") == "non_finite"
    assert rejection_reason("update from aws: tensor x has shape (2,), expected (3,)") == "spec_mismatch"
    assert rejection_reason("refused by the server: an update stream must start with its header") == "wire_format"


def test_metrics_match_metrics_jsonl_in_a_real_run(procs, tmp_path):
    certs = dev_certs(tmp_path / "certs", CLIENTS)
    tokens = dict(line.split(": ") for line in certs["tokens.yaml"].read_text().splitlines())
    port, mport = free_port(), free_port()
    run = tmp_path / "run"
    base = {**procs.env, "PYTHONPATH": str(ROOT / "src")}  # this tree's skyfed, whatever the cwd
    # credentials as a container would get them: environment variables naming mounted files
    procs.env = {**base, "SKYFED_TLS_CERT": str(certs["server.pem"]), "SKYFED_TLS_KEY": str(certs["server.key"]),
                 "SKYFED_TOKENS_FILE": str(certs["tokens.yaml"])}
    procs.start("server", ["server", *SMOKE, "--listen", f"127.0.0.1:{port}", "--out", str(run),
                           "--metrics-port", str(mport), "--metrics-linger", "300"])
    url = f"http://127.0.0.1:{mport}"
    procs.env = {**base, "SKYFED_CA_CERT": str(certs["ca.pem"]), "SKYFED_TOKEN": "not-the-right-token"}
    procs.start("intruder", ["client", "--server", f"localhost:{port}", "--name", "aws", "--max-backoff", "1", "--connect-timeout", "300"])
    for name in CLIENTS:
        procs.env = {**base, "SKYFED_CA_CERT": str(certs["ca.pem"]), "SKYFED_TOKEN": tokens[name]}
        procs.start(name, ["client", "--server", f"localhost:{port}", "--name", name, "--max-backoff", "1", "--connect-timeout", "300"])
    procs.env = base

    def scrape() -> dict:
        assert procs.procs["server"].poll() is None, procs.logs()
        try:
            return samples(get(url + "/metrics")[1])
        except OSError:
            return {}

    # during the run: the round gauge moves and the page shows the clients
    def started() -> bool:
        try:
            return json.loads(get(url + "/status.json")[1])["round"] is not None
        except OSError:
            return False

    procs.wait_for("a round to start", lambda: scrape().get(("skyfed_clients", (("state", "registered"),))) == 3 and started(), timeout=300)
    _, live = get(url + "/status")
    assert [r[0] for r in Page(live).rows] == CLIENTS and re.search(r'id="state">(training|finished)<', live)
    assert procs.wait_exit("intruder", 120) == 2 and "wrong token" in procs.log("intruder")

    procs.wait_for("summary.json", lambda: (run / "summary.json").exists(), timeout=300)
    for name in CLIENTS:
        assert procs.wait_exit(name, 120) == 0, procs.logs()
    lines = metrics(run)
    assert [x["round"] for x in lines] == [0, 1] and all(not x["rejected"] for x in lines)
    m = scrape()
    for name in CLIENTS:
        label = (("client", name),)
        assert m[("skyfed_bytes_received_total", label)] == sum(x["bytes_up_by_client"][name] for x in lines)
        assert m[("skyfed_bytes_sent_total", label)] == sum(x["bytes_down_by_client"][name] for x in lines)
        assert m[("skyfed_updates_received_total", label)] == len(lines)
        # a client registers once to fetch the config and tokenizer, then with its token count
        assert m[("skyfed_registrations_total", label)] == 2
    assert m[("skyfed_refusals_total", (("reason", "UNAUTHENTICATED"),))] == 1  # the intruder, once
    assert not [k for k in m if k[0] == "skyfed_rejected_updates_total"]
    assert m[("skyfed_round", ())] == lines[-1]["round"] and m[("skyfed_model_version", ())] == lines[-1]["version"]
    assert m[("skyfed_round_duration_seconds_count", ())] == len(lines)
    assert m[("skyfed_round_duration_seconds_sum", ())] == pytest.approx(sum(x["wall_time_s"] for x in lines))
    assert m[("skyfed_aggregation_seconds_sum", ())] == pytest.approx(sum(x["aggregate_s"] for x in lines))
    assert m[("skyfed_val_ppl", ())] == lines[-1]["val_ppl"] and m[("skyfed_val_loss", ())] == lines[-1]["val_loss"]
    assert m[("skyfed_clients", (("state", "registered"),))] == 3

    _, html = get(url + "/")
    page = Page(html)
    assert [r[0] for r in page.rows] == CLIENTS and page.points == len(lines) and page.refresh == "5"
    assert all(r[5] == str(len(lines)) for r in page.rows)  # rounds submitted
    assert re.search(r'id="state">finished<', html)
    status = json.loads(get(url + "/status.json")[1])
    assert [h["val_ppl"] for h in status["history"]] == [x["val_ppl"] for x in lines]
    for row in status["clients"]:  # the servicer's counters against the transport's registry
        assert row["registrations"] == m[("skyfed_registrations_total", (("client", row["client"]),))]
        assert row["rounds_submitted"] == len(lines) and row["bytes_in"] == m[("skyfed_bytes_received_total", (("client", row["client"]),))]
    everything = html + json.dumps(status) + get(url + "/metrics")[1]
    for secret in [*tokens.values(), certs["server.key"].read_text().splitlines()[1]]:
        assert secret not in everything
    assert str(tmp_path) not in everything  # no paths (data, certificates, run directory)

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium:  # a real headless browser, only where one is installed already
        dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", url + "/"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)}).stdout
        assert [r[0] for r in Page(dom).rows] == CLIENTS and Page(dom).points == len(lines)
