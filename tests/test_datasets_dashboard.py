"""The dashboard's dataset pages, the launch form's dataset pickers and the version page's
evaluation metrics and benchmark chart.

No worker runs here: ``enqueue`` is patched so nothing reaches the broker, and benchmark rows and
metrics are written through the ORM the way a worker would leave them.
"""

from __future__ import annotations

import json
import os
import re
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from r1platform.accounts.models import Team
from r1platform.core.charts.benchmarks import latency_chart_svg
from r1platform.datasets.models import Dataset
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel
from r1platform.registry.services import register_version

HX = {"HTTP_HX_REQUEST": "true"}
SVG = "{http://www.w3.org/2000/svg}"

# --- fixtures and helpers ---


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory) -> Path:
    """scikit-learn's digits as CSV: 64 float pixel columns p0..p63, then an integer label."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits.csv"
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    table = np.column_stack([digits.data, digits.target])
    fmt = ["%.1f"] * 64 + ["%d"]
    np.savetxt(path, table, delimiter=",", header=header, comments="", fmt=fmt)
    return path


def files_under(root: Path) -> list[str]:
    """Every file under ``root``; the empty upload spool dir is the only thing allowed."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(found)


def upload(client, path: Path, name: str = "digits", **fields):
    with open(path, "rb") as f:
        data = {"name": name, "target": "", "train": 0.8, "validation": 0.1, "test": 0.1}
        data["seed"] = 0
        data.update(fields)
        data["file"] = f
        return client.post(reverse("datasets:dataset_upload"), data)


def make_dataset(team: Team, name: str = "feats", version: int = 1, **kwargs) -> Dataset:
    columns = [{"name": f"p{i}", "dtype": "float64"} for i in range(64)]
    fields = {
        "team": team,
        "name": name,
        "version": version,
        "format": "csv",
        "file": f"datasets/team-{team.pk}/{uuid.uuid4().hex}.csv",
        "sha256": uuid.uuid4().hex * 2,
        "size_bytes": 2048,
        "rows": 1797,
        "schema": {"columns": [*columns, {"name": "label", "dtype": "int64"}]},
    }
    fields.update(kwargs)
    return Dataset.objects.create(**fields)


def make_version(team: Team, name: str = "mlp", parent=None, job=None, **kwargs) -> ModelVersion:
    if parent is not None:
        model = parent.model
    else:
        model, _ = RegisteredModel.objects.get_or_create(
            team=team, name=name, defaults={"mlflow_name": f"{team.slug}.{name}"}
        )
    fields = {
        "relative_file": f"models/team-{team.pk}/{uuid.uuid4().hex}.onnx",
        "sha256": uuid.uuid4().hex * 2,
        "size_bytes": 4096,
        "format": "onnx",
        "precision": "fp32",
        "inputs": [{"name": "x", "shape": ["batch", 64], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}],
        "parent": parent,
        "job": job,
    }
    fields.update(kwargs)
    return register_version(model, **fields)


def make_job(version: ModelVersion, **kwargs) -> Job:
    fields = {
        "team_id": version.team_id,
        "version": version,
        "stages": [{"name": "benchmark", "settings": {}}],
        "queue": "cpu",
        "idempotency_key": uuid.uuid4().hex,
        "status": JobStatus.SUCCEEDED,
    }
    fields.update(kwargs)
    return Job.objects.create(**fields)


def bench(version, job, batch: int, p50: float, throughput: float, **kwargs) -> BenchmarkResult:
    fields = {
        "version": version,
        "job": job,
        "backend": "onnxruntime",
        "device": "cpu: test",
        "batch_size": batch,
        "p50_ms": p50,
        "p95_ms": p50 * 1.5,
        "p99_ms": p50 * 2,
        "throughput": throughput,
        "iterations": 50,
    }
    fields.update(kwargs)
    return BenchmarkResult.objects.create(**fields)


def chart_of(body: str) -> ET.Element:
    """The version page's benchmark chart, parsed as XML."""
    match = re.search(r'<svg xmlns="http://www.w3.org/2000/svg".*?</svg>', body, re.S)
    assert match, "the page has an inline SVG chart"
    return ET.fromstring(match.group(0))


def points(svg: ET.Element, series: str) -> list[int]:
    return [
        int(c.get("data-batch")) for c in svg.iter(f"{SVG}circle") if c.get("data-series") == series
    ]


# --- upload ---


def test_it_uploads_a_digits_csv_as_version_1_and_again_as_version_2(
    member_client, user, team, media, digits_csv
):
    first = upload(member_client, digits_csv, name="digits", target="label")
    second = upload(member_client, digits_csv, name="digits", train=0.7, validation=0.2, seed=7)

    v1, v2 = Dataset.objects.filter(team=team, name="digits").order_by("version")
    assert first.status_code == 302 and first["Location"] == v1.get_absolute_url()
    assert second.status_code == 302 and second["Location"] == v2.get_absolute_url()
    assert (v1.version, v2.version) == (1, 2)
    assert v1.format == "csv" and v1.rows == 1797 and v1.created_by == user
    columns = v1.schema["columns"]
    assert len(columns) == 65 and columns[-1] == {"name": "label", "dtype": "int64"}
    assert {c["dtype"] for c in columns[:64]} == {"float64"}
    assert v1.target == "label" and v2.splits == {
        "train": 0.7,
        "validation": 0.2,
        "test": 0.1,
        "seed": 7,
    }
    assert (media / v1.file).is_file() and (media / v2.file).is_file() and v1.file != v2.file
    page = member_client.get(second["Location"]).content.decode()
    assert f"Uploaded digits v2 (csv, 1,797 rows, sha256 {v2.sha256[:12]}…)" in page


def test_it_hides_the_team_choice_and_keeps_the_file_field_last(member_client, team):
    body = member_client.get(reverse("datasets:dataset_upload")).content.decode()

    assert f'type="hidden" name="team" value="{team.pk}"' in body
    assert 'enctype="multipart/form-data"' in body
    form = body[body.index('id="dataset-upload-form"') :]
    names = re.findall(r'name="(\w+)"', form)
    assert names[-1] == "file" and names.index("target") < names.index("train")
    for name, value in (("train", "0.8"), ("validation", "0.1"), ("test", "0.1"), ("seed", "0")):
        assert re.search(rf'name="{name}" value="{value}"', form), name


def test_it_prefills_the_name_for_a_new_version(member_client, team):
    dataset = make_dataset(team, "digits")

    detail = member_client.get(dataset.get_absolute_url()).content.decode()
    link = re.search(r'href="([^"]+)" data-testid="new-version-link"', detail).group(1)
    form = member_client.get(link.replace("&amp;", "&")).content.decode()

    assert 'name="name" value="digits"' in form


def _object_npz(tmp_path: Path) -> Path:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, [1, 2]], dtype=object), label=np.array([0, 1]))
    return path


def _ragged_csv(tmp_path: Path) -> Path:
    path = tmp_path / "ragged.csv"
    path.write_text("a,b,label\n1.0,2.0,0\n3.0,1\n")
    return path


@pytest.mark.parametrize(
    ("make_file", "fields", "reason"),
    [
        (_object_npz, {}, "pickle"),
        (_ragged_csv, {}, "line 3 has 2 values but the header has 3 columns"),
        (_ragged_csv, {"train": 0.5}, "train + validation + test must add up to 1"),
    ],
    ids=["object-npz", "ragged-csv", "splits-not-summing-to-1"],
)
def test_it_refuses_a_bad_dataset_with_the_reason_and_keeps_nothing(
    member_client, media, tmp_path, make_file, fields, reason
):
    path = make_file(tmp_path)

    response = upload(member_client, path, name="bad", **fields)

    assert response.status_code == 400
    body = response.content.decode()
    errors = response.context["form"].non_field_errors()
    assert errors and reason in errors[0]
    assert escape(errors[0]) in body
    assert not Dataset.objects.exists()
    assert files_under(media) == []


def test_it_refuses_an_upload_over_the_size_limit_as_a_file_error(
    member_client, media, settings, digits_csv
):
    settings.R1_MAX_UPLOAD_BYTES = 1024

    response = upload(member_client, digits_csv, name="huge")

    assert response.status_code == 400
    assert "over the 1.0 KiB limit" in " ".join(response.context["form"].errors["file"])
    assert not Dataset.objects.exists()
    assert files_under(media) == []


def test_it_refuses_an_upload_into_a_team_the_member_is_not_in(
    member_client, other_team, media, digits_csv
):
    response = upload(member_client, digits_csv, team=other_team.pk)

    assert response.status_code == 400
    assert "team" in response.context["form"].errors
    assert not Dataset.objects.exists()
    assert files_under(media) == []


# --- list and detail ---


def test_it_lists_the_teams_datasets_newest_first_with_search(member_client, team, other_team):
    now = timezone.now()
    old = make_dataset(team, "digits", 1, created_at=now - timezone.timedelta(days=2))
    new = make_dataset(team, "digits", 2, created_at=now - timezone.timedelta(days=1))
    other = make_dataset(team, "iris", 1, created_at=now, rows=150)
    make_dataset(other_team, "secret-set")

    everything = member_client.get(reverse("datasets:dataset_list"))
    found = member_client.get(reverse("datasets:dataset_list"), {"q": "DIG"}, **HX)

    assert [d.pk for d in everything.context["page"]] == [other.pk, new.pk, old.pk]
    body = everything.content.decode()
    assert "secret-set" not in body and "Team B" not in body
    assert ">1,797<" in body and ">150<" in body and "2.0\xa0KB" in body
    assert 'aria-current="page" data-testid="nav-datasets"' in body
    partial = found.content.decode()
    assert [d.pk for d in found.context["page"]] == [new.pk, old.pk]
    assert partial.lstrip().startswith('<section id="datasets-table"') and "<html" not in partial


def test_it_paginates_the_datasets_25_to_a_page(member_client, team):
    for i in range(27):
        make_dataset(team, f"set-{i:02d}")

    second = member_client.get(reverse("datasets:dataset_list"), {"page": 2})

    assert len(second.context["page"].object_list) == 2
    assert "Page 2 of 2" in second.content.decode()


def test_it_shows_a_datasets_schema_splits_and_other_versions(member_client, team):
    v1 = make_dataset(team, "digits", 1)
    v2 = make_dataset(
        team,
        "digits",
        2,
        format="npz",
        rows=1000,
        schema={
            "arrays": [
                {"name": "x", "dtype": "float32", "shape": [1000, 8, 8]},
                {"name": "y", "dtype": "int64", "shape": [1000]},
            ]
        },
        splits={"train": 0.7, "validation": 0.2, "test": 0.1, "seed": 3},
    )

    response = member_client.get(v2.get_absolute_url())

    body = response.content.decode()
    assert response.status_code == 200
    assert body.count('data-testid="schema-row"') == 2
    assert "[1000, 8, 8]" in body and "float32" in body
    assert re.search(r'class="is-target">\s*<td><code>y</code>', body), "y is the target"
    assert "picked by name" in body
    splits = {s["name"]: s["rows"] for s in response.context["splits"]}
    assert splits == {"train": 700, "validation": 200, "test": 100}
    assert "<code>3</code>" in body  # the seed
    assert v1.get_absolute_url() in body and body.count('data-testid="dataset-version-row"') == 2


def test_it_lists_the_jobs_that_used_a_dataset(member_client, team):
    dataset = make_dataset(team, "digits")
    version = make_version(team)
    used = make_job(version, stages=[{"name": "evaluate", "settings": {"dataset_id": dataset.pk}}])
    unused = make_job(version)

    body = member_client.get(dataset.get_absolute_url()).content.decode()

    assert used.get_absolute_url() in body
    assert unused.get_absolute_url() not in body


def test_it_answers_404_for_another_teams_dataset(member_client, other_team):
    theirs = make_dataset(other_team, "secret-set")

    assert member_client.get(theirs.get_absolute_url()).status_code == 404
    assert member_client.get(reverse("datasets:dataset_detail", args=[999999])).status_code == 404


# --- launch form ---


def test_it_offers_the_teams_datasets_for_evaluate_and_launches_with_the_pick(
    member_client, team, other_team, enqueued, django_capture_on_commit_callbacks
):
    version = make_version(team)
    older = make_dataset(team, "digits", 1)
    newer = make_dataset(team, "digits", 2)
    make_dataset(other_team, "secret-set")
    url = f"{reverse('jobs:job_new')}?version={version.pk}"

    page = member_client.get(url).content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = member_client.post(
            url,
            {
                "idempotency_key": uuid.uuid4().hex,
                "include_evaluate": "on",
                "settings_evaluate": json.dumps({"split": "test"}),
                "dataset_evaluate_dataset_id": str(older.pk),
            },
        )

    select = re.search(r'<select name="dataset_evaluate_dataset_id".*?</select>', page, re.S)
    assert select, "evaluate's dataset_id is a picker"
    options = re.findall(r'<option value="(\d*)"[^>]*>([^<]*)</option>', select.group(0))
    assert options == [
        (str(newer.pk), "digits v2 (1,797 rows, csv)"),
        (str(older.pk), "digits v1 (1,797 rows, csv)"),
    ]
    quantize = re.search(r'<select name="dataset_quantize_eval_dataset_id".*?</select>', page, re.S)
    assert quantize and '<option value="" selected>— none —</option>' in quantize.group(0)
    assert "secret-set" not in page
    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == job.get_absolute_url()
    assert job.stages == [
        {"name": "evaluate", "settings": {**job.stages[0]["settings"], "dataset_id": older.pk}}
    ]
    assert job.stages[0]["settings"]["split"] == "test"
    assert enqueued == [job.pk]


def test_it_refuses_a_launch_naming_another_teams_dataset(
    member_client, team, other_team, enqueued
):
    version = make_version(team)
    make_dataset(team, "digits")
    theirs = make_dataset(other_team, "secret-set")
    url = f"{reverse('jobs:job_new')}?version={version.pk}"
    data = {"idempotency_key": uuid.uuid4().hex, "include_evaluate": "on"}

    picked = member_client.post(url, {**data, "dataset_evaluate_dataset_id": str(theirs.pk)})
    typed = member_client.post(
        url, {**data, "settings_evaluate": json.dumps({"dataset_id": theirs.pk})}
    )

    assert picked.status_code == 400
    assert "Select a valid choice" in picked.content.decode()
    assert typed.status_code == 400
    assert f"dataset {theirs.pk} does not exist in this team" in typed.content.decode()
    assert not Job.objects.exists() and enqueued == []


def test_it_asks_for_a_dataset_when_a_team_has_none(member_client, team, enqueued):
    version = make_version(team)
    url = f"{reverse('jobs:job_new')}?version={version.pk}"

    page = member_client.get(url).content.decode()
    response = member_client.post(
        url, {"idempotency_key": uuid.uuid4().hex, "include_evaluate": "on"}
    )

    assert "This team has no datasets yet" in page
    assert response.status_code == 400
    assert "evaluate: choose a dataset for dataset_id" in response.content.decode()
    assert not Job.objects.exists()


def test_it_ignores_a_stale_pick_on_a_stage_that_is_not_included(member_client, team, enqueued):
    version = make_version(team)
    make_dataset(team, "digits")
    url = f"{reverse('jobs:job_new')}?version={version.pk}"

    response = member_client.post(
        url,
        {
            "idempotency_key": uuid.uuid4().hex,
            "include_benchmark": "on",
            "settings_benchmark": "{}",
            "dataset_evaluate_dataset_id": "999999",
        },
    )

    assert response.status_code == 302
    assert [s["name"] for s in Job.objects.get().stages] == ["benchmark"]


def test_it_prefills_the_demo_pipeline_and_runs_its_stages_in_pipeline_order(
    member_client, team, enqueued
):
    version = make_version(
        team,
        "digits-mlp",
        format="torchscript",
        inputs=[{"name": "input", "shape": ["batch", 64], "dtype": "float32"}],
    )
    dataset = make_dataset(team, "digits")
    url = reverse("jobs:job_new")

    plain = member_client.get(url, {"version": version.pk}).content.decode()
    page = member_client.get(url, {"version": version.pk, "preset": "demo", "dataset": dataset.pk})
    form = page.content.decode()

    assert 'data-testid="demo-preset"' in plain and 'name="preset" value="demo"' in plain
    checked = re.findall(r'<input type="checkbox" name="include_(\w+)"[^>]*checked', form)
    assert checked == ["finetune", "quantize", "compile", "evaluate", "benchmark"]
    picker = re.search(r'<select name="dataset_finetune_dataset_id".*?</select>', form, re.S)
    assert f'<option value="{dataset.pk}" selected>' in picker.group(0)
    finetune_json = page.context["form"]["settings_finetune"].value()
    # The picker holds the id and a field the epochs: nothing is left for the JSON box.
    assert json.loads(finetune_json) == {}, "the picker, not the JSON, holds the id"
    assert page.context["form"]["set_finetune_epochs"].value() == 3

    data = {"idempotency_key": uuid.uuid4().hex}
    for name in checked:
        data[f"include_{name}"] = "on"
        data[f"settings_{name}"] = page.context["form"][f"settings_{name}"].value()
    for field in re.findall(r'<select name="(dataset_\w+)"', form):
        data[field] = page.context["form"][field].value() or ""
    for field in re.findall(r'name="(set_\w+)"', form):
        value = page.context["form"][field].value()
        data[field] = "" if value is None else value
    response = member_client.post(f"{url}?version={version.pk}", data)

    assert response.status_code == 302, response.content.decode()[-2000:]
    stages = Job.objects.get().stages
    assert [s["name"] for s in stages] == checked
    assert stages[0]["settings"]["dataset_id"] == dataset.pk
    assert stages[0]["settings"]["epochs"] == 3
    assert stages[1]["settings"]["calibration_dataset_id"] == dataset.pk
    assert stages[3]["settings"]["dataset_id"] == dataset.pk


def test_it_offers_no_demo_pipeline_on_an_onnx_version(member_client, team):
    version = make_version(team)
    dataset = make_dataset(team, "digits")

    response = member_client.get(
        reverse("jobs:job_new"), {"version": version.pk, "preset": "demo", "dataset": dataset.pk}
    )

    body = response.content.decode()
    assert 'data-testid="demo-preset"' not in body
    assert not re.search(r'name="include_finetune"[^>]*checked', body)


# --- version page: evaluation and chart ---


def test_it_shows_the_evaluation_metrics_block_when_metrics_exist(member_client, team):
    parent = make_version(team)
    dataset = make_dataset(team, "digits")
    job = make_job(parent)
    child = make_version(
        team,
        parent=parent,
        job=job,
        artifact_key="s1",
        precision="int8",
        metrics={
            "accuracy": 0.9733,
            "top5": 1.0,
            "retention": 0.998,
            "parent_accuracy": 0.975,
            "size_ratio": 0.32,
            "eval_rows": 180.0,
            "max_abs_diff": 0.0123,
        },
        details={"evaluation": {"dataset_id": dataset.pk, "split": "validation"}},
    )

    body = member_client.get(child.get_absolute_url()).content.decode()
    plain = member_client.get(parent.get_absolute_url()).content.decode()

    block = body[body.index('data-testid="evaluation-metrics"') :]
    block = block[: block.index("</section>")]
    assert re.search(r'data-metric="accuracy">.*?97\.33%.*?parent v1: 97\.50%', block, re.S)
    assert re.search(r'data-metric="top5">.*?Top-5 accuracy.*?100\.00%', block, re.S)
    assert re.search(r'data-metric="retention">.*?99\.80%.*?97\.50% → 97\.33%', block, re.S)
    assert re.search(r'data-metric="size_ratio">.*?32\.00%.*?3\.1× smaller', block, re.S)
    assert dataset.get_absolute_url() in block and "validation split" in block
    assert "180 rows" in block
    assert "max_abs_diff" in body and "max_abs_diff" not in block
    assert 'data-testid="evaluation-metrics"' not in plain


def test_it_shows_regression_metrics_without_a_parent(member_client, team):
    version = make_version(team, metrics={"mse": 0.0421, "mae": 0.15, "cosine": 0.98765})

    body = member_client.get(version.get_absolute_url()).content.decode()

    assert re.search(r'data-metric="mse">.*?0\.0421', body, re.S)
    assert re.search(r'data-metric="cosine">.*?0\.9877', body, re.S)
    assert 'data-metric="retention"' not in body and "parent v" not in body


def test_it_charts_the_latest_jobs_benchmarks_and_the_speedup_over_the_parent(member_client, team):
    parent = make_version(team)
    child_job = make_job(parent)
    # The job that made the child timed its parent beside it (speedups come from one job).
    for batch in (1, 2, 4, 8):
        bench(parent, child_job, batch, p50=2.0 * batch, throughput=500.0)
    child = make_version(team, parent=parent, job=child_job, artifact_key="s1", backend="trt")
    old_job = make_job(child, created_at=timezone.now() - timezone.timedelta(days=1))
    bench(child, old_job, 16, p50=9.0, throughput=10.0)
    for batch in (1, 2, 4, 8):
        bench(child, child_job, batch, p50=1.0 * batch, throughput=1000.0 * batch)

    response = member_client.get(child.get_absolute_url())

    body = response.content.decode()
    svg = chart_of(body)
    assert points(svg, "p50") == [1, 2, 4, 8]  # the latest job's rows only: no batch 16
    assert points(svg, "p99") == [1, 2, 4, 8]
    assert points(svg, "throughput") == [1, 2, 4, 8]
    ticks = [t.text for t in svg.iter(f"{SVG}text") if "chart-xtick" in t.get("class", "")]
    assert ticks == ["1", "2", "4", "8"] * 2
    labels = " ".join(t.text or "" for t in svg.iter(f"{SVG}text"))
    assert "batch size" in labels and "ms" in labels and "samples/s" in labels
    assert "<script" not in body.split('data-testid="latency-chart"')[1].split("</svg>")[0]
    speedups = re.findall(r'data-testid="speedup-parent">(.*?)</td>', body, re.S)
    assert len(speedups) == 5 and "2.00×" in speedups[0]
    assert "not measured together" in speedups[-1]  # batch 16: an older job, no parent row
    assert "vs parent v1" in body
    assert [b.batch_size for b in response.context["benchmarks"]] == [1, 2, 4, 8, 16]


def test_it_shows_no_chart_and_no_speedup_without_rows(member_client, team):
    version = make_version(team)

    body = member_client.get(version.get_absolute_url()).content.decode()

    assert "<svg" not in body and "Speedup" not in body
    assert "No benchmarks of this version yet" in body


def test_it_labels_produced_versions_with_their_backend_on_the_job_page(member_client, team):
    source = make_version(team)
    job = make_job(source)
    make_version(team, parent=source, job=job, artifact_key="s1", backend="onnxruntime")

    body = member_client.get(job.get_absolute_url()).content.decode()

    assert "ONNX · FP32 · onnxruntime" in body


# --- latency_chart_svg ---


def test_it_draws_one_point_per_batch_size_as_valid_svg():
    rows = [
        {"batch_size": b, "backend": "onnxruntime", "p50_ms": 0.5 * b, "p99_ms": b, "throughput": t}
        for b, t in ((32, 9000.0), (1, 2000.0), (4, 6000.0))
    ]

    svg = ET.fromstring(latency_chart_svg(rows))

    assert svg.tag == f"{SVG}svg"
    assert points(svg, "p50") == [1, 4, 32] and points(svg, "throughput") == [1, 4, 32]
    panels = [g.get("data-chart") for g in svg.iter(f"{SVG}g") if g.get("data-chart")]
    assert panels == ["latency", "throughput"]
    xs = [float(c.get("cx")) for c in svg.iter(f"{SVG}circle") if c.get("data-series") == "p50"]
    assert xs[1] - xs[0] == pytest.approx(xs[2] - xs[1]), "batch sizes are spaced by index"
    ys = [float(c.get("cy")) for c in svg.iter(f"{SVG}circle") if c.get("data-series") == "p50"]
    assert ys[0] > ys[1] > ys[2], "a larger latency is drawn higher"
    throughput = next(g for g in svg.iter(f"{SVG}g") if g.get("data-chart") == "throughput")
    y_ticks = [
        t.text
        for t in throughput.iter(f"{SVG}text")
        if t.get("class") == "chart-tick" and t.get("text-anchor") == "end"
    ]
    assert y_ticks == ["0", "2500", "5000", "7500", "10k"]


def test_it_escapes_text_and_splits_series_by_backend():
    rows = [
        {"batch_size": 1, "backend": "<b>&x", "p50_ms": 1.0, "p99_ms": 2.0, "throughput": 5.0},
        {"batch_size": 1, "backend": "trt", "p50_ms": 0.2, "p99_ms": 0.4, "throughput": 50.0},
        {"batch_size": 2, "backend": "trt", "p50_ms": 0.3, "p99_ms": 0.6, "throughput": 70.0},
    ]

    markup = latency_chart_svg(rows)
    svg = ET.fromstring(markup)

    assert "<b>" not in markup and "&lt;b&gt;&amp;x" in markup
    assert points(svg, "p50:trt") == [1, 2] and points(svg, "p50:<b>&x") == [1]
    assert latency_chart_svg([]) == ""
