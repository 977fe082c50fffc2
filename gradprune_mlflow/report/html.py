"""The sanitize run's HTML report: one self-contained page (inline CSS, figures as base64 PNG) that the MLflow UI
shows in its artifact viewer and that can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

from gradprune_mlflow.report.figures import png_bytes
from gradprune_mlflow.report.summary import how_measured, pct, rows, verification_headline

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#1a1a1a;max-width:60em}
h1{font-size:1.4em} h2{font-size:1.1em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} th,td{border:1px solid #ccc;padding:.25em .7em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} .ok{color:#1b7a1b} .bad{color:#b00020;font-weight:bold}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top} figcaption{font-size:.85em;color:#555}
img{max-width:100%;border:1px solid #eee}
"""


def render_report(report: dict[str, Any], *, title: str, figures: dict[str, Any] | None = None,
                  validation: dict[str, Any] | None = None, links: dict[str, str] | None = None) -> str:
    """The report page as an HTML string.

    Takes the report.json dict, a page title, figures (caption -> PIL image; None values are left out), the Great
    Expectations summary of the clean set (validation/ge_result.json) and links (label -> URL). Returns the HTML.
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>", _verification(report),
             _links(links or {}), "<h2>Before and after</h2>", _table_html(report),
             f"<p>{escape(how_measured(report))}</p>", _facts(report)]
    shown = {k: v for k, v in (figures or {}).items() if v is not None}
    if shown:
        parts.append("<h2>Figures</h2>")
        parts += [_figure(caption, image) for caption, image in shown.items()]
    parts += [_validation(validation), "</body></html>"]
    return "\n".join(p for p in parts if p)


def _verification(report: dict[str, Any]) -> str:
    """The verification verdict, first on the page (the markdown headline as plain text)."""
    line = verification_headline(report)
    if line is None:
        return ""
    style = {"passed": "ok", "failed": "bad"}.get((report.get("verification") or {}).get("verdict"), "")
    return f"<p id='verification' class='{style}'>{escape(line.replace('**', '').replace('`', ''))}</p>"


def _table_html(report: dict[str, Any]) -> str:
    before, after = report.get("before") or {}, report.get("after") or {}
    cells = "".join(f"<tr><td>{label}</td><td class='num'>{pct(before.get(key))}</td>"
                    f"<td class='num'>{pct(after.get(key))}</td></tr>" for label, key in rows(report))
    return f"<table id='before-after'><tr><th>metric</th><th>before</th><th>after</th></tr>{cells}</table>"


def _facts(report: dict[str, Any]) -> str:
    det = report.get("detection") or {}
    facts = [("mode", report.get("mode")), ("device", report.get("device")), ("seconds", report.get("seconds")),
             ("trigger", report.get("trigger_source")), ("detected target class", det.get("target")),
             ("anomaly index", det.get("anomaly_index")), ("flagged", det.get("flagged")),
             ("flagged by", det.get("flagged_by")),
             ("flag score", _score(det.get("score"))),
             ("filters pruned", f"{report.get('pruned_filters')} of {report.get('total_filters')}"),
             ("fine-tuning epochs", report.get("finetune_epochs")),
             ("distillation weight", report.get("distill_weight")),
             ("away-from-target weight", report.get("away_weight")), ("evaluated on", report.get("evaluated_on")),
             ("evaluated images", report.get("evaluated_images"))]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in facts if v is not None)
    return f"<table id='facts'>{rows}</table>"


def _score(score: dict | None) -> str | None:
    if not score:
        return None
    from gradprune_mlflow.defense.evidence import describe

    return f"{score['verdict']}: {describe(score)}"


def _figure(caption: str, image: Any) -> str:
    data = base64.b64encode(png_bytes(image)).decode("ascii")
    return (f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _links(links: dict[str, str]) -> str:
    if not links:
        return ""
    items = " | ".join(f"<a href='{escape(url)}' target='_top'>{escape(label)}</a>" for label, url in links.items())
    return f"<p>{items}</p>"


def _validation(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "<h2>Clean set validation</h2><p>No Great Expectations result was recorded for this run.</p>"
    stats, data = summary.get("statistics") or {}, summary.get("data") or {}
    verdict = "<span class='ok'>passed</span>" if summary.get("success") else "<span class='bad'>FAILED</span>"
    head = (f"<h2>Clean set validation (Great Expectations)</h2><p>Suite {escape(str(summary.get('suite', '?')))} "
            f"{verdict}: {stats.get('successful_expectations', '?')} of {stats.get('evaluated_expectations', '?')} "
            f"expectations met on {escape(str(data.get('source', '?')))} ({data.get('rows', '?')} images).</p>")
    failed = "".join(f"<li>{escape(str(f))}</li>" for f in summary.get("failed") or [])
    rows = "".join(
        f"<tr><td>{escape(str(e.get('check')))}</td><td>{escape(str(e.get('column', '')))}</td>"
        f"<td class='{'ok' if e.get('success') else 'bad'}'>{'yes' if e.get('success') else 'no'}</td></tr>"
        for e in summary.get("expectations") or [])
    table = f"<table id='expectations'><tr><th>check</th><th>column</th><th>met</th></tr>{rows}</table>" if rows else ""
    return head + (f"<ul>{failed}</ul>" if failed else "") + table
