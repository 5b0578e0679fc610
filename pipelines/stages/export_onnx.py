"""export_onnx: TorchScript -> ONNX, checked against the TorchScript model's own outputs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

from pydantic import Field

from pipelines.backends.check import cause, compare_outputs, run_once
from pipelines.core import (
    Artifact,
    ModelFormat,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageSettings,
    TensorSpec,
)
from pipelines.engines import load_engine
from pipelines.onnx_io import (
    describe_inputs,
    first_error_line,
    model_size_bytes,
    random_inputs,
    read_tensor_specs,
)
from pipelines.stages.base import ONNX_FILENAME, Stage, StageOutcome, settings_meta
from pipelines.staging import staged_output

# Tolerances of the TorchScript / onnxruntime comparison: fp32 kernels differ in summation order,
# which moves results by ~1e-6 relative; anything beyond these is a wrong export, not rounding.

# Size of named non-batch dims (sequence length, image side) in the example input when the
# settings do not give one. Not 1: tracing with a size of 1 lets broadcasting hide a wrong shape.
DEFAULT_DIM_SIZE = 8


class ExportOnnxSettings(StageSettings):
    """Settings of export_onnx."""

    opset: int = Field(
        17,
        ge=13,
        le=21,
        description=(
            "ONNX opset to export to. 17 runs on every current onnxruntime and TensorRT; raise it "
            "only when the export reports an operator that needs a newer opset."
        ),
    )
    dynamic_batch: bool = Field(
        True,
        description=(
            "Keep a named first dim (such as 'batch') dynamic in the ONNX model. Off: it is fixed "
            "to batch_size. Dims declared as numbers at upload are always fixed."
        ),
    )
    batch_size: int = Field(
        2,
        ge=1,
        le=1024,
        description=(
            "Batch size of the example input the model is exported and checked with. 2 rather "
            "than 1, so that an operation that only works for one sample shows up here."
        ),
    )
    dim_sizes: dict[str, Annotated[int, Field(ge=1, le=1_000_000)]] = Field(
        default_factory=dict,
        description=(
            'Sizes of other named dims in the example input, e.g. {"seq": 128}; named dims not '
            f"listed use {DEFAULT_DIM_SIZE}."
        ),
    )


def _flatten_outputs(value: Any, torch: Any) -> list[Any]:
    """The tensors a TorchScript forward returned, in the order the ONNX exporter lays them out."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in _flatten_outputs(item, torch)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _flatten_outputs(item, torch)]
    raise PipelineError(
        f"the model returns a {type(value).__name__}, which ONNX cannot represent: make forward "
        "return tensors (or a tuple of tensors)"
    )


def _output_names(declared: Sequence[TensorSpec], count: int) -> list[str]:
    """Declared output names when they fit, else "output" / "output_0", "output_1", ..."""
    if declared and len(declared) == count:
        return [spec.name for spec in declared]
    if count == 1:
        return ["output"]
    return [f"output_{i}" for i in range(count)]


def _dynamic_axes(
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    output_names: Sequence[str],
    dynamic_batch: bool,
) -> dict[str, dict[int, str]]:
    """The named dims of the declared inputs (and outputs, when declared) as dynamic axes.

    With dynamic_batch off, the batch name is left out, so the exporter fixes it to the example's
    size. Undeclared outputs get their dims from ONNX shape inference, which carries the input's
    dim names through (an MLP's output comes out as ["batch", 10]).
    """
    batch_names = {s.shape[0] for s in inputs if s.shape and isinstance(s.shape[0], str)}

    def axes(shape: Sequence[int | str]) -> dict[int, str]:
        return {
            i: dim
            for i, dim in enumerate(shape)
            if isinstance(dim, str) and (dynamic_batch or dim not in batch_names)
        }

    result = {spec.name: axes(spec.shape) for spec in inputs}
    if outputs and [spec.name for spec in outputs] == list(output_names):
        result.update({spec.name: axes(spec.shape) for spec in outputs})
    return {name: ax for name, ax in result.items() if ax}


class ExportOnnx(Stage[ExportOnnxSettings]):
    """Export a TorchScript model to ONNX with the legacy TorchScript exporter.

    The legacy exporter (``dynamo=False``) is the only one in torch 2.13 that takes a
    ScriptModule: the dynamo exporter needs the Python source, which a .pt upload does not have.
    """

    name: ClassVar[str] = "export_onnx"
    description: ClassVar[str] = (
        "Convert a TorchScript model to ONNX and check that onnxruntime gives the same outputs "
        "as TorchScript on an example input."
    )
    Settings: ClassVar[type[StageSettings]] = ExportOnnxSettings
    accepts: ClassVar[tuple[str, ...]] = (ModelFormat.TORCHSCRIPT.value,)
    produces: ClassVar[str | None] = ModelFormat.ONNX.value

    def _run(
        self, ctx: PipelineContext, stage_id: str, s: ExportOnnxSettings, progress: ProgressFn
    ) -> StageOutcome:
        """Export the current TorchScript artifact; the ONNX model becomes the current one."""
        source = ctx.current_artifact
        if not source.inputs:
            raise PipelineError(
                "the model declares no inputs: give its input shapes at upload, e.g. "
                '[{"name": "x", "shape": ["batch", 3, 224, 224], "dtype": "float32"}]'
            )
        names = [spec.name for spec in source.inputs]
        if len(set(names)) != len(names):
            raise PipelineError(f"the declared inputs have duplicate names: {names}")

        import onnx
        import torch

        progress(0.0, "loading the TorchScript model")
        try:
            model = torch.jit.load(source.path, map_location="cpu")
        except Exception as exc:
            raise PipelineError(
                f"could not load {source.path} as TorchScript: {first_error_line(exc)}"
            ) from exc
        model.eval()

        arrays = random_inputs(source.inputs, s.batch_size, s.dim_sizes, DEFAULT_DIM_SIZE)
        tensors = tuple(torch.from_numpy(a) for a in arrays.values())
        progress(0.1, "running the TorchScript model on an example input")
        try:
            with torch.no_grad():
                returned = model(*tensors)
        except Exception as exc:
            what = "an input" if len(arrays) == 1 else "inputs"
            raise PipelineError(
                f"the model rejected {what} of shape {describe_inputs(arrays)}: check the input "
                f"shape given at upload: {first_error_line(exc)}"
            ) from exc
        reference_tensors = _flatten_outputs(returned, torch)
        # float64 so the comparison itself adds no rounding (and bfloat16 has no numpy dtype).
        reference = [t.detach().cpu().to(torch.float64).numpy() for t in reference_tensors]
        output_names = _output_names(source.outputs, len(reference))
        dynamic_axes = _dynamic_axes(source.inputs, source.outputs, output_names, s.dynamic_batch)

        stage_dir = ctx.stage_dir(stage_id)
        with staged_output(stage_dir, ONNX_FILENAME) as tmp_path:
            progress(0.3, f"exporting to ONNX opset {s.opset}")
            try:
                with warnings.catch_warnings():
                    # Using the legacy exporter is deliberate (see the class docstring).
                    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX")
                    warnings.filterwarnings("ignore", message="no signature found")
                    torch.onnx.export(
                        model,
                        tensors,
                        str(tmp_path),
                        input_names=list(arrays),
                        output_names=output_names,
                        dynamic_axes=dynamic_axes or None,
                        opset_version=s.opset,
                        do_constant_folding=True,
                        dynamo=False,
                    )
            except Exception as exc:
                raise PipelineError(
                    f"ONNX export at opset {s.opset} failed: {first_error_line(exc)} (when an "
                    "operator is not supported, a higher opset may have it)"
                ) from exc

            progress(0.6, "checking the ONNX model")
            try:
                # The path, not a loaded proto: the checker then also handles >2 GiB models.
                onnx.checker.check_model(str(tmp_path))
            except Exception as exc:
                raise PipelineError(
                    f"the exported ONNX model is invalid: {first_error_line(exc)}"
                ) from exc

            progress(0.7, "comparing onnxruntime's outputs with TorchScript's")
            exported_specs, exported_outputs = read_tensor_specs(tmp_path)
            candidate = Artifact(
                key="the exported model",
                path=str(tmp_path),
                format=ModelFormat.ONNX.value,
                precision=source.precision,
                inputs=exported_specs,
                outputs=exported_outputs,
            )
            try:
                engine = load_engine(candidate, "cpu")
                exported = run_once(engine, arrays)
            except Exception as exc:
                if isinstance(exc, PipelineError) and exc.__cause__ is None:
                    raise  # an input the model needs that the artifact does not declare
                raise PipelineError(
                    f"onnxruntime cannot run the exported model: {cause(exc)}"
                ) from exc
            del engine  # release the file before it is renamed (matters on Windows)
            max_abs_diff = compare_outputs(
                reference,
                exported,
                names=output_names,
                made="the ONNX model",
                source="the TorchScript model",
                hint=": the exporter does not reproduce an operation of this model faithfully; "
                "try another opset",
            )

        final = stage_dir / ONNX_FILENAME
        inputs, outputs = read_tensor_specs(final)
        artifact = Artifact(
            key=stage_id,
            path=str(final),
            format=ModelFormat.ONNX.value,
            # The exporter keeps the weights' dtype, so an fp16 TorchScript model stays fp16.
            precision=source.precision,
            inputs=inputs,
            outputs=outputs,
            parent=source.key,
            produced_by=self.name,
            metrics={"max_abs_diff": max_abs_diff, "size_bytes": float(model_size_bytes(final))},
            meta={
                "opset": s.opset,
                "torch_version": torch.__version__,
                "example_input": describe_inputs(arrays),
                "settings": settings_meta(s),
            },
        )
        ctx.add_artifact(artifact)
        progress(1.0, "exported")
        dynamic = sorted({d for spec in inputs for d in spec.shape if isinstance(d, str)})
        return StageOutcome(
            outputs=[artifact.key],
            metrics={"max_abs_diff": max_abs_diff},
            message=(
                f"exported to ONNX opset {s.opset}; onnxruntime matches TorchScript (max abs diff "
                f"{max_abs_diff:.2g}); dynamic dims: {', '.join(dynamic) or 'none'}"
            ),
        )
