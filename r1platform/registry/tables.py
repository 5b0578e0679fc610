"""The compare page's tables: versions of one model side by side (metrics, benchmark rows at
the same batch and device, and certifications).

Only rows measured alike are put in one line: the same batch size, device and input shapes.
Only rows of one job are compared (the benchmark stage times a lineage together; rows of
different jobs do not compare on a busy worker): a row from another job is shown marked "not
measured together". A row whose timing windows disagreed is marked and never called the fastest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from r1platform.certification.models import Certification
from r1platform.registry.history import by_job, newest_first, row_key
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel

MAX_VERSIONS = 8


@dataclass
class Line:
    """One line of a comparison table: a label and one cell per version (None: no value)."""

    label: str
    cells: list[Any]
    best: int | None = None  # index of the cell to highlight
    notes: list[str] = field(default_factory=list)
    apart: set[int] = field(default_factory=set)  # cells from another job: not comparable


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
    """One line per (batch size, device, input shapes), its cells from one job: the newest job
    that timed the most of the versions there (the benchmark stage times a lineage together, so
    those rows compare). A version that job did not time shows its latest row from another job,
    marked "not measured together" and never the fastest."""
    rows = list(BenchmarkResult.objects.filter(version__in=versions).select_related("job"))
    jobs = by_job(rows)
    order = {v.pk: i for i, v in enumerate(versions)}
    keys = sorted({row_key(r) for r in rows if r.p50_ms > 0})
    newest = newest_first(rows)
    lines = []
    for key in keys:
        timed = {j: [v for v, by_key in jobs.get(j, {}).items() if key in by_key] for j in newest}
        chosen = max(newest, key=lambda j: len(timed[j]))  # the newest among the fullest
        cells: list[BenchmarkResult | None] = [None] * len(versions)
        apart: set[int] = set()
        for job_id in [chosen, *(j for j in newest if j != chosen)]:
            for version_id in timed[job_id]:
                i = order[version_id]
                if cells[i] is None:
                    cells[i] = jobs[job_id][version_id][key]
                    if job_id != chosen:
                        apart.add(i)
        together = [(r, i) for i, r in enumerate(cells) if r is not None and i not in apart]
        present = [(r.throughput, i, r.converged) for r, i in together]
        # A fastest only among two or more rows of one job, all steady: an unsteady row may be
        # the fastest.
        comparable = len(present) > 1 and all(steady for _, _, steady in present)
        best = max(present)[1] if comparable else None
        batch, device, shape = key
        notes = [n for n in (device, shape) if n]
        if apart:
            notes.append("not all measured together")
        lines.append(Line(f"batch {batch}", cells, best, notes, apart))
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
