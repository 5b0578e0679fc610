"""Model names: one slug-like rule that MLflow, serving URLs and Triton's repository accept."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings

from r1platform.registry.models import RegisteredModel
from r1platform.registry.services import model_name_problem

pytestmark = pytest.mark.usefixtures("enqueued")


@pytest.mark.parametrize("name", ["mlp", "resnet-50", "bert_base.v2", "A1", "x" * 100])
def test_it_accepts_slug_like_names(name):
    assert model_name_problem(name) is None


@pytest.mark.parametrize(
    "name",
    [
        "<script>alert(1)</script>",
        "team/model",
        "model:v1",
        "has space",
        "-leading-dash",
        ".hidden",
        "a..b",
        "x" * 101,
        "",
        "naïve",
    ],
)
def test_it_refuses_other_names_and_says_the_rule(name):
    problem = model_name_problem(name)
    assert problem is not None
    assert "letters, digits, '.', '_' or '-'" in problem


def _files() -> list[Path]:
    return [p for p in Path(settings.MEDIA_ROOT).rglob("*") if p.is_file()]


def test_the_api_refuses_a_bad_name_with_the_rule_and_stores_nothing(api, mlp_onnx):
    with open(mlp_onnx, "rb") as f:
        response = api.post(
            "/api/v1/models", {"name": "<b>x</b>", "task": "classification", "file": f}
        )
    assert response.status_code == 400, response.content
    assert "letters, digits" in response.json()["detail"]
    assert not RegisteredModel.objects.exists()
    assert _files() == []


def test_the_upload_form_shows_the_rule(member_client, mlp_onnx):
    with open(mlp_onnx, "rb") as f:
        response = member_client.post(
            "/models/upload/", {"name": "a/b", "task": "classification", "file": f}
        )
    assert response.status_code in (200, 400)
    assert "letters, digits" in response.content.decode()
    assert not RegisteredModel.objects.exists()
