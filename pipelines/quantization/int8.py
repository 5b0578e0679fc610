"""int8: dynamic (weights only, activations quantized per batch at run time) and static QDQ.

Static quantization writes explicit QuantizeLinear/DequantizeLinear pairs, what TensorRT consumes
now that its implicit INT8 calibrators are deprecated, and what onnxruntime runs: symmetric int8
weights and activations (TensorRT wants zero points of 0), weights per channel, activation
ranges from running the model over a calibration dataset's train split.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.core import Artifact, PipelineContext, PipelineError, ProgressFn
from pipelines.onnx_io import (
    external_data_files,
    first_error_line,
    fixed_batch,
    op_types,
    read_tensor_specs,
)
from pipelines.quantization.checks import Made
from pipelines.quantization.graph import dynamic_counts, qdq_counts, zero_points_all_zero
from pipelines.quantization.settings import WEIGHT_OPS, QuantizeSettings

if TYPE_CHECKING:
    from pipelines.calibration import SplitCalibrationReader
    from pipelines.core import DatasetRef
    from pipelines.datasets import SplitData

__all__ = [
    "calibration_reader",
    "candidate_nodes",
    "int8_dynamic",
    "int8_static",
    "preprocess",
]

logger = logging.getLogger(__name__)


def preprocess(source: Artifact, scratch: Path, external: bool) -> str | None:
    """quant_pre_process into ``scratch``; None (and a warning) when the model defeats it.

    Pre-processing (symbolic shape inference, onnxruntime's graph cleanup, ONNX shape
    inference) lets the quantizer see shapes and fused patterns it otherwise misses. When the
    symbolic shape inference fails (it does on torch's export of nn.TransformerEncoder), the
    rest is run without it: the cleanup turns a weight reached through an Identity node (how
    torch exports equal weights) back into an initializer, and the quantizer only quantizes
    MatMuls whose weight is an initializer; without it, 3 of 4 encoder layers stayed float.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = (scratch / "preprocessed.onnx").resolve()
    model = str(Path(source.path).resolve())  # before the chdir below: it may be relative
    problem = ""
    for skip_symbolic in (False, True):
        try:
            # Inside scratch: when the symbolic inference gives up, onnxruntime saves
            # ``sym_shape_infer_temp.onnx`` and its data into the working directory (the
            # worker's, the project root), and a job writes only in its own folder.
            with contextlib.chdir(scratch):
                quant_pre_process(
                    model,
                    str(pre),
                    skip_symbolic_shape=skip_symbolic,
                    save_as_external_data=external,
                )
            return str(pre)
        except Exception as exc:
            problem = problem or first_error_line(exc) or type(exc).__name__
    logger.warning(
        "quantize %s: pre-processing failed (%s); quantizing the model as it is",
        source.key,
        problem,
    )
    return None


def weight_nodes(path: str, op_types: list[str]) -> list[str] | None:
    """The nodes of ``op_types`` that multiply by a constant (a weight): a Linear's MatMul, not
    attention's activation-by-activation MatMuls, whose int8 error is what breaks a transformer.
    None when such a node has no name to select it by (then every node of ``op_types`` is)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    constant = {t.name for t in graph.initializer}
    for node in graph.node:  # Constant nodes, and what is computed from constants alone
        if node.op_type == "Constant" or (node.input and all(i in constant for i in node.input)):
            constant.update(node.output)
    chosen = [
        node
        for node in graph.node
        if node.op_type in op_types and any(i in constant for i in node.input)
    ]
    if any(not node.name for node in chosen):
        return None
    names = [node.name for node in chosen]
    # Dynamic int8 first rewrites each Gemm as "<name>_MatMul" (onnx_model.py in onnxruntime).
    return names + [f"{node.name}_MatMul" for node in chosen if node.op_type == "Gemm"]


def _selection(
    to_quantize: str, s: QuantizeSettings, exclude: Sequence[str] = ()
) -> dict[str, list[str] | None]:
    """The quantizer's op-type and node selection: by default, only the weight-bearing nodes;
    ``exclude`` names nodes kept in float (the sensitivity search's choice)."""
    op_types = s.effective_op_types
    nodes = None
    if s.op_types is None and op_types is not None:
        nodes = weight_nodes(to_quantize, op_types)
    excluded = set(exclude) | {f"{name}_MatMul" for name in exclude}  # a Gemm, rewritten
    if nodes is not None:
        nodes = [n for n in nodes if n not in excluded]
    return {
        "op_types_to_quantize": op_types,
        "nodes_to_quantize": nodes,
        "nodes_to_exclude": sorted(excluded) or None,
    }


def _float_outputs(exclude: Sequence[str]) -> dict[str, list[str]]:
    """With nodes kept in float, static QDQ also leaves the weight ops' outputs unquantized:
    QDQ quantizes a Gemm's (or Conv's) output for its consumer, so a node kept in float would
    still read an int8-rounded input from the node before it."""
    return {"OpTypesToExcludeOutputQuantization": list(WEIGHT_OPS)} if exclude else {}


def candidate_nodes(to_quantize: str, s: QuantizeSettings) -> list[str]:
    """The nodes the sensitivity search may keep in float: the weight nodes of the selection."""
    op_types = s.effective_op_types or ["MatMul", "Gemm", "Conv"]
    chosen = weight_nodes(to_quantize, [t for t in op_types if t in ("MatMul", "Gemm", "Conv")])
    return [n for n in chosen or [] if not n.endswith("_MatMul")]


def _nothing_quantized(source: Artifact, s: QuantizeSettings) -> PipelineError:
    present = ", ".join(sorted(Counter(op_types(source.path)))) or "none"
    chosen = s.effective_op_types
    wanted = f"the op types {chosen}" if chosen else "any op type it supports"
    return PipelineError(
        f"nothing was quantized: the model has none of {wanted} (its op types: {present})"
    )


def cpu_lacks_vnni() -> bool:
    """Whether this is an x86 CPU without VNNI, whose u8s8 int8 kernels (vpmaddubsw) saturate
    at int16 with 8-bit weights: onnxruntime's documented case for 7-bit weights."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" not in flags and "avx_vnni" not in flags and " amx_int8" not in flags


def _absolute(path: str | Path) -> str:
    return str(Path(path).resolve())


def _in_folder_of(out: Path) -> contextlib.chdir:
    """Run the quantizer from the output's folder: onnx checks whether the external data file
    it is about to write exists relative to the working directory, not to the model (so a
    ``model.onnx.data`` wherever the worker was started refuses the job), and onnxruntime's
    helpers write their temporary files there too. An earlier model at ``out`` (the search
    writes its choice over the first one) is removed with its data file first."""
    data = out.with_name(out.name + ".data")
    if out.is_file():
        for extra in external_data_files(out):
            extra.unlink(missing_ok=True)
        out.unlink()
    data.unlink(missing_ok=True)
    return contextlib.chdir(out.parent)


def reduce_range(s: QuantizeSettings) -> bool:
    """The 7-bit choice: the setting when given, else whether this CPU needs it."""
    return cpu_lacks_vnni() if s.reduce_range is None else s.reduce_range


def int8_dynamic(
    source: Artifact,
    to_quantize: str,
    out: Path,
    s: QuantizeSettings,
    external: bool,
    exclude: Sequence[str] = (),
) -> Made:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    to_quantize, out = _absolute(to_quantize), Path(_absolute(out))
    try:
        with _in_folder_of(out):
            quantize_dynamic(
                to_quantize,
                str(out),
                **_selection(to_quantize, s, exclude),
                per_channel=s.effective_per_channel,
                reduce_range=reduce_range(s),
                weight_type=QuantType.QInt8,
                use_external_data_format=external,
            )
    except Exception as exc:
        raise PipelineError(f"int8 quantization failed: {first_error_line(exc)}") from exc
    counts = dynamic_counts(out)
    if not counts:
        raise _nothing_quantized(source, s)
    return Made(counts=counts, meta={"reduce_range": reduce_range(s)})


def calibration_reader(
    ref: DatasetRef, to_quantize: str, s: QuantizeSettings
) -> tuple[SplitCalibrationReader, SplitData]:
    """A reader over the calibration train split, and the split; a PipelineError if it misfits."""
    from pipelines.calibration import SplitCalibrationReader, check_fits
    from pipelines.datasets import load_split

    specs, _ = read_tensor_specs(to_quantize)
    what = f"calibration dataset {ref.id} (calibration_dataset_id, train split)"
    try:
        data = load_split(ref, "train", specs)
    except PipelineError as exc:  # rows that do not map onto the inputs: it names both shapes
        raise PipelineError(
            f"calibration_dataset_id {ref.id} cannot calibrate this model: {exc}; pick a "
            "dataset whose rows have the model's input shape"
        ) from exc
    check_fits(data, specs, what)
    if data.rows == 0:
        raise PipelineError(f"{what} has no rows")
    fixed = fixed_batch(specs)
    batch = fixed or min(32, s.calibration_samples)
    reader = SplitCalibrationReader(
        data,
        [t.name for t in specs],
        s.calibration_samples,
        batch,
        full_batches=fixed is not None,
    )
    if reader.samples == 0:
        raise PipelineError(
            f"{what} has {data.rows} rows, fewer than the model's fixed batch of {fixed}"
        )
    return reader, data


def int8_static(
    ctx: PipelineContext,
    source: Artifact,
    to_quantize: str,
    out: Path,
    s: QuantizeSettings,
    external: bool,
    progress: ProgressFn,
    exclude: Sequence[str] = (),
    calibration_cache: Path | None = None,
) -> Made:
    """Static QDQ int8; ``calibration_cache`` (a file) keeps the activation ranges of a first
    call for the next ones (the search re-quantizes the same model with other nodes in float)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    assert s.calibration_dataset_id is not None  # the settings validator makes sure
    ref = ctx.dataset(s.calibration_dataset_id, "calibration_dataset_id")
    reader, data = calibration_reader(ref, to_quantize, s)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[s.calibrate_method]
    progress(0.3, f"calibrating ({s.calibrate_method}) on {reader.samples} rows")
    chatter = io.StringIO()  # the histogram calibrators print their progress
    to_quantize, out = _absolute(to_quantize), Path(_absolute(out))
    try:
        with contextlib.redirect_stdout(chatter), _in_folder_of(out):
            quantize_static(
                to_quantize,
                str(out),
                reader,
                quant_format=QuantFormat.QDQ,
                **_selection(to_quantize, s, exclude),
                per_channel=s.effective_per_channel,
                reduce_range=reduce_range(s),
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                use_external_data_format=external,
                calibration_cache_path=calibration_cache,
                # Biases stay float: TensorRT's ONNX parser refuses the int32 DequantizeLinear
                # nodes ORT writes for quantized biases, and it fuses a float bias itself.
                extra_options={
                    "WeightSymmetric": True,
                    "ActivationSymmetric": True,
                    "QuantizeBias": False,
                    **_float_outputs(exclude),
                },
            )
    except PipelineError:
        raise
    except Exception as exc:
        raise PipelineError(f"int8 static quantization failed: {first_error_line(exc)}") from exc
    finally:
        if chatter.getvalue().strip():
            logger.debug("quantize_static: %s", chatter.getvalue().strip())
    counts = qdq_counts(out)
    if not counts:
        raise _nothing_quantized(source, s)
    symmetric = zero_points_all_zero(out)
    notes = [] if symmetric else ["some zero points are not 0: TensorRT will refuse this model"]
    reader.rewind()
    return Made(
        counts=counts,
        notes=notes,
        check_feeds=reader.get_next(),  # the first calibration batch
        meta={
            "quant_format": "QDQ",
            "calibrate_method": s.calibrate_method,
            "calibration_dataset_id": s.calibration_dataset_id,
            "calibration_rows": reader.samples,
            "symmetric": symmetric,
            "reduce_range": reduce_range(s),
        },
    )
