"""The serving process's Prometheus metrics, in a registry each app owns (tests build several).

Model labels are ``team/name``: model names are unique only within a team. Requests for models
that are not served are counted under ``model=""``, so a caller cannot grow the label set.

``/metrics`` names teams and models, so it wants a bearer token: ``R1_METRICS_TOKEN`` (what
Prometheus sends) sees every series; a team's API token sees only its own models' series.

``r1_serving_consecutive_slow_requests`` is the one series Prometheus cannot derive from a
histogram: how many answers in a row, per model, took longer than the latency budget (the alert
``ServingConsecutiveSlowRequests`` fires at five).
"""

from __future__ import annotations

import hmac
from collections.abc import Collection, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from pipelines.certification.settings import CertifySettings

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Deployments carry no latency budget of their own, so every model is held to the certification
# suite's default p99 budget (500 ms), the number the p99 alert fires at too.
LATENCY_BUDGET_SECONDS: float = float(CertifySettings.model_fields["p99_budget_ms"].default) / 1000


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "r1_serving_requests",
            "Inference requests answered, by model, version and HTTP status",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "r1_serving_request_seconds",
            "Time from reading an inference request to its answer",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "r1_serving_batch_size",
            "Rows in each batch handed to an engine",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "r1_serving_queue_depth",
            "Requests waiting for a batch",
            ["model"],
            registry=self.registry,
        )
        self.load_failures = Counter(
            "r1_serving_load_failures",
            "Model versions that failed to load",
            ["model"],
            registry=self.registry,
        )
        self.models_ready = Gauge(
            "r1_serving_models_ready", "Models loaded and answering", registry=self.registry
        )
        self.text = TextMetrics(self.registry)
        self.slow_streaks = SlowStreaks()
        self.registry.register(self.slow_streaks)

    def exposition(self, teams: Collection[str] | None = None) -> bytes:
        """Every series, or (``teams`` given, as slugs) only those of these teams' models."""
        if teams is None:
            return generate_latest(self.registry)
        prefixes = tuple(f"{team}/" for team in teams)
        return generate_latest(_OnlyModels(self.registry, prefixes))  # type: ignore[arg-type]


class TextMetrics:
    """Language-model answers (the OpenAI-compatible routes), per model and version: what users
    of a streaming API watch. Requests by status are counted in ``r1_serving_requests``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "version"]
        self.ttft = Histogram(
            "r1_serving_time_to_first_token_seconds",
            "Time from reading a generation request to its first output token",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tpot = Histogram(
            "r1_serving_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request",
            labels,
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "r1_serving_generation_seconds",
            "Time from reading a generation request to its last token",
            labels,
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "r1_serving_prompt_tokens",
            "Prompt tokens of generation requests",
            labels,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "r1_serving_generated_tokens", "Tokens generated", labels, registry=registry
        )
        self.decode_failures = Counter(
            "r1_serving_decode_failures",
            "Generation requests that ended in an engine error or produced invalid UTF-8",
            labels,
            registry=registry,
        )
        self.batch_size = Histogram(
            "r1_serving_decode_batch_size",
            "Requests in the engine's batch when an output token was delivered",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )


class SlowStreaks:
    """Per model, how many answers in a row (the latest last) took longer than the budget.

    Only answered requests (200) count: a 4xx or 5xx is not a sample of the model's latency (a
    refused body is answered at once, a failure has its own error-rate alert), so it neither
    extends nor breaks a streak. Requests count in the order they were answered.

    ``observe`` runs on the serving event loop for every answer, so it is one dict write and no
    lock; ``collect`` runs on the same loop when ``/metrics`` is read. A prometheus-client Gauge
    would take a lock per update.
    """

    NAME = "r1_serving_consecutive_slow_requests"
    HELP = "Answers in a row, latest last, that took longer than the model's latency budget"

    def __init__(self, budget_seconds: float = LATENCY_BUDGET_SECONDS) -> None:
        self.budget_seconds = budget_seconds
        self._streaks: dict[str, int] = {}

    def observe(self, model: str, status: int, seconds: float) -> None:
        if status == 200:
            slow = seconds > self.budget_seconds
            self._streaks[model] = self._streaks.get(model, 0) + 1 if slow else 0

    def forget(self, model: str) -> None:
        """Drop a model that is no longer served, so its last streak does not alert forever."""
        self._streaks.pop(model, None)

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["model"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["model"])
        for model, streak in list(self._streaks.items()):
            family.add_metric([model], streak)
        yield family


class _OnlyModels:
    """A view of a registry holding only the series whose ``model`` label has a prefix."""

    def __init__(self, registry: CollectorRegistry, prefixes: tuple[str, ...]) -> None:
        self.registry, self.prefixes = registry, prefixes

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            samples = [
                s for s in family.samples if s.labels.get("model", "").startswith(self.prefixes)
            ]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


def is_metrics_token(given: str, expected: str) -> bool:
    """Whether ``given`` is the metrics token; never when none is set."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())
