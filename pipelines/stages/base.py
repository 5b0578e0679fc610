"""The base every stage subclasses: the opening and closing of a stage are written once, here.

``Stage.run`` is the only entry point (the runner, notebooks and stages that call another stage
all use it). It works like model_navigator's ``Command.run``:

1. start the timer and coerce the settings to the stage's ``Settings`` (a dict, None or another
   model is validated, so a notebook can call ``stage.run(ctx, id, {}, progress)``);
2. ``_pre_run``: what must hold before any work (default: the current artifact is in a format
   ``accepts_for(settings)`` lists);
3. ``_run``: the stage's own work, returning a :class:`StageOutcome`;
4. ``_post_run``: the :class:`~pipelines.core.StageResult`, with the seconds since step 1.

What ``validate_pipeline`` asks of a stage before a job is queued is a set of classmethods with
defaults here, so a stage overrides only what depends on its settings: ``accepts_for`` /
``produces_for`` (formats), ``narrow_for`` (settings that make only some of its formats),
``format_hint`` (a line for a format refusal) and ``precision_for`` (the precision it leaves and
why it refuses one). Nothing here knows a model family: a text-generation stage subclasses this
the same way a tensor stage does, with its own formats and ``_run``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar, cast

from pipelines.core import (
    Artifact,
    PipelineContext,
    PipelineError,
    ProgressFn,
    StageResult,
    StageSettings,
    StageStatus,
)

__all__ = [
    "ONNX_FILENAME",
    "Formats",
    "Stage",
    "StageOutcome",
    "coerce_settings",
    "not_kept",
    "require_format",
    "settings_meta",
]

S = TypeVar("S", bound=StageSettings)

# The file name of the ONNX model a stage writes into its stage directory.
ONNX_FILENAME = "model.onnx"

# What a stage leaves current: one format, one of several (decided on the worker), or None (the
# current artifact stays as it is).
Formats = str | tuple[str, ...] | None


@dataclass
class StageOutcome:
    """What a stage's ``_run`` made; ``_post_run`` turns it into the StageResult."""

    outputs: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    # Metrics over time (a training curve), logged to MLflow at their steps.
    history: list[dict[str, Any]] = field(default_factory=list)
    # Structured output beyond numbers (certify's suite report), JSON-safe.
    details: dict[str, Any] = field(default_factory=dict)
    status: StageStatus = StageStatus.SUCCEEDED


def coerce_settings(cls: type[S], settings: Any) -> S:
    """``settings`` as an instance of ``cls``: a dict (or None, for defaults) is validated.

    run_pipeline passes validated instances; this lets a notebook call ``stage.run(..., {})``.
    """
    if isinstance(settings, cls):
        return settings
    if settings is None:
        return cls()
    if isinstance(settings, StageSettings):
        settings = settings.model_dump()
    return cls.model_validate(settings)


def require_format(artifact: Artifact, stage: str, formats: tuple[str, ...]) -> None:
    """A PipelineError unless ``artifact`` is in one of ``formats``."""
    if artifact.format not in formats:
        wanted = " or ".join(formats)
        raise PipelineError(
            f"{stage} needs a {wanted} model but the current artifact {artifact.key!r} is "
            f"{artifact.format}"
        )


def settings_meta(settings: StageSettings) -> dict[str, Any]:
    """Settings as JSON-safe data, kept in an artifact's meta so a version says how it was made."""
    return settings.model_dump(mode="json")


def not_kept(
    reason: str,
    message: str,
    *,
    settings: StageSettings,
    parent: str,
    metrics: dict[str, float] | None = None,
    details: dict[str, Any] | None = None,
) -> StageOutcome:
    """The outcome of a stage that ran but whose result is under its threshold and not kept.

    ``reason`` is the short verdict the dashboard shows after "not kept: " (``retention 96.3% <
    99.0%``). ``details`` records it with the settings it was judged with and the parent that
    stays current, so a re-delivered job reuses the verdict only for the same settings.
    """
    return StageOutcome(
        outputs=[],
        metrics=dict(metrics or {}),
        message=f"not kept: {reason}; {message}",
        details={
            **(details or {}),
            "not_kept": reason,
            "settings": settings_meta(settings),
            "parent": parent,
        },
        status=StageStatus.NOT_KEPT,
    )


class Stage(ABC, Generic[S]):
    """One step of a pipeline; subclasses set the class attributes and write ``_run``.

    ``accepts`` lists the formats the stage can take as its current artifact, and ``produces`` the
    format it leaves current (None: it leaves the current artifact as it is, as benchmark does):
    the summary ``stage_schemas`` shows. ``accepts_for`` / ``produces_for`` say it for given
    settings; the pipeline is checked against those before a job is queued.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Settings: ClassVar[type[StageSettings]]
    accepts: ClassVar[tuple[str, ...]]
    produces: ClassVar[str | None]

    def run(
        self, ctx: PipelineContext, stage_id: str, settings: Any, progress: ProgressFn
    ) -> StageResult:
        """Run the stage on ``ctx``'s current artifact; the one opening and closing of a stage."""
        started = time.perf_counter()
        s = cast(S, coerce_settings(self.Settings, settings))
        self._pre_run(ctx, s)
        outcome = self._run(ctx, stage_id, s, progress)
        return self._post_run(stage_id, started, outcome)

    def _pre_run(self, ctx: PipelineContext, settings: S) -> None:
        """What must hold before any work: by default, the current artifact's format."""
        require_format(ctx.current_artifact, self.name, self.accepts_for(settings))

    @abstractmethod
    def _run(
        self, ctx: PipelineContext, stage_id: str, settings: S, progress: ProgressFn
    ) -> StageOutcome:
        """The stage's own work on checked settings."""

    def _post_run(self, stage_id: str, started: float, outcome: StageOutcome) -> StageResult:
        """The result, timed from ``started`` (a ``time.perf_counter()``)."""
        return StageResult(
            stage_id=stage_id,
            name=self.name,
            status=outcome.status,
            outputs=list(outcome.outputs),
            metrics=dict(outcome.metrics),
            seconds=round(time.perf_counter() - started, 4),
            message=outcome.message,
            history=list(outcome.history),
            details=dict(outcome.details),
        )

    # -- what validate_pipeline asks; the defaults suit a stage whose formats are fixed ----------

    @classmethod
    def accepts_for(cls, settings: StageSettings) -> tuple[str, ...]:
        """The formats the stage takes with these settings."""
        return cls.accepts

    @classmethod
    def produces_for(cls, settings: StageSettings) -> Formats:
        """The format it leaves with these settings (a tuple: one of them, decided on the
        worker; None: the current artifact stays)."""
        return cls.produces

    @classmethod
    def narrow_for(cls, settings: StageSettings, formats: tuple[str, ...]) -> StageSettings | None:
        """Settings that make only ``formats``, for a later stage that takes only those (None:
        it cannot narrow)."""
        return None

    @classmethod
    def format_hint(cls, settings: StageSettings) -> str | None:
        """A line added to a format refusal (which setting takes which format), or None."""
        return None

    @classmethod
    def precision_for(
        cls, settings: StageSettings | None, precision: str | None
    ) -> tuple[str | None, str | None]:
        """(the precision the stage leaves, why it refuses a model of ``precision`` or None).

        ``settings`` None: they did not validate, and the stage answers for its defaults'
        family of settings. The refusal follows "stage N (name): ". By default a stage takes
        any precision and leaves it as it is.
        """
        return precision, None
