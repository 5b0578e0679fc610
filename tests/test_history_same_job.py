"""Benchmark comparisons come from rows of one job: ancestors' rows recorded under their versions,
speedups against the parent and the upload on the version page, rows of different jobs never
compared, and no claim from a ratio over 50x."""

from __future__ import annotations

import re

from django.urls import reverse

from pipelines.core import BenchmarkRow
from r1platform.jobs.models import JobStatus
from r1platform.registry.history import benchmark_history, slower_than_upload
from r1platform.registry.models import BenchmarkResult, ModelVersion
from r1platform.registry.registration import JobOutputs
from tests.test_dashboard import make_job, make_model, make_version

CPU = "cpu: Test Xeon"


def bench(version: ModelVersion, job, batch: int, p50: float, **kw) -> BenchmarkResult:
    return BenchmarkResult.objects.create(
        version=version,
        job=job,
        backend=kw.pop("backend", "onnxruntime"),
        device=kw.pop("device", CPU),
        batch_size=batch,
        p50_ms=p50,
        p95_ms=p50 * 1.2,
        p99_ms=p50 * 1.5,
        throughput=kw.pop("throughput", batch * 1000 / p50),
        iterations=100,
        **kw,
    )


def row(artifact: str, p50: float) -> BenchmarkRow:
    return BenchmarkRow(
        artifact=artifact,
        backend="onnxruntime",
        batch_size=8,
        p50_ms=p50,
        p95_ms=p50,
        p99_ms=p50,
        throughput=8000 / p50,
        iterations=30,
        converged=True,
        shapes={"x": [8, 4]},
    )


def test_ancestor_rows_are_recorded_under_their_versions(team) -> None:
    model = make_model(team, "lineage")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1)
    stranger = make_version(make_model(team, "another"))
    job = make_job(v2, status=JobStatus.RUNNING)

    JobOutputs(job, v2).record_benchmarks(
        [row("input", 5.0), row(f"version-{v1.pk}", 10.0), row(f"version-{stranger.pk}", 1.0)],
        CPU,
    )

    recorded = {r.version_id: r.p50_ms for r in BenchmarkResult.objects.filter(job=job)}
    assert recorded == {v2.pk: 5.0, v1.pk: 10.0}  # another model's version is never written


def _lineage(team):
    """v1 (upload) -> v2 (onnx) -> v3 (int8); one job timed all three, an older one v3 alone."""
    model = make_model(team, "together")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1)
    v3 = make_version(model, parent=v2, precision="int8")
    alone = make_job(v3, status=JobStatus.SUCCEEDED)
    bench(v3, alone, 1, 1.0)  # v1 was timed, but never with this row
    job = make_job(v3, status=JobStatus.SUCCEEDED)
    for version, p50 in ((v1, 8.0), (v2, 4.0), (v3, 2.0)):
        bench(version, job, 8, p50)
    bench(v1, job, 1, 3.0)
    return model, v1, v2, v3, job


def test_the_version_page_shows_speedups_vs_parent_and_vs_upload_from_the_same_job(
    member_client, team
) -> None:
    model, v1, v2, v3, job = _lineage(team)

    body = member_client.get(v3.get_absolute_url()).content.decode()

    assert f"vs parent v{v2.number}" in body and f"vs upload v{v1.number}" in body
    parent = re.findall(r'data-testid="speedup-parent">(.*?)</td>', body, re.S)
    upload = re.findall(r'data-testid="speedup-upload">(.*?)</td>', body, re.S)
    # Rows by batch size: batch 1 from the job that timed v3 alone, batch 8 timed together.
    assert "not measured together" in upload[0] and "×" not in upload[0]
    assert "2.00×" in parent[1] and "4.00×" in upload[1]


def test_history_compares_with_the_parent_and_the_upload_and_never_across_jobs(team) -> None:
    model, v1, v2, v3, job = _lineage(team)
    other = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v2, other, 1, 0.5)  # v2 at batch 1, but never in a job with v1 or v3 at batch 1

    found = {
        (c.version.number, c.against, c.parent.number, c.batch_size): (c.speedup, c.job_id)
        for c in benchmark_history(model).comparisons
    }

    assert found == {
        (3, "parent", 2, 8): (2.0, job.pk),
        (3, "upload", 1, 8): (4.0, job.pk),
        (2, "parent", 1, 8): (2.0, job.pk),
    }


def test_slower_than_the_upload_needs_both_in_one_job(team) -> None:
    model = make_model(team, "slowed")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1, precision="int8")
    bench(v1, make_job(v1, status=JobStatus.SUCCEEDED), 8, 10.0)
    apart = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v2, apart, 8, 14.0)  # slower than v1's row of another job: not a claim

    assert slower_than_upload(model) == {}

    together = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v1, together, 8, 10.0)
    bench(v2, together, 8, 14.0)
    (flag,) = slower_than_upload(model)[v2.pk]
    assert flag.batch_size == 8 and round(flag.speedup, 2) == 0.71


def test_a_ratio_over_50x_is_never_a_claim(member_client, team) -> None:
    model = make_model(team, "broken-timer")
    v1 = make_version(model, format="torchscript")
    v2 = make_version(model, parent=v1)
    job = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v1, job, 8, 20.0)
    bench(v2, job, 8, 0.006)  # "3333x faster", both rows steady: a broken measurement

    (comparison,) = benchmark_history(model).comparisons
    assert comparison.verdict == "unsteady"
    body = member_client.get(v2.get_absolute_url()).content.decode()
    cell = re.findall(r'data-testid="speedup-parent">(.*?)</td>', body, re.S)[0]
    assert "unsteady" in cell and "3333" not in cell and "×" not in cell
    history = member_client.get(model.get_absolute_url()).content.decode()
    assert "3333" not in history and 'data-verdict="unsteady"' in history


def test_the_compare_page_marks_rows_not_measured_together(member_client, team) -> None:
    model = make_model(team, "apart")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1)
    bench(v1, make_job(v1, status=JobStatus.SUCCEEDED), 8, 10.0)
    bench(v2, make_job(v2, status=JobStatus.SUCCEEDED), 8, 5.0)

    url = reverse("registry:compare", args=[model.pk])
    body = member_client.get(url, {"v": [v1.pk, v2.pk]}).content.decode()

    (line,) = body.split('data-testid="benchmark-line"')[1:]
    assert line.count('data-testid="not-together"') == 1
    assert 'data-testid="fastest"' not in line


def test_a_rows_window_spread_is_recorded_and_shown(member_client, team) -> None:
    model = make_model(team, "spread")
    v1 = make_version(model)
    job = make_job(v1, status=JobStatus.RUNNING)
    measured = row("input", 5.0)
    measured.spread = 0.0432

    JobOutputs(job, v1).record_benchmarks([measured], CPU)

    assert BenchmarkResult.objects.get(job=job).spread == 0.0432
    body = member_client.get(v1.get_absolute_url()).content.decode()
    assert re.search(r'data-testid="spread"[^>]*>±4%<', body)
