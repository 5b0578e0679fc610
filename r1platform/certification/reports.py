"""The certification report, from one context: a standalone HTML page (inline CSS, no external
resource, so it opens anywhere and WeasyPrint renders it), its PDF, and the body of the
dashboard's certification page. Verdict first, then every check with what it measured against
its threshold, then where it ran, what ran, what it was compared with, and how it came to be.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from django.template.loader import render_to_string

from pipelines.certification.report import (
    CHECK_TITLES,
    TENSOR,
    TEXT_GENERATION,
    CheckId,
    Level,
    checks_of,
    level_checks_of,
)
from r1platform.certification.models import Certification, CertStatus
from r1platform.certification.services import REPORT_KINDS, certificate_document
from r1platform.core import storage
from r1platform.core.charts.parity import parity_chart_svg

# WeasyPrint and fontTools log every rendering step at INFO; the worker's log is for the job.
for _noisy in ("weasyprint", "fontTools"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

VERDICT_TEXT = {"pass": "pass", "fail": "fail", "not_run": "not run"}
HEADLINE = {
    CertStatus.PASSED: "Passed",
    CertStatus.FAILED: "Failed",
    CertStatus.PENDING: "Pending",
    CertStatus.ERROR: "Error",
}
COMPARISON = {"<=": "≤", ">=": "≥", "==": "=", "<": "<", "": ""}
# What a language model's report says about its criteria (its performance criterion differs).
TEXT_CRITERIA_NOTE = (
    "A language model's performance criterion is output tokens per second per card under "
    "concurrent streaming load through the serving process, with its time to first token (p99) "
    "and time per output token within budget: a streamed generation has no fixed cost per "
    "request, so requests per second (QPS) would say nothing about it."
)
CONTENT_TYPES = {
    "json": "application/json",
    "html": "text/html; charset=utf-8",
    "pdf": "application/pdf",
}


def show(value: Any) -> str:
    """A measured value or threshold for people: 0.000123 → 1.230e-04, 184712.3 → 184,712,
    True → yes, None → —."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e9):
            return f"{value:.3e}"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _with_unit(value: Any, unit: str) -> str:
    text = show(value)
    return f"{text} {unit}" if unit and text != "—" else text


def _measurement(m: dict) -> dict:
    judged = m.get("threshold") is not None and m.get("comparison")
    return {
        "name": m["name"],
        "value": _with_unit(m.get("value"), m.get("unit", "")),
        "comparison": COMPARISON.get(m.get("comparison", ""), "") if judged else "",
        "threshold": _with_unit(m.get("threshold"), m.get("unit", "")) if judged else "",
        "passed": m.get("passed"),
        "mark": {True: "✓", False: "✗"}.get(m.get("passed"), ""),
    }


def _check(c: dict) -> dict:
    return {
        "id": c["id"],
        "title": c.get("title") or CHECK_TITLES.get(CheckId(c["id"]), c["id"]),
        "verdict": c["verdict"],
        "verdict_text": VERDICT_TEXT.get(c["verdict"], c["verdict"]),
        "summary": c.get("summary", ""),
        "seconds": c.get("seconds", 0.0),
        "measurements": [_measurement(m) for m in c.get("measurements", [])],
    }


def _pairs(data: dict | None) -> list[tuple[str, str]]:
    return [(str(k), show(v)) for k, v in (data or {}).items()]


def _thresholds(doc: dict) -> list[tuple[str, str]]:
    """The thresholds in force; ``golden_rows`` (a cap) with the rows the check actually used."""
    pairs = _pairs(doc["thresholds"])
    used = (doc.get("golden") or {}).get("rows")
    if used is None:
        return pairs
    return [(k, f"{show(used)} used (at most {v})" if k == "golden_rows" else v) for k, v in pairs]


def _criteria(doc: dict) -> list[dict]:
    """The source's three criteria, each as "value comparison threshold" with its verdict."""
    rows = []
    for c in doc.get("criteria") or []:
        measured = _measurement({**c, "name": c["title"]})
        rows.append(
            {
                **measured,
                "level": c["level"],
                "verdict": c["verdict"],
                "verdict_text": VERDICT_TEXT.get(c["verdict"], c["verdict"]),
                "summary": c.get("summary", ""),
            }
        )
    return rows


def _load_details(checks: list[dict]) -> list[dict]:
    """The load checks' failures by cause and latency distribution, for the report."""
    found = []
    for c in checks:
        details = c.get("details") or {}
        if c["id"] not in (CheckId.API_SUCCESS, CheckId.QPS) or "latency" not in details:
            continue
        failures = details.get("failures") or {}
        found.append(
            {
                "title": c.get("title") or CHECK_TITLES[CheckId(c["id"])],
                "latency": [
                    (k.removesuffix("_ms"), show(v)) for k, v in details["latency"].items()
                ],
                "by_cause": list((failures.get("by_cause") or {}).items()),
                "first": failures.get("first") or [],
            }
        )
    return found


def _test_cases(checks: list[dict]) -> dict | None:
    """The scenario's test cases: counts by tag and every failed case with what came back."""
    scenario = next((c for c in checks if c["id"] == CheckId.SCENARIO), None)
    found = ((scenario or {}).get("details") or {}).get("test_cases")
    if not found:
        return None
    return {
        "cases": found.get("cases", 0),
        "by_tag": [(tag, f"{n[0]}/{n[1]}") for tag, n in (found.get("by_tag") or {}).items()],
        "failed": [
            {**case, "got": ", ".join(f"{k} {show(v)}" for k, v in case.get("got", {}).items())}
            for case in found.get("failed", [])
        ],
    }


def _histograms(checks: list[dict]) -> Any:
    parity = next((c for c in checks if c["id"] == CheckId.PARITY), None)
    return (parity or {}).get("details", {}).get("histograms")


def report_context(cert: Certification, *, live: bool = False) -> dict:
    """Everything the report templates show. ``live``: inside the dashboard, with links."""
    doc = certificate_document(cert)
    checks = [_check(c) for c in doc["checks"]]
    counts = {v: sum(1 for c in checks if c["verdict"] == v) for v in VERDICT_TEXT}
    family = (cert.report or {}).get("family", TENSOR)
    expected = level_checks_of(family)[Level(doc["level"])]
    titles = checks_of(family)
    return {
        "cert": cert,
        "doc": doc,
        "live": live,
        "headline": HEADLINE.get(cert.status, cert.status),
        "criteria": _criteria(doc),
        "load": _load_details(doc["checks"]),
        "test_cases": _test_cases(doc["checks"]),
        "checks": checks,
        "counts": {VERDICT_TEXT[v]: n for v, n in counts.items() if n},
        "missing": [titles[c] for c in expected if c.value not in {x["id"] for x in checks}],
        "text_model": family == TEXT_GENERATION,
        "criteria_note": TEXT_CRITERIA_NOTE if family == TEXT_GENERATION else "",
        "chart": parity_chart_svg(_histograms(doc["checks"])),
        "thresholds": _thresholds(doc),
        "reference": _pairs(doc["reference"]),
        "golden": _pairs(doc["golden"]),
        "engine": _pairs((cert.report or {}).get("engine")),
        "validity": doc["validity"],
    }


def render_html(cert: Certification) -> str:
    """The report as one HTML file: inline CSS and SVG, no link to anything outside it."""
    return render_to_string("certification/report.html", report_context(cert))


def render_pdf(cert: Certification) -> bytes:
    """The HTML report printed to PDF by WeasyPrint."""
    from weasyprint import HTML  # heavy (pango, cairo): only where a PDF is made

    return HTML(string=render_html(cert)).write_pdf()


@dataclass(frozen=True)
class StoredReport:
    data: bytes
    content_type: str
    filename: str


def stored_report(cert: Certification, kind: str) -> StoredReport | None:
    """A finished certification's rendered report; None until it exists."""
    if kind not in REPORT_KINDS or cert.status not in (CertStatus.PASSED, CertStatus.FAILED):
        return None
    relative = getattr(cert, f"report_{kind}")
    if not relative:
        return None
    path = storage.media_path(relative)
    if not path.is_file():
        return None
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", cert.version.model.name).strip("-") or "model"
    filename = f"certificate-{cert.pk}-{model}-v{cert.version.number}.{kind}"
    return StoredReport(path.read_bytes(), CONTENT_TYPES[kind], filename)
