"""Datasets through the API: versioned uploads, refusals, team scoping, checks before a launch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings

from pipelines.demo import write_digits_dataset
from r1platform.datasets.models import Dataset
from r1platform.jobs.models import Job

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")


@pytest.fixture(scope="session")
def digits_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits.csv"
    write_digits_dataset(path, "csv")
    return path


def post_dataset(api, path: Path, name: str = "digits", **fields):
    with open(path, "rb") as f:
        return api.post("/api/v1/datasets", {"name": name, "file": f, **fields})


def stored_files() -> list[Path]:
    return [p for p in Path(settings.MEDIA_ROOT).rglob("*") if p.is_file()]


def test_it_uploads_a_dataset_and_versions_it_by_name(api, digits_csv):
    first = post_dataset(api, digits_csv, target="label")
    assert first.status_code == 201, first.content
    body = first.json()
    assert (body["version"], body["format"], body["rows"]) == (1, "csv", 1797)
    assert {"name": "label"}.items() <= body["schema"]["columns"][-1].items()
    second = post_dataset(
        api, digits_csv, splits=json.dumps({"train": 0.6, "validation": 0.2, "test": 0.2})
    )
    assert second.json()["version"] == 2
    assert second.json()["splits"]["train"] == 0.6
    got = api.get(f"/api/v1/datasets/{body['id']}").json()
    assert got["sha256"] == body["sha256"] and got["target"] == "label"


@pytest.mark.parametrize(
    ("splits", "needle"),
    [
        ('{"train": 0.9, "validation": 0.2, "test": 0.1}', "add up to 1"),
        ('{"train": 1.0, "holdout": 0}', "unknown split keys"),
        ("[0.8, 0.2]", "JSON object"),
    ],
)
def test_it_refuses_bad_split_settings(api, digits_csv, splits, needle):
    response = post_dataset(api, digits_csv, splits=splits)
    assert response.status_code == 400
    assert needle in response.json()["detail"]
    assert stored_files() == []


def test_it_refuses_a_target_that_is_not_in_the_dataset(api, digits_csv):
    response = post_dataset(api, digits_csv, target="class")
    assert response.status_code == 400
    assert "'class' is not in the dataset" in response.json()["detail"]
    assert stored_files() == []


def test_it_refuses_an_npz_that_needs_pickle_and_never_runs_it(api, tmp_path):
    canary = tmp_path / "canary"

    class Canary:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {canary}",))

    evil = tmp_path / "evil.npz"
    np.savez(evil, x=np.array([Canary()], dtype=object))
    response = post_dataset(api, evil)
    assert response.status_code == 400
    assert "pickle" in response.json()["detail"].lower()
    assert not canary.exists()
    assert stored_files() == []


def test_it_hides_other_teams_datasets(api, client, digits_csv, outsider_token):
    dataset_id = post_dataset(api, digits_csv).json()["id"]
    client.defaults.pop("HTTP_AUTHORIZATION")
    other = {"HTTP_AUTHORIZATION": f"Bearer {outsider_token}"}
    assert client.get(f"/api/v1/datasets/{dataset_id}", **other).status_code == 404
    assert client.get("/api/v1/datasets", **other).json() == []


@pytest.fixture
def digits_version(api, digits_torchscript) -> dict:
    with open(digits_torchscript, "rb") as f:
        data = {"name": "digits", "task": "classification", "file": f, "input_shape": "batch,64"}
        return api.post("/api/v1/models", data).json()["versions"][0]


def launch(api, version_id, stages):
    payload = {"version_id": version_id, "stages": stages}
    return api.post("/api/v1/jobs", payload, content_type="application/json")


def test_it_launches_with_a_dataset_of_the_team(api, digits_version, digits_csv):
    dataset_id = post_dataset(api, digits_csv, target="label").json()["id"]
    response = launch(api, digits_version["id"], [
        {"name": "export_onnx"},
        {"name": "evaluate", "settings": {"dataset_id": dataset_id}},
    ])  # fmt: skip
    assert response.status_code == 201, response.content
    assert response.json()["stages"][1]["settings"]["dataset_id"] == dataset_id


def test_it_refuses_a_dataset_that_does_not_fit_the_model(api, digits_version, tmp_path):
    narrow = tmp_path / "narrow.csv"
    narrow.write_text("a,b,label\n" + "".join(f"{i},{i},{i % 2}\n" for i in range(30)))
    dataset_id = post_dataset(api, narrow, name="narrow", target="label").json()["id"]
    response = launch(api, digits_version["id"], [
        {"name": "export_onnx"},
        {"name": "evaluate", "settings": {"dataset_id": dataset_id}},
    ])  # fmt: skip
    assert response.status_code == 400
    assert "64" in response.json()["detail"]
    assert not Job.objects.exists()


def test_it_refuses_another_teams_dataset_at_launch(api, digits_version, digits_csv, other_team):
    theirs = Dataset.objects.create(
        team=other_team, name="x", version=1, format="csv", file="datasets/x.csv",
        sha256="0" * 64, size_bytes=1, rows=1, schema={},
    )  # fmt: skip
    response = launch(api, digits_version["id"], [
        {"name": "export_onnx"},
        {"name": "evaluate", "settings": {"dataset_id": theirs.pk}},
    ])  # fmt: skip
    assert response.status_code == 400
    assert f"dataset {theirs.pk} does not exist" in response.json()["detail"]
