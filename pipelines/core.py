"""What every pipeline stage shares: the context, artifacts, settings and results.

A pipeline is an ordered list of stages (:class:`pipelines.stages.base.Stage`) run over a
:class:`PipelineContext`. Each stage reads the context's current artifact, may write new
artifacts into the context's work directory, and returns a :class:`StageResult`. The context is
saved as JSON after every stage, so a job that is delivered again (a worker killed mid-job) finds
the stages it already finished and skips them.

Nothing here imports Django, Celery or a heavy framework: torch and onnxruntime are imported inside
the stages that need them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

CONTEXT_FILE = "context.json"


class ModelFormat(StrEnum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"
    # Compiled formats: compile makes them; they are not uploaded.
    AOTINDUCTOR = "aotinductor"  # a .pt2 package of torch._inductor.aoti_compile_and_package
    TENSORRT = "tensorrt"  # a serialized TensorRT engine (.engine), for one GPU model
    # Language models (family "text-generation", pipelines.llm): folders, stored as one tar.
    HF_CHECKPOINT = "hf_checkpoint"  # config.json, safetensors shards, tokenizer files
    GGUF = "gguf"  # one llama.cpp GGUF file; converted to an hf_checkpoint on the worker
    ORT_GENAI = "ort_genai"  # an ONNX Runtime GenAI folder (genai_config.json, model.onnx, ...)
    LORA_ADAPTER = "lora_adapter"  # a peft adapter folder, run over its base version


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"  # weight-only, language models (MatMulNBits; AWQ through ModelOpt)
    FP8 = "fp8"  # language models calibrated with ModelOpt on a GPU


class StageStatus(StrEnum):
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"
    # The stage ran to its end but its result was judged not good enough and not kept (quantize
    # or compile under its threshold): the job goes on with the parent, and the dashboard shows
    # it amber with the reason, never as a green success.
    NOT_KEPT = "not_kept"

    @property
    def done(self) -> bool:
        """Whether the stage finished its work (a re-delivered job need not run it again)."""
        return self in (StageStatus.SUCCEEDED, StageStatus.NOT_KEPT)


class PipelineError(Exception):
    """A failure a user can act on: the message is shown in the dashboard as it is."""


class StageConfigError(PipelineError):
    """A pipeline or stage setting that cannot run; raised before anything is queued."""


class Cancelled(Exception):
    """Raised from a progress callback when the job was cancelled; the stage stops at once."""


@dataclass
class TensorSpec:
    """One input or output: its name, shape (ints, or strings for dynamic axes) and numpy dtype."""

    name: str
    shape: list[int | str]
    dtype: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), shape=list(data["shape"]), dtype=str(data["dtype"]))


@dataclass
class Artifact:
    """A model file the pipeline knows about, the pipeline's input included.

    ``key`` names it inside the context ("input", or the id of the stage that made it); ``parent``
    is the key of the artifact it was made from, which becomes the version's parent (lineage).
    """

    key: str
    path: str
    format: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parent: str | None = None
    backend: str = ""
    produced_by: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Artifact:
        data = dict(data)
        data["inputs"] = [TensorSpec.from_dict(t) for t in data.get("inputs", [])]
        data["outputs"] = [TensorSpec.from_dict(t) for t in data.get("outputs", [])]
        return cls(**data)


@dataclass
class DatasetRef:
    """A stored dataset a stage may read: the worker resolves ids to local files before the run.

    ``target`` names the column (CSV, JSON Lines) or array (npz) holding the labels or expected
    outputs; ``splits`` are the train/validation/test fractions and the seed that cuts them, so
    every stage of every job sees the same rows in the same split.
    """

    id: str
    path: str
    format: str  # "csv" | "jsonl" | "npz"
    target: str | None = None
    splits: dict[str, float] = field(
        default_factory=lambda: {"train": 0.8, "validation": 0.1, "test": 0.1, "seed": 0}
    )
    schema: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetRef:
        return cls(**data)


@dataclass
class BenchmarkRow:
    """Latency and throughput of one artifact at one batch size, measured after warm-up."""

    artifact: str
    backend: str
    batch_size: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput: float  # samples per second
    iterations: int
    # Added later; the defaults let contexts saved before them load.
    p90_ms: float = 0.0
    windows: int = 1  # timed windows (see pipelines.latency.measure_windows)
    converged: bool = False  # the last three windows' p50 agreed
    peak_rss_mb: float = 0.0  # process peak RSS (VmHWM) while loading and measuring this artifact
    model_rss_mb: float = 0.0  # RSS growth from loading the model
    gpu_mem_mb: float | None = None  # peak CUDA memory, for the backends that allocate via torch
    shapes: dict[str, list[int]] = field(default_factory=dict)  # each input's shape as timed
    # Each window's p50, in round order: the targets of one batch size were timed in the same
    # rounds, so two rows' windows pair up (see the benchmark stage's speedups).
    window_p50_ms: list[float] = field(default_factory=list)
    spread: float = 0.0  # (max - min) / min of the last three windows' p50


@dataclass
class StageResult:
    stage_id: str
    name: str
    status: StageStatus
    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    message: str = ""
    # Metrics over time, e.g. a training curve: [{"step": 10, "metrics": {"loss": 0.3}}, ...];
    # the worker logs each entry to MLflow at its step.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Structured output beyond numbers, e.g. the certify stage's whole suite report (JSON-safe).
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageResult:
        data = dict(data)
        data["status"] = StageStatus(data["status"])
        return cls(**data)


@dataclass
class PipelineContext:
    """What the stages share; saved to ``workdir/context.json`` after each stage."""

    workdir: Path
    artifacts: dict[str, Artifact]
    current: str
    results: dict[str, StageResult] = field(default_factory=dict)
    benchmarks: list[BenchmarkRow] = field(default_factory=list)
    # The model's task ("classification", "regression", "embedding", "other"): it picks the
    # metric that evaluate, fine-tune and quantize retention use.
    task: str = "other"
    # Datasets the stages' settings name (by id, as a string), resolved by whoever runs the job.
    datasets: dict[str, DatasetRef] = field(default_factory=dict)
    # Free-form per-stage state that must survive a worker being killed (e.g. a checkpoint path).
    state: dict[str, Any] = field(default_factory=dict)
    # What the input was made from (its registered lineage, nearest first), for stages that
    # compare against an ancestor (certify's FP32 reference). Never produced or registered by the
    # job; the input's ``parent`` names the first of them.
    ancestors: dict[str, Artifact] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        workdir: Path,
        source: Artifact,
        task: str = "other",
        datasets: dict[str, DatasetRef] | None = None,
    ) -> PipelineContext:
        """A new context whose current artifact is ``source`` (key forced to "input")."""
        source.key = "input"
        return cls(
            workdir=Path(workdir),
            artifacts={"input": source},
            current="input",
            task=task,
            datasets=dict(datasets or {}),
        )

    def dataset(self, dataset_id: int | str, purpose: str) -> DatasetRef:
        """The dataset a setting names, or a PipelineError saying which setting named what."""
        ref = self.datasets.get(str(dataset_id))
        if ref is None:
            raise PipelineError(f"dataset {dataset_id} ({purpose}) was not provided to this job")
        return ref

    def lineage(self, artifact: Artifact) -> list[Artifact]:
        """``artifact``'s ancestors, nearest first: this job's artifacts, then ``ancestors``."""
        chain: list[Artifact] = []
        seen = {artifact.key}
        key = artifact.parent
        while key is not None and key not in seen:
            found = self.artifacts.get(key) or self.ancestors.get(key)
            if found is None:
                break
            seen.add(key)
            chain.append(found)
            key = found.parent
        return chain

    @property
    def current_artifact(self) -> Artifact:
        return self.artifacts[self.current]

    def add_artifact(self, artifact: Artifact) -> None:
        self.artifacts[artifact.key] = artifact
        self.current = artifact.key

    def stage_dir(self, stage_id: str) -> Path:
        path = self.workdir / stage_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def save(self) -> None:
        data = {
            "current": self.current,
            "artifacts": {k: asdict(a) for k, a in self.artifacts.items()},
            "results": {
                k: {**asdict(r), "status": r.status.value} for k, r in self.results.items()
            },
            "benchmarks": [asdict(b) for b in self.benchmarks],
            "task": self.task,
            "datasets": {k: asdict(d) for k, d in self.datasets.items()},
            "state": self.state,
            "ancestors": {k: asdict(a) for k, a in self.ancestors.items()},
        }
        tmp = self.workdir / (CONTEXT_FILE + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        # The rename is atomic, so a worker killed while saving leaves the previous context whole.
        tmp.replace(self.workdir / CONTEXT_FILE)

    @classmethod
    def load(cls, workdir: Path) -> PipelineContext | None:
        path = Path(workdir) / CONTEXT_FILE
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            workdir=Path(workdir),
            artifacts={k: Artifact.from_dict(a) for k, a in data["artifacts"].items()},
            current=data["current"],
            results={k: StageResult.from_dict(r) for k, r in data["results"].items()},
            benchmarks=[BenchmarkRow(**b) for b in data["benchmarks"]],
            task=data.get("task", "other"),
            datasets={k: DatasetRef.from_dict(d) for k, d in data.get("datasets", {}).items()},
            state=data.get("state", {}),
            ancestors={k: Artifact.from_dict(a) for k, a in data.get("ancestors", {}).items()},
        )


# fraction of the stage done (0..1) and a short message; it may raise Cancelled.
ProgressFn = Callable[[float, str], None]


class StageSettings(BaseModel):
    """Base of every stage's settings: unknown keys are refused, so a typo is an error."""

    model_config = ConfigDict(extra="forbid")
