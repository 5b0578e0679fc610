"""The compare page's tables: versions of one model side by side (metrics, benchmark rows at
the same batch and device, and certifications).

Only rows measured alike are put in one line: the same batch size on the same device, each
version's row from the latest job that benchmarked it. A row whose timing windows disagreed is
marked and never called the fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from r1platform.certification.models import Certification
from r1platform.registry.history import shape_text
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel

MAX_VERSIONS = 8


@dataclass
class Line:
    """One line of a comparison table: a label and one cell per version (None: no value)."""

    label: str
    cells: list[Any]
    best: int | None = None  # index of the cell to highlight
    notes: list[str] = field(default_factory=list)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def metric_lines(versions: list[ModelVersion]) -> list[Line]:
    """Every numeric metric any of the versions has, one line each (parent copies left out)."""
    keys = sorted(
        {
            k
            for v in versions
            for k, value in (v.metrics or {}).items()
            if _finite(value) is not None and not k.startswith("parent_")
        }
    )
    return [Line(k, [_finite((v.metrics or {}).get(k)) for v in versions]) for k in keys]


def benchmark_lines(versions: list[ModelVersion]) -> list[Line]:
    """One line per (batch size, device, input shapes): each version's row from its latest
    benchmarking job."""
    latest: dict[tuple[int, int, str, str], BenchmarkResult] = {}
    rows = BenchmarkResult.objects.filter(version__in=versions).order_by("-job_id", "-pk")
    for row in rows:
        shape = shape_text(row.shapes)
        latest.setdefault((row.version_id, row.batch_size, row.device, shape), row)
    order = {v.pk: i for i, v in enumerate(versions)}
    groups: dict[tuple[int, str, str], list[BenchmarkResult | None]] = {}
    for (version_id, batch, device, shape), row in latest.items():
        groups.setdefault((batch, device, shape), [None] * len(versions))[order[version_id]] = row
    lines = []
    for (batch, device, shape), cells in sorted(groups.items()):
        present = [(row.throughput, i, row.converged) for i, row in enumerate(cells) if row]
        # A fastest only among two or more rows, all steady: an unsteady row may be the fastest.
        comparable = len(present) > 1 and all(steady for _, _, steady in present)
        best = max(present)[1] if comparable else None
        notes = [n for n in (device, shape) if n]
        lines.append(Line(f"batch {batch}", cells, best, notes))
    return lines


def certification_lines(versions: list[ModelVersion]) -> list[Line]:
    """One line per (profile, level): each version's latest certification there."""
    latest: dict[tuple[int, str, str], Certification] = {}
    certs = (
        Certification.objects.filter(version__in=versions)
        .select_related("profile")
        .order_by("-created_at", "-pk")
    )
    for cert in certs:
        latest.setdefault((cert.version_id, cert.profile.key, cert.level), cert)
    order = {v.pk: i for i, v in enumerate(versions)}
    groups: dict[tuple[str, str], list[Certification | None]] = {}
    for (version_id, profile, level), cert in latest.items():
        groups.setdefault((profile, level), [None] * len(versions))[order[version_id]] = cert
    return [
        Line(f"{level} on {profile}", cells) for (profile, level), cells in sorted(groups.items())
    ]


def chosen_versions(model: RegisteredModel, raw_ids: list[str]) -> tuple[list[ModelVersion], str]:
    """The model's versions named in ``?v=``, in version order, and a problem to show, if any."""
    ids = {int(x) for x in raw_ids if x.isdigit()}
    versions = list(
        model.versions.filter(pk__in=ids).select_related("parent", "job").order_by("number")
    )
    if len(versions) > MAX_VERSIONS:
        return versions[:MAX_VERSIONS], f"at most {MAX_VERSIONS} versions side by side"
    if len(versions) < 2:
        return versions, "pick two or more versions of this model to compare them"
    return versions, ""
