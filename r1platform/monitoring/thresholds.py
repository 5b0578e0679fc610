"""The numbers the shipped alert rules (``deploy/prometheus/alerts.yml``) fire at.

Latency and memory come from the certification suite's defaults, so an alert fires where a
certificate would have failed; ``tests/test_monitoring_config.py`` checks the rules against
these values.
"""

from __future__ import annotations

from pipelines.certification.settings import CertifySettings

_CERTIFY = CertifySettings.model_fields

# A certified model's p99 latency budget, in seconds as Prometheus measures it (500 ms).
SERVING_P99_SECONDS: float = float(_CERTIFY["p99_budget_ms"].default) / 1000.0
# The fraction of a device's memory a certified engine may use at peak (0.85).
GPU_MEMORY_FRACTION: float = float(_CERTIFY["max_memory_fraction"].default)
# Failed answers (5xx and models that failed to load) over all requests. The certification suite
# has no error-rate default (it fails on any wrong answer), so the platform sets it here: 0.1%.
SERVING_ERROR_RATIO: float = 0.001
# Answers in a row over a model's latency budget (the serving process's
# r1_serving_consecutive_slow_requests) that fire an alert at once: the certification source's
# monitoring rule, which a p99 over minutes would only see later.
SLOW_STREAK: int = 5
# A queue whose depth keeps growing this long is not being drained.
QUEUE_GROWING_FOR: str = "10m"
