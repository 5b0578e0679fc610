"""The language-model alert rules, budgets and dashboard against the series a real serving process
exposes.

A real serving app (uvicorn on loopback, a static model list) serves a tiny random Llama and the
same Llama with NaN in its output layer, whose first request fails to decode in the engine (a
real decode failure, answered 500; the engine then stops taking requests, 503). ``/metrics`` is
scraped once, with the target labels ``deploy/prometheus/prometheus.yml`` gives it. Prometheus's
own rule tester (``promtool``, where installed) then runs the shipped ``alerts.yml`` and
``budgets.yml`` on series that repeat that traffic every minute, and on series changed from it
where a test needs a boundary (a failure ratio just under or over 0.1%, requests slower than the
time-to-first-token budget). The rules' shape and numbers are checked without promtool.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import promql_parser
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipelines.certification.settings import CertifySettings
from r1platform.monitoring import thresholds
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from tests.llm_fixtures import tiny_llama
from tests.test_monitoring_config import exposed_series, selectors
from tests.test_serving_openai import METRICS, TEAM_A, A, text_spec
from tests.test_slow_streak_alert import serving_target

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS_FILE, BUDGETS_FILE = PROMETHEUS / "alerts.yml", PROMETHEUS / "budgets.yml"
RULES = {
    rule["alert"]: rule
    for group in yaml.safe_load(ALERTS_FILE.read_text())["groups"]
    for rule in group["rules"]
}
DECODE, TTFT = RULES["ServingDecodeFailures"], RULES["ServingTTFTP99High"]
(BUDGET,) = [r for g in yaml.safe_load(BUDGETS_FILE.read_text())["groups"] for r in g["rules"]]
DASHBOARD = json.loads((ROOT / "deploy/grafana/dashboards/r1platform-llm.json").read_text())
BUCKETS = "r1_serving_time_to_first_token_seconds_bucket"
FAILURES, REQUESTS = "r1_serving_decode_failures_total", "r1_serving_requests_total"
READY = "r1_serving_models_ready"
MINUTES = 12
# A random model's bytes are often not UTF-8 (a decode failure, rightly); this prompt's greedy
# continuation on the tiny Llama is plain ASCII.
VALID_PROMPT = "perplexity is"

Sample = tuple[str, dict[str, str], float]


# -- the rules' shape and numbers ------------------------------------------------------------------


def test_thresholds_are_the_certification_defaults_for_language_models():
    defaults = CertifySettings(profile="any")
    assert thresholds.DECODE_FAILURE_RATIO == defaults.max_decode_failure_rate == 0.001
    assert defaults.ttft_p99_budget_ms / 1000 == thresholds.SERVING_TTFT_P99_SECONDS
    assert defaults.tpot_budget_ms / 1000 == thresholds.SERVING_TPOT_SECONDS


def test_decode_failures_are_judged_per_version_over_five_minutes_against_the_ceiling():
    node = promql_parser.parse(DECODE["expr"])
    assert str(node.op) == ">" and node.rhs.val == thresholds.DECODE_FAILURE_RATIO
    assert selectors(DECODE["expr"]) == {FAILURES, REQUESTS}
    assert DECODE["expr"].count("[5m]") == 2 and 'status!~"4.."' in DECODE["expr"]
    assert "by (instance, pool, model, version)" in DECODE["expr"]
    assert DECODE.get("for", "0m") == "0m" and DECODE["labels"]["severity"] == "critical"


def test_ttft_p99_is_compared_with_its_pools_recorded_budget():
    node = promql_parser.parse(TTFT["expr"])
    assert str(node.op) == ">" and isinstance(node.rhs, promql_parser.VectorSelector)
    assert node.rhs.name == BUDGET["record"] == "pool:r1_serving_ttft_p99_budget_seconds"
    # group_left on the pool: many model versions, one budget per pool.
    assert node.modifier.card == promql_parser.VectorMatchCardinality.ManyToOne
    assert str(node.modifier.matching) == "on (pool)"
    assert "histogram_quantile(0.99," in TTFT["expr"] and BUCKETS in TTFT["expr"]
    assert TTFT["for"] == "5m" and TTFT["labels"]["severity"] == "warning"
    # The default every pool gets is the certification's budget, from a series every pool has.
    budget = promql_parser.parse(BUDGET["expr"])
    assert str(budget.op) == "+" and budget.rhs.val == thresholds.SERVING_TTFT_P99_SECONDS
    assert selectors(BUDGET["expr"]) == {READY} <= exposed_series()
    assert (
        "budgets.yml" in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["rule_files"]
    )


def test_the_language_model_dashboard_shows_each_number_per_model_and_version():
    panels = {p["title"]: p for p in DASHBOARD["panels"] if p["type"] != "row"}
    exprs = {title: [t["expr"] for t in p["targets"]] for title, p in panels.items()}
    shown = " ".join(e for es in exprs.values() for e in es)
    for quantile in ("0.5", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (pool, model, version, le) (rate({BUCKETS}"
            in shown
        )
    assert BUDGET["record"] in " ".join(exprs["Time to first token p99"])
    assert "r1_serving_time_per_output_token_seconds_bucket" in shown
    assert "rate(r1_serving_generated_tokens_total" in " ".join(exprs["Output tokens per second"])
    assert selectors(exprs["Decode failure rate"][0]) == {FAILURES, REQUESTS}
    assert "r1_serving_decode_batch_size_sum" in " ".join(exprs["Decode batch size"])
    assert line_at(panels["Decode failure rate"]) == thresholds.DECODE_FAILURE_RATIO
    assert line_at(panels["Time per output token"]) == thresholds.SERVING_TPOT_SECONDS
    text_series = {n for n in exposed_series() if n.startswith(TEXT_PREFIXES)}
    for title, panel_exprs in exprs.items():
        for expr in panel_exprs:
            read = selectors(expr) & text_series
            if read:
                assert 'model=~"$model"' in expr and 'pool=~"$pool"' in expr, title
            if read and not any("decode_batch_size" in name for name in read):
                # Per model and version (the engine's batch size has no version of its own).
                assert "by (pool, model, version" in expr, title
    for variable in DASHBOARD["templating"]["list"]:
        (metric,) = re.findall(r"label_values\((\w+)", variable["definition"])
        assert metric in exposed_series(), variable["name"]


TEXT_PREFIXES = (
    "r1_serving_time_to_first_token",
    "r1_serving_time_per_output_token",
    "r1_serving_generation_seconds",
    "r1_serving_generated_tokens",
    "r1_serving_prompt_tokens",
    "r1_serving_decode_",
)


def line_at(panel: dict) -> float:
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] == "line"
    return defaults["thresholds"]["steps"][-1]["value"]


# -- the rules on a real serving process's series -------------------------------------------------


def nan_llama(folder: Path) -> Path:
    """A tiny Llama whose output layer is NaN: the engine's sampler fails on its first step."""
    from safetensors.torch import load_file, save_file

    tiny_llama(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"][:] = float("nan")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> list[Sample]:
    """One scrape of a real serving app after some good, bad and failing generations."""
    models = [
        text_spec(TEAM_A, "llm", tiny_llama(tmp_path_factory.mktemp("llm") / "m")),
        text_spec(TEAM_A, "nan", nan_llama(tmp_path_factory.mktemp("nan") / "m")),
    ]
    source = StaticModelSource(models, {"token-a": TEAM_A})
    app = build_app(source, ServingOptions(poll_seconds=0.2, metrics_token="scrape"))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)

        def generate(model: str, route: str = "generate", **parameters) -> int:
            parameters = {"max_tokens": 8, "temperature": 0} | parameters
            body = {"text_input": VALID_PROMPT, "parameters": parameters}
            answer = requests.post(
                f"{url}/v2/models/{model}/{route}", json=body, headers=A, timeout=60
            )
            return answer.status_code

        assert [generate("llm", max_tokens=4 + i) for i in range(4)] == [200] * 4
        assert [generate("llm", "generate_stream") for _ in range(2)] == [200] * 2
        assert generate("llm", max_tokens=0) == 400
        runtime = app.state.runtime
        first = runtime.lookup(TEAM_A, "nan").text
        assert generate("nan") == 500  # the NaN reached the sampler: a decode failure
        # Its engine's loop died with it: the poller loads the model again, and the new engine
        # decodes (and fails) the next request.
        deadline = time.monotonic() + 30
        while runtime.lookup(TEAM_A, "nan").text is first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runtime.lookup(TEAM_A, "nan").text is not first
        assert generate("nan") == 500
        text = requests.get(f"{url}/metrics", headers=METRICS, timeout=10).text
    target = serving_target()
    return [
        (s.name, {**s.labels, **target}, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def pick(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [s for s in samples if s[0] == name and labels.items() <= s[1].items()]


def test_the_scrape_holds_what_the_rules_read(scrape):
    llm, nan = {"model": "team-1/llm"}, {"model": "team-1/nan"}
    # The healthy version's failure series exists at 0, so rate() would see its first failure.
    assert [v for *_, v in pick(scrape, FAILURES, **llm)] == [0.0]
    assert [v for *_, v in pick(scrape, FAILURES, **nan)] == [2.0]
    statuses = {s[1]["status"]: s[2] for s in pick(scrape, REQUESTS, **nan)}
    assert statuses == {"500": 2.0}
    assert pick(scrape, BUCKETS, le="+Inf", **llm)[0][2] == 6.0
    assert not pick(scrape, BUCKETS, **nan)  # it never produced a first token


def series(samples: list[Sample]) -> list[dict[str, str]]:
    """promtool input series: each sample's value added again every minute (counters)."""
    return [
        {
            "series": name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}",
            "values": f"0+{value:g}x{MINUTES}",
        }
        for name, labels, value in samples
    ]


def gauges(samples: list[Sample]) -> list[dict[str, str]]:
    """promtool input series: each gauge's value held for every minute."""
    return [
        {
            "series": name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}",
            "values": f"{value:g}x{MINUTES}",
        }
        for name, labels, value in samples
    ]


def expected(rule: dict, labels: dict[str, str], value: float) -> dict:
    shown = {k: labels[k] for k in ("instance", "pool", "model", "version")}
    annotations = {k: render(v, shown, value) for k, v in rule["annotations"].items()}
    return {"exp_labels": {**shown, **rule["labels"]}, "exp_annotations": annotations}


def render(template: str, labels: dict[str, str], value: float) -> str:
    """The annotation as Prometheus writes it (only the functions these rules use)."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    text = text.replace("{{ $value | humanizePercentage }}", f"{value * 100:.4g}%")
    if "humanizeDuration" in text:
        assert 1 <= value < 60, "a duration this test cannot render"
        text = text.replace("{{ $value | humanizeDuration }}", f"{value:.4g}s")
    assert "{{" not in text, f"a template this test cannot render: {template}"
    return text


def promtool(tmp_path: Path, input_series: list, checks: list, budgets: Path = BUDGETS_FILE):
    """Prometheus's own rule tester on the shipped rules, one evaluation a minute."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    tests = {
        "rule_files": [str(ALERTS_FILE), str(budgets)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": checks}],
    }
    path = tmp_path / "llm_alerts_test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    done = subprocess.run(
        [binary, "test", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def check(at: str, rule: str, alerts: list) -> dict:
    return {"eval_time": at, "alertname": rule, "exp_alerts": alerts}


def test_promtool_fires_decode_failures_for_the_failing_version_only(scrape, tmp_path):
    nan = pick(scrape, FAILURES, model="team-1/nan")[0][1]
    counted = pick(scrape, FAILURES) + pick(scrape, REQUESTS) + pick(scrape, BUCKETS)
    checks = [
        check("10m", "ServingDecodeFailures", [expected(DECODE, nan, 1.0)]),
        # The healthy model decoded everything, quickly: neither rule fires for it.
        check("10m", "ServingTTFTP99High", []),
    ]
    promtool(tmp_path, series(counted) + gauges(pick(scrape, READY)), checks)


def test_promtool_judges_decode_failures_against_0_1_percent_of_decodes(scrape, tmp_path):
    """Version 1: 1 failure in 2,000 answers (quiet); version 2: 3 in 1,000 (fires), with
    20,000 refusals a minute that would hide them if 4xx counted."""
    (llm,) = [s[1] for s in pick(scrape, FAILURES, model="team-1/llm")]

    def at(version: str, **extra: str) -> dict[str, str]:
        return {**llm, "version": version, **extra}

    traffic = [
        (FAILURES, at("1"), 1.0),
        (REQUESTS, at("1", status="200"), 1999.0),
        (REQUESTS, at("1", status="500"), 1.0),
        (FAILURES, at("2"), 3.0),
        (REQUESTS, at("2", status="200"), 997.0),
        (REQUESTS, at("2", status="500"), 3.0),
        (REQUESTS, at("2", status="400"), 20000.0),
    ]
    checks = [check("10m", "ServingDecodeFailures", [expected(DECODE, at("2"), 0.003)])]
    promtool(tmp_path, series(traffic), checks)


def slow_ttft(scrape: list[Sample]) -> list[Sample]:
    """The healthy model's real TTFT buckets with one more request a minute over 10 s: more than
    1% over the last finite bucket, so the p99 is that bucket's bound, 10 s."""
    buckets = pick(scrape, BUCKETS, model="team-1/llm")
    return [(n, labels, v + (labels["le"] == "+Inf")) for n, labels, v in buckets]


def test_promtool_fires_ttft_p99_over_the_pool_budget_after_five_minutes(scrape, tmp_path):
    slow = slow_ttft(scrape)
    labels = slow[0][1]
    checks = [
        check("4m", "ServingTTFTP99High", []),  # pending
        check("10m", "ServingTTFTP99High", [expected(TTFT, labels, 10.0)]),
    ]
    promtool(tmp_path, series(slow) + gauges(pick(scrape, READY)), checks)


def test_a_pool_with_a_budget_of_its_own_is_held_to_it(scrape, tmp_path):
    """The override budgets.yml documents: the pool's own 12 s budget replaces the default."""
    pool = serving_target()["pool"]
    rules = yaml.safe_load(BUDGETS_FILE.read_text())
    own = f'label_replace(vector(12), "pool", "{pool}", "", "") or on (pool) ({BUDGET["expr"]})'
    rules["groups"][0]["rules"][0]["expr"] = own
    budgets = tmp_path / "budgets.yml"
    budgets.write_text(yaml.safe_dump(rules))
    checks = [check("10m", "ServingTTFTP99High", [])]
    promtool(tmp_path, series(slow_ttft(scrape)) + gauges(pick(scrape, READY)), checks, budgets)


def test_the_metrics_the_rules_read_are_the_ones_serving_exposes():
    names = {f.name for f in ServingMetrics().registry.collect()}
    assert {"r1_serving_decode_failures", "r1_serving_time_to_first_token_seconds"} <= names
    for rule in (DECODE, TTFT):
        assert selectors(rule["expr"]) - {BUDGET["record"]} <= exposed_series()
