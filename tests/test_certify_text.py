"""Certifying a language model on the platform: launched like any certification, run by the
worker's runner in this process (``execute_job``), through the real serving process on loopback,
recorded with the same certificate, reports and promotion gate as a tensor model's.

The model is a tiny random Llama whose greedy text is valid UTF-8 (tests.text_models); the job
makes a bf16 checkpoint of it and certifies that at the scenario level on a text golden set and
text test cases, so parity (perplexity, greedy agreement against the fp32 upload) runs too.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from gpu_workers.runner import Outcome, execute_job
from r1platform.certification import services as certification
from r1platform.certification.forms import SuiteForm
from r1platform.certification.models import Certification, CertStatus
from r1platform.core import storage
from r1platform.core.storage import spool_local_file
from r1platform.datasets.services import upload_dataset
from r1platform.deployments.models import ServingPool
from r1platform.deployments.services import promote
from r1platform.jobs import services as jobs
from r1platform.jobs.models import JobStatus
from r1platform.registry.models import ModelVersion
from r1platform.registry.services import upload_model
from r1platform.workers.services import beat
from tests.certification_data import (  # noqa: F401 - fixtures, registered by name
    WORKER,
    certify_stage_fixture,
    profiles_fixture,
)
from tests.text_models import ascii_llama

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a language model predicts the next token from the ones before it",
    "perplexity is the exponential of the mean negative log likelihood",
    "fine tuning with low rank adapters trains a few megabytes of weights",
]
CASES = [
    # Any text at all: the model answers (a must case).
    {"name": "answers", "prompt": "the quick brown", "expected": "(?s).", "check": "regex",
     "tags": ["must"]},
    {"name": "digits", "prompt": "0 1 2 3", "expected": "[a-z0-9 ]", "check": "regex"},
    # Nothing passes this one, for the model or its reference: a pass rate of 2/3 for both.
    {"name": "never", "prompt": "a language model", "expected": "zzz never", "check": "contains"},
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint_tar(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text-cert")
    folder = ascii_llama(root / "tiny-llama")
    archive = root / "tiny-llama.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder, arcname="tiny-llama")
    return archive


def _upload(team, user, archive: Path, name: str) -> ModelVersion:
    copy = archive.parent / f"{name}.tar"
    copy.write_bytes(archive.read_bytes())
    return upload_model(
        team=team, user=user, name=name, task="text-generation", uploaded=spool_local_file(copy)
    )


def _dataset(team, user, tmp_path: Path, name: str, rows: list[dict]) -> int:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = upload_dataset(
        team=team, user=user, name=name, uploaded=spool_local_file(path), target="", splits=None
    )
    return dataset.pk


def _measured(check: dict) -> dict:
    return {m["name"]: m for m in check["measurements"]}


def test_a_language_model_is_certified_through_the_serving_process_and_passes_the_gate(
    transactional_db, team, user, profiles, checkpoint_tar, tmp_path, monkeypatch, settings
):
    monkeypatch.setattr("r1platform.jobs.services.enqueue", lambda job: None)
    settings.R1_LLM_KV_CACHE_TOKENS = 4096
    torch_cpu = profiles["torch"]
    upload = _upload(team, user, checkpoint_tar, "tiny-llama")
    assert (upload.format, upload.precision) == ("hf_checkpoint", "fp32")
    golden = _dataset(team, user, tmp_path, "golden", [{"text": t} for t in LINES])
    cases = _dataset(team, user, tmp_path, "cases", CASES)
    certify = {
        "profile": torch_cpu.key,
        "level": "scenario",
        "golden_dataset_id": golden,
        "golden_split": "all",
        "test_cases_dataset_id": cases,
        # Bounded for a test; every check still runs on every part.
        "stream_requests": 40,
        "stream_concurrency": 4,
        "stream_max_tokens": 16,
        "text_prompts": 3,
        "text_new_tokens": 24,
    }
    stages = [
        {"name": "quantize", "settings": {"precision": "bf16", "max_ppl_increase": 1.0}},
        {"name": "certify", "settings": certify},
    ]
    beat(WORKER)
    job = jobs.launch_job(version=upload, user=user, stages=stages)[0]
    assert execute_job(job.pk, "w1") is Outcome.SUCCEEDED
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error

    child = ModelVersion.objects.get(job=job)
    assert (child.precision, child.parent_id) == ("bf16", upload.pk)
    cert = Certification.objects.get(job=job)
    report = cert.report
    checks = {c["id"]: c for c in report["checks"]}
    summaries = {name: c["summary"] for name, c in checks.items()}
    assert cert.version == child and cert.status == CertStatus.PASSED, summaries
    assert report["family"] == "text-generation" and cert.engine_sha256 == child.sha256
    assert {c["verdict"] for c in checks.values()} == {"pass"}, summaries
    # The three criteria, as for a tensor model; performance is output tokens/s per card.
    criteria = {c["level"]: c for c in report["criteria"]}
    assert [(lv, c["verdict"]) for lv, c in criteria.items()] == [
        ("basic", "pass"), ("performance", "pass"), ("scenario", "pass"),
    ]  # fmt: skip
    assert criteria["basic"]["value"] == 1.0
    assert criteria["performance"]["unit"] == "tokens/s" and criteria["performance"]["value"] > 20
    assert criteria["scenario"]["value"] == pytest.approx(2 / 3, abs=1e-5)

    # Every stream went through the serving process and ended well.
    success = _measured(checks["api_success"])
    assert success["requests"]["value"] == 40 and success["decode_failures"]["value"] == 0
    assert "OpenAI-compatible" in checks["api_success"]["details"]["runtime"]
    qps = _measured(checks["qps"])
    assert qps["ttft_p99_ms"]["passed"] and qps["tpot_p99_ms"]["passed"]
    assert qps["output_tokens"]["value"] > 0
    # Parity against the fp32 upload, stops and the context limit at the API.
    parity = _measured(checks["parity"])
    assert report["reference"]["precision"] == "fp32"
    assert parity["ppl_increase"]["value"] <= 0.02 and parity["greedy_agreement"]["passed"]
    stops = _measured(checks["stops"])
    assert stops["stop_strings_honoured"]["value"] >= 1 and stops["stop_strings_honoured"]["passed"]
    context = _measured(checks["context"])
    assert context["prompt_over_context_refused"]["value"] is True
    assert context["max_tokens_over_context_refused"]["value"] is True
    assert context["at_the_limit_accepted"]["value"] is True
    assert _measured(checks["serving"])["usage_counts_match"]["passed"]

    # The same reports as a tensor model's: JSON, HTML and PDF, saying what a reader needs.
    html = storage.media_path(cert.report_html).read_text()
    for words in ("Output tokens/s per card", "tokens/s", "ttft_p99", "perplexity",
                  "Tokenizer round trip", "(QPS) would say nothing"):  # fmt: skip
        assert words in html, words
    assert storage.media_path(cert.report_pdf).read_bytes().startswith(b"%PDF")
    document = json.loads(storage.media_path(cert.report_json).read_text())
    assert document["verdict"] == "passed" and document["level"] == "scenario"

    # The gate: the certified bf16 version may serve on the CPU pool, the uncertified upload not.
    pool = ServingPool.objects.create(name="cpu-llm", profile=torch_cpu)
    model = upload.model
    assert certification.is_certified(child, "scenario", torch_cpu.key).certified
    refused = promote(model=model, version=upload, pool=pool, stage="production", actor=user)
    assert refused.status == "refused" and "no passed certification" in refused.reason
    promoted = promote(model=model, version=child, pool=pool, stage="production", actor=user)
    assert promoted.status == "promoted", promoted.reason
    assert promoted.deployment.version == child


@pytest.fixture
def text_version(team, user, checkpoint_tar) -> ModelVersion:
    return _upload(team, user, checkpoint_tar, "tiny-llama-b")


def test_a_language_model_is_refused_datasets_it_cannot_be_certified_on(
    enqueued, api, team, user, profiles, text_version, tmp_path
):
    key = profiles["torch"].key
    golden = _dataset(team, user, tmp_path, "golden", [{"text": t} for t in LINES])
    cases = _dataset(team, user, tmp_path, "cases", CASES)
    launch = {"version": text_version, "profile_key": key, "user": user}
    with pytest.raises(certification.CertificationRefused, match="text test-case dataset"):
        certification.launch_certification(**launch, level="scenario", golden_dataset_id=golden)
    with pytest.raises(certification.CertificationRefused, match="golden set is text rows"):
        certification.launch_certification(
            **launch, level="basic", golden_dataset_id=cases, thresholds=None
        )
    with pytest.raises(jobs.LaunchRefused, match="language model's test cases"):
        certification.launch_certification(
            **launch, level="scenario", golden_dataset_id=golden,
            thresholds={"test_cases_dataset_id": golden},
        )  # fmt: skip
    with pytest.raises(certification.CertificationRefused, match="on a CPU profile|runs on"):
        certification.launch_certification(
            version=text_version, profile_key=profiles["onnxruntime"].key, user=user, level="basic"
        )
    # Through the API, with its own test-case field: a text golden set and text test cases.
    body = {"version_id": text_version.pk, "profile": key, "level": "scenario",
            "golden_dataset_id": golden, "test_cases_dataset_id": cases,
            "thresholds": {"stream_requests": 50}}  # fmt: skip
    response = api.post("/api/v1/certifications", body, content_type="application/json")
    assert response.status_code == 201, response.content
    cert = Certification.objects.get(pk=response.json()["id"])
    assert cert.status == CertStatus.PENDING and cert.settings["test_cases_dataset_id"] == cases
    queued = cert.job.stages[0]["settings"]
    assert queued["test_cases_dataset_id"] == cases and queued["stream_requests"] == 50

    # The form offers a language model text datasets only, test cases apart.
    form = SuiteForm(version=text_version)
    assert [c[0] for c in form.fields["golden_dataset"].choices] == ["", golden]
    assert [c[0] for c in form.fields["test_cases"].choices] == ["", cases]
    assert [p.key for p in form.profiles] == [key]
