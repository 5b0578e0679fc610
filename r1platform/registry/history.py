"""A model's benchmark history: each version's numbers, and what got faster or slower.

Only rows of the **same job** are compared. The benchmark stage times a job's input, its
ancestors back to the upload and what it made interleaved in one run, so their ratios hold on a
busy worker; rows of different jobs do not compare (an FP32 baseline's p50 ranged 56-111 ms across
six jobs on one worker), and a pair that no one job measured is "not measured together".

A version is compared with its parent and with its upload (the root of its lineage) at the same
batch size, device and input shapes, in the newest job that measured both there. The backend may
differ, since a version is often another format of its parent (TorchScript exported to ONNX);
where one version has several rows at a key in a job, the fastest stands for it. Speedup is the
reference's p50 over the version's: above 1 is faster. Within ``SAME_WITHIN`` of 1 it is the
same, given that benchmark windows agree only within 10%. A verdict needs latency and throughput
to agree (else it is *mixed*), and both rows steady (else it is *unsteady*, and no claim is
made); a ratio over ``MAX_CREDIBLE_SPEEDUP`` (50x) is unsteady too: it has been a broken
measurement (a timer's resolution), never a model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipelines.latency import MAX_CREDIBLE_SPEEDUP
from r1platform.core.charts.benchmarks import version_history_svg
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel
from r1platform.registry.services import lineage

SAME_WITHIN = 0.05
# A verdict for a pair of rows that no one job measured together: no ratio is given.
APART = "apart"

Key = tuple[int, str, str]  # batch size, device, input shapes (rows timed alike only)
# Per job id, per version id, per key: the fastest row.
ByJob = dict[int, dict[int, dict[Key, BenchmarkResult]]]


def shape_text(shapes: object) -> str:
    """A row's input shapes as text, ``input 32×64`` (several inputs comma-separated, sorted)."""
    if not isinstance(shapes, dict):
        return ""
    return ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in sorted(shapes.items()))


def row_key(row: BenchmarkResult) -> Key:
    return (row.batch_size, row.device, shape_text(row.shapes))


def verdict(speedup: float, throughput_ratio: float | None, steady: bool) -> str:
    """faster / slower / same when latency and throughput agree; else mixed. A comparison with a
    row whose windows disagreed, or a ratio over ``MAX_CREDIBLE_SPEEDUP``, is unsteady: no claim
    is made from it."""
    credible = max(speedup, throughput_ratio or 0.0) <= MAX_CREDIBLE_SPEEDUP
    if not steady or not credible:
        return "unsteady"
    by_latency = _direction(speedup)
    by_throughput = by_latency if throughput_ratio is None else _direction(throughput_ratio)
    return by_latency if by_latency == by_throughput else "mixed"


def _direction(ratio: float) -> str:
    if ratio > 1 + SAME_WITHIN:
        return "faster"
    if ratio < 1 / (1 + SAME_WITHIN):
        return "slower"
    return "same"


@dataclass(frozen=True)
class Comparison:
    """One version against a reference (its parent, or its upload) at one batch size and device,
    both rows from one job."""

    version: ModelVersion
    parent: ModelVersion  # the reference: the parent, or the upload when ``against`` says so
    batch_size: int
    device: str
    backend: str
    parent_backend: str
    p50_ms: float
    parent_p50_ms: float
    throughput: float
    parent_throughput: float
    steady: bool = True  # both rows' timing windows agreed
    against: str = "parent"  # or "upload"
    job_id: int | None = None  # the job that measured both

    @property
    def speedup(self) -> float:
        return self.parent_p50_ms / self.p50_ms

    @property
    def throughput_ratio(self) -> float | None:
        return self.throughput / self.parent_throughput if self.parent_throughput > 0 else None

    @property
    def verdict(self) -> str:
        return verdict(self.speedup, self.throughput_ratio, self.steady)

    @classmethod
    def of(
        cls, row: BenchmarkResult, base: BenchmarkResult, reference: ModelVersion, against: str
    ) -> Comparison:
        return cls(
            version=row.version,
            parent=reference,
            batch_size=row.batch_size,
            device=row.device,
            backend=row.backend,
            parent_backend=base.backend,
            p50_ms=row.p50_ms,
            parent_p50_ms=base.p50_ms,
            throughput=row.throughput,
            parent_throughput=base.throughput,
            steady=row.converged and base.converged,
            against=against,
            job_id=row.job_id,
        )


@dataclass
class BenchmarkHistory:
    rows: list[BenchmarkResult]  # per version, batch size and device: the fastest row
    comparisons: list[Comparison]
    chart: str  # markup from version_history_svg, which escapes all its text


def by_job(rows: Iterable[BenchmarkResult]) -> ByJob:
    """Per job, per version, the fastest row at each (batch size, device, shapes)."""
    found: ByJob = {}
    for r in rows:
        if r.p50_ms <= 0:
            continue
        mine = found.setdefault(r.job_id, {}).setdefault(r.version_id, {})
        key = row_key(r)
        if key not in mine or r.p50_ms < mine[key].p50_ms:
            mine[key] = r
    return found


def newest_first(rows: Iterable[BenchmarkResult]) -> list[int]:
    """The job ids of ``rows`` (their ``job`` selected), newest job first."""
    marks = {r.job_id: (r.job.created_at, r.job_id) for r in rows}
    return sorted(marks, key=marks.__getitem__, reverse=True)


def measured_together(
    jobs: ByJob, order: list[int], version_id: int, reference_id: int
) -> dict[Key, tuple[BenchmarkResult, BenchmarkResult]]:
    """Per key, (the version's row, the reference's row) from the newest job that timed both."""
    pairs: dict[Key, tuple[BenchmarkResult, BenchmarkResult]] = {}
    for job_id in order:
        mine = jobs.get(job_id, {}).get(version_id, {})
        theirs = jobs.get(job_id, {}).get(reference_id, {})
        for key in mine.keys() & theirs.keys():
            pairs.setdefault(key, (mine[key], theirs[key]))
    return pairs


def newest_rows(rows: list[BenchmarkResult]) -> dict[int, dict[Key, BenchmarkResult]]:
    """Per version id, at each (batch size, device, shapes), the fastest row of the newest job
    that timed it there: each version's own numbers (the chart), never a comparison."""
    jobs = by_job(rows)
    kept: dict[int, dict[Key, BenchmarkResult]] = {}
    for job_id in newest_first(rows):
        for version_id, by_key in jobs.get(job_id, {}).items():
            mine = kept.setdefault(version_id, {})
            for key, row in by_key.items():
                mine.setdefault(key, row)
    return kept


def _roots(parents: dict[int, int | None]) -> dict[int, int]:
    """Per version id, the upload it descends from (a loop cannot trap it)."""

    def root(pk: int) -> int:
        seen = set()
        while parents.get(pk) and pk not in seen:
            seen.add(pk)
            pk = parents[pk]  # type: ignore[assignment]
        return pk

    return {pk: root(pk) for pk in parents}


def benchmark_history(model: RegisteredModel) -> BenchmarkHistory:
    """The model's versions' benchmark numbers side by side, each against its parent and its
    upload where one job measured both."""
    rows = list(
        BenchmarkResult.objects.filter(version__model=model).select_related("job", "version")
    )
    versions = {v.pk: v for v in model.versions.all()}
    roots = _roots({pk: v.parent_id for pk, v in versions.items()})
    jobs, order = by_job(rows), newest_first(rows)
    comparisons: list[Comparison] = []
    for version_id in {r.version_id for r in rows}:
        version = versions[version_id]
        references = [("parent", version.parent_id)]
        if roots[version_id] not in (version_id, version.parent_id):
            references.append(("upload", roots[version_id]))
        for against, reference_id in references:
            if reference_id is None:
                continue
            pairs = measured_together(jobs, order, version_id, reference_id)
            for row, base in pairs.values():
                comparisons.append(Comparison.of(row, base, versions[reference_id], against))
    comparisons.sort(
        key=lambda c: (-c.version.number, c.against != "parent", c.batch_size, c.device)
    )
    kept = newest_rows(rows)
    flat = sorted(
        (r for by_key in kept.values() for r in by_key.values()),
        key=lambda r: (r.version.number, r.batch_size, r.device),
    )
    chart_rows = [
        {
            "version": r.version.number,
            "batch_size": r.batch_size,
            "device": r.device,
            "p50_ms": r.p50_ms,
            "throughput": r.throughput,
        }
        for r in flat
    ]
    return BenchmarkHistory(
        rows=flat, comparisons=comparisons, chart=version_history_svg(chart_rows)
    )


@dataclass(frozen=True)
class RowSpeedup:
    """A version-page row against one reference version, from the row's own job."""

    reference: ModelVersion
    verdict: str  # faster / slower / same / mixed / unsteady, or APART (no row in that job)
    ratio: float | None = None  # the reference's p50 over the row's; None when APART

    @property
    def claim(self) -> bool:
        """Whether the ratio may be shown as a claim (steady, credible, measured together)."""
        return self.ratio is not None and self.verdict not in ("unsteady", APART)


def add_row_speedups(version: ModelVersion, rows: list[BenchmarkResult]) -> bool:
    """Set ``vs_parent`` and ``vs_upload`` (a :class:`RowSpeedup` or None) on each of the
    version's ``rows``: against the parent's and the upload's rows of the same job at the same
    batch size, device and shapes. True when the version has a parent (the columns show)."""
    for r in rows:
        r.vs_parent = r.vs_upload = None
    if not version.parent_id or not rows:
        return False
    chain = lineage(version)
    references = {"vs_parent": chain[-2], "vs_upload": chain[0]}
    theirs = list(
        BenchmarkResult.objects.filter(
            job_id__in={r.job_id for r in rows},
            version_id__in={v.pk for v in references.values()},
        )
    )
    jobs = by_job(theirs)
    measured = {r.version_id for r in theirs} | set(
        BenchmarkResult.objects.filter(version_id__in={v.pk for v in references.values()})
        .values_list("version_id", flat=True)
        .distinct()
    )
    for r in rows:
        for attr, reference in references.items():
            base = jobs.get(r.job_id, {}).get(reference.pk, {}).get(row_key(r))
            if base is None:
                apart = RowSpeedup(reference, APART) if reference.pk in measured else None
                setattr(r, attr, apart)
                continue
            speedup = base.p50_ms / r.p50_ms if r.p50_ms > 0 else 0.0
            ratio = r.throughput / base.throughput if base.throughput > 0 else None
            steady = r.converged and base.converged and r.p50_ms > 0
            setattr(r, attr, RowSpeedup(reference, verdict(speedup, ratio, steady), speedup))
    return True


@dataclass(frozen=True)
class AgainstUpload:
    """A version slower than its model's upload at one batch size and device (steady rows)."""

    batch_size: int
    device: str
    speedup: float  # the upload's p50 over the version's: under 1 is slower
    upload_number: int


def slower_than_upload(model: RegisteredModel) -> dict[int, list[AgainstUpload]]:
    """Per version id of ``model``, where it is slower than the upload it descends from, in a job
    that measured both: latency and throughput agreeing, both rows steady, same batch size,
    device and shapes. Two queries, whatever the number of versions."""
    parents = dict(model.versions.values_list("pk", "parent_id"))
    numbers = dict(model.versions.values_list("pk", "number"))
    roots = _roots(parents)
    rows = list(BenchmarkResult.objects.filter(version__model=model).select_related("job"))
    jobs, order = by_job(rows), newest_first(rows)
    found: dict[int, list[AgainstUpload]] = {}
    for version_id in sorted({r.version_id for r in rows}):
        upload = roots.get(version_id, version_id)
        if upload == version_id:
            continue
        pairs = measured_together(jobs, order, version_id, upload)
        for _, (row, base) in sorted(pairs.items()):
            speedup = base.p50_ms / row.p50_ms
            ratio = row.throughput / base.throughput if base.throughput > 0 else None
            if verdict(speedup, ratio, row.converged and base.converged) == "slower":
                found.setdefault(version_id, []).append(
                    AgainstUpload(row.batch_size, row.device, speedup, numbers[upload])
                )
    return found
