"""Text datasets (JSON Lines for language models) through the API and the dashboard: stored with
their kind, refused with the line and the reason (keeping nothing), shown with samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse
from django.utils.html import escape

from pipelines.core import PipelineError, TensorSpec
from pipelines.datasets import check_fits, load_pairs, load_texts
from r1platform.datasets.models import Dataset
from r1platform.datasets.services import dataset_ref

# No broker here: nothing these tests do queues a job, but keep the guard the API tests use.
pytestmark = pytest.mark.usefixtures("enqueued")

PAIRS = [{"prompt": f"Q: {i} + 1 =", "completion": f" {i + 1}"} for i in range(10)]
HOSTILE = '<script>alert("x")</script> & more'
CASES = [
    {"prompt": HOSTILE, "expected": "Paris", "check": "contains", "tags": ["geo"]},
    {"prompt": "2+2=", "expected": "4", "check": "exact", "name": "sum"},
    {"prompt": "JSON:", "expected": '{"a": 1}', "check": "json"},
]


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def stored_files() -> list[Path]:
    return [p for p in Path(settings.MEDIA_ROOT).rglob("*") if p.is_file()]


def post_dataset(api, path: Path, name: str = "sft", **fields):
    with open(path, "rb") as f:
        return api.post("/api/v1/datasets", {"name": name, "file": f, **fields})


def upload(client, path: Path, name: str = "cases", **fields):
    with open(path, "rb") as f:
        data = {"name": name, "target": "", "train": 0.8, "validation": 0.1, "test": 0.1}
        data["seed"] = 0
        data.update(fields)
        data["file"] = f
        return client.post(reverse("datasets:dataset_upload"), data)


# --- API ---


def test_the_api_stores_a_text_dataset_with_its_kind_and_a_worker_reads_it(api, tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", PAIRS)

    response = post_dataset(
        api, path, splits=json.dumps({"train": 0.8, "validation": 0, "test": 0.2, "seed": 3})
    )

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["format"], body["rows"], body["version"]) == ("jsonl", 10, 1)
    assert body["schema"]["text_kind"] == "prompt_completion"
    assert body["schema"]["samples"][0] == PAIRS[0]
    dataset = Dataset.objects.get(pk=body["id"])
    assert dataset.schema["text_kind"] == "prompt_completion" and dataset.target == ""
    assert len(stored_files()) == 1
    # what a worker reads is the stored file, cut by the stored splits
    ref = dataset_ref(dataset)
    train, test = load_pairs(ref, "train"), load_pairs(ref, "test")
    assert (len(train), len(test)) == (8, 2)
    assert sorted(train + test) == sorted((r["prompt"], r["completion"]) for r in PAIRS)
    assert load_texts(ref, "test") == [p + c for p, c in test]
    again = post_dataset(api, path)
    assert again.json()["version"] == 2


@pytest.mark.parametrize(
    ("rows", "fields", "needle"),
    [
        (
            [{"text": "a"}, {"messages": [{"role": "user", "content": "hi"}]}],
            {},
            "line 2 is a messages row but line 1 made this a text dataset",
        ),
        (
            [{"prompt": "p", "expected": "(", "check": "regex"}],
            {},
            "line 1: the regex pattern '(' is invalid",
        ),
        (
            [{"prompt": "p", "expected": "not json", "check": "json"}],
            {},
            "'expected' of a json check must be JSON text",
        ),
        ([{"text": "a"}], {"target": "text"}, "this is a text dataset (text)"),
    ],
    ids=["mixed-kinds", "bad-regex", "non-json-expected", "target-on-text"],
)
def test_the_api_refuses_a_bad_text_dataset_and_keeps_nothing(api, tmp_path, rows, fields, needle):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)

    response = post_dataset(api, path, **fields)

    assert response.status_code == 400
    assert needle in response.json()["detail"]
    assert not Dataset.objects.exists()
    assert stored_files() == []


def test_the_api_refuses_a_line_that_is_not_utf8_and_keeps_nothing(api, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "d\xe9j\xe0 vu"}\n')

    response = post_dataset(api, path)

    assert response.status_code == 400
    assert "line 2 is not UTF-8 text" in response.json()["detail"]
    assert stored_files() == []


# --- dashboard ---


def test_the_dashboard_uploads_test_cases_and_shows_kind_checks_and_escaped_samples(
    member_client, team, media, tmp_path
):
    path = write_jsonl(tmp_path / "cases.jsonl", CASES)

    response = upload(member_client, path)

    dataset = Dataset.objects.get(team=team, name="cases")
    assert response.status_code == 302 and response["Location"] == dataset.get_absolute_url()
    assert dataset.format == "jsonl" and dataset.rows == 3
    assert dataset.schema["text_kind"] == "test_cases"
    assert dataset.schema["checks"] == {"contains": 1, "exact": 1, "json": 1}
    assert (media / dataset.file).is_file()
    page = member_client.get(response["Location"]).content.decode()
    assert f"Uploaded cases v1 (jsonl test_cases, 3 rows, sha256 {dataset.sha256[:12]}" in page
    assert 'data-testid="dataset-kind"' in page and ">test_cases</span>" in page
    assert "test cases (scenarios)" in page
    assert page.count('data-testid="text-sample"') == 3
    assert escape(HOSTILE) in page and HOSTILE not in page  # a sample never runs in the page
    assert "case-1" in page and "sum" in page  # the default name, and a given one
    assert 'data-testid="schema-table"' not in page  # no columns to show
    assert "none: each row holds what the model should produce" in page
    listing = member_client.get(reverse("datasets:dataset_list")).content.decode()
    assert 'data-testid="dataset-kind">test_cases</span>' in listing


def test_the_dashboard_refuses_a_bad_text_dataset_with_the_line_and_keeps_nothing(
    member_client, media, tmp_path
):
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", bad)

    response = upload(member_client, path, name="chat")

    assert response.status_code == 400
    errors = response.context["form"].non_field_errors()
    assert errors and "line 1: message 2 has role 'robot'" in errors[0]
    assert escape(errors[0]) in response.content.decode()
    assert not Dataset.objects.exists()
    assert [p for p in media.rglob("*") if p.is_file()] == []


# --- which models a stored text dataset fits ---


def test_a_stored_text_dataset_fits_language_models_only(api, tmp_path):
    text = post_dataset(api, write_jsonl(tmp_path / "lm.jsonl", [{"text": "hello"}] * 3))
    ref = dataset_ref(Dataset.objects.get(pk=text.json()["id"]))

    check_fits(ref, "hf_checkpoint", [])
    check_fits(ref, "ort_genai", [])
    with pytest.raises(PipelineError, match="only language models read text"):
        check_fits(ref, "onnx", [TensorSpec("x", ["batch", 64], "float32")])


def test_the_dataset_page_shows_each_conversation_turn_by_role(member_client, tmp_path):
    chat = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello <b>there</b>"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 4)

    response = upload(member_client, path, name="chat")

    page = member_client.get(response["Location"]).content.decode()
    assert ">messages</span>" in page and "messages (chat)" in page
    turns = page[page.index('data-testid="text-sample"') :]
    assert turns.index(">system<") < turns.index(">user<") < turns.index(">assistant<")
    assert escape("Hello <b>there</b>") in page and "<b>there</b>" not in page
