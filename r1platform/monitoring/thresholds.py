"""The numbers the shipped alert rules (``deploy/prometheus/alerts.yml``) fire at.

Latency, memory, time to first token and decode failures come from the certification suite's
defaults, so an alert fires where a certificate would have failed;
``tests/test_monitoring_config.py`` and ``tests/test_llm_alerts.py`` check the rules against
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

# -- language models (the serving process's text metrics) ------------------------------------------
# Generation requests that failed to decode (an engine error, a NaN, invalid UTF-8) over the text
# requests the model answered or failed (refusals of bad input excluded): the certification's
# ceiling (0.1%), as ServingDecodeFailures judges it over 5 minutes.
DECODE_FAILURE_RATIO: float = float(_CERTIFY["max_decode_failure_rate"].default)
# Time to first token, p99, in seconds (2 s): every pool's budget unless it has one of its own in
# deploy/prometheus/budgets.yml (pool:r1_serving_ttft_p99_budget_seconds, which
# ServingTTFTP99High compares with).
SERVING_TTFT_P99_SECONDS: float = float(_CERTIFY["ttft_p99_budget_ms"].default) / 1000.0
# Time per output token after the first (a request's mean), p99, in seconds (250 ms): the line on
# the dashboard's TPOT panel.
SERVING_TPOT_SECONDS: float = float(_CERTIFY["tpot_budget_ms"].default) / 1000.0
