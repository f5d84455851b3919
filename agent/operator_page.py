"""The operator page at `/`: server-rendered HTML, no scripts, no build step.

What a line engineer needs when a station starts rejecting good parts: every ROI with its sample
counts and threshold (and how it was set), where that threshold sits in the OK (and NG) score
distribution next to the latest predictions, and the last results with their heatmaps.
"""

from __future__ import annotations

import time
from html import escape

import numpy as np

from .recent import RecentResult

CSS = """
body{font:14px system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2430}
header{background:#1d2430;color:#fff;padding:10px 20px}header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;color:#c8cdd6}main{padding:12px 20px}h2{font-size:16px;margin:18px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%}th,td{padding:6px 8px;border-bottom:1px solid #e2e5ea;
text-align:left;vertical-align:middle}th{background:#e9ecf1;font-weight:600}
.ok{color:#16794a;font-weight:600}.ng{color:#c0262d;font-weight:600}.warn{color:#a65f00;font-weight:600}.err{color:#8a5a00;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;
padding:8px;width:220px}.card img{width:100%;border-radius:4px;background:#000}.card.anomaly{border-color:#c0262d}
.muted{color:#6b7482;font-size:12px}code{font-size:11px;word-break:break-all}.legend span{margin-right:10px}
"""

PLOT_W, PLOT_H, BINS = 380, 100, 30


def _fmt(v: object, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else escape(str(v))


def score_plot(ok: list[float], ng: list[float], threshold: float | None, recent: list[float]) -> str:
    """Histogram of OK (green) and NG (red) calibration scores, the threshold (dashed) and recent scores (ticks)."""
    values = [*ok, *ng, *recent, *([threshold] if threshold else [])]
    if not values:
        return '<span class="muted">no scores yet</span>'
    span = (max(values) - min(values)) or abs(max(values)) or 1.0
    low, top = max(0.0, min(values) - 0.15 * span), max(values) + 0.15 * span
    x = lambda v: 4 + (PLOT_W - 8) * min(max((v - low) / (top - low), 0.0), 1.0)  # noqa: E731
    base = PLOT_H - 18
    edges = np.linspace(low, top, BINS + 1)
    hist = {name: np.histogram(vals, edges)[0] for name, vals in (("ok", ok), ("ng", ng))}
    peak = max(1, *(int(h.max()) for h in hist.values()))
    parts = [f'<svg class="scores" width="{PLOT_W}" height="{PLOT_H}" viewBox="0 0 {PLOT_W} {PLOT_H}" '
             f'role="img" data-threshold="{threshold if threshold is not None else ""}" data-n-ok="{len(ok)}">',
             f"<title>{len(ok)} OK and {len(ng)} NG calibration scores, threshold {_fmt(threshold)}</title>",
             f'<rect x="0" y="0" width="{PLOT_W}" height="{PLOT_H}" fill="#fbfcfd" stroke="#e2e5ea"/>']
    bw = (PLOT_W - 8) / BINS
    for name, colour in (("ok", "#2e9d62"), ("ng", "#d6453d")):
        for i, n in enumerate(hist[name]):
            if n:
                h = (base - 6) * n / peak
                parts.append(f'<rect class="bar-{name}" x="{4 + i * bw:.1f}" y="{base - h:.1f}" width="{bw - 1:.1f}" '
                             f'height="{h:.1f}" fill="{colour}" fill-opacity="0.7"/>')
    for v in recent:
        parts.append(f'<line class="recent" x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{base + 1}" y2="{base + 7}" '
                     'stroke="#2b5fd9" stroke-width="1.5"/>')
    if threshold is not None:
        tx = x(threshold)
        parts.append(f'<line class="threshold" x1="{tx:.1f}" x2="{tx:.1f}" y1="2" y2="{base + 8}" stroke="#1d2430" '
                     'stroke-dasharray="4 3" stroke-width="1.5"/>')
        anchor = "end" if tx > PLOT_W * 0.7 else "start"
        parts.append(f'<text x="{tx + (-4 if anchor == "end" else 4):.1f}" y="12" font-size="10" '
                     f'text-anchor="{anchor}">threshold {_fmt(threshold)}</text>')
    parts.append(f'<text x="4" y="{PLOT_H - 3}" font-size="10" fill="#6b7482">{_fmt(low, 3)}</text>'
                 f'<text x="{PLOT_W - 4}" y="{PLOT_H - 3}" font-size="10" fill="#6b7482" text-anchor="end">'
                 f"{_fmt(top, 3)}</text></svg>")
    return "".join(parts)


def _policy(state: dict) -> str:
    p = state.get("threshold_policy") or {}
    src = "set by calibrate" if p.get("source") == "calibrate" else "from config"
    return f"{escape(str(p.get('policy')))} <span class='muted'>({src})</span>"


def _lifecycle(s: dict) -> str:
    """Drift state, suspect OK samples and kept versions of a ROI (issue: the operator sees them without files)."""
    d = s.get("drift") or {}
    state = d.get("state", "ok")
    colour = {"ok": "ok", "warning": "warn", "alarm": "ng"}.get(state, "muted")
    drift = (f'<span class="{colour} drift">drift {escape(state)}</span>'
             + (f' <span class="muted">(good parts at {d["margin_used"]:.0%} of the margin, NG rate '
                f'{d["ng_rate"]:.0%}, {d["predictions"]} recent)</span>' if d.get("margin_used") is not None else "")
             + "".join(f"<br><span class='muted'>{escape(x)}</span>" for x in d.get("reasons", [])))
    sus = s.get("suspect_samples") or []
    suspects = (f'<br><span class="warn suspects">{len(sus)} suspect OK sample(s): '
                + ", ".join(f"<code>{escape(x['sample_id'])}</code> ({x['loo_score']:.3g})" for x in sus[:3])
                + "</span>") if sus else ""
    versions = s.get("versions") or []
    kept = f"<br><span class='muted'>versions kept: {escape(', '.join(map(str, versions[-10:])))}</span>" if versions \
        else ""
    return f"<td class='lifecycle'>{drift}{suspects}{kept}</td>"


def _roi_rows(states: list[dict], manifests_scores: dict, recent: list[RecentResult]) -> str:
    if not states:
        return "<p class='muted'>No ROI fitted yet: send OK samples (fit_ok) by folder, MQTT or HTTP.</p>"
    rows = []
    for s in states:
        key = (s["role_id"], s["roi_id"])
        ok, ng = manifests_scores.get(key, ([], []))
        scores = [r.result["data"]["score"] for r in recent
                  if r.result["status"] == "ok" and r.result["action"] == "predict"
                  and (r.result["role_id"], r.result["roi_id"]) == key]
        details = s.get("threshold_details") or {}
        rows.append(
            f'<tr class="roi" id="roi-{escape(s["role_id"])}-{escape(s["roi_id"])}">'
            f'<td><b>{escape(s["role_id"])}/{escape(s["roi_id"])}</b><br><span class="muted">v{s["model_version"]} · '
            f'{escape(str(s.get("updated_utc", "")))}</span></td>'
            f'<td class="n-ok">{s["samples"]["ok"]}</td><td class="n-ng">{s["samples"]["ng"]}</td>'
            f'<td>{s["bank_size"]}</td><td class="thr">{_fmt(s["threshold"])}</td>'
            f'<td>{escape(s["threshold_method"])}<br><span class="muted">policy {_policy(s)}'
            f'{"; NG/OK separable" if details.get("separable") else ""}</span></td>'
            f"<td>{score_plot(ok, ng, s['threshold'], scores)}</td>{_lifecycle(s)}</tr>")
    return ("<table><tr><th>ROI</th><th>OK</th><th>NG</th><th>bank</th><th>threshold</th><th>how it was set</th>"
            "<th>OK / NG scores vs threshold "
            "<span class='legend muted'><span style='color:#2e9d62'>■ OK</span><span style='color:#d6453d'>■ NG"
            "</span><span style='color:#2b5fd9'>| recent</span></span></th><th>drift, suspects, versions</th></tr>"
            + "".join(rows) + "</table>")


def _result_cards(recent: list[RecentResult]) -> str:
    if not recent:
        return "<p class='muted'>No results yet.</p>"
    cards = []
    for item in recent:
        r = item.result
        head = (f"<b>{escape(r['role_id'])}/{escape(r['roi_id'])}</b> · {escape(r['action'])} · "
                f"{escape(item.ingress)}<br><span class='muted'>{escape(r['timestamp_utc'])}<br>"
                f"<code>{escape(str(r['request_id']))[:60]}</code></span>")
        if r["status"] != "ok":
            err = r["error"]
            cards.append(f'<div class="card result error">{head}<br><span class="err">error {escape(err["code"])}'
                         f"</span><br><span class='muted'>{escape(err['message'])[:200]}</span></div>")
            continue
        d = r["data"]
        if r["action"] != "predict":
            cards.append(f'<div class="card result">{head}<br>samples OK {d.get("samples", {}).get("ok")} / '
                         f'NG {d.get("samples", {}).get("ng")}, threshold {_fmt(d.get("threshold"))}</div>')
            continue
        verdict = '<span class="ng">NG (anomaly)</span>' if d["is_anomaly"] else '<span class="ok">OK</span>'
        img = (f'<img src="/ui/heatmap/{item.seq}.png" alt="heatmap {escape(str(r["request_id"]))}">'
               if item.preview is not None else "")
        area = d["defects"].get("total_area_mm2")
        cards.append(
            f'<div class="card result{" anomaly" if d["is_anomaly"] else ""}">{img}{head}<br>{verdict} '
            f'score {_fmt(d["score"])} / {_fmt(d["threshold"])}<br><span class="muted">{d["inference_ms"]:.0f} ms · '
            f'{d["defects"]["count"]} defect(s){f", {area:.3g} mm²" if area else ""}</span></div>')
    return f'<div class="grid">{"".join(cards)}</div>'


def render_page(states: list[dict], scores: dict, recent: list[RecentResult], health: dict,
                refresh_s: float) -> str:
    """scores: {(role_id, roi_id): (ok_scores, ng_scores)} from the manifests."""
    refresh = f'<meta http-equiv="refresh" content="{refresh_s:g}">' if refresh_s > 0 else ""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(health.get("counts", {}).items())) or "no requests yet"
    up = time.strftime("%H:%M:%S", time.gmtime(health.get("uptime_s", 0)))
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{refresh}<title>anomaly-agent</title>"
        f"<style>{CSS}</style></head><body><header><h1>anomaly-agent · {escape(health.get('agent_id', ''))}</h1>"
        f"<p>{escape(str(health.get('backbone', {}).get('name', '')))} on {escape(health.get('device', ''))} · "
        f"up {up} · queue {health.get('queue_depth', 0)} · {escape(counts)}</p></header><main>"
        f"<h2>ROIs</h2>{_roi_rows(states, scores, recent)}"
        f"<h2>Last {len(recent)} results</h2>{_result_cards(recent)}"
        f"<p class='muted'>{f'Refreshes every {refresh_s:g} s' if refresh_s > 0 else 'Reload for new results'} · "
        "<a href='/docs'>API</a> · <a href='/metrics'>metrics</a>"
        "</p></main></body></html>")
