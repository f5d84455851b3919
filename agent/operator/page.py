"""The operator page at `/`: server-rendered HTML, no scripts, no build step (forms post to /label and
/ui/threshold; behind a token the browser asks once, for the tab, through HTTP Basic).

What a line engineer needs when a station starts rejecting good parts: every ROI with its current verdict,
NG rate and score trend against the threshold, its sample counts and how the threshold was set, where it
sits in the OK / NG score distribution, what another threshold would flip (previewed before it is
applied), and the last results with the image beside its heatmap and buttons to label them OK or NG.
"""

from __future__ import annotations

import time
from html import escape

import numpy as np

from agent.operator.recent import RecentResult

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
.card{width:300px}.pair{display:flex;gap:4px}.pair img{width:148px}.flash{background:#fff6d6;border:1px solid #e6c65c;
padding:6px 10px;border-radius:4px}.filter a{margin-right:10px}.labels form{display:inline}.labels button{margin:4px 4px
0 0;padding:4px 12px;font-weight:600;border-radius:4px;border:1px solid #99a1ad;background:#fff;cursor:pointer}
.labels button.ok{border-color:#16794a}.labels button.ng{border-color:#c0262d}.scale{height:10px;border-radius:3px;
background:linear-gradient(90deg,#00007f,#0000ff,#00ffff,#7fff7f,#ffff00,#ff0000,#7f0000)}
.scalebar{display:flex;justify-content:space-between;font-size:11px;color:#6b7482}
.preview{font-size:12px;margin-top:4px}.preview input{width:80px}td.trend svg{display:block}
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


TREND_W, TREND_H, TREND_N = 260, 70, 100


def trend_plot(history: list[tuple[float, bool]], threshold: float | None) -> str:
    """The last TREND_N scores of a ROI in order (NG red, OK green), the threshold dashed."""
    pts = history[-TREND_N:]
    if not pts:
        return '<span class="muted">no predictions yet</span>'
    values = [v for v, _ in pts] + ([threshold] if threshold else [])
    low, top = min(values), max(values)
    span = (top - low) or abs(top) or 1.0
    low, top = low - 0.1 * span, top + 0.1 * span
    y = lambda v: 4 + (TREND_H - 8) * (1 - (v - low) / (top - low))  # noqa: E731
    step = (TREND_W - 8) / max(1, len(pts) - 1)
    coords = [(4 + i * step, y(v)) for i, (v, _) in enumerate(pts)]
    parts = [f'<svg class="trend" width="{TREND_W}" height="{TREND_H}" viewBox="0 0 {TREND_W} {TREND_H}" role="img" '
             f'data-n="{len(pts)}"><title>last {len(pts)} scores, threshold {_fmt(threshold)}</title>'
             f'<rect width="{TREND_W}" height="{TREND_H}" fill="#fbfcfd" stroke="#e2e5ea"/>',
             '<polyline fill="none" stroke="#8a94a3" stroke-width="1" points="'
             + " ".join(f"{cx:.1f},{cy:.1f}" for cx, cy in coords) + '"/>']
    for (cx, cy), (_, bad) in zip(coords, pts, strict=True):
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="2" fill="{"#d6453d" if bad else "#2e9d62"}"/>')
    if threshold is not None:
        ty = y(threshold)
        parts.append(f'<line class="threshold" x1="2" x2="{TREND_W - 2}" y1="{ty:.1f}" y2="{ty:.1f}" stroke="#1d2430" '
                     'stroke-dasharray="4 3"/>')
    return "".join(parts) + "</svg>"


def _verdict(history: list[tuple[float, bool]]) -> str:
    if not history:
        return '<span class="muted">–</span>'
    score, bad = history[-1]
    rate = sum(b for _, b in history) / len(history)
    word = '<span class="ng verdict">NG</span>' if bad else '<span class="ok verdict">OK</span>'
    return (f"{word} <span class='muted'>{_fmt(score)}</span><br><span class='ngrate'>NG rate {rate:.0%}</span>"
            f"<span class='muted'> of {len(history)}</span>")


def _csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{escape(csrf)}">'


def _threshold_cell(s: dict, ng: list[float], preview: dict | None, csrf: str = "") -> str:
    """The threshold, how it was set, NG samples it lets pass, and the preview / apply forms."""
    role, roi, th = s["role_id"], s["roi_id"], s["threshold"]
    details = s.get("threshold_details") or {}
    passing = sum(1 for v in ng if th is not None and v <= th)
    out = [f'<b class="thr">{_fmt(th)}</b> {escape(s["threshold_method"])}<br><span class="muted">policy '
           f'{_policy(s)}{"; NG/OK separable" if details.get("separable") else ""}'
           + (f"; set by {escape(str(details['set_by']))}" if details.get("set_by") else "") + "</span>"]
    if ng:
        out.append(f'<br><span class="{"warn" if passing else "ok"} ng-pass">{passing} of {len(ng)} NG samples would '
                   f"pass the current threshold</span>")
    for w in s.get("warnings", []):  # what the threshold does to the ROI's own labelled samples
        if w.get("code") == "ok_rejects_high":
            out.append(f'<br><span class="warn ok-rejects">{escape(str(w.get("message", "")))}</span>')
    key = f"{role}/{roi}"
    value = "" if preview is None else f"{preview['threshold']:g}"
    out.append(f'<form class="preview" method="get" action="/"><input type="hidden" name="roi" value="{escape(key)}">'
               f'<input name="preview" type="number" step="any" min="0" value="{value}" placeholder="{_fmt(th)}" '
               'aria-label="threshold to preview"> <button>preview</button></form>')
    if preview is not None:
        p = preview
        out.append(f'<div class="preview result">at {p["threshold"]:.4g}: OK samples flagged {p["ok_flagged"]} of '
                   f'{p["n_ok"]} (now {p["ok_flagged_now"]}), NG samples passing {p["ng_passing"]} of {p["n_ng"]} '
                   f'(now {p["ng_passing_now"]}); of the last {p["n_recent"]} predictions {p["recent_to_ng"]} would '
                   f'turn NG, {p["recent_to_ok"]} OK'
                   f'<form method="post" action="/ui/threshold">{_csrf_field(csrf)}'
                   f'<input type="hidden" name="role_id" value="{escape(role)}">'
                   f'<input type="hidden" name="roi_id" value="{escape(roi)}"><input type="hidden" name="threshold" '
                   f'value="{p["threshold"]!r}"><button class="apply">apply {p["threshold"]:.4g} (manual)</button>'
                   "</form></div>")
    return "<td>" + "".join(out) + "</td>"


def _unloadable_rows(bad: list[dict]) -> str:
    """ROIs whose files cannot be used: named with the reason and what happens next (never a page error)."""
    if not bad:
        return ""
    items = "".join(f'<li class="unloadable"><b>{escape(b["role_id"])}/{escape(b["roi_id"])}</b>: '
                    f'<span class="err">{escape(b["unloadable"]["reason"])}</span> <span class="muted">'
                    f'{escape(b["unloadable"]["then"])}</span></li>' for b in bad)
    return f"<h2>ROIs that cannot be used</h2><ul>{items}</ul>"


def _roi_rows(states: list[dict], manifests_scores: dict, histories: dict, previews: dict, csrf: str = "") -> str:
    if not states:
        return "<p class='muted'>No ROI fitted yet: send OK samples (fit_ok) by folder, MQTT or HTTP.</p>"
    rows = []
    for s in states:
        key = (s["role_id"], s["roi_id"])
        ok, ng = manifests_scores.get(key, ([], []))
        hist = histories.get(key, [])
        rows.append(
            f'<tr class="roi" id="roi-{escape(s["role_id"])}-{escape(s["roi_id"])}">'
            f'<td><a href="/?roi={escape(s["role_id"])}/{escape(s["roi_id"])}"><b>{escape(s["role_id"])}/'
            f'{escape(s["roi_id"])}</b></a><br><span class="muted">v{s["model_version"]} · OK {s["samples"]["ok"]} · '
            f'NG {s["samples"]["ng"]} · bank {s["bank_size"]}</span></td>'
            f"<td>{_verdict(hist)}</td><td class='trend'>{trend_plot(hist, s['threshold'])}</td>"
            f"{_threshold_cell(s, ng, previews.get(key), csrf)}"
            f"<td>{score_plot(ok, ng, s['threshold'], [v for v, _ in hist[-20:]])}</td>{_lifecycle(s)}</tr>")
    return ("<table><tr><th>ROI</th><th>verdict</th><th>trend (last 100)</th><th>threshold</th><th>OK / NG scores "
            "<span class='legend muted'><span style='color:#2e9d62'>■ OK</span><span style='color:#d6453d'>■ NG"
            "</span><span style='color:#2b5fd9'>| recent</span></span></th><th>drift, suspects, versions</th></tr>"
            + "".join(rows) + "</table>")


def _scale(threshold: float) -> str:
    return (f'<div class="legendbar"><div class="scale"></div><div class="scalebar"><span>0</span><span>threshold '
            f'{_fmt(threshold)}</span><span>{_fmt(2 * threshold)}+</span></div></div>')


def _result_cards(recent: list[RecentResult], csrf: str = "") -> str:
    if not recent:
        return "<p class='muted'>No results yet.</p>"
    cards = []
    for item in recent:
        r = item.result
        name = item.file_name or str(r["request_id"])
        head = (f"<b>{escape(r['role_id'])}/{escape(r['roi_id'])}</b> · {escape(r['action'])} · "
                f"{escape(item.ingress)}<br><span class='name'>{escape(name)[:80]}</span><br><span class='muted'>"
                f"{escape(r['timestamp_utc'])}" + (f" · <code>{escape(str(r['request_id']))[:60]}</code>"
                                                   if item.file_name else "") + "</span>")
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
        pair = ""
        if item.preview is not None:
            alt = escape(name)
            pair = (f'<div class="pair"><img src="/ui/image/{item.seq}.png" alt="image {alt}">'
                    f'<img src="/ui/heatmap/{item.seq}.png" alt="heatmap {alt}"></div>{_scale(d["threshold"])}')
        area = d["defects"].get("total_area_mm2")
        labels = ""
        if item.labelled:
            labels = f'<div class="labels muted">labelled {item.labelled.upper()}</div>'
        elif item.image is not None:
            rid = escape(str(r["request_id"]))
            labels = ('<div class="labels">label as: '
                      + "".join(f'<form method="post" action="/label">{_csrf_field(csrf)}<input type="hidden" '
                                f'name="request_id" value="{rid}"><button class="{k} label-{k}" name="label" '
                                f'value="{k}">{k.upper()}</button></form>' for k in ("ok", "ng")) + "</div>")
        cards.append(
            f'<div class="card result{" anomaly" if d["is_anomaly"] else ""}" id="result-{item.seq}" '
            f'data-request="{escape(str(r["request_id"]))}">{pair}{head}<br>'
            f'{verdict} score {_fmt(d["score"])} / {_fmt(d["threshold"])}<br><span class="muted">'
            f'{d["inference_ms"]:.0f} ms · {d["defects"]["count"]} defect(s){f", {area:.3g} mm²" if area else ""}'
            f"</span>{labels}</div>")
    return f'<div class="grid">{"".join(cards)}</div>'


def render_page(states: list[dict], scores: dict, recent: list[RecentResult], health: dict, refresh_s: float,
                histories: dict | None = None, previews: dict | None = None, roi_filter: str | None = None,
                flash: str | None = None, csrf: str = "", unloadable: list[dict] | None = None) -> str:
    """scores: {(role_id, roi_id): (ok_scores, ng_scores)} from the manifests; histories: the ROI's last
    predictions (score, is_anomaly); previews: {(role_id, roi_id): thresholds.preview(...)}; csrf: this
    browser's token, in every form (agent/http/csrf.py); unloadable: ROIs whose files cannot be used."""
    refresh = (f'<meta http-equiv="refresh" content="{refresh_s:g}">' if refresh_s > 0 and not previews and not flash
               else "")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(health.get("counts", {}).items())) or "no requests yet"
    up = time.strftime("%H:%M:%S", time.gmtime(health.get("uptime_s", 0)))
    names = [f"{s['role_id']}/{s['roi_id']}" for s in states]
    if roi_filter:
        states = [s for s in states if f"{s['role_id']}/{s['roi_id']}" == roi_filter]
        recent = [i for i in recent if f"{i.result['role_id']}/{i.result['roi_id']}" == roi_filter]
    links = "".join(f'<a href="/?roi={escape(n)}"{" class=ok" if n == roi_filter else ""}>{escape(n)}</a>'
                    for n in names)
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'>{refresh}"
        f"<title>{escape(_title(health.get('agent_id', '')))}</title>"
        f"<meta name='viewport' content='width=device-width'><style>{CSS}</style></head><body><header>"
        f"<h1>{escape(_station(health.get('agent_id', '')))}</h1>"
        f"<p>{escape(str(health.get('backbone', {}).get('name', '')))} on {escape(health.get('device', ''))} · "
        f"up {up} · queue {health.get('queue_depth', 0)} · {escape(counts)}</p></header><main>"
        + (f'<p class="flash">{escape(flash)}</p>' if flash else "")
        + f'<p class="filter">ROI: <a href="/"{" class=ok" if not roi_filter else ""}>all</a>{links}</p>'
        f"<h2>ROIs</h2>{_roi_rows(states, scores, histories or {}, previews or {}, csrf)}"
        f"{_unloadable_rows(unloadable or [])}"
        f"<h2>Last {len(recent)} results</h2>{_result_cards(recent, csrf)}"
        f"<p class='muted'>{f'Refreshes every {refresh_s:g} s' if refresh else 'Reload for new results'} · "
        "<a href='/docs'>API</a> · <a href='/metrics'>metrics</a>"
        "</p></main></body></html>")


def _station(agent_id: str) -> str:
    """The page's heading: the station's agent id, said once ("anomaly-agent" when it is the default id)."""
    return agent_id if agent_id and agent_id != "anomaly-agent" else "anomaly-agent"


def _title(agent_id: str) -> str:
    station = _station(agent_id)
    return station if station == "anomaly-agent" else f"{station} · anomaly-agent"
