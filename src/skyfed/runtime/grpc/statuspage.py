"""The server's status page: one self-contained HTML page from `ServerMonitor.status()`.

It shows the run's state, the current round and model version, a table of the clients
and the validation perplexity per round as an inline SVG curve. No script, stylesheet or
font is fetched from anywhere; the page reloads itself every `REFRESH_S` seconds. It is
built only from the status dict (client names, counts, bytes, losses): no token,
session id, certificate or data path can reach it.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

REFRESH_S = 5
W, H, PAD = 560, 220, 40


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def perplexity_svg(history: list[dict[str, Any]]) -> str:
    """An SVG line of val_ppl per round (log scale when it spans more than 10x)."""
    points = [(h["round"], h["val_ppl"]) for h in history if isinstance(h.get("val_ppl"), (int, float)) and math.isfinite(h["val_ppl"]) and h["val_ppl"] > 0]
    if not points:
        return '<p class="muted">no evaluated round yet</p>'
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    log_scale = max(ys) / min(ys) > 10
    f = math.log10 if log_scale else (lambda v: v)
    y0, y1 = f(min(ys)), f(max(ys))
    x0, x1 = min(xs), max(xs)

    def sx(x: float) -> float:
        return PAD + (W - 2 * PAD) * ((x - x0) / (x1 - x0) if x1 > x0 else 0.5)

    def sy(y: float) -> float:
        return H - PAD - (H - 2 * PAD) * ((f(y) - y0) / (y1 - y0) if y1 > y0 else 0.5)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3"><title>round {x}: {y:.2f}</title></circle>' for x, y in points)
    return (
        f'<svg id="ppl" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="validation perplexity per round">'
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#999"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="#999"/>'
        f'<text x="{PAD}" y="{PAD - 8}" font-size="12">val ppl{" (log)" if log_scale else ""}: {max(ys):.2f} → {ys[-1]:.2f}</text>'
        f'<text x="{W - PAD}" y="{H - PAD + 16}" font-size="12" text-anchor="end">round {x1}</text>'
        f'<text x="{PAD}" y="{H - PAD + 16}" font-size="12">round {x0}</text>'
        f'<polyline points="{line}" fill="none" stroke="#1f6feb" stroke-width="2"/>{dots}</svg>'
    )


def render_status_page(status: dict[str, Any]) -> str:
    rows = []
    for c in status["clients"]:
        rows.append(
            "<tr>"
            f"<td>{escape(str(c['client']))}</td>"
            f"<td>{'yes' if c['registered'] else 'no'}</td>"
            f"<td class=\"{'ok' if c['connected'] else 'bad'}\">{'yes' if c['connected'] else 'no'}</td>"
            f"<td>{_num(c['last_seen_s'], '{:.0f} s ago')}</td>"
            f"<td>{'submitted' if c['submitted'] else ('training' if c['in_round'] else '–')}</td>"
            f"<td>{c['rounds_submitted']}</td>"
            f"<td>{c['registrations']}</td>"
            f"<td>{_bytes(c['bytes_out'])}</td>"
            f"<td>{_bytes(c['bytes_in'])}</td>"
            f"<td>{_num(c['train_loss'])}</td>"
            "</tr>"
        )
    evaluated = [h for h in status["history"] if "val_ppl" in h]  # eval.interval skips rounds
    last = evaluated[-1] if evaluated else {}
    current = "–" if status["round"] is None else f"{status['round']} of {status['rounds']} (0-based)"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>skyfed server: round {escape(str(status['round']))}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: left; }}
.ok {{ color: #1a7f37; }} .bad {{ color: #cf222e; }} .muted {{ color: #888; }}
</style></head>
<body>
<h1>skyfed server</h1>
<p id="summary">state: <b id="state">{escape(status['state'])}</b> · round <b id="round">{escape(current)}</b> ·
model version <b id="version">{status['version']}</b> · val loss {_num(last.get('val_loss'))} ·
val ppl <b id="val-ppl">{_num(last.get('val_ppl'), '{:.2f}')}</b> · up {status['uptime_s']:.0f} s</p>
<h2>Clients</h2>
<table id="clients"><thead><tr><th>client</th><th>registered</th><th>connected</th><th>last seen</th>
<th>this round</th><th>rounds submitted</th><th>registrations</th><th>sent to it</th><th>received from it</th>
<th>train loss</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Validation perplexity</h2>
{perplexity_svg(status['history'])}
<p class="muted">Refreshes every {REFRESH_S} s · <a href="metrics">/metrics</a> · <a href="status.json">/status.json</a></p>
</body></html>
"""
