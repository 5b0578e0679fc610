"""A pool's deployments as a Triton Inference Server model repository.

For each deployment: ``<model>/<version number>/model.onnx`` (``model.plan`` for a TensorRT
engine, ``model.pt`` for TorchScript) and ``<model>/config.pbtxt`` (Triton's
``inference.ModelConfig`` in protobuf text format): platform; ``max_batch_size`` and dims
without the batch dim when every input and output starts with the same dynamic dim (else 0 and
the full dims); -1 for the other dynamic dims; dynamic batching with the pool's delay; one
instance on the pool's device. TorchScript tensors are named ``<name>__<index>``, the convention
by which Triton's PyTorch backend maps them to ``forward``'s positional arguments and results.

Files are checked against their registered sha256 before they are copied, as serving does.
AOTInductor packages have no Triton backend and are skipped with the reason.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core import PipelineError, TensorSpec
from pipelines.onnx_io import external_data_files
from r1platform.deployments.models import Deployment
from r1platform.serving.deployments_source import model_spec
from r1platform.serving.protocol import DATATYPES, PLATFORMS
from r1platform.serving.runtime import batch_range, batchable, check_file, tensor_specs
from r1platform.serving.source import ModelSpec

# format -> the file name Triton's backend for that platform loads.
MODEL_FILES = {"onnx": "model.onnx", "tensorrt": "model.plan", "torchscript": "model.pt"}


@dataclass
class ExportResult:
    written: list[Path] = field(default_factory=list)  # each model's folder
    skipped: dict[str, str] = field(default_factory=dict)  # model name -> why


def export_repository(deployments: Iterable[Deployment], dest_dir: Path) -> ExportResult:
    """Write every deployment under ``dest_dir`` as Triton's model repository lays it out."""
    return export_models([model_spec(d) for d in deployments], Path(dest_dir))


def export_models(specs: list[ModelSpec], dest_dir: Path) -> ExportResult:
    result = ExportResult()
    owners: dict[str, str] = {}
    for spec in specs:
        # A Triton repository has one namespace; two teams may use one name in a pool.
        if spec.name in owners:
            result.skipped[spec.label] = f"{owners[spec.name]} already exports a model so named"
            continue
        owners[spec.name] = spec.label
        try:
            result.written.append(write_model(spec, dest_dir))
        except PipelineError as exc:
            result.skipped[spec.label] = str(exc)
    return result


def write_model(spec: ModelSpec, dest_dir: Path) -> Path:
    """One model's folder; PipelineError when Triton cannot serve it as it is."""
    fmt = spec.artifact.format
    if fmt not in MODEL_FILES:
        raise PipelineError(f"Triton has no backend for {fmt} models")
    if spec.name in ("", ".", "..") or "/" in spec.name or "\\" in spec.name:
        raise PipelineError(f"{spec.name!r} cannot be a folder name in a model repository")
    source = check_file(spec)
    inputs, outputs = tensor_specs(spec.artifact)
    if not outputs:
        raise PipelineError("its outputs are not declared, and Triton needs them")
    folder = Path(dest_dir) / spec.name
    version_dir = folder / str(spec.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / MODEL_FILES[fmt]
    # An ONNX model's external data files go beside it, where its graph says they are (the
    # data first: a reader that finds model.onnx finds its weights too).
    for data in external_data_files(source) if fmt == "onnx" else []:
        placed = version_dir / data.relative_to(source.parent)
        placed.parent.mkdir(parents=True, exist_ok=True)
        _copy(data, placed)
    _copy(source, target)
    (folder / "config.pbtxt").write_text(model_config(spec, inputs, outputs))
    return folder


def _copy(source: Path, target: Path) -> None:
    """Copied under a temporary name, then renamed: a half-written file is never in place."""
    partial = target.with_name(target.name + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(target)


def model_config(spec: ModelSpec, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> str:
    """``config.pbtxt`` for one model."""
    batched = batchable(inputs, outputs)
    max_batch = 0
    if batched:
        max_batch = batch_range(_engine_range(spec), spec.max_batch_size)[1]
    torch_names = spec.artifact.format == "torchscript"
    lines = [
        f"name: {_quote(spec.name)}",
        f"platform: {_quote(PLATFORMS[spec.artifact.format])}",
        f"max_batch_size: {max_batch}",
        _tensors("input", inputs, batched, torch_names),
        _tensors("output", outputs, batched, torch_names),
    ]
    if max_batch > 1 and spec.max_queue_delay_ms > 0:
        lines += [
            "dynamic_batching {",
            f"  preferred_batch_size: [ {max_batch} ]",
            f"  max_queue_delay_microseconds: {round(spec.max_queue_delay_ms * 1000)}",
            "}",
        ]
    gpu = spec.device == "cuda" or spec.artifact.format == "tensorrt"
    lines += [
        "instance_group [",
        "  {",
        "    count: 1",
        f"    kind: {'KIND_GPU' if gpu else 'KIND_CPU'}",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def _engine_range(spec: ModelSpec) -> tuple[int, int] | None:
    found = spec.artifact.meta.get("batch_range")  # a TensorRT engine's optimisation profile
    return (int(found[0]), int(found[1])) if found else None


def _tensors(field_name: str, specs: list[TensorSpec], batched: bool, torch_names: bool) -> str:
    entries = []
    for index, spec in enumerate(specs):
        shape = spec.shape[1:] if batched else spec.shape
        dims = [d if isinstance(d, int) else -1 for d in shape]
        name = f"{spec.name}__{index}" if torch_names else spec.name
        try:
            kind = "TYPE_" + DATATYPES[spec.dtype]
        except KeyError:
            raise PipelineError(
                f"{field_name} {spec.name!r} is {spec.dtype}, which Triton does not take"
            ) from None
        body = [f"    name: {_quote(name)}", f"    data_type: {kind}"]
        if dims:
            body.append(f"    dims: [ {', '.join(str(d) for d in dims)} ]")
        else:
            # A tensor that is only its batch dim: Triton wants one dim, reshaped away.
            body += ["    dims: [ 1 ]", "    reshape: { shape: [ ] }"]
        entries.append("  {\n" + "\n".join(body) + "\n  }")
    return f"{field_name} [\n" + ",\n".join(entries) + "\n]"


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
