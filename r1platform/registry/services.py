"""Actions on the registry: every multi-row write lives here, views and workers only call them."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from pipelines.core import Artifact, ModelFormat, TensorSpec
from pipelines.formats import (
    ARCHIVE_SUFFIX,
    RejectedUpload,
    inspect_model,
    parse_input_shapes,
    sanitize_filename,
    unpack_onnx,
)
from pipelines.llm import FOLDER_FORMATS, is_text_format
from pipelines.llm.folders import unpack_folder
from r1platform.accounts.models import Team
from r1platform.core import storage
from r1platform.registry.mirror import mirror_to_mlflow, mlflow_name  # noqa: F401 - callers
from r1platform.registry.models import Format, ModelVersion, RegisteredModel, Task

log = logging.getLogger(__name__)

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", ModelFormat.GGUF.value: ".gguf"}


class UploadRefused(Exception):
    """The upload cannot become a model; the message says why, and nothing was kept."""


# One rule that MLflow's registry (no '/' or ':'), URLs (/v2/models/<name>) and a Triton model
# repository (a folder per model) all accept.
MODEL_NAME_RULE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model, or None when it can."""
    if MODEL_NAME_RULE.fullmatch(name) and ".." not in name:
        return None
    return (
        f"model name {name[:120]!r} is not allowed: use 1 to 100 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit, without '..' (MLflow, serving URLs and Triton's "
        "model repository all need such names)"
    )


def upload_model(
    *,
    team: Team,
    user: object,
    name: str,
    task: str,
    uploaded,
    input_shape: str = "",
    input_dtype: str = "float32",
) -> ModelVersion:
    """Validate an uploaded file without running it and register it as version 1 of a new model.

    ``uploaded`` is the file Django spooled through :class:`storage.HashingUploadHandler`.
    Whatever happens, the spooled file is either moved into storage or deleted.
    """
    temp_path = Path(uploaded.temporary_file_path())
    try:
        name = name.strip()
        problem = model_name_problem(name)
        if problem is not None:
            raise UploadRefused(problem)
        if task not in Task.values:
            raise UploadRefused(f"task must be one of {', '.join(Task.values)}")
        if RegisteredModel.objects.filter(team=team, name=name).exists():
            raise UploadRefused(f"team {team.slug} already has a model named {name!r}")
        declared = parse_input_shapes(input_shape, input_dtype) if input_shape.strip() else None
        info = inspect_model(
            temp_path,
            uploaded.name,
            declared_inputs=declared,
            max_unpacked_bytes=settings.R1_MAX_UNPACKED_BYTES,
        )
        task = task_for_format(task, info.format)
    except RejectedUpload as exc:
        temp_path.unlink(missing_ok=True)
        raise UploadRefused(str(exc)) from None
    except UploadRefused:
        temp_path.unlink(missing_ok=True)
        raise

    archive = info.details.get("model_archive")
    suffix = ARCHIVE_SUFFIX[archive["kind"]] if archive else SUFFIX[info.format]
    relative = storage.store_upload(temp_path, kind="models", team_id=team.pk, suffix=suffix)
    try:
        with transaction.atomic():
            model = RegisteredModel.objects.create(
                team=team,
                name=name,
                task=task,
                created_by=user,
                mlflow_name=mlflow_name(team, name),
            )
            version = register_version(
                model,
                relative_file=relative,
                sha256=uploaded.sha256,
                size_bytes=uploaded.size,
                format=info.format,
                precision=info.precision,
                inputs=[asdict(t) for t in info.inputs],
                outputs=[asdict(t) for t in info.outputs],
                details=info.details,
                original_name=sanitize_filename(uploaded.name),
                user=user,
            )
    except IntegrityError:
        storage.remove(relative)
        raise UploadRefused(f"team {team.slug} already has a model named {name!r}") from None
    except Exception:
        storage.remove(relative)
        raise
    # Best effort, bounded by R1_MLFLOW_TIMEOUT_SECONDS: when MLflow is down the version says
    # its mirror is pending and beat's r1.mirror_versions mirrors it later.
    transaction.on_commit(lambda: mirror_to_mlflow(version))
    # register_version moved latest_version with an UPDATE: the caller sees the row as stored.
    version.model.refresh_from_db(fields=["latest_version", "updated_at"])
    return version


def task_for_format(task: str, fmt: str) -> str:
    """The model's task given its first version's format: a language model's is
    text-generation (left at the form's default, "other", it is set so), and only a language
    model's is. UploadRefused when they disagree."""
    text = is_text_format(fmt)
    if text and task == Task.OTHER:
        return Task.TEXT_GENERATION.value
    if text and task != Task.TEXT_GENERATION:
        raise UploadRefused(
            f"this is a language model ({Format(fmt).label}): its task is "
            f"{Task.TEXT_GENERATION.value}, not {task}"
        )
    if not text and task == Task.TEXT_GENERATION:
        raise UploadRefused(
            f"task {Task.TEXT_GENERATION.value} is for language models: upload a Hugging Face "
            f"checkpoint folder as a zip or tar, or a GGUF file; this is {Format(fmt).label}"
        )
    return task


def register_version(
    model: RegisteredModel,
    *,
    relative_file: str,
    sha256: str,
    size_bytes: int,
    format: str,
    precision: str,
    inputs: list[dict],
    outputs: list[dict],
    details: dict | None = None,
    metrics: dict | None = None,
    parent: ModelVersion | None = None,
    job=None,
    artifact_key: str = "",
    backend: str = "",
    original_name: str = "",
    user: object = None,
) -> ModelVersion:
    """Give the model its next version number and record the file as that version."""
    with transaction.atomic():
        locked = RegisteredModel.objects.select_for_update().get(pk=model.pk)
        number = locked.latest_version + 1
        RegisteredModel.objects.filter(pk=model.pk).update(
            latest_version=number, updated_at=timezone.now()
        )
        return ModelVersion.objects.create(
            model=model,
            team_id=model.team_id,
            number=number,
            format=format,
            precision=precision,
            backend=backend,
            parent=parent,
            job=job,
            artifact_key=artifact_key,
            file=relative_file,
            original_name=original_name,
            sha256=sha256,
            size_bytes=size_bytes,
            inputs=inputs,
            outputs=outputs,
            details=details or {},
            metrics=metrics or {},
            created_by=user,
        )


def input_specs(version: ModelVersion) -> list[TensorSpec]:
    return [TensorSpec.from_dict(t) for t in version.inputs]


def version_artifact(version: ModelVersion, key: str) -> Artifact:
    """A stored version as the pipeline artifact a worker or the serving runtime loads.

    A version stored as an archive (an ONNX model with external data, or a model folder: a
    Hugging Face checkpoint, an ONNX Runtime GenAI folder, a LoRA adapter) is unpacked once into
    ``R1_WORK_DIR/unpacked/<sha256>/`` (:func:`pipelines.formats.unpack_onnx`, shared by every
    job and serving process of the host) and the artifact is its ``.onnx`` file there, or for
    a folder format (:data:`pipelines.llm.FOLDER_FORMATS`) the folder holding its marker file
    (``config.json``, ...); its ``meta["stored_file"]`` names the archive, the file whose sha256
    the version records, for those who check it (serving, certification).
    """
    stored = storage.media_path(version.file)
    path, meta = stored, dict(version.details)
    archive = meta.get("model_archive")
    if archive and version.format in FOLDER_FORMATS:
        path = unpack_folder(stored, version.sha256, archive["model"], unpacked_root())
        meta["stored_file"] = str(stored)
    elif archive:
        path = unpack_onnx(stored, version.sha256, archive["model"], unpacked_root())
        meta["stored_file"] = str(stored)
    return Artifact(
        key=key,
        path=str(path),
        format=version.format,
        precision=version.precision,
        inputs=[TensorSpec.from_dict(t) for t in version.inputs],
        outputs=[TensorSpec.from_dict(t) for t in version.outputs],
        backend=version.backend,
        meta=meta,
    )


def unpacked_root() -> Path:
    """Where stored archives are unpacked to run: outside storage, beside the jobs' folders."""
    return Path(settings.R1_WORK_DIR) / "unpacked"


def lineage(version: ModelVersion) -> list[ModelVersion]:
    """The versions from the upload down to ``version`` (parent links; a loop cannot trap it)."""
    chain: list[ModelVersion] = []
    seen: set[int] = set()
    node: ModelVersion | None = version
    while node is not None and node.pk not in seen:
        seen.add(node.pk)
        chain.append(node)
        node = node.parent
    return chain[::-1]


def adapter_base(version: ModelVersion) -> Artifact | None:
    """A LoRA adapter's base checkpoint (its nearest ``hf_checkpoint`` ancestor), else None."""
    if version.format != ModelFormat.LORA_ADAPTER.value:
        return None
    for ancestor in reversed(lineage(version)[:-1]):
        if ancestor.format == ModelFormat.HF_CHECKPOINT.value:
            return version_artifact(ancestor, f"{ancestor.model.name} v{ancestor.number}")
    return None
