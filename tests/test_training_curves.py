"""A fine-tune's training curve drawn on the job and version pages, not only in MLflow."""

from __future__ import annotations

import re

from r1platform.core.charts.training import curves, training_chart_svg
from r1platform.jobs.models import JobStatus
from tests.test_dashboard import make_job, make_model, make_version

HISTORY = [
    {"step": 0, "metrics": {"val_accuracy": 0.1, "val_loss": 2.3}},
    {"step": 10, "metrics": {"train_loss": 1.9, "lr": 0.001}},
    {"step": 20, "metrics": {"train_loss": 1.2, "val_accuracy": 0.7, "val_loss": 1.1, "lr": 5e-4}},
    {"step": 30, "metrics": {"train_loss": 0.6, "val_accuracy": 0.9, "val_loss": 0.5}},
]


def test_it_reads_each_metric_as_a_curve_over_steps():
    found = curves(HISTORY + [{"step": "x", "metrics": {}}, {"step": 40, "metrics": None}])
    assert found["train_loss"] == [(10, 1.9), (20, 1.2), (30, 0.6)]
    assert found["val_accuracy"] == [(0, 0.1), (20, 0.7), (30, 0.9)]
    assert "lr" not in found


def test_it_draws_a_loss_and_a_metric_panel_with_every_point():
    svg = training_chart_svg(HISTORY)
    assert 'data-chart="loss"' in svg and 'data-chart="metric"' in svg
    points = re.findall(r'data-series="([^"]+)" data-step="([^"]+)" data-value="([^"]+)"', svg)
    assert ("val_accuracy", "30", "0.9") in points
    assert ("train_loss", "10", "1.9") in points
    assert len(points) == 9  # 3 train_loss + 3 val_loss + 3 val_accuracy
    assert training_chart_svg([]) == ""


def test_it_escapes_metric_names():
    svg = training_chart_svg([{"step": 1, "metrics": {"<b>loss": 1.0}}])
    assert "<b>" not in svg and "&lt;b&gt;loss" in svg


def test_the_job_and_version_pages_draw_the_curve(member_client, team):
    model = make_model(team)
    source = make_version(model)
    job = make_job(source, status=JobStatus.SUCCEEDED)
    produced = make_version(model, parent=source, job=job, artifact_key="s1")
    job.stage_results = [
        {"stage_id": "01-finetune", "name": "finetune", "status": "succeeded", "seconds": 3.0,
         "message": "", "versions": [produced.pk], "history": HISTORY},
        {"stage_id": "02-benchmark", "name": "benchmark", "status": "succeeded", "seconds": 1.0,
         "message": "", "versions": [], "history": []},
    ]  # fmt: skip
    job.save(update_fields=["stage_results"])

    for url in (job.get_absolute_url(), produced.get_absolute_url()):
        body = member_client.get(url).content.decode()
        assert body.count('data-testid="training-curve"') == 1, url
        assert 'data-series="val_accuracy" data-step="30" data-value="0.9"' in body
    assert (
        'data-testid="training-curve"'
        not in member_client.get(source.get_absolute_url()).content.decode()
    )
