"""A language model through a real worker: upload -> LoRA fine-tune -> merge -> INT8 -> evaluate ->
benchmark, every produced version registered with its lineage, metrics and benchmark rows."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from r1platform.core import tracking
from r1platform.jobs.models import JobStatus
from r1platform.registry.models import BenchmarkResult, ModelVersion
from tests.conftest import wait_for_job, wait_for_run_status
from tests.llm_fixtures import tiny_llama

pytestmark = pytest.mark.worker

LINES = [
    "the quick brown fox jumps over the lazy dog",
    "a language model predicts the next token from the ones before it",
    "perplexity is the exponential of the mean negative log likelihood",
]


def _dataset(api, path: Path, name: str, rows: list[dict]) -> int:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(path, "rb") as f:
        response = api.post("/api/v1/datasets", {"name": name, "file": f})
    assert response.status_code == 201, response.content
    return response.json()["id"]


def test_a_checkpoint_is_fine_tuned_merged_quantized_evaluated_and_benchmarked(
    worker, api, member_client, tmp_path
):
    folder = tiny_llama(tmp_path / "tiny-llama")
    archive = tmp_path / "tiny-llama.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(folder, arcname="tiny-llama")
    with open(archive, "rb") as f:
        response = api.post("/api/v1/models", {"name": "tiny-llama", "file": f})
    assert response.status_code == 201, response.content
    v1 = response.json()["versions"][0]
    assert v1["format"] == "hf_checkpoint"

    pairs = _dataset(
        api,
        tmp_path / "pairs.jsonl",
        "pairs",
        [{"prompt": f"q{i}: ", "completion": LINES[i % 3]} for i in range(24)],
    )
    texts = _dataset(api, tmp_path / "texts.jsonl", "texts", [{"text": t} for t in LINES * 8])
    stages = [
        {
            "name": "finetune",
            "settings": {
                "dataset_id": pairs,
                "rank": 4,
                "max_steps": 4,
                "batch_size": 4,
                "max_seq_length": 32,
                "checkpoint_every_steps": 2,
                "log_every_steps": 1,
                "merge": True,
            },
        },
        # A random tiny model: any perplexity rise is kept so the chain goes on.
        {
            "name": "quantize",
            "settings": {"precision": "int8", "dataset_id": texts, "max_ppl_increase": 10.0},
        },
        {"name": "evaluate", "settings": {"dataset_id": texts, "max_new_tokens": 8}},
        {
            "name": "benchmark",
            "settings": {
                "prompt_lengths": [8],
                "concurrency": [1, 4],
                "new_tokens": 4,
                "min_seconds": 0.0,
                "max_windows": 3,
            },
        },
    ]
    response = api.post(
        "/api/v1/jobs", {"version_id": v1["id"], "stages": stages}, content_type="application/json"
    )
    assert response.status_code == 201, response.content
    job = wait_for_job(response.json()["id"], timeout=400)
    assert job.status == JobStatus.SUCCEEDED, f"{job.error}\n{job.log_tail}"

    produced = list(ModelVersion.objects.filter(job=job).order_by("number"))
    kinds = [(v.format, v.precision) for v in produced]
    assert kinds == [
        ("lora_adapter", "fp32"),  # the adapter, a child of the upload
        ("hf_checkpoint", "fp32"),  # merged
        ("ort_genai", "int8"),  # weight-only INT8
    ], kinds
    adapter, merged, int8 = produced
    assert adapter.parent_id == v1["id"]
    assert merged.parent_id == adapter.pk and int8.parent_id == merged.pk
    assert adapter.size_bytes < 1_000_000  # megabytes at most, not a second base
    assert adapter.sha256 and merged.details["model_archive"]["model"] == "config.json"
    assert int8.metrics["perplexity"] > 1 and "ppl_increase" in int8.metrics

    rows = BenchmarkResult.objects.filter(job=job)
    # The INT8 version and its parent, measured in the same run, at each concurrency.
    assert {(r.version_id, r.batch_size) for r in rows} >= {
        (int8.pk, 1),
        (int8.pk, 4),
        (merged.pk, 1),
        (merged.pk, 4),
    }

    # A produced folder version is one stored tar that unpacks to a loadable folder.
    from r1platform.registry.services import version_artifact

    loaded = Path(version_artifact(int8, "check").path)
    assert (loaded / "genai_config.json").is_file()

    # Served, the adapter runs over the checkpoint it was trained on, found through its lineage.
    from r1platform.registry.services import adapter_base

    base = adapter_base(adapter)
    assert base is not None and base.format == "hf_checkpoint"
    assert (Path(base.path) / "config.json").is_file()
    assert adapter_base(int8) is None and adapter_base(merged) is None

    # The pages speak of a language model's rows: concurrency and output tokens/s.
    page = member_client.get(int8.get_absolute_url()).content.decode()
    assert "Output tokens/s" in page and "Concurrency" in page
    assert "Throughput /s" not in page

    assert wait_for_run_status(job.mlflow_run_id) == "FINISHED"
    history = tracking.client().get_metric_history(job.mlflow_run_id, "01-finetune.loss")
    assert len(history) >= 2  # the loss curve, logged at its steps
