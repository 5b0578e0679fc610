"""Proving a converted model runs, through the one engine: load it, run it, compare with its parent.

Every mode's output is loaded by :func:`pipelines.engines.load_engine` (as a worker or a server
would load it) and run once next to the source; the largest difference is recorded. A model
onnxruntime cannot load or run is a :class:`RunFailed`, whose ``cause`` (onnxruntime's first
error line) the float modes read to find the op type that has no kernel.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.backends.check import cause, max_abs_diff, run_once
from pipelines.core import Artifact, ModelFormat, PipelineError
from pipelines.engines import Engine, load_engine
from pipelines.onnx_io import CPU_PROVIDERS, random_inputs, read_tensor_specs
from pipelines.quantization.settings import INT8_MODES

__all__ = ["Made", "RunFailed", "check_runs", "model_engine"]

logger = logging.getLogger(__name__)


@dataclass
class Made:
    """What a mode's conversion produced, besides the file."""

    counts: Counter[str]
    providers: list[str] = field(default_factory=lambda: list(CPU_PROVIDERS))
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # The run check already ran (float modes check as part of choosing what stays fp32).
    max_abs_diff: float | None = None
    checked: bool = False
    # Rows to compare the new model with its parent on (None: random data).
    check_feeds: dict[str, np.ndarray] | None = None


class RunFailed(PipelineError):
    """onnxruntime cannot load or run the model a mode made; ``cause`` is its error line."""

    def __init__(self, mode: str, cause: str) -> None:
        hint = (
            '; limit op_types (e.g. ["MatMul"]) to leave the failing op type in float'
            if mode in INT8_MODES
            else ""
        )
        super().__init__(f"onnxruntime cannot run the {mode} model: {cause}{hint}")
        self.cause = cause


def model_engine(artifact: Artifact, providers: Sequence[str]) -> Engine:
    """``artifact`` loaded on the first of ``providers`` (the CUDA provider: on the GPU)."""
    device = "cuda" if "CUDAExecutionProvider" in providers else "cpu"
    return load_engine(artifact, device)


def check_runs(
    source: Artifact,
    new_path: Path,
    mode: str,
    providers: Sequence[str],
    feeds: Mapping[str, np.ndarray] | None = None,
) -> float | None:
    """Load and run the new model once; its max abs difference to the source on the same input.

    ``feeds`` default to random normal data; static int8 passes real rows instead, since its
    activation ranges only cover data like the calibration set. None when the source model itself
    cannot run the input (a named dim whose size the model constrains): then there is nothing to
    compare with, and no reason to fail the stage as long as the new model loads.
    """
    if feeds is None:
        specs, _ = read_tensor_specs(source.path)
        feeds = random_inputs(specs, batch_size=1, default_dim=8)
    try:
        reference: list[np.ndarray] | None = run_once(load_engine(source, "cpu"), feeds, cast=True)
    except Exception as exc:
        logger.info("quantize: not comparing outputs, the source model cannot run (%s)", exc)
        reference = None
    inputs, outputs = read_tensor_specs(new_path)
    candidate = Artifact(
        key=f"{mode} model",
        path=str(new_path),
        format=ModelFormat.ONNX.value,
        precision="",
        inputs=inputs,
        outputs=outputs,
    )
    try:
        engine = model_engine(candidate, providers)
    except Exception as exc:
        raise RunFailed(mode, cause(exc)) from exc
    try:
        produced = run_once(engine, feeds, cast=True)
    except Exception as exc:
        if reference is None:
            return None
        raise RunFailed(mode, cause(exc)) from exc
    if reference is None:
        return None
    return max_abs_diff(reference, produced)
