"""What a WAN run measured, set against the simulator's cloud model (skyfed.clouds).

Times. The relays log every chunk they read with one host-wide monotonic clock: the tap
at the server's end of each link, the delay relay at the client's end. For each round and
client the transfer of the task (down) and of the update (up) is the shortest run of
chunks that carries the payload's bytes (`payload_window`), so that the registration reply
or a poll sent just before or after does not count. Then

    download = last byte at the client end + the relay's hold (rtt/2)  -  first byte at the server end
    upload   = last byte at the server end  -  first byte at the client end

are the quantities of `CloudNetwork.download_s` / `upload_s` (RTT/2 + bytes x 8 / rate),
which are evaluated for the same bytes and profiles. The round: the server's
`wall_time_s - eval_s` (task built and sent ... global model published; the simulated
round has no evaluation) against the model's round with the compute time measured on
the clients, `max_c(download_c + compute_c + upload_c) + aggregate_s`.

Bytes. The egress ledger bills a client's update to its cloud and the model sent to it
to the server's cloud (`CloudNetwork.bill_upload` / `bill_download`), payload bytes only;
the relays count every application byte that crossed the link (TLS records, HTTP/2 and
gRPC framing, the registration with the tokenizer, polls); the veths count layer 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from skyfed.clouds import CloudNetwork, network_from_config
from skyfed.config import load_config

GAP_S = 0.3  # a transfer's data chunks are closer than this (seen: at most 0.02 s apart)
MIN_CHUNK = 1000  # smaller reads are control frames (HTTP/2 window updates, pings, headers)


def bursts(events: list, direction: str, gap_s: float = GAP_S) -> list[list[tuple[float, int]]]:
    """The relay's data chunks in one direction, cut where no data moved for `gap_s`."""
    out: list[list[tuple[float, int]]] = []
    for t, d, n in events:
        if d != direction or n < MIN_CHUNK:
            continue
        if out and t - out[-1][-1][0] < gap_s:
            out[-1].append((t, n))
        else:
            out.append([(t, n)])
    return out


def payload_window(burst: list[tuple[float, int]], nbytes: int) -> tuple[float, float, int] | None:
    """(first, last read time, bytes) of the shortest run of chunks holding >= `nbytes`, or None."""
    best, total, i = None, 0, 0
    for j, (_, n) in enumerate(burst):
        total += n
        while total - burst[i][1] >= nbytes:
            total -= burst[i][1]
            i += 1
        if total >= nbytes and (best is None or burst[j][0] - burst[i][0] < best[1] - best[0]):
            best = (burst[i][0], burst[j][0], total)
    return best


def transfer_windows(events: list, direction: str, sizes: list[int]) -> list[tuple[float, float, int]] | None:
    """One window per round: the bursts large enough for that round's payload, in time order."""
    big = [b for b in bursts(events, direction) if sum(n for _, n in b) >= min(sizes)]
    if len(big) != len(sizes):
        return None
    windows = [payload_window(b, size) for b, size in zip(big, sizes)]
    return None if any(w is None for w in windows) else windows


def client_windows(run: dict[str, Any], client: str) -> dict[str, list[tuple[float, float, int]] | None]:
    """The task and update transfers of `client` seen at both ends of its link, per round."""
    relay = run["relays"][client]
    sizes = {"down": [m["bytes_down_by_client"][client] for m in run["metrics"]],
             "up": [m["bytes_up_by_client"][client] for m in run["metrics"]]}
    return {f"{d}_{end}": transfer_windows(relay[f"{end}_end"]["events"], d, sizes[d])
            for d in ("down", "up") for end in ("server", "client")}


def measured_timing(run: dict[str, Any]) -> dict[str, list[dict[str, float]] | None]:
    """Per client, per round: download_s, upload_s, between_s (download end to upload start:
    decode, train, encode) and total_s, from the relay logs; None where the transfers could
    not be told apart."""
    out: dict[str, list[dict[str, float]] | None] = {}
    for link in run["links"]:
        c = link["name"]
        hold = run["relays"][c]["client_end"]["delay_s"]
        w = client_windows(run, c)
        if any(v is None for v in w.values()):
            out[c] = None
            continue
        rows = []
        for ds, dc, uc, us in zip(w["down_server"], w["down_client"], w["up_client"], w["up_server"]):
            d_end = dc[1] + hold
            rows.append({"download_s": d_end - ds[0], "upload_s": us[1] - uc[0], "between_s": uc[0] - d_end, "total_s": us[1] - ds[0]})
        out[c] = rows
    return out


def network(run: dict[str, Any]) -> CloudNetwork:
    """The simulator's network for the run's own config (the links as cloud profiles)."""
    return network_from_config(load_config(run["config"], "smoke"), num_params=1)


def model_timing(run: dict[str, Any]) -> dict[str, list[dict[str, float]]]:
    """`CloudNetwork`'s download/upload for each round's real bytes, with the measured compute."""
    net = network(run)
    out: dict[str, list[dict[str, float]]] = {}
    for link in run["links"]:
        c = link["name"]
        out[c] = [{"download_s": net.download_s(c, m["bytes_down_by_client"][c]), "compute_s": m["compute_s"][c],
                   "upload_s": net.upload_s(c, m["bytes_up_by_client"][c])} for m in run["metrics"]]
        for row in out[c]:
            row["total_s"] = row["download_s"] + row["compute_s"] + row["upload_s"]
    return out


def ledger(run: dict[str, Any]) -> dict[str, int]:
    """The egress bytes per cloud that the simulator's ledger bills for the run's transfers."""
    net = network(run)
    for m in run["metrics"]:
        for c, n in m["bytes_down_by_client"].items():
            net.bill_download(c, n)
        for c, n in m["bytes_up_by_client"].items():
            net.bill_upload(c, n)
    return dict(net.egress_bytes)


def compare(run: dict[str, Any]) -> dict[str, Any]:
    """Times and bytes, measured against the model; ratios are measured / model."""
    measured, model = measured_timing(run), model_timing(run)
    rounds = []
    for r, m in enumerate(run["metrics"]):
        predicted = {c: rows[r]["total_s"] for c, rows in model.items()}
        slow = max(predicted, key=predicted.get)
        measured_round = m["wall_time_s"] - m["eval_s"]
        model_round = predicted[slow] + m["aggregate_s"]
        row = {"round": r, "measured_s": measured_round, "model_s": model_round, "ratio": measured_round / model_round,
               "slowest_by_model": slow, "wall_time_s": m["wall_time_s"], "eval_s": m["eval_s"], "aggregate_s": m["aggregate_s"]}
        totals = {c: rows[r]["total_s"] for c, rows in measured.items() if rows is not None}
        if totals:  # the round outside the clients' transfers: the server's task building, decoding, folding, step
            last = max(totals, key=totals.get)
            row.update({"slowest_measured": last, "slowest_total_s": totals[last], "server_rest_s": measured_round - totals[last]})
        rounds.append(row)
    clients = {}
    for c in model:
        row: dict[str, Any] = {"model": model[c], "measured": measured[c]}
        if measured[c] is not None:
            comm_meas = sum(x["download_s"] + x["upload_s"] for x in measured[c])
            comm_model = sum(x["download_s"] + x["upload_s"] for x in model[c])
            row["comm_ratio"] = comm_meas / comm_model
            row["download_ratio"] = [a["download_s"] / b["download_s"] for a, b in zip(measured[c], model[c])]
            row["upload_ratio"] = [a["upload_s"] / b["upload_s"] for a, b in zip(measured[c], model[c])]
        clients[c] = row
    return {"rounds": rounds, "round_ratio_mean": float(np.mean([x["ratio"] for x in rounds])),
            "clients": clients, "bytes": compare_bytes(run)}


def compare_bytes(run: dict[str, Any]) -> dict[str, Any]:
    """Per client and direction: the ledger's payload bytes against what crossed the link,
    counted by the relay at the server's end (`relay`: every TLS byte; `in_transfers`: the
    bytes of the payload windows, i.e. the payload and its framing; `session`: the rest,
    the TLS handshake, the registration with the tokenizer, polls) and by the veth
    (`veth`: layer 2, with TCP/IP headers); `*_over_ledger` are ratios."""
    billed = ledger(run)
    server_cloud = network(run).server_cloud
    out: dict[str, Any] = {"ledger": billed, "server_cloud": server_cloud, "clients": {}}
    down_total = {"ledger": billed[server_cloud], "relay": 0, "veth": 0}
    for link in run["links"]:
        c = link["name"]
        relay, veth, w = run["relays"][c], run["veth"][c], client_windows(run, c)
        row = {}
        for d, ledger_bytes, veth_bytes in (("up", billed[c], veth["client_tx_bytes"]),
                                            ("down", sum(m["bytes_down_by_client"][c] for m in run["metrics"]), veth["server_tx_bytes"])):
            side = {"ledger": ledger_bytes, "relay": relay["server_end"]["bytes"][d], "veth": veth_bytes}
            if w[f"{d}_server"] is not None:
                side["in_transfers"] = sum(x[2] for x in w[f"{d}_server"])
                side["session"] = side["relay"] - side["in_transfers"]
                side["in_transfers_over_ledger"] = side["in_transfers"] / ledger_bytes
            side["relay_over_ledger"] = side["relay"] / ledger_bytes
            side["veth_over_ledger"] = veth_bytes / ledger_bytes
            row[d] = side
        out["clients"][c] = row
        down_total["relay"] += row["down"]["relay"]
        down_total["veth"] += row["down"]["veth"]
    down_total["relay_over_ledger"] = down_total["relay"] / down_total["ledger"]
    down_total["veth_over_ledger"] = down_total["veth"] / down_total["ledger"]
    out["server_down"] = down_total
    return out
