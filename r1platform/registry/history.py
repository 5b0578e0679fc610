"""A model's benchmark history: each version's numbers, and what got faster or slower.

Each version is represented by the rows of its newest benchmarking job (as on the version
page). A version is compared with its parent in the lineage at the same batch size on the same
device (hardware): the backend may differ, since a version is often another format of its
parent (TorchScript exported to ONNX). Where one version has several rows for a batch size and
device, the fastest stands for it. Speedup is the parent's p50 over the version's: above 1 is
faster. Within ``SAME_WITHIN`` of 1 it is the same, given that benchmark windows agree only
within 10%. A verdict needs latency and throughput to agree (else it is *mixed*), and both rows
steady (else it is *unsteady*, and no claim is made).
"""

from __future__ import annotations

from dataclasses import dataclass

from r1platform.core.charts.benchmarks import version_history_svg
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel

SAME_WITHIN = 0.05

Key = tuple[int, str, str]  # batch size, device, input shapes (rows timed alike only)


def shape_text(shapes: object) -> str:
    """A row's input shapes as text, ``input 32×64`` (several inputs comma-separated, sorted)."""
    if not isinstance(shapes, dict):
        return ""
    return ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in sorted(shapes.items()))


@dataclass(frozen=True)
class Comparison:
    """One version against its parent at one batch size and device."""

    version: ModelVersion
    parent: ModelVersion
    batch_size: int
    device: str
    backend: str
    parent_backend: str
    p50_ms: float
    parent_p50_ms: float
    throughput: float
    parent_throughput: float
    steady: bool = True  # both rows' timing windows agreed

    @property
    def speedup(self) -> float:
        return self.parent_p50_ms / self.p50_ms

    @property
    def throughput_ratio(self) -> float | None:
        return self.throughput / self.parent_throughput if self.parent_throughput > 0 else None

    @property
    def verdict(self) -> str:
        return verdict(self.speedup, self.throughput_ratio, self.steady)


def verdict(speedup: float, throughput_ratio: float | None, steady: bool) -> str:
    """faster / slower / same when latency and throughput agree; else mixed. A comparison with a
    row whose windows disagreed is unsteady: no claim is made from it."""
    if not steady:
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


@dataclass
class BenchmarkHistory:
    rows: list[BenchmarkResult]  # per version, batch size and device: the fastest row
    comparisons: list[Comparison]
    chart: str  # markup from version_history_svg, which escapes all its text


def newest_rows(rows: list[BenchmarkResult]) -> dict[int, dict[Key, BenchmarkResult]]:
    """Per version id, its newest job's fastest row at each (batch size, device, shapes)."""
    newest_job: dict[int, tuple] = {}
    for r in rows:
        mark = (r.job.created_at, r.job_id)
        if r.version_id not in newest_job or mark > newest_job[r.version_id]:
            newest_job[r.version_id] = mark
    kept: dict[int, dict[Key, BenchmarkResult]] = {}
    for r in rows:
        if r.job_id != newest_job[r.version_id][1] or r.p50_ms <= 0:
            continue
        by_key = kept.setdefault(r.version_id, {})
        key = (r.batch_size, r.device, shape_text(r.shapes))
        if key not in by_key or r.p50_ms < by_key[key].p50_ms:
            by_key[key] = r
    return kept


def benchmark_history(model: RegisteredModel) -> BenchmarkHistory:
    """The model's versions' benchmark numbers side by side, each against its parent."""
    rows = list(
        BenchmarkResult.objects.filter(version__model=model).select_related("job", "version")
    )
    kept = newest_rows(rows)
    versions = {r.version_id: r.version for r in rows}
    comparisons: list[Comparison] = []
    for version_id, by_key in kept.items():
        version = versions[version_id]
        parent_rows = kept.get(version.parent_id or 0, {})
        for key, row in by_key.items():
            base = parent_rows.get(key)
            if base is None:
                continue
            comparisons.append(
                Comparison(
                    version=version,
                    parent=versions[base.version_id],
                    batch_size=row.batch_size,
                    device=row.device,
                    backend=row.backend,
                    parent_backend=base.backend,
                    p50_ms=row.p50_ms,
                    parent_p50_ms=base.p50_ms,
                    throughput=row.throughput,
                    parent_throughput=base.throughput,
                    steady=row.converged and base.converged,
                )
            )
    comparisons.sort(key=lambda c: (-c.version.number, c.batch_size, c.device))
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
class AgainstUpload:
    """A version slower than its model's upload at one batch size and device (steady rows)."""

    batch_size: int
    device: str
    speedup: float  # the upload's p50 over the version's: under 1 is slower
    upload_number: int


def slower_than_upload(model: RegisteredModel) -> dict[int, list[AgainstUpload]]:
    """Per version id of ``model``, where it is slower than the upload it descends from:
    latency and throughput agreeing, both rows steady, same batch size, device and shapes.
    Two queries, whatever the number of versions."""
    parents = dict(model.versions.values_list("pk", "parent_id"))
    numbers = dict(model.versions.values_list("pk", "number"))

    def root(pk: int) -> int:
        seen = set()
        while parents.get(pk) and pk not in seen:
            seen.add(pk)
            pk = parents[pk]
        return pk

    rows = list(BenchmarkResult.objects.filter(version__model=model).select_related("job"))
    kept = newest_rows(rows)
    found: dict[int, list[AgainstUpload]] = {}
    for version_id, mine in kept.items():
        upload = root(version_id)
        theirs = kept.get(upload, {})
        if upload == version_id:
            continue
        for key, row in sorted(mine.items()):
            base = theirs.get(key)
            if base is None:
                continue
            speedup = base.p50_ms / row.p50_ms
            ratio = row.throughput / base.throughput if base.throughput > 0 else None
            if verdict(speedup, ratio, row.converged and base.converged) == "slower":
                found.setdefault(version_id, []).append(
                    AgainstUpload(row.batch_size, row.device, speedup, numbers[upload])
                )
    return found
