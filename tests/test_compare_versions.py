"""Compare versions: metrics, benchmark rows measured alike, and certifications side by side."""

from __future__ import annotations

from django.urls import reverse

from r1platform.jobs.models import JobStatus
from r1platform.registry.models import BenchmarkResult, ModelVersion
from tests.test_dashboard import make_job, make_model, make_version


def bench(version: ModelVersion, job, batch: int, p50: float, throughput: float, **kw):
    fields = {
        "backend": "onnxruntime",
        "device": "cpu",
        "p95_ms": p50 * 1.2,
        "p99_ms": p50 * 1.5,
        "iterations": 100,
        "converged": True,
    } | kw
    return BenchmarkResult.objects.create(
        version=version, job=job, batch_size=batch, p50_ms=p50, throughput=throughput, **fields
    )


def test_it_lines_up_the_chosen_versions(member_client, team):
    model = make_model(team, "enc")
    v1 = make_version(model, metrics={"accuracy": 0.91})
    old_job = make_job(v1, status=JobStatus.SUCCEEDED)
    job = make_job(v1, status=JobStatus.SUCCEEDED)
    v2 = make_version(
        model, parent=v1, job=job, artifact_key="q", precision="int8",
        metrics={"accuracy": 0.905, "parent_accuracy": 0.91, "retention": 0.994},
    )  # fmt: skip
    v3 = make_version(make_model(team, "other-model"))
    bench(v1, old_job, 1, 9.0, 100.0)  # superseded by the later job's row
    bench(v1, job, 1, 4.0, 250.0)
    bench(v2, job, 1, 2.0, 500.0, converged=False)  # fastest, but unsteady: never "fastest"
    bench(v1, job, 8, 20.0, 400.0)
    bench(v2, job, 8, 10.0, 800.0)
    bench(v2, job, 32, 30.0, 1000.0)  # only v2 was measured at 32

    url = reverse("registry:compare", args=[model.pk])
    body = member_client.get(url, {"v": [v2.pk, v1.pk, v3.pk, "x"]}).content.decode()

    # v3 belongs to another model: left out; the order is the version order.
    table = body.split('data-testid="compare-versions"', 1)[1].split("</thead>", 1)[0]
    assert table.index("v1") < table.index("v2") and "v3" not in table
    assert 'data-metric="accuracy"' in body and 'data-metric="parent_accuracy"' not in body
    assert "0.9100" in body and "0.9050" in body and "0.9940" in body
    lines = body.split('data-testid="benchmark-line"')[1:]
    assert [line.split("<td>", 1)[1].split(" ", 2)[:2] for line in lines] == [
        ["batch", "1"], ["batch", "8"], ["batch", "32"],
    ]  # fmt: skip
    assert ">9 / " not in lines[0] and ">4 / 6<" in lines[0]  # p50 / p99 of the latest job
    assert 'data-testid="fastest"' not in lines[0]  # the only faster row was unsteady
    assert lines[0].count("±") == 1
    assert lines[1].count('data-testid="fastest"') == 1
    fastest = lines[1].split('data-testid="fastest"', 1)[1]
    assert "800" in fastest.split("</td>", 1)[0]
    assert 'data-testid="fastest"' not in lines[2]  # one version alone is not a comparison


def test_it_asks_for_two_versions_and_links_from_the_model_page(member_client, team):
    model = make_model(team, "enc")
    v1 = make_version(model)
    make_version(model)
    page = member_client.get(model.get_absolute_url()).content.decode()
    assert f'action="{reverse("registry:compare", args=[model.pk])}"' in page
    assert page.count('data-testid="compare-check"') == 2

    one = member_client.get(reverse("registry:compare", args=[model.pk]), {"v": v1.pk})
    assert "pick two or more versions" in one.content.decode().lower()
    assert 'data-testid="compare-metrics"' not in one.content.decode()


def test_another_teams_versions_never_show(member_client, team, other_team):
    mine = make_model(team, "enc")
    theirs = make_model(other_team, "enc")
    t1, t2 = make_version(theirs), make_version(theirs)
    assert member_client.get(reverse("registry:compare", args=[theirs.pk])).status_code == 404
    body = member_client.get(
        reverse("registry:compare", args=[mine.pk]), {"v": [t1.pk, t2.pk]}
    ).content.decode()
    assert "pick two or more" in body.lower()
