"""The browser dashboard: pages, search, uploads, launching, live job status and cancel.

No worker runs here: ``enqueue`` is patched so nothing reaches the broker, and job states are set
through the ORM the way a worker would leave them.
"""

from __future__ import annotations

import os
import pickle
import re
import uuid
from pathlib import Path

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.html import escape

from pipelines.core import StageConfigError
from pipelines.stages import default_pipeline, stage_schemas, validate_pipeline
from r1platform.accounts.models import Membership, Team
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry.models import BenchmarkResult, ModelVersion, RegisteredModel
from r1platform.registry.services import register_version

HX = {"HTTP_HX_REQUEST": "true"}

# --- fixtures (teams, members and media are tests/conftest.py's) ---


@pytest.fixture
def linear_onnx(tmp_path) -> Path:
    """A real ONNX model: one Linear layer, dynamic batch axis."""
    import torch

    torch.manual_seed(0)
    path = tmp_path / "linear.onnx"
    torch.onnx.export(
        torch.nn.Linear(4, 2).eval(),
        (torch.randn(1, 4),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        opset_version=17,
    )
    return path


def make_model(team: Team, name: str = "resnet", **kwargs) -> RegisteredModel:
    return RegisteredModel.objects.create(team=team, name=name, mlflow_name=f"{team.slug}.{name}")


def make_version(model: RegisteredModel, parent=None, job=None, **kwargs) -> ModelVersion:
    defaults = {
        "relative_file": f"models/team-{model.team_id}/{uuid.uuid4().hex}.onnx",
        "sha256": uuid.uuid4().hex * 2,
        "size_bytes": 1234,
        "format": "onnx",
        "precision": "fp32",
        "inputs": [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": ["batch", 2], "dtype": "float32"}],
        "parent": parent,
        "job": job,
    }
    defaults.update(kwargs)
    return register_version(model, **defaults)


def make_job(version: ModelVersion, status: str = JobStatus.QUEUED, **kwargs) -> Job:
    fields = {
        "team_id": version.team_id,
        "version": version,
        "stages": [{"name": "benchmark", "settings": {}}],
        "queue": "cpu",
        "idempotency_key": uuid.uuid4().hex,
        "status": status,
    }
    fields.update(kwargs)
    return Job.objects.create(**fields)


def files_under(root: Path) -> list[str]:
    """Every file under ``root``; the empty upload spool dir is the only thing allowed."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(found)


def upload(client, path: Path, name: str = "linear", **fields):
    with open(path, "rb") as f:
        data = {"name": name, "task": "regression", "input_shape": "", "input_dtype": "float32"}
        data.update(fields)
        data["file"] = f
        return client.post(reverse("registry:model_upload"), data)


# --- models list ---


def test_it_lists_the_models_of_the_members_teams(member_client, team, django_user_model):
    mine = make_model(team, "resnet")
    make_version(mine)
    other = Team.objects.create(name="Other", slug="other")
    make_model(other, "secret-model")

    response = member_client.get(reverse("registry:model_list"))

    assert response.status_code == 200
    body = response.content.decode()
    assert "resnet" in body and mine.get_absolute_url() in body
    assert "secret-model" not in body
    assert "Upload model" in body
    assert 'hx-trigger="keyup changed delay:300ms, search"' in body
    assert "/static/r1/htmx.min.js" in body


def test_it_filters_models_by_name_and_answers_htmx_with_the_table_only(member_client, team):
    make_model(team, "resnet50")
    make_model(team, "bert-base")

    full = member_client.get(reverse("registry:model_list"), {"q": "RESNET"})
    partial = member_client.get(reverse("registry:model_list"), {"q": "bert"}, **HX)

    assert [m.name for m in full.context["page"]] == ["resnet50"]
    body = partial.content.decode()
    assert partial.status_code == 200
    assert "bert-base" in body and "resnet50" not in body
    assert body.lstrip().startswith('<section id="models-table"')
    assert "<html" not in body


def test_it_answers_an_htmx_history_restore_with_the_whole_page(member_client, team):
    make_model(team, "resnet50")

    response = member_client.get(
        reverse("registry:model_list"), {"q": "res"}, HTTP_HX_HISTORY_RESTORE_REQUEST="true", **HX
    )

    assert response.status_code == 200
    assert "<html" in response.content.decode() and "resnet50" in response.content.decode()
    assert "HX-Request" in response["Vary"]


def test_it_paginates_the_models_list_25_to_a_page(member_client, team):
    RegisteredModel.objects.bulk_create(
        RegisteredModel(team=team, name=f"model-{i:02d}") for i in range(30)
    )

    first = member_client.get(reverse("registry:model_list"))
    second = member_client.get(reverse("registry:model_list"), {"page": 2})

    assert len(first.context["page"].object_list) == 25
    assert len(second.context["page"].object_list) == 5
    assert "page=2" in first.content.decode()
    assert "Page 2 of 2" in second.content.decode()


def test_it_keeps_the_models_list_queries_constant_as_versions_grow(
    member_client, team, django_assert_max_num_queries
):
    model = make_model(team, "big")
    make_version(model)
    url = reverse("registry:model_list")
    member_client.get(url)  # warm the session

    with CaptureQueriesContext(connection) as one_version:
        member_client.get(url)
    first = make_version(model)
    ModelVersion.objects.bulk_create(
        ModelVersion(
            model=model,
            team=team,
            number=n,
            format="onnx",
            file=f"f{n}",
            sha256="0" * 64,
            size_bytes=1,
        )
        for n in range(first.number + 1, 301)
    )
    RegisteredModel.objects.filter(pk=model.pk).update(latest_version=300)

    with django_assert_max_num_queries(len(one_version.captured_queries)):
        response = member_client.get(url)
    assert model.versions.count() == 300
    assert response.context["page"].object_list[0].latest_version == 300
    assert not any(
        "COUNT" in q["sql"] and "registry_modelversion" in q["sql"]
        for q in one_version.captured_queries
    )


# --- upload ---


def test_it_uploads_a_real_onnx_through_the_form_as_version_1(
    member_client, team, media, linear_onnx
):
    response = upload(member_client, linear_onnx, name="linear")

    model = RegisteredModel.objects.get(team=team, name="linear")
    version = model.versions.get()
    assert response.status_code == 302
    assert response["Location"] == model.get_absolute_url()
    assert version.number == 1 and version.format == "onnx"
    assert [t["name"] for t in version.inputs] == ["x"]
    assert version.inputs[0]["shape"][1] == 4
    assert [t["name"] for t in version.outputs] == ["y"]
    page = member_client.get(response["Location"]).content.decode()
    assert f"Uploaded linear v1 (ONNX, sha256 {version.sha256[:12]}…)" in page
    assert (media / version.file).is_file()


def test_it_hides_the_team_choice_from_a_member_of_one_team(member_client, user, team):
    one = member_client.get(reverse("registry:model_upload")).content.decode()
    second = Team.objects.create(name="Speech", slug="speech")
    Membership.objects.create(team=second, user=user)
    two = member_client.get(reverse("registry:model_upload")).content.decode()

    assert f'type="hidden" name="team" value="{team.pk}"' in one
    assert '<select name="team"' in two and "Speech" in two
    assert 'enctype="multipart/form-data"' in one
    assert "ids:batch,128:int64;mask:batch,128:int64" in one


def test_it_uploads_into_the_chosen_team_only_if_the_member_belongs_to_it(
    member_client, media, linear_onnx
):
    stranger = Team.objects.create(name="Stranger", slug="stranger")

    response = upload(member_client, linear_onnx, team=stranger.pk)

    assert response.status_code == 400
    assert not RegisteredModel.objects.exists()


@pytest.mark.parametrize(
    ("filename", "content"),
    [
        ("weights.pt", pickle.dumps({"weight": [1.0, 2.0]})),
        ("model.onnx", os.urandom(2048)),
    ],
    ids=["pickle-named-pt", "random-bytes-named-onnx"],
)
def test_it_refuses_a_file_that_is_not_a_model_and_keeps_nothing(
    member_client, media, tmp_path, filename, content
):
    path = tmp_path / filename
    path.write_bytes(content)

    response = upload(member_client, path, name="bad")

    assert response.status_code == 400
    errors = response.context["form"].non_field_errors()
    assert errors, "the refusal reason is shown"
    assert escape(errors[0]).replace("\n", "<br>") in response.content.decode()
    assert not RegisteredModel.objects.exists()
    assert files_under(media) == []


def test_it_refuses_an_upload_over_the_size_limit_as_a_file_error(
    member_client, media, settings, linear_onnx
):
    settings.R1_MAX_UPLOAD_BYTES = 64

    response = upload(member_client, linear_onnx, name="too-big")

    assert response.status_code == 400
    assert "limit" in " ".join(response.context["form"].errors["file"])
    assert "over the 64 B limit" in response.content.decode()
    assert not RegisteredModel.objects.exists()
    assert files_under(media) == []


def test_it_refuses_a_second_model_with_the_same_name(member_client, team, media, linear_onnx):
    assert upload(member_client, linear_onnx, name="dup").status_code == 302

    again = upload(member_client, linear_onnx, name="dup")

    assert again.status_code == 400
    assert "already has a model named" in again.content.decode()
    assert RegisteredModel.objects.filter(name="dup").count() == 1
    assert len(files_under(media / "models")) == 1


# --- model and version pages ---


def test_it_shows_a_models_versions_and_its_lineage_tree(member_client, team):
    model = make_model(team, "tree")
    v1 = make_version(model)
    v2 = make_version(model, parent=v1, precision="int8")
    v3 = make_version(model, parent=v2, backend="onnxruntime")
    v4 = make_version(model, parent=v1, precision="fp16")
    job = make_job(v1, status=JobStatus.SUCCEEDED)

    response = member_client.get(model.get_absolute_url())

    assert response.status_code == 200
    body = response.content.decode()
    tree = re.sub(r"\s+", " ", body[body.index('id="lineage"') :])
    tree = tree[: tree.index("</section>")]
    order = re.findall(r">v(\d+)</a>", tree)
    assert order == ["1", "2", "3", "4"]
    # v2 and v4 are nested under v1, v3 under v2.
    assert tree.count("<ul>") == 2 and tree.count("</ul>") == 3
    assert f"{v3.label}" == "ONNX · FP32 · onnxruntime"
    assert "ONNX · INT8" in body
    assert f"{reverse('jobs:job_new')}?version={v4.pk}" in body
    assert "/#/models/team-a.tree" in body
    assert job.get_absolute_url() in body


def test_it_builds_the_model_page_without_a_query_per_version(member_client, team):
    model = make_model(team, "chain")
    parent = make_version(model)
    member_client.get(model.get_absolute_url())
    for _ in range(3):
        parent = make_version(model, parent=parent)
    with CaptureQueriesContext(connection) as few:
        member_client.get(model.get_absolute_url())
    for _ in range(30):
        parent = make_version(model, parent=parent)
    with CaptureQueriesContext(connection) as many:
        response = member_client.get(model.get_absolute_url())

    assert len(response.context["versions"]) == 34
    assert len(many.captured_queries) == len(few.captured_queries)


def test_it_shows_a_versions_facts_benchmarks_and_mlflow_link(member_client, team):
    model = make_model(team, "bench")
    v1 = make_version(model)
    job = make_job(v1, status=JobStatus.SUCCEEDED)
    v2 = make_version(model, parent=v1, job=job, artifact_key="s1", metrics={"max_abs_diff": 0.001})
    ModelVersion.objects.filter(pk=v2.pk).update(mlflow_version="7")
    for batch in (8, 1):
        BenchmarkResult.objects.create(
            version=v2,
            job=job,
            backend="onnxruntime",
            device="cpu: test",
            batch_size=batch,
            p50_ms=1.25,
            p95_ms=2.5,
            p99_ms=3.75,
            throughput=800.0,
            iterations=50,
        )

    response = member_client.get(v2.get_absolute_url())
    parent_page = member_client.get(v1.get_absolute_url()).content.decode()

    body = response.content.decode()
    assert response.status_code == 200
    assert [b.batch_size for b in response.context["benchmarks"]] == [1, 8]
    assert body.count('data-testid="benchmark-row"') == 2
    assert ">1.25<" in body and ">800<" in body and "cpu: test" in body
    assert "/#/models/team-a.bench/versions/7" in body
    assert v1.get_absolute_url() in body and "max_abs_diff" in body
    assert "batch, 4" in body
    assert v2.get_absolute_url() in parent_page  # a child link on the parent
    assert "not yet in MLflow" in parent_page


# --- launch ---


def test_it_renders_the_launch_form_with_the_default_pipeline_checked(member_client, team):
    version = make_version(make_model(team))

    response = member_client.get(reverse("jobs:job_new"), {"version": version.pk})

    assert response.status_code == 200
    body = response.content.decode()
    defaults = [s["name"] for s in default_pipeline("onnx")]
    names = [s["name"] for s in stage_schemas("tensor")]
    assert 'name="include_from_gguf"' not in body  # a language model's stage, not offered here
    for name in names:
        box = re.search(rf'<input type="checkbox" name="include_{name}"[^>]*>', body)
        assert box, name
        assert ("checked" in box.group(0)) == (name in defaults), name
        assert f'name="settings_{name}"' in body
    schema = stage_schemas()[0]
    assert schema["description"][:40] in body
    key = re.search(r'name="idempotency_key" value="([0-9a-f]{32})"', body)
    assert key, "a fresh idempotency key is in the form"
    again = member_client.get(reverse("jobs:job_new"), {"version": version.pk}).content.decode()
    assert key.group(1) not in again


def _launch_data(key: str, stages: dict[str, str]) -> dict[str, str]:
    data = {"idempotency_key": key}
    for name, settings in stages.items():
        data[f"include_{name}"] = "on"
        data[f"settings_{name}"] = settings
    return data


def test_it_launches_one_job_from_the_form(
    member_client, user, team, enqueued, django_capture_on_commit_callbacks
):
    version = make_version(make_model(team))
    url = f"{reverse('jobs:job_new')}?version={version.pk}"

    with django_capture_on_commit_callbacks(execute=True):
        response = member_client.post(
            url,
            _launch_data(uuid.uuid4().hex, {"quantize": "{}", "benchmark": '{"iterations": 5}'}),
        )

    job = Job.objects.get()
    assert response.status_code == 302 and response["Location"] == job.get_absolute_url()
    assert [s["name"] for s in job.stages] == ["quantize", "benchmark"]
    assert job.stages[1]["settings"]["iterations"] == 5
    assert job.version == version and job.created_by == user
    assert enqueued == [job.pk]


def test_it_makes_one_job_from_a_double_post_with_the_same_key(member_client, team, enqueued):
    version = make_version(make_model(team))
    url = f"{reverse('jobs:job_new')}?version={version.pk}"
    data = _launch_data(uuid.uuid4().hex, {"compile": "{}"})

    first = member_client.post(url, data)
    second = member_client.post(url, data)

    assert Job.objects.count() == 1
    assert first["Location"] == second["Location"] == Job.objects.get().get_absolute_url()
    followed = member_client.get(second["Location"]).content.decode()
    assert "already launched" in followed


def test_it_redirects_an_htmx_launch_on_the_client(member_client, team, enqueued):
    version = make_version(make_model(team))
    url = f"{reverse('jobs:job_new')}?version={version.pk}"

    response = member_client.post(url, _launch_data(uuid.uuid4().hex, {"benchmark": "{}"}), **HX)

    assert response.status_code == 200
    assert response["HX-Redirect"] == Job.objects.get().get_absolute_url()


def test_it_names_the_stage_whose_settings_are_not_json(member_client, team, enqueued):
    version = make_version(make_model(team))
    url = f"{reverse('jobs:job_new')}?version={version.pk}"

    response = member_client.post(
        url, _launch_data(uuid.uuid4().hex, {"quantize": "{}", "benchmark": "{iterations: 5"})
    )
    partial = member_client.post(url, _launch_data(uuid.uuid4().hex, {"compile": "[1]"}), **HX)

    assert response.status_code == 400
    assert "benchmark: the settings are not valid JSON" in response.content.decode()
    assert partial.status_code == 400
    assert "compile: the settings must be a JSON object" in partial.content.decode()
    assert partial.content.decode().lstrip().startswith('<form id="launch-form"')
    assert not Job.objects.exists()


def test_it_refuses_a_stage_combination_the_pipeline_cannot_run(member_client, team, enqueued):
    version = make_version(make_model(team))  # ONNX: export_onnx takes TorchScript only
    url = f"{reverse('jobs:job_new')}?version={version.pk}"
    stages = {"export_onnx": "{}", "benchmark": "{}"}
    with pytest.raises(StageConfigError) as refused:
        validate_pipeline("onnx", [{"name": n, "settings": {}} for n in stages])

    response = member_client.post(url, _launch_data(uuid.uuid4().hex, stages))

    assert response.status_code == 400
    assert str(refused.value).splitlines()[0] in response.content.decode()
    assert not Job.objects.exists()


def test_it_refuses_a_launch_with_no_stage_checked(member_client, team, enqueued):
    version = make_version(make_model(team))
    url = f"{reverse('jobs:job_new')}?version={version.pk}"

    response = member_client.post(url, {})

    assert response.status_code == 400
    assert "Include at least one stage" in response.content.decode()
    assert not Job.objects.exists()


def test_it_answers_404_for_a_launch_without_a_known_version(member_client):
    assert member_client.get(reverse("jobs:job_new")).status_code == 404
    assert member_client.get(reverse("jobs:job_new"), {"version": "x"}).status_code == 404
    assert member_client.get(reverse("jobs:job_new"), {"version": 999999}).status_code == 404


# --- job pages ---


def test_it_lists_jobs_newest_first_and_filters_by_status(member_client, team):
    version = make_version(make_model(team))
    old = make_job(version, status=JobStatus.SUCCEEDED)
    new = make_job(version, status=JobStatus.FAILED)

    everything = member_client.get(reverse("jobs:job_list"))
    failed = member_client.get(reverse("jobs:job_list"), {"status": "failed"})

    assert [j.pk for j in everything.context["page"]] == [new.pk, old.pk]
    assert [j.pk for j in failed.context["page"]] == [new.pk]
    assert 'data-status="failed"' in failed.content.decode()
    assert 'hx-trigger="every 2s"' not in everything.content.decode()


def test_it_polls_the_jobs_table_only_while_a_job_is_active(member_client, team):
    version = make_version(make_model(team))
    job = make_job(version, status=JobStatus.RUNNING, progress=0.5)
    url = reverse("jobs:job_list")

    live = member_client.get(url)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.SUCCEEDED, progress=1.0)
    poll = member_client.get(url, HTTP_HX_TRIGGER="jobs-table", **HX)

    assert 'hx-trigger="every 2s"' in live.content.decode()
    assert 'aria-valuenow="50"' in live.content.decode()
    assert poll.status_code == 286
    assert 'hx-trigger="every 2s"' not in poll.content.decode()
    assert 'data-status="succeeded"' in poll.content.decode()


def test_it_polls_the_job_page_every_second_while_running(member_client, team):
    job = make_job(
        make_version(make_model(team)),
        status=JobStatus.RUNNING,
        progress=0.25,
        current_stage="quantize",
        worker_host="gpu-7",
        attempts=1,
        started_at=timezone.now(),
    )

    page = member_client.get(job.get_absolute_url())
    partial = member_client.get(job.get_absolute_url(), **HX)

    assert page.status_code == 200 and partial.status_code == 200
    for body in (page.content.decode(), partial.content.decode()):
        assert 'hx-trigger="every 1s"' in body and 'hx-swap="outerHTML"' in body
        assert 'id="job-status" data-status="running"' in body
        assert 'aria-valuenow="25"' in body
        assert "gpu-7" in body and "Cancel job" in body
    assert partial.content.decode().lstrip().startswith('<div id="job-live"')


def test_it_stops_polling_with_286_and_shows_the_final_state(member_client, team):
    model = make_model(team)
    source = make_version(model)
    job = make_job(source, status=JobStatus.RUNNING)
    produced = make_version(model, parent=source, job=job, artifact_key="s1", precision="int8")
    BenchmarkResult.objects.create(
        version=produced,
        job=job,
        backend="onnxruntime",
        batch_size=4,
        p50_ms=0.5,
        p95_ms=0.6,
        p99_ms=0.7,
        throughput=4000.0,
        iterations=20,
    )
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.SUCCEEDED,
        progress=1.0,
        finished_at=timezone.now(),
        mlflow_experiment_id="3",
        mlflow_run_id="abc123",
        log_tail="12:00:00 quantize done\n",
        stage_results=[
            {
                "stage_id": "s1",
                "name": "quantize",
                "status": "succeeded",
                "seconds": 1.5,
                "message": "4x smaller",
                "versions": [produced.pk],
            }
        ],
    )

    response = member_client.get(job.get_absolute_url(), **HX)

    body = response.content.decode()
    assert response.status_code == 286
    assert 'data-status="succeeded"' in body
    assert "every 1s" not in body and "hx-trigger" not in body.split("<section", 1)[0]
    assert produced.get_absolute_url() in body and "ONNX · INT8" in body
    assert "4x smaller" in body and "12:00:00 quantize done" in body
    assert body.count('data-testid="benchmark-row"') == 1 and ">4,000<" in body
    assert "/#/experiments/3/runs/abc123" in body
    assert "Cancel job" not in body


def test_it_shows_a_failed_jobs_error_prominently(member_client, team):
    job = make_job(
        make_version(make_model(team)),
        status=JobStatus.FAILED,
        error="quantize: the model has no weights to quantize",
    )

    body = member_client.get(job.get_absolute_url()).content.decode()

    assert 'class="alert alert-error"' in body
    assert "the model has no weights to quantize" in body


def test_it_cancels_a_queued_job(member_client, team):
    job = make_job(make_version(make_model(team)))

    response = member_client.post(reverse("jobs:job_cancel", args=[job.pk]), **HX)

    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED and job.finished_at is not None
    assert response.status_code == 200
    body = response.content.decode()
    assert 'data-status="cancelled"' in body and "every 1s" not in body


def test_it_asks_a_running_job_to_stop_and_redirects_without_htmx(member_client, team):
    job = make_job(make_version(make_model(team)), status=JobStatus.RUNNING)

    response = member_client.post(reverse("jobs:job_cancel", args=[job.pk]))

    job.refresh_from_db()
    assert response.status_code == 302 and response["Location"] == job.get_absolute_url()
    assert job.cancel_requested and job.status == JobStatus.RUNNING
    assert "Cancelling" in member_client.get(job.get_absolute_url()).content.decode()


def test_it_refuses_cancel_by_get(member_client, team):
    job = make_job(make_version(make_model(team)))

    response = member_client.get(reverse("jobs:job_cancel", args=[job.pk]))

    job.refresh_from_db()
    assert response.status_code == 405
    assert job.status == JobStatus.QUEUED


# --- chrome and admin ---


def test_it_shows_the_nav_with_teams_mlflow_and_a_logout_form(member_client, settings):
    body = member_client.get(reverse("registry:model_list")).content.decode()

    assert "Team A" in body and "alice" in body
    assert f'href="{settings.MLFLOW_UI_URL}" target="_blank"' in body
    assert re.search(r'<form method="post" action="/accounts/logout/"', body)
    assert 'hx-headers=\'{"X-CSRFToken": "' in body
    assert ">Admin<" not in body


def test_it_logs_in_through_the_login_page(client, user):
    page = client.get(reverse("login"))
    response = client.post(reverse("login"), {"username": "alice", "password": "pw-alice-123"})

    assert page.status_code == 200 and 'name="password"' in page.content.decode()
    assert response.status_code == 302 and response["Location"] == reverse("registry:model_list")


def test_it_serves_htmx_and_css_from_our_static_files():
    root = Path(__file__).resolve().parent.parent
    htmx = (root / "static/r1/htmx.min.js").read_text()
    templates = " ".join(p.read_text() for p in (root / "templates").rglob("*.html"))

    assert "htmx" in htmx[:200] and len(htmx) > 40_000
    assert (root / "static/r1/app.css").stat().st_size > 1000
    assert not re.search(r"https?://(unpkg|cdn|cdnjs|fonts\.googleapis)", templates)


def test_it_renders_every_admin_changelist_and_refuses_adding_tokens(
    client, admin_user, team, user
):
    client.force_login(admin_user)
    model = make_model(team)
    version = make_version(model)
    job = make_job(version, status=JobStatus.SUCCEEDED)
    BenchmarkResult.objects.create(
        version=version,
        job=job,
        backend="onnxruntime",
        batch_size=1,
        p50_ms=1,
        p95_ms=1,
        p99_ms=1,
        throughput=1,
        iterations=1,
    )
    from r1platform.accounts.models import ApiToken

    ApiToken.issue(user, team, name="ci")
    names = [
        "accounts_team",
        "accounts_membership",
        "accounts_apitoken",
        "registry_registeredmodel",
        "registry_modelversion",
        "registry_benchmarkresult",
        "jobs_job",
    ]

    for name in names:
        response = client.get(reverse(f"admin:{name}_changelist"))
        assert response.status_code == 200, name
    assert client.get(reverse("admin:accounts_apitoken_add")).status_code == 403
    assert (
        client.get(reverse("admin:registry_modelversion_change", args=[version.pk])).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("status", "shown"),
    [
        (JobStatus.SUCCEEDED, "finished"),
        (JobStatus.FAILED, "failed during benchmark"),
        (JobStatus.RUNNING, "benchmark"),
    ],
)
def test_the_job_page_says_finished_not_the_last_stage(member_client, team, status, shown):
    job = make_job(make_version(make_model(team)), status=status, current_stage="benchmark")
    if status != JobStatus.RUNNING:
        Job.objects.filter(pk=job.pk).update(finished_at=timezone.now())
    body = member_client.get(job.get_absolute_url()).content.decode()
    stage = body.split('data-testid="current-stage">', 1)[1].split("</dd>", 1)[0]
    assert stage == shown
    assert ("Current stage" in body) == (status == JobStatus.RUNNING)
