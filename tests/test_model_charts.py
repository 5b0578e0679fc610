"""The model page's charts: the production serving history per pool, and the benchmark history
across versions with what got faster or slower against each version's parent."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from r1platform.deployments.models import ServingPool
from r1platform.jobs.models import JobStatus
from r1platform.registry.history import benchmark_history
from r1platform.registry.models import BenchmarkResult, ModelVersion
from r1platform.serving.history import serving_history
from r1platform.serving.models import ServingWindow
from r1platform.serving.stats import latency_bucket
from r1platform.workers.models import HardwareProfile
from tests.test_dashboard import make_job, make_model, make_version

CPU = "cpu: Test Xeon"


@pytest.fixture
def pool(db) -> ServingPool:
    profile = HardwareProfile.objects.create(
        key="onnxruntime-cpu-charts",
        backend="onnxruntime",
        backend_version="1.0",
        device_kind="cpu",
        device_name="Test Xeon",
    )
    return ServingPool.objects.create(name="cpu-charts", profile=profile)


def window(pool, version: ModelVersion, minutes_ago: float, requests: int, **kw) -> ServingWindow:
    """A one-minute window of ``requests`` answered in ``latency_ms`` each."""
    latency_ms = kw.pop("latency_ms", 4.0)
    return ServingWindow.objects.create(
        pool=pool,
        stage=kw.pop("stage", "production"),
        model=version.model,
        version=version,
        started_at=timezone.now() - timedelta(minutes=minutes_ago),
        seconds=60.0,
        requests=requests,
        latency_histogram={str(latency_bucket(latency_ms)): requests} if requests else {},
        p50_ms=latency_ms if requests else None,
        p99_ms=latency_ms if requests else None,
        **kw,
    )


def bench(version: ModelVersion, job, batch: int, p50: float, device: str = CPU, **kw):
    return BenchmarkResult.objects.create(
        version=version,
        job=job,
        backend=kw.pop("backend", "onnxruntime"),
        device=device,
        batch_size=batch,
        p50_ms=p50,
        p95_ms=p50 * 1.2,
        p99_ms=p50 * 1.5,
        throughput=kw.pop("throughput", batch * 1000 / p50),
        iterations=100,
        **kw,
    )


@pytest.fixture
def lineage(team):
    """v1 (FP32) with two children: v2 (2x faster at batch 1, slower at 8), v3 (the same).

    Each job times its input's ancestors too (the benchmark stage does): pairs come from one job.
    """
    model = make_model(team, "charted")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1, precision="int8")
    v3 = make_version(model, parent=v1, precision="fp16")
    job1 = make_job(v1, status=JobStatus.SUCCEEDED)
    bench(v1, job1, 1, 2.0)
    bench(v1, job1, 8, 10.0)
    stale = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v1, stale, 1, 2.0)
    bench(v2, stale, 1, 50.0)  # an older job's pair: the newest job that timed both stands
    job2 = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v1, job2, 1, 2.0)
    bench(v1, job2, 8, 10.0)
    bench(v2, job2, 1, 1.0)
    bench(v2, job2, 8, 12.5)
    bench(v2, job2, 1, 0.2, device="cuda: Test GPU", backend="onnxruntime-cuda")  # no pair
    job3 = make_job(v3, status=JobStatus.SUCCEEDED)
    bench(v1, job3, 1, 2.0)
    bench(v3, job3, 1, 1.96)
    return model, v1, v2, v3


def test_the_faster_slower_table_compares_each_version_with_its_parent(lineage):
    model, v1, v2, v3 = lineage

    history = benchmark_history(model)

    found = {
        (c.version.number, c.parent.number, c.batch_size): (round(c.speedup, 3), c.verdict)
        for c in history.comparisons
    }
    assert found == {
        (2, 1, 1): (2.0, "faster"),
        (2, 1, 8): (0.8, "slower"),
        (3, 1, 1): (round(2.0 / 1.96, 3), "same"),
    }
    assert len(history.rows) == 6  # v1 x2, v2 x3 (cpu 1, cpu 8, cuda 1), v3 x1


def test_the_model_page_charts_serving_and_benchmark_history(member_client, lineage, pool):
    model, v1, v2, _ = lineage
    window(pool, v1, 30, 120, errors_5xx=6, errors_4xx=3, batches=60, batch_rows=120)
    window(pool, v1, 29, 90, latency_ms=8.0)
    window(pool, v1, 28, 30)  # the flush that saw the swap: the old version draining...
    window(pool, v2, 28, 60, latency_ms=2.0)  # ...and the new one, at the same start
    window(pool, v2, 27, 0)  # served, idle
    window(pool, v2, 26, 500, stage="staging")  # another process's history: not shown

    response = member_client.get(model.get_absolute_url())

    assert response.status_code == 200
    body = response.content.decode()
    serving = body[body.index('id="serving-section"') : body.index('id="benchmark-history"')]
    assert 'data-testid="serving-chart"' in serving
    assert 'data-pool="cpu-charts"' in serving
    assert 'data-testid="serving-requests">300<' in serving
    assert "6 5xx · 3 4xx" in serving
    assert "serving v2" in serving
    # One point per one-minute window, per minute: 120, 90, then both versions' 90.
    rates = re.findall(r'data-series="requests" data-time="[^"]+" data-value="([^"]+)"', serving)
    assert rates == ["120", "90", "90", "0"]
    errors = re.findall(r'data-series="5xx" data-time="[^"]+" data-value="([^"]+)"', serving)
    assert errors == ["6", "0", "0", "0"]
    p99 = re.findall(r'data-series="p99" data-time="[^"]+" data-value="([^"]+)"', serving)
    assert len(p99) == 3 and 7.0 < float(p99[1]) < 9.0  # the 8 ms window, to its bucket
    assert re.findall(r'data-marker="(v\d+)"', serving) == ["v1", "v2"] * 3  # in each panel

    history = body[body.index('id="benchmark-history"') :]
    assert 'data-testid="history-chart"' in history
    points = re.findall(
        r'data-series="b1@cpu: Test Xeon" data-version="(\d+)" data-value="([^"]+)"',
        history.split("Throughput")[0],
    )
    assert points == [("1", "2"), ("2", "1"), ("3", "1.96")]
    rows = re.findall(r'data-version="(\d)" data-batch="(\d+)" data-verdict="(\w+)"', history)
    assert rows == [("3", "1", "same"), ("2", "1", "faster"), ("2", "8", "slower")]
    assert '<span class="speedup-up">2.00×</span>' in history
    assert '<span class="speedup-down">0.80×</span>' in history


def test_the_model_page_says_when_nothing_was_recorded(member_client, team, pool):
    model = make_model(team, "quiet")
    version = make_version(model)
    window(pool, version, 60 * 30, 100)  # a month ago: outside the last day

    body = member_client.get(model.get_absolute_url()).content.decode()

    assert 'data-testid="serving-empty"' in body
    assert "No traffic has been recorded yet" in body
    assert 'data-testid="history-empty"' in body
    assert "<svg" not in body


def test_the_serving_section_refreshes_alone_over_htmx(member_client, lineage, pool):
    model, v1, _, _ = lineage
    window(pool, v1, 5, 42)
    headers = {"HX-Request": "true", "HX-Target": "serving-section"}

    response = member_client.get(model.get_absolute_url(), headers=headers)

    body = response.content.decode()
    assert body.lstrip().startswith('<section class="card" id="serving-section"')
    assert 'hx-trigger="every 30s"' in body
    assert 'data-testid="serving-requests">42<' in body
    assert "Benchmark history" not in body and "Versions" not in body


@pytest.mark.parametrize("htmx", [False, True])
def test_another_teams_model_page_is_404(client, lineage, pool, outsider, htmx):
    model, v1, _, _ = lineage
    window(pool, v1, 5, 42)
    client.force_login(outsider)
    headers = {"HX-Request": "true", "HX-Target": "serving-section"} if htmx else {}

    assert client.get(model.get_absolute_url(), headers=headers).status_code == 404


def test_a_gap_in_the_windows_breaks_the_lines(team, pool):
    model = make_model(team, "gappy")
    version = make_version(model)
    for minutes_ago in (300, 299, 298, 10, 9):  # the process was down in between
        window(pool, version, minutes_ago, 60)

    (history,) = serving_history(model)

    gaps = [i for i, point in enumerate(history.points) if point["at"] is None]
    assert len(gaps) == 1 and history.points[gaps[0] - 1]["at"] < history.points[gaps[0] + 1]["at"]
    assert [label for _, label in history.markers] == ["v1"]
    assert history.requests == 300


def test_faster_needs_latency_and_throughput_to_agree_and_steady_rows(team):
    model = make_model(team, "mixed")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1, precision="int8")
    job2 = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v1, job2, 1, 10.0, throughput=100.0)
    bench(v2, job2, 1, 7.5, throughput=72.0)  # 1.33x lower p50 at 0.72x the throughput
    bench(v1, job2, 8, 20.0, throughput=400.0)
    bench(v2, job2, 8, 0.012, throughput=660_000.0, converged=False)  # a 1667x that cannot be

    verdicts = {c.batch_size: c.verdict for c in benchmark_history(model).comparisons}

    assert verdicts == {1: "mixed", 8: "unsteady"}


def test_the_version_page_claims_no_speedup_from_an_unsteady_row(member_client, team):
    model = make_model(team, "noisy")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1, precision="int8")
    job2 = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v1, job2, 1, 10.0)
    bench(v1, job2, 8, 40.0)
    bench(v2, job2, 1, 5.0)
    bench(v2, job2, 8, 0.01, converged=False)  # "4000x": its windows disagreed

    body = member_client.get(v2.get_absolute_url()).content.decode()
    speedups = re.findall(r'data-testid="speedup-parent">(.*?)</td>', body, re.S)
    assert len(speedups) == 2
    assert "2.00×" in speedups[0]
    assert "×" not in speedups[1] and "unsteady" in speedups[1]  # the batch-8 row: no ratio


def test_benchmark_rows_show_their_shapes_and_only_alike_rows_are_compared(member_client, team):
    model = make_model(team, "shaped")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1, precision="int8")
    job1 = make_job(v1, status=JobStatus.SUCCEEDED)
    job2 = make_job(v2, status=JobStatus.SUCCEEDED)
    bench(v1, job1, 32, 40.0, shapes={"x": [32, 128]})
    bench(v2, job2, 32, 4.0, shapes={"x": [32, 1]})  # a sequence of 1: not the same work

    page = member_client.get(v2.get_absolute_url()).content.decode()
    assert 'data-testid="bench-shapes">x 32×1<' in page
    url = reverse("registry:compare", args=[model.pk])
    compare = member_client.get(url, {"v": [v1.pk, v2.pk]}).content.decode()
    assert compare.count('data-testid="benchmark-line"') == 2  # never side by side
    assert 'data-testid="fastest"' not in compare


def test_a_version_slower_than_its_upload_is_flagged_on_its_page_and_the_promote_form(
    member_client, team, pool
):
    model = make_model(team, "slowed")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1, format="onnx")
    v3 = make_version(model, parent=v2, precision="int8")  # slower than v1, its upload
    for made in (v2, v3):  # each job times its input and the input's ancestors together
        job = make_job(made, status=JobStatus.SUCCEEDED)
        for version, p50 in ((v1, 10.0), (v2, 9.0), (v3, 14.0))[: made.number]:
            bench(version, job, 8, p50)

    page = member_client.get(v3.get_absolute_url()).content.decode()
    flag = page.split('data-testid="slower-than-upload"', 1)[1].split("</div>", 1)[0]
    assert "slower than v1" in flag and "batch 8" in flag and "0.71×" in flag
    assert 'data-testid="slower-than-upload"' not in member_client.get(
        v2.get_absolute_url()
    ).content.decode()

    section = member_client.get(model.get_absolute_url()).content.decode()
    options = re.findall(r'<option value="(\d+)"[^>]*>([^<]*)</option>', section)
    labels = {int(pk): label for pk, label in options}
    assert "slower than its upload" in labels[v3.pk]
    assert "slower" not in labels[v2.pk] and "slower" not in labels[v1.pk]
