"""A tensor model's test-case dataset through the API and the dashboard: stored with its summary,
shown as test cases, refused for every stage that reads rows, parsed back by the library."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.urls import reverse

from pipelines.certification.test_cases import parse_test_cases
from r1platform.datasets.models import Dataset
from r1platform.datasets.services import dataset_ref
from r1platform.jobs.models import Job

# No broker here: a launch these tests try is refused before anything is queued.
pytestmark = pytest.mark.usefixtures("enqueued")

CASES = [
    {"name": "fraud-001", "input": [0.1] * 64, "expected": 1, "check": "argmax",
     "tags": ["fraud", "must"]},
    {"name": "scan-7", "input": [0.5] * 64, "expected": [0.1, 0.9], "check": "within",
     "atol": 0.01, "rtol": 0.0, "tags": ["must"]},
    {"name": "top", "input": [0.0] * 64, "expected": 3, "check": "top_k", "k": 2},
]  # fmt: skip


@pytest.fixture
def cases_file(tmp_path: Path) -> Path:
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CASES), encoding="utf-8")
    return path


def post_dataset(api, path: Path, name: str = "suite", **fields):
    with open(path, "rb") as f:
        return api.post("/api/v1/datasets", {"name": name, "file": f, **fields})


def test_the_api_stores_test_cases_with_their_summary(api, cases_file):
    response = post_dataset(api, cases_file)

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["format"], body["rows"], body["target"]) == ("jsonl", 3, "")
    assert body["schema"] == {
        "test_cases": {
            "count": 3,
            "checks": {"argmax": 1, "top_k": 1, "within": 1},
            "tags": {"must": 2, "fraud": 1},
            "inputs": ["input"],
        }
    }
    dataset = Dataset.objects.get(pk=body["id"])
    stored = parse_test_cases(Path(dataset_ref(dataset).path))
    assert [c.name for c in stored] == ["fraud-001", "scan-7", "top"]


def test_a_target_is_refused_for_test_cases(api, cases_file):
    response = post_dataset(api, cases_file, target="label")
    assert response.status_code == 400
    assert "test-case dataset" in response.content.decode()
    assert not Dataset.objects.exists()


def test_a_launch_refuses_test_cases_as_a_stage_dataset(api, cases_file, digits_torchscript):
    dataset_id = post_dataset(api, cases_file).json()["id"]
    with open(digits_torchscript, "rb") as f:
        data = {"name": "digits", "task": "classification", "file": f, "input_shape": "batch,64"}
        version = api.post("/api/v1/models", data).json()["versions"][0]

    response = api.post(
        "/api/v1/jobs",
        {
            "version_id": version["id"],
            "stages": [
                {"name": "export_onnx"},
                {"name": "evaluate", "settings": {"dataset_id": dataset_id}},
            ],
        },
        content_type="application/json",
    )

    assert response.status_code == 400
    assert f"dataset {dataset_id} holds test cases" in response.json()["detail"]
    assert not Job.objects.exists()


def test_the_dataset_pages_show_test_cases_and_their_count(api, member_client, cases_file):
    dataset_id = post_dataset(api, cases_file).json()["id"]

    listing = member_client.get(reverse("datasets:dataset_list")).content.decode()
    page = member_client.get(reverse("datasets:dataset_detail", args=[dataset_id]))

    assert 'data-testid="dataset-kind">test cases (3)</span>' in listing
    html = page.content.decode()
    assert ">test cases (3)</span>" in html and 'data-testid="dataset-test-cases"' in html
    assert "argmax × 1" in html and "must × 2" in html
    assert "none: each case holds its expected output" in html
