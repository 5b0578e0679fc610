"""``ServingConsecutiveSlowRequests`` against the series a real serving process exposes.

A real serving app (uvicorn on loopback, a static model list) answers 4 slow requests, 1 fast,
5 slow, then one bad request (400), and then stops serving the model; ``/metrics`` is scraped
after each step, with the target labels ``deploy/prometheus/prometheus.yml`` gives it. The shipped
rule is evaluated on each scrape by a small evaluator for its one shape (``max by (...) (gauge)
>= n``, parsed with ``promql_parser``, so a rule of another shape fails here), and, where
``promtool`` is installed, by Prometheus's own rule tester on the same series.

Slow and fast come from the batcher, not from sleeping: the model batches up to 4 rows and waits
up to 250 ms for them, so a 1-row request waits the full 250 ms and a 4-row request runs at once.
The budget is set to 100 ms, between the two.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import promql_parser
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from r1platform.monitoring import thresholds
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.metrics import ServingMetrics, SlowStreaks
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from tests.test_serving import (
    METRICS_TOKEN,
    TEAM_A,
    TOKEN_A,
    A,
    eventually,
    mlp_request,
    rows,
    spec,
)

ROOT = Path(__file__).resolve().parent.parent
ALERTS_FILE = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULES = {
    rule["alert"]: rule
    for group in yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    for rule in group["rules"]
}
RULE = RULES["ServingConsecutiveSlowRequests"]
GAUGE = "r1_serving_consecutive_slow_requests"
MODEL = "team-1/mlp"
BUDGET_SECONDS = 0.1
BATCH_WAIT_MS = 250.0
# The steps the serving app is driven through, and what the gauge reads after each.
STEPS = ["slow"] * 4 + ["fast"] + ["slow"] * 5 + ["bad", "undeployed"]
EXPECTED = [1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 5, None]
FIRES = [False] * 9 + [True, True, False]


def serving_target() -> dict[str, str]:
    """The labels Prometheus gives the first serving target: job, instance and its pool."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "r1-serving"]
    static = job["static_configs"][0]
    return {"job": job["job_name"], "instance": static["targets"][0], **static["labels"]}


Sample = tuple[str, dict[str, str], float]


def scrape(url: str) -> list[Sample]:
    """Every sample of the serving process's /metrics, with the target's labels added."""
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    text = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
    target = serving_target()
    return [
        (s.name, {**s.labels, **target}, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def gauge(samples: list[Sample]) -> float | None:
    values = [v for name, labels, v in samples if name == GAUGE and labels["model"] == MODEL]
    assert len(values) <= 1
    return values[0] if values else None


def fire(expr: str, samples: list[Sample]) -> dict[tuple[str, ...], float]:
    """The alerts ``expr`` raises on one scrape, by their labels: ``max by (...) (gauge) >= n``."""
    node = promql_parser.parse(expr)
    assert isinstance(node, promql_parser.BinaryExpr) and str(node.op) == ">=", expr
    assert node.modifier is None and isinstance(node.rhs, promql_parser.NumberLiteral), expr
    aggregate = node.lhs
    assert isinstance(aggregate, promql_parser.AggregateExpr) and str(aggregate.op) == "max"
    assert aggregate.modifier.type == promql_parser.AggModifierType.By and aggregate.param is None
    selector = aggregate.expr
    assert isinstance(selector, promql_parser.VectorSelector), expr
    assert not selector.matchers.matchers and selector.offset is None and selector.at is None
    by = aggregate.modifier.labels
    groups: dict[tuple[str, ...], float] = {}
    for name, labels, value in samples:
        if name == selector.name:
            key = tuple(labels.get(label, "") for label in by)
            groups[key] = max(groups.get(key, -math.inf), value)
    return {key: value for key, value in groups.items() if value >= node.rhs.val}


@pytest.fixture(scope="module")
def scrapes(mlp_onnx) -> list[list[Sample]]:
    """One scrape after each of STEPS, from a real serving app."""
    model = spec(TEAM_A, "mlp", mlp_onnx, max_batch_size=4, max_queue_delay_ms=BATCH_WAIT_MS)
    source = StaticModelSource([model], {TOKEN_A: TEAM_A})
    app = build_app(source, ServingOptions(poll_seconds=0.1, metrics_token=METRICS_TOKEN))
    app.state.metrics.slow_streaks.budget_seconds = BUDGET_SECONDS
    infer, ready = f"/v2/models/{model.name}/infer", f"/v2/models/{model.name}/ready"
    bodies = {"slow": mlp_request(rows(1, 1)), "fast": mlp_request(rows(2, 4)), "bad": {}}
    recorded: list[list[Sample]] = []
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)

        def gone() -> bool:
            return requests.get(url + ready, headers=A, timeout=10).status_code == 404

        for step in STEPS:
            if step == "undeployed":
                source.set_models([])
                eventually(gone)
            else:
                answer = requests.post(url + infer, json=bodies[step], headers=A, timeout=10)
                assert answer.status_code == (400 if step == "bad" else 200), answer.text
            recorded.append(scrape(url))
    return recorded


def test_the_gauge_counts_slow_answers_in_a_row_and_a_fast_one_resets_it(scrapes):
    assert [gauge(samples) for samples in scrapes] == EXPECTED


def test_the_rule_fires_only_from_the_fifth_slow_answer_in_a_row(scrapes):
    assert RULE["expr"].strip().endswith(f">= {thresholds.SLOW_STREAK}")
    alerts = [fire(RULE["expr"], samples) for samples in scrapes]
    assert [bool(a) for a in alerts] == FIRES
    target = serving_target()
    assert alerts[9] == {(target["instance"], target["pool"], MODEL): thresholds.SLOW_STREAK}


def test_promtool_fires_the_shipped_rule_on_the_recorded_series(scrapes, tmp_path):
    """Prometheus's own rule tester, one evaluation a minute over one sample a minute."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    labels = {**serving_target(), "model": MODEL}
    values = [gauge(samples) for samples in scrapes]
    series = GAUGE + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    checks = []
    for minute, value in enumerate(values):
        expected = []
        if FIRES[minute]:
            shown = {k: labels[k] for k in ("instance", "pool", "model")}
            annotations = {k: _render(v, shown, value) for k, v in RULE["annotations"].items()}
            expected = [{"exp_labels": {**shown, **RULE["labels"]}, "exp_annotations": annotations}]
        checks.append(
            {
                "eval_time": f"{minute}m",
                "alertname": "ServingConsecutiveSlowRequests",
                "exp_alerts": expected,
            }
        )
    tests = {
        "rule_files": [str(ALERTS_FILE)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": series,
                        "values": " ".join("stale" if v is None else f"{v:g}" for v in values),
                    }
                ],
                "alert_rule_test": checks,
            }
        ],
    }
    path = tmp_path / "slow_streak_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _render(template: str, labels: dict[str, str], value: float | None) -> str:
    """The annotation as Prometheus writes it: only ``$labels.x`` and ``$value`` are used."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    text = text.replace("{{ $value }}", f"{value:g}")
    assert "{{" not in text, f"a template this test cannot render: {template}"
    return text


# -- the streak alone ------------------------------------------------------------------------------


def test_it_counts_only_answers_so_failures_neither_extend_nor_break_a_streak():
    streaks = SlowStreaks(budget_seconds=0.5)
    for status, seconds in [(200, 0.6), (200, 0.7), (500, 0.1), (503, 9.0), (400, 0.0)]:
        streaks.observe("team-1/mlp", status, seconds)
    streaks.observe("team-1/other", 200, 0.5)  # on the budget is within it
    shown = {s.labels["model"]: s.value for s in next(iter(streaks.collect())).samples}
    assert shown == {"team-1/mlp": 2, "team-1/other": 0}
    streaks.observe("team-1/mlp", 200, 0.1)
    streaks.forget("team-1/other")
    shown = {s.labels["model"]: s.value for s in next(iter(streaks.collect())).samples}
    assert shown == {"team-1/mlp": 0}


def test_the_default_budget_is_the_certified_p99_and_a_team_sees_only_its_streaks():
    metrics = ServingMetrics()
    assert metrics.slow_streaks.budget_seconds == thresholds.SERVING_P99_SECONDS == 0.5
    metrics.slow_streaks.observe("team-1/mlp", 200, 0.6)
    metrics.slow_streaks.observe("team-2/mlp", 200, 0.6)
    own = metrics.exposition(["team-1"]).decode()
    assert f'{GAUGE}{{model="team-1/mlp"}} 1.0' in own and "team-2" not in own
    assert f'{GAUGE}{{model="team-2/mlp"}} 1.0' in metrics.exposition().decode()
