"""ONNX with external data, uploaded as one archive: stored whole, run unpacked, downloaded whole.

The model is the session's torch export (``mlp_onnx``) re-saved with every weight in a data file
beside the graph, as torch's exporter writes big models; zipped or tarred here.
"""

from __future__ import annotations

import hashlib
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from django.conf import settings
from django.urls import reverse

from gpu_workers.runner import Outcome, execute_job
from pipelines.certification.suite import describe_file
from pipelines.core import Artifact
from pipelines.engines import load_engine
from r1platform.core.storage import spool_local_file
from r1platform.jobs import services as jobs
from r1platform.jobs.models import JobStatus
from r1platform.registry.models import ModelVersion
from r1platform.registry.registration import JobOutputs
from r1platform.registry.services import upload_model, version_artifact
from r1platform.serving.runtime import check_file
from r1platform.serving.source import ModelSpec

pytestmark = pytest.mark.usefixtures("enqueued")


def leftovers() -> list[Path]:
    """Every file under storage (the upload spool included) and every unpack folder."""
    media = Path(settings.MEDIA_ROOT)
    return [p for p in media.rglob("*") if p.is_file() or p.name.startswith(".r1")]


@pytest.fixture
def external_dir(tmp_path: Path, mlp_onnx: Path) -> Path:
    folder = tmp_path / "exported"
    folder.mkdir()
    onnx.save_model(
        onnx.load(str(mlp_onnx)),
        str(folder / "mlp.onnx"),
        save_as_external_data=True,
        location="mlp.onnx.data",
        size_threshold=0,
    )
    return folder


def zipped(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, p.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return out


def upload(api, path: Path, name: str = "mlp"):
    with open(path, "rb") as f:
        return api.post("/api/v1/models", {"name": name, "task": "classification", "file": f})


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_uploads_as_one_version_and_downloads_whole(
    api, member_client, external_dir: Path, tmp_path: Path, kind: str
) -> None:
    archive = tmp_path / f"mlp.{kind}"
    if kind == "zip":
        zipped(external_dir, archive)
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in sorted(external_dir.iterdir()):
                tf.add(p, p.name)
    response = upload(api, archive)
    assert response.status_code == 201, response.content
    version = ModelVersion.objects.get(pk=response.json()["versions"][0]["id"])
    assert (version.format, version.precision) == ("onnx", "fp32")
    assert version.inputs == [{"name": "features", "shape": ["batch", 16], "dtype": "float32"}]
    assert version.file.endswith(f".{kind}")
    assert version.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert version.details["model_archive"]["files"] == ["mlp.onnx", "mlp.onnx.data"]
    assert leftovers() == [Path(settings.MEDIA_ROOT) / version.file]  # no unpacked copy kept

    got = member_client.get(reverse("registry:version_download", args=[version.pk]))
    assert got.status_code == 200
    assert b"".join(got.streaming_content) == archive.read_bytes()
    assert f'filename="mlp-v1.{kind}"' in got["Content-Disposition"]


def test_a_plain_onnx_naming_external_data_is_refused_with_what_to_upload(
    api, external_dir: Path
) -> None:
    response = upload(api, external_dir / "mlp.onnx")
    assert response.status_code == 400
    assert "upload a zip or tar" in response.json()["detail"]
    assert leftovers() == []


def _relocated(external_dir: Path, location: str) -> None:
    path = external_dir / "mlp.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize(
    ("hostile", "words"),
    [
        ("traversal", "'..' would leave the model's folder"),
        ("absolute", "absolute paths are not allowed"),
        ("missing", "the file is missing from the upload"),
        ("short", "do not fit the file"),
        ("two_models", "holds exactly one .onnx file"),
        ("extra", "the model does not name"),
        ("symlink", "symbolic link"),
        ("bomb", "zip bomb"),
    ],
)
def test_a_hostile_archive_is_refused_with_its_reason_and_nothing_is_kept(
    api, external_dir: Path, tmp_path: Path, hostile: str, words: str
) -> None:
    extra: dict[str, bytes] = {}
    if hostile == "traversal":
        _relocated(external_dir, "../mlp.onnx.data")
    elif hostile == "absolute":
        _relocated(external_dir, "/etc/passwd")
    elif hostile == "missing":
        (external_dir / "mlp.onnx.data").unlink()
    elif hostile == "short":
        data = external_dir / "mlp.onnx.data"
        data.write_bytes(data.read_bytes()[:100])
    elif hostile == "two_models":
        extra = {"copy/mlp.onnx": (external_dir / "mlp.onnx").read_bytes()}
    elif hostile == "extra":
        extra = {"install.sh": b"#!/bin/sh\nrm -rf /\n"}
    elif hostile == "bomb":
        extra = {"zeros.bin": bytes(40 * 2**20)}
    archive = zipped(external_dir, tmp_path / "hostile.zip", extra)
    if hostile == "symlink":
        with zipfile.ZipFile(archive, "a") as zf:
            link = zipfile.ZipInfo("weights.bin")
            link.external_attr = (0o120777) << 16
            zf.writestr(link, "/etc/passwd")
    response = upload(api, archive)
    assert response.status_code == 400, response.content
    assert words in response.json()["detail"]
    assert leftovers() == []
    assert not ModelVersion.objects.exists()


def test_a_job_runs_on_an_archive_and_registers_its_external_output_as_one(
    transactional_db, team, user, external_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    archive = zipped(external_dir, tmp_path / "mlp.zip")
    source = upload_model(
        team=team, user=user, name="mlp", task="classification", uploaded=spool_local_file(archive)
    )
    monkeypatch.setattr("r1platform.jobs.services.enqueue", lambda job: None)
    stages = [
        {"name": "quantize", "settings": {"mode": "int8_dynamic", "keep_below_threshold": True}},
        {"name": "benchmark", "settings": {"batch_sizes": [1], "iterations": 5}},
    ]
    job = jobs.launch_job(version=source, user=user, stages=stages)[0]
    assert execute_job(job.pk, "w1") is Outcome.SUCCEEDED
    job.refresh_from_db()
    assert job.status == JobStatus.SUCCEEDED, job.error

    # The input ran unpacked once, outside storage, keyed by the archive's sha256.
    unpacked = Path(settings.R1_WORK_DIR) / "unpacked" / source.sha256
    assert sorted(p.name for p in unpacked.iterdir()) == ["mlp.onnx", "mlp.onnx.data"]
    made = ModelVersion.objects.get(job=job)
    assert made.precision == "int8" and made.parent_id == source.pk
    assert source.benchmarks.filter(job=job).exists() and made.benchmarks.filter(job=job).exists()
    # Nothing was written beside a stored file: storage holds the stored files only.
    media = Path(settings.MEDIA_ROOT)
    assert sorted(p for p in media.rglob("*") if p.is_file()) == sorted(
        [media / source.file, media / made.file]
    )

    # A job's ONNX whose weights sit beside it (quantize over 2 GB) is registered as one tar.
    workdir = Path(settings.R1_WORK_DIR) / f"job-{job.pk}" / "made"
    (workdir / "weights").mkdir(parents=True)
    onnx.save_model(
        onnx.load(str(unpacked / "mlp.onnx")),
        str(workdir / "model.onnx"),
        save_as_external_data=True,
        location="weights/model.bin",
        size_threshold=0,
    )
    outputs = JobOutputs(job, source)
    produced = Artifact(
        key="external", path=str(workdir / "model.onnx"), format="onnx", precision="fp32",
        inputs=version_artifact(source, "input").inputs, outputs=[],
    )  # fmt: skip
    external, fresh = outputs.register(produced)
    assert fresh and external.file.endswith(".tar")
    assert external.details["model_archive"]["files"] == ["model.onnx", "weights/model.bin"]
    stored = media / external.file
    assert external.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert not list(media.rglob("*.partial"))

    artifact = version_artifact(external, "external")
    assert Path(artifact.path).is_relative_to(Path(settings.R1_WORK_DIR) / "unpacked")
    out = load_engine(artifact).run({"features": np.ones((2, 16), np.float32)})
    assert next(iter(out.values())).shape == (2, 4)
    # The checks of the stored bytes (serving, certification) hash the archive, not the unpacked.
    spec = ModelSpec(team_id=team.pk, team=team.slug, name="mlp", version=external.number,
                     artifact=artifact, sha256=external.sha256)  # fmt: skip
    assert check_file(spec) == Path(artifact.path)
    assert describe_file(artifact)["sha256"] == external.sha256
