"""AOTInductor backend: TorchScript -> a ``.pt2`` package compiled ahead of time by Inductor.

Steps (each reported through ``progress``, since a compile on a small CPU takes tens of seconds):

1. load the TorchScript model on the target device and run it on an example input;
2. convert it to an ExportedProgram (``torch._export.converter.TS2EPConverter``), then export that
   program's module again with explicit ``torch.export.Dim`` s, so the batch dim (and other named
   dims) stay dynamic: the converter's own retrace marks every dim ``Dim.AUTO`` and cannot be told
   which are meant to vary;
3. ``torch._inductor.aoti_compile_and_package`` -> ``model.pt2``;
4. load the package back (``aoti_load_package``) and compare it with TorchScript at two batch
   sizes (rtol 1e-3, atol 1e-4); a mismatch fails the compile.

Inductor's caches go under the platform's storage (``<jobs>/cache/inductor``), not the default
``/tmp/torchinductor_<user>``; see :func:`inductor_cache_env`. torch is imported inside functions.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.backends import CompiledModel
from pipelines.core import Artifact, ModelFormat, PipelineError, ProgressFn, TensorSpec
from pipelines.onnx_io import describe_inputs, first_error_line, random_inputs

if TYPE_CHECKING:
    from pipelines.stages.compile import CompileSettings

PACKAGE_FILENAME = "model.pt2"
RTOL = 1e-3
ATOL = 1e-4
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


def resolve_device(requested: str) -> str:
    """ "cpu" or "cuda" for a device setting ("auto": cuda when torch sees a GPU)."""
    import torch

    has_cuda = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    if requested == "cuda" and not has_cuda:
        raise PipelineError("device cuda was asked for but this worker has no CUDA GPU")
    return requested


@contextlib.contextmanager
def inductor_cache_env(cache_dir: Path) -> Iterator[Path]:
    """Point Inductor's (and Triton's) caches at ``cache_dir`` for the block; restore after.

    Inductor reads TORCHINDUCTOR_CACHE_DIR on every use (and writes the resolved value back into
    the environment), so both variables are saved and restored, unset ones removed again.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    wanted = {
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
        "TRITON_CACHE_DIR": str(cache_dir / "triton"),
    }
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield cache_dir
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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


def flatten_outputs(value: Any) -> list[Any]:
    """The tensors a model returned (a tensor, or nested lists/tuples/dicts of them), in order."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for item in value for t in flatten_outputs(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in flatten_outputs(item)]
    raise PipelineError(
        f"the model returns a {type(value).__name__}; AOTInductor needs tensors (or tuples of them)"
    )


def compare_outputs(reference: Sequence[Any], got: Sequence[Any], where: str) -> float:
    """Max abs difference; a PipelineError when a shape or value is out of tolerance."""
    if len(reference) != len(got):
        raise PipelineError(
            f"the AOTInductor package returns {len(got)} outputs at {where} but TorchScript "
            f"returns {len(reference)}"
        )
    worst = 0.0
    for index, (ref, out) in enumerate(zip(reference, got, strict=True)):
        ref_np = ref.detach().cpu().double().numpy()
        out_np = out.detach().cpu().double().numpy()
        if ref_np.shape != out_np.shape:
            raise PipelineError(
                f"output {index} of the AOTInductor package has shape {list(out_np.shape)} at "
                f"{where} but TorchScript's has {list(ref_np.shape)}"
            )
        diff = float(np.max(np.abs(ref_np - out_np))) if ref_np.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(out_np, ref_np, rtol=RTOL, atol=ATOL, equal_nan=True):
            raise PipelineError(
                f"output {index} of the AOTInductor package differs from TorchScript's at {where} "
                f"(max abs diff {diff:.3g}, tolerance rtol {RTOL:g} atol {ATOL:g})"
            )
    return worst


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
        specs.append(TensorSpec(name=names[i], shape=shape, dtype=_numpy_dtype_name(tensor)))
    return specs


def _numpy_dtype_name(tensor: Any) -> str:
    try:
        return str(tensor.detach().cpu().reshape(-1)[:0].numpy().dtype)
    except TypeError:  # bfloat16 and others numpy has no dtype for
        return str(tensor.dtype).removeprefix("torch.")


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
    check_arrays = (
        random_inputs(specs, CHECK_BATCH, sizes, DEFAULT_DIM_SIZE, seed=1) if batch_names else None
    )
    with torch.inference_mode():
        try:
            reference = flatten_outputs(module(*example))
            check_reference = (
                flatten_outputs(module(*_tensors(check_arrays, specs, device)))
                if check_arrays is not None
                else None
            )
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(
                f"the model rejected an input of shape {describe_inputs(arrays)}: "
                f"{first_error_line(exc)}"
            ) from exc

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
        try:
            compiled = load_package(package)  # inside inductor_cache_env already
        except Exception as exc:
            raise PipelineError(
                f"the compiled package does not load: {first_error_line(exc)}"
            ) from exc

    with torch.inference_mode():
        try:
            got = flatten_outputs(compiled(*example))
            got_check = (
                flatten_outputs(compiled(*_tensors(check_arrays, specs, device)))
                if check_arrays is not None
                else None
            )
        except PipelineError:
            raise
        except Exception as exc:
            raise PipelineError(
                f"the compiled package fails to run: {first_error_line(exc)}"
            ) from exc
    max_abs_diff = compare_outputs(reference, got, f"batch {EXAMPLE_BATCH}")
    if check_reference is not None and got_check is not None:
        max_abs_diff = max(
            max_abs_diff, compare_outputs(check_reference, got_check, f"batch {CHECK_BATCH}")
        )
    progress(0.95, "compiled package matches TorchScript")

    outputs = _output_specs(source.outputs, got, got_check, batch_name)
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
        "checked_batch_sizes": [EXAMPLE_BATCH, CHECK_BATCH] if check_arrays else [EXAMPLE_BATCH],
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


def load_package(path: str | Path, cache_dir: Path | None = None) -> Any:
    """An AOTInductor package loaded for running (``model(*tensors)``).

    Loading extracts the package's kernels into Inductor's cache folder; ``cache_dir`` (the
    platform's ``<jobs>/cache/inductor``) keeps them there rather than in /tmp. torch's loader
    fixes that folder at the first load of the process, so every load of a worker must go
    through here with the same folder (the compile stage's check does).
    """
    import torch

    if cache_dir is None:
        return torch._inductor.aoti_load_package(str(path))
    with inductor_cache_env(cache_dir):
        return torch._inductor.aoti_load_package(str(path))
