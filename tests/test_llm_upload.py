"""A language model through the registry: uploaded (API and dashboard), shown, downloaded,
mirrored to MLflow, and handed to a worker as a folder transformers loads.

The checkpoint is the tiny random Llama of ``tests.llm_fixtures``, zipped under a top folder
and tarred at the root; the GGUF is written with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse

from pipelines.core import Artifact
from r1platform.core import storage, tracking
from r1platform.registry.models import ModelVersion, RegisteredModel
from r1platform.registry.registration import _store
from r1platform.registry.services import version_artifact
from tests.llm_fixtures import VOCAB, tiny_llama
from tests.pipelines.test_llm_checkpoint import edit_json, pack, write_gguf

pytestmark = pytest.mark.usefixtures("enqueued")


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("llm") / "llama")


@pytest.fixture(scope="module")
def llama_zip(llama: Path, tmp_path_factory) -> Path:
    return pack(llama, tmp_path_factory.mktemp("zip") / "tiny-llama.zip", top="tiny-llama")


@pytest.fixture(scope="module")
def llama_tar(llama: Path, tmp_path_factory) -> Path:
    return pack(llama, tmp_path_factory.mktemp("tar") / "tiny-llama.tar", top=None)


def stored_files() -> list[str]:
    """Every file under MEDIA_ROOT (the upload spool included)."""
    root = Path(settings.MEDIA_ROOT)
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in files]
    return sorted(found)


def api_upload(api, path: Path, name: str, **fields):
    with open(path, "rb") as f:
        return api.post("/api/v1/models", {"name": name, "file": f, **fields})


def form_upload(client, path: Path, name: str, task: str):
    with open(path, "rb") as f:
        data = {"name": name, "task": task, "input_shape": "", "input_dtype": "float32", "file": f}
        return client.post(reverse("registry:model_upload"), data)


def test_a_checkpoint_uploads_through_the_api_and_loads_on_a_worker(
    api, member_client, llama_zip: Path, django_capture_on_commit_callbacks
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = api_upload(api, llama_zip, "tiny-llama-api")  # task left at its default
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["task"] == "text-generation"  # set from the format
    version = ModelVersion.objects.get(pk=body["versions"][0]["id"])
    assert (version.format, version.precision) == ("hf_checkpoint", "fp32")
    assert version.inputs == [
        {"name": "input_ids", "shape": ["batch", "sequence"], "dtype": "int64"}
    ]
    assert version.details["llm"]["parameters"] == 115008
    assert version.details["model_archive"]["model"] == "tiny-llama/config.json"
    assert version.file.endswith(".zip")
    assert version.sha256 == hashlib.sha256(llama_zip.read_bytes()).hexdigest()
    assert stored_files() == [version.file]  # the archive, nothing unpacked beside it

    # MLflow holds the stored archive as the version's artifact, tagged as every version is.
    assert version.mlflow_version, version.mlflow_error
    artifacts = tracking.client().list_artifacts(version.mlflow_run_id, "versions/v1")
    assert [Path(a.path).name for a in artifacts] == [Path(version.file).name]
    mirrored = tracking.client().get_model_version(
        version.model.mlflow_name, version.mlflow_version
    )
    assert mirrored.tags["format"] == "hf_checkpoint" and mirrored.tags["sha256"] == version.sha256

    # The download is the archive as uploaded.
    got = member_client.get(reverse("registry:version_download", args=[version.pk]))
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == llama_zip.read_bytes()
    assert 'filename="tiny-llama-api-v1.zip"' in got["Content-Disposition"]

    # A worker gets the checkpoint's folder, unpacked outside storage, which transformers loads.
    artifact = version_artifact(version, "input")
    folder = Path(artifact.path)
    assert folder.is_dir() and (folder / "config.json").is_file()
    assert folder.parent == Path(settings.R1_WORK_DIR) / "unpacked" / version.sha256
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    assert model.num_parameters() == version.details["llm"]["parameters"]
    assert model.config.vocab_size == VOCAB


def test_a_checkpoint_uploads_through_the_form_and_its_pages_show_the_model(
    member_client, team, llama_tar: Path
) -> None:
    response = form_upload(member_client, llama_tar, "tiny-llama", "text-generation")
    model = RegisteredModel.objects.get(team=team, name="tiny-llama")
    assert response.status_code == 302, response.content.decode()[-2000:]
    version = model.versions.get()
    assert (model.task, version.format) == ("text-generation", "hf_checkpoint")
    assert version.file.endswith(".tar")

    page = member_client.get(version.get_absolute_url()).content.decode()
    assert 'data-testid="llm-section"' in page
    for shown in ("LlamaForCausalLM", "0.1 M", "float32", "128 tokens", "320 tokens"):
        assert shown in page, shown
    assert "(2 key/value)" in page and "with a chat template" in page
    assert "Hugging Face checkpoint · FP32" in page

    listing = member_client.get(model.get_absolute_url()).content.decode()
    assert 'data-testid="model-llm-facts"' in listing and "LlamaForCausalLM" in listing
    assert "Text generation" in listing

    form = member_client.get(reverse("registry:model_upload")).content.decode()
    assert 'value="text-generation"' in form and ".gguf" in form


def test_a_gguf_uploads_as_one_file(api, member_client, tmp_path: Path) -> None:
    gguf_file = write_gguf(
        tmp_path / "src" / "tiny.gguf", file_type="MOSTLY_Q8_0", tensor_type="Q8_0"
    )
    response = api_upload(api, gguf_file, "tiny-gguf", task="text-generation")
    assert response.status_code == 201, response.content
    version = ModelVersion.objects.get(pk=response.json()["versions"][0]["id"])
    assert (version.format, version.precision) == ("gguf", "int8")
    assert version.file.endswith(".gguf") and stored_files() == [version.file]
    assert version.details["gguf"]["file_type"] == "Q8_0"
    assert Path(version_artifact(version, "input").path) == storage.media_path(version.file)
    page = member_client.get(version.get_absolute_url()).content.decode()
    assert "GGUF Q8_0" in page and "LlamaForCausalLM" in page


@pytest.mark.parametrize(
    ("source", "task", "words"),
    [
        ("checkpoint", "classification", "its task is text-generation, not classification"),
        ("onnx", "text-generation", "task text-generation is for language models"),
        ("auto_map", "text-generation", "auto_map"),
        ("pickle", "other", "convert them with transformers"),
    ],
)
def test_a_refused_upload_leaves_nothing(
    api, member_client, llama: Path, llama_zip: Path, mlp_onnx: Path, tmp_path: Path,
    source: str, task: str, words: str,
) -> None:  # fmt: skip
    if source == "checkpoint":
        path = llama_zip
    elif source == "onnx":
        path = mlp_onnx
    else:
        folder = tmp_path / "variant"
        folder.mkdir()
        for p in llama.iterdir():
            (folder / p.name).write_bytes(p.read_bytes())
        if source == "auto_map":
            edit_json(folder / "config.json", auto_map={"AutoModelForCausalLM": "x.Y"})
        else:
            (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
        path = pack(folder, tmp_path / "up" / "c.zip")
    response = api_upload(api, path, f"refused-{source}", task=task)
    assert response.status_code == 400
    assert words in response.json()["detail"]
    form = form_upload(member_client, path, f"refused-form-{source}", task)
    assert form.status_code == 400 and words in form.content.decode()
    assert stored_files() == []
    assert not RegisteredModel.objects.exists()


def test_a_job_made_folder_is_stored_as_one_tar_and_comes_back_a_folder(
    team, llama: Path, tmp_path: Path
) -> None:
    meta = {"llm": {"parameters": 115008}, "stored_file": "/elsewhere/parent.tar"}
    made = Artifact("01-x", str(llama), "hf_checkpoint", "fp32", inputs=[], outputs=[], meta=meta)
    relative, sha, size, details = _store(made, team.pk)
    assert relative.endswith(".tar") and size == storage.media_path(relative).stat().st_size
    assert details["model_archive"]["model"] == "config.json"
    assert sorted(details["model_archive"]["files"]) == sorted(p.name for p in llama.iterdir())
    assert "stored_file" not in details and details["llm"] == {"parameters": 115008}
    version = ModelVersion(
        file=relative,
        sha256=sha,
        format="hf_checkpoint",
        precision="fp32",
        inputs=[],
        outputs=[],
        details=details,
    )
    folder = Path(version_artifact(version, "v").path)
    for p in llama.iterdir():
        assert (folder / p.name).read_bytes() == p.read_bytes()

    gguf_file = write_gguf(tmp_path / "m.gguf")
    relative, _, _, _ = _store(
        Artifact("02-y", str(gguf_file), "gguf", "fp16", inputs=[], outputs=[]), team.pk
    )
    assert relative.endswith(".gguf")
    assert storage.media_path(relative).read_bytes() == gguf_file.read_bytes()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_a_checkpoints_launch_form_offers_the_language_model_stages(
    api, member_client, llama_tar: Path, tmp_path: Path
) -> None:
    response = api_upload(api, llama_tar, "tiny-launch")
    assert response.status_code == 201, response.content
    version_id = response.json()["versions"][0]["id"]
    numbers = tmp_path / "numbers.csv"
    numbers.write_text("a,b\n1,2\n3,4\n")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "the quick brown fox"}\n{"text": "jumps over the dog"}\n')
    for name, path in (("numbers", numbers), ("texts", texts)):
        with open(path, "rb") as f:
            assert api.post("/api/v1/datasets", {"name": name, "file": f}).status_code == 201

    body = member_client.get(reverse("jobs:job_new"), {"version": version_id}).content.decode()
    # certify too: a language model has its own suite (pipelines/certification/text_suite.py).
    for name in ("finetune", "quantize", "evaluate", "benchmark", "from_gguf", "certify"):
        assert f'name="include_{name}"' in body, name
    for name in ("export_onnx", "compile"):  # tensor stages are not offered
        assert f'name="include_{name}"' not in body, name
    assert "prompt_lengths" in body  # the text benchmark's settings, not batch_sizes
    # The default pipeline, quantize -> evaluate -> benchmark, is checked; from_gguf is not.
    for name, checked in (("quantize", True), ("benchmark", True), ("from_gguf", False)):
        box = re.search(rf'<input type="checkbox" name="include_{name}"[^>]*>', body)
        assert box and ("checked" in box.group(0)) == checked, name
    # Text datasets are offered; numbers are listed as unfit with the reason.
    assert "texts v1" in body and "a language model reads a text" in body
