"""AOTInductor backend: TorchScript -> a ``.pt2`` package compiled ahead of time by Inductor.

Steps (each reported through ``progress``, since a compile on a small CPU takes tens of seconds):

1. load the TorchScript model on the target device and run it on an example input;
2. convert it to an ExportedProgram (``torch._export.converter.TS2EPConverter``), then export that
   program's module again with explicit ``torch.export.Dim`` s, so the batch dim (and other named
   dims) stay dynamic: the converter's own retrace marks every dim ``Dim.AUTO`` and cannot be told
   which are meant to vary;
3. ``torch._inductor.aoti_compile_and_package`` -> ``model.pt2``;
4. load the package back and run it and the TorchScript model through ``pipelines.engines`` at two
   batch sizes, compared with rtol 1e-3, atol 1e-4; a mismatch fails the compile.

Inductor's caches go under the platform's storage (``<jobs>/cache/inductor``), see
:func:`pipelines.backends.aotinductor.inductor_cache_env`. torch is imported inside functions.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.backends.aotinductor import inductor_cache_env
from pipelines.backends.catalog import CompiledModel
from pipelines.backends.check import cause, compare_outputs
from pipelines.backends.settings import CompileSettings
from pipelines.core import Artifact, ModelFormat, PipelineError, ProgressFn, TensorSpec
from pipelines.engines import EngineOptions, load_engine, resolve_device
from pipelines.onnx_io import describe_inputs, first_error_line, random_inputs

__all__ = ["compile_aotinductor"]

PACKAGE_FILENAME = "model.pt2"
# Batch size of the example input the program is exported with, and the second size the package
# is checked at (so a batch dim that is not really dynamic fails here, not in serving).
EXAMPLE_BATCH = 2
CHECK_BATCH = 5
# Size of named non-batch dims in the example input when dim_ranges does not give one.
DEFAULT_DIM_SIZE = 8

# Inductor options for the package. Precompiled headers are off: Inductor writes them under the
# default /tmp/torchinductor_<user> whatever TORCHINDUCTOR_CACHE_DIR says (~290 MB per compiler
# and flag set), and on 2 cores they did not make a compile faster.
INDUCTOR_CONFIGS: dict[str, Any] = {"aot_inductor.precompile_headers": False}


def _dim_name(name: str) -> str:
    """A dim name torch.export accepts (an identifier)."""
    cleaned = re.sub(r"\W", "_", name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"d_{cleaned}"


def batch_dim_names(specs: Sequence[TensorSpec]) -> set[str]:
    """Names of the inputs' first dims that are dynamic (strings)."""
    return {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}


def example_sizes(
    specs: Sequence[TensorSpec], dim_ranges: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    """Size of each named non-batch dim in the example input: dim_ranges' opt, else 8."""
    batch = batch_dim_names(specs)
    sizes: dict[str, int] = {}
    for spec in specs:
        for dim in spec.shape[1:]:
            if isinstance(dim, str) and dim not in batch:
                sizes[dim] = int(dim_ranges[dim][1]) if dim in dim_ranges else DEFAULT_DIM_SIZE
    return sizes


def dynamic_shapes_for(
    specs: Sequence[TensorSpec],
    dim_ranges: Mapping[str, Sequence[int]],
    include_named: bool = True,
) -> tuple[tuple[dict[int, Any], ...], dict[str, list[int | None]]]:
    """``dynamic_shapes`` for torch.export (one dict per input) and the ranges, for the record.

    A named first dim is the batch: Dim(min=1), unbounded. Other named dims (``include_named``)
    get dim_ranges' [min, max] when listed, else min 1 unbounded. One name is one Dim across
    inputs, so export knows two inputs share their sequence length.
    """
    import torch

    batch = batch_dim_names(specs)
    dims: dict[str, Any] = {}
    ranges: dict[str, list[int | None]] = {}

    def dim_for(name: str) -> Any:
        if name not in dims:
            if name in dim_ranges and name not in batch:
                low, _, high = (int(v) for v in dim_ranges[name])
                dims[name] = torch.export.Dim(_dim_name(name), min=low, max=high)
                ranges[name] = [low, high]
            else:
                dims[name] = torch.export.Dim(_dim_name(name), min=1)
                ranges[name] = [1, None]
        return dims[name]

    shapes: list[dict[int, Any]] = []
    for spec in specs:
        axes: dict[int, Any] = {}
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, str) and (dim in batch or include_named):
                axes[i] = dim_for(dim)
        shapes.append(axes)
    return tuple(shapes), ranges


def _output_specs(
    declared: Sequence[TensorSpec], first: Sequence[Any], second: Sequence[Any] | None, batch: str
) -> list[TensorSpec]:
    """Output specs from two runs at different batch sizes: dims that changed are the batch."""
    count = len(first)
    if declared and len(declared) == count:
        names = [s.name for s in declared]
    else:
        names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    specs = []
    for i, tensor in enumerate(first):
        other = second[i] if second is not None else tensor
        shape: list[int | str] = [
            batch if a != b else int(a) for a, b in zip(tensor.shape, other.shape, strict=False)
        ]
        specs.append(TensorSpec(name=names[i], shape=shape, dtype=str(np.asarray(tensor).dtype)))
    return specs


def _tensors(arrays: Mapping[str, np.ndarray], specs: Sequence[TensorSpec], device: str) -> tuple:
    import torch

    return tuple(torch.from_numpy(arrays[s.name]).to(device) for s in specs)


def _export(
    module: Any, example: tuple, specs: Sequence[TensorSpec], dim_ranges: Mapping[str, Any]
) -> tuple[Any, dict[str, list[int | None]], list[str]]:
    """TorchScript -> ExportedProgram with dynamic dims; falls back to a dynamic batch only."""
    import torch
    from torch._export.converter import TS2EPConverter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = TS2EPConverter(module, example).convert()
        except Exception as exc:
            raise PipelineError(
                f"torch.export cannot convert this TorchScript model: {first_error_line(exc)}"
            ) from exc
        named = {d for s in specs for d in s.shape[1:] if isinstance(d, str)}
        attempts = [True, False] if named - batch_dim_names(specs) else [True]
        first_error: Exception | None = None
        for include_named in attempts:
            shapes, ranges = dynamic_shapes_for(specs, dim_ranges, include_named)
            try:
                program = torch.export.export(
                    converted.module(), example, dynamic_shapes=shapes, strict=False
                )
            except Exception as exc:
                first_error = first_error or exc
                continue
            static = [] if include_named else sorted(named - batch_dim_names(specs))
            return program, ranges, static
    assert first_error is not None
    raise PipelineError(
        f"torch.export cannot keep the model's batch dim dynamic: {first_error_line(first_error)}"
    ) from first_error


def compile_aotinductor(
    source: Artifact,
    out_dir: Path,
    settings: CompileSettings,
    progress: ProgressFn,
    *,
    cache_root: Path,
) -> CompiledModel:
    """Compile the TorchScript ``source`` into ``out_dir/model.pt2`` and check it."""
    import torch

    if not source.inputs:
        raise PipelineError(
            "the model declares no inputs: give its input shapes at upload, e.g. "
            '[{"name": "x", "shape": ["batch", 64], "dtype": "float32"}]'
        )
    device = resolve_device(settings.device)
    dim_ranges = {k: list(v) for k, v in settings.dim_ranges.items()}
    specs = list(source.inputs)
    batch_names = batch_dim_names(specs)
    batch_name = next(iter(sorted(batch_names)), "batch")

    progress(0.02, f"loading the TorchScript model on {device}")
    try:
        module = torch.jit.load(source.path, map_location=device).eval()
    except Exception as exc:
        raise PipelineError(
            f"could not load {source.path} as TorchScript: {first_error_line(exc)}"
        ) from exc

    sizes = example_sizes(specs, dim_ranges)
    arrays = random_inputs(specs, EXAMPLE_BATCH, sizes, DEFAULT_DIM_SIZE, seed=0)
    example = _tensors(arrays, specs, device)
    batches = [arrays]
    if batch_names:  # a second size, so a batch dim that is not really dynamic fails here
        batches.append(random_inputs(specs, CHECK_BATCH, sizes, DEFAULT_DIM_SIZE, seed=1))
    # The reference is the TorchScript model as an engine runs it (the module above is what
    # torch.export converts; it is not run).
    reference_engine = load_engine(source, device)
    try:
        reference = [list(reference_engine.run(batch).values()) for batch in batches]
    except Exception as exc:
        raise PipelineError(
            f"the model rejected an input of shape {describe_inputs(arrays)}: {cause(exc)}"
        ) from exc
    del reference_engine

    cache_dir = Path(cache_root) / "inductor"
    package = Path(out_dir) / PACKAGE_FILENAME
    started = time.perf_counter()
    with inductor_cache_env(cache_dir):
        progress(0.08, "converting TorchScript to an ExportedProgram")
        program, ranges, static = _export(module, example, specs, dim_ranges)
        progress(0.15, f"compiling with AOTInductor for {device} (tens of seconds)")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch._inductor.aoti_compile_and_package(
                    program, package_path=str(package), inductor_configs=dict(INDUCTOR_CONFIGS)
                )
        except Exception as exc:
            raise PipelineError(f"AOTInductor failed to compile: {first_error_line(exc)}") from exc
        compile_seconds = time.perf_counter() - started
        progress(0.85, "loading the package back and comparing with TorchScript")
        if not package.is_file():
            raise PipelineError("AOTInductor did not write the package")
    built = Artifact(
        key="the compiled package",
        path=str(package),
        format=ModelFormat.AOTINDUCTOR.value,
        precision=source.precision,
        inputs=specs,
        outputs=list(source.outputs),
        meta={"device": device},
    )
    try:
        compiled = load_engine(built, device, options=EngineOptions(cache_root=Path(cache_root)))
    except Exception as exc:
        raise PipelineError(f"the compiled package does not load: {cause(exc)}") from exc
    try:
        got = [list(compiled.run(batch).values()) for batch in batches]
    except Exception as exc:
        raise PipelineError(f"the compiled package fails to run: {cause(exc)}") from exc
    max_abs_diff = 0.0
    for batch, ref, out in zip(batches, reference, got, strict=True):
        size = len(next(iter(batch.values())))
        max_abs_diff = max(
            max_abs_diff,
            compare_outputs(
                ref,
                out,
                names=[str(i) for i in range(len(ref))],
                made=f"the AOTInductor package at batch {size}",
                source="TorchScript",
            ),
        )
    progress(0.95, "compiled package matches TorchScript")

    outputs = _output_specs(source.outputs, got[0], got[1] if len(got) > 1 else None, batch_name)
    if static:  # the package only takes these dims at the example's size: say so in its inputs
        specs = [
            TensorSpec(s.name, [sizes[d] if d in static else d for d in s.shape], s.dtype)
            for s in specs
        ]
    meta: dict[str, Any] = {
        "torch_version": torch.__version__,
        "device": device,
        "dynamic_dims": ranges,
        "example_input": describe_inputs(arrays),
        "checked_batch_sizes": [EXAMPLE_BATCH, CHECK_BATCH][: len(batches)],
        "inductor_configs": dict(INDUCTOR_CONFIGS),
    }
    if static:
        meta["static_dims"] = {name: sizes[name] for name in static}
    return CompiledModel(
        filename=PACKAGE_FILENAME,
        format=ModelFormat.AOTINDUCTOR.value,
        backend="aotinductor",
        meta=meta,
        metrics={"max_abs_diff": max_abs_diff, "compile_seconds": round(compile_seconds, 3)},
        inputs=specs,
        outputs=outputs,
        summary=f"{device}, dynamic {', '.join(ranges) or 'nothing'}",
    )
