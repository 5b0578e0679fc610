"""The shipped Prometheus, Grafana and compose files, checked by parsing them (no Docker here):
rules and panels parse as PromQL, name only metrics the code exposes, and fire at the
certification defaults; compose mounts files that exist and runs the metrics set-up."""

from __future__ import annotations

import importlib.util
import json
import re
import types
from pathlib import Path
from types import SimpleNamespace

import promql_parser
import pytest
import yaml

from r1platform.monitoring import collectors, thresholds
from r1platform.monitoring import metrics as platform_metrics
from r1platform.serving.metrics import ServingMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALERTS = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
RULES = {rule["alert"]: rule for group in ALERTS["groups"] for rule in group["rules"]}
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "dashboards" / "r1platform.json").read_text())
# Every provisioned dashboard (r1platform-llm.json: language models, tests/test_llm_alerts.py).
DASHBOARDS = [
    json.loads(path.read_text())
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))
]
# Series the shipped recording rules make (budgets.yml), which rules and panels may read too.
RECORDED = {
    rule["record"]
    for name in PROMETHEUS["rule_files"]
    for group in yaml.safe_load((DEPLOY / "prometheus" / name).read_text())["groups"]
    for rule in group["rules"]
    if "record" in rule
}
# Series Prometheus itself makes: scrape health and the alerts' own states.
BUILTIN = {"up", "ALERTS", "ALERTS_FOR_STATE"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "gauge": ("",),
}


def exposed_series() -> set[str]:
    """Every series name the platform's /metrics and a serving process's /metrics can carry."""
    families = [
        m
        for c in (
            platform_metrics.stage_duration,
            platform_metrics.stage_runs,
            platform_metrics.jobs_finished,
        )
        for m in c.describe()
    ]
    families += list(ServingMetrics().registry.collect())
    names = {f.name + suffix for f in families for suffix in SUFFIXES[f.type]}
    return names | set(collectors.FAMILIES)


def selectors(expr: str) -> set[str]:
    found: set[str] = set()

    def visit(node) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found


def comparison(expr: str) -> tuple[str, float]:
    """The top comparison's operator and the number it compares with."""
    node = promql_parser.parse(expr)
    assert isinstance(node, promql_parser.BinaryExpr), expr
    assert isinstance(node.rhs, promql_parser.NumberLiteral), expr
    return str(node.op), node.rhs.val


def panel_targets(*dashboards: dict) -> list[tuple[dict, str]]:
    """The panels' queries, of the main dashboard unless ``dashboards`` are named."""
    return [
        (p, t["expr"])
        for dashboard in dashboards or (DASHBOARD,)
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]


# -- alert rules --------------------------------------------------------------------------------


def test_every_rule_parses_and_says_what_and_how_bad():
    assert {
        "ServingP99LatencyHigh",
        "ServingConsecutiveSlowRequests",
        "ServingErrorRateHigh",
        "GpuMemoryHigh",
        "QueueGrowing",
        "WorkerLost",
        "ServingDecodeFailures",
        "ServingTTFTP99High",
    } <= set(RULES)
    for name, rule in RULES.items():
        promql_parser.parse(rule["expr"])
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), name


def test_every_rule_names_only_metrics_the_code_exposes():
    exposed = exposed_series() | BUILTIN | RECORDED
    for name, rule in RULES.items():
        assert selectors(rule["expr"]) <= exposed, (name, selectors(rule["expr"]) - exposed)


def test_thresholds_are_the_certification_defaults():
    from pipelines.certification.settings import CertifySettings

    defaults = CertifySettings(profile="any")
    assert thresholds.SERVING_P99_SECONDS == defaults.p99_budget_ms / 1000 == 0.5
    assert thresholds.GPU_MEMORY_FRACTION == defaults.max_memory_fraction == 0.85

    p99 = RULES["ServingP99LatencyHigh"]["expr"]
    assert comparison(p99) == (">", thresholds.SERVING_P99_SECONDS)
    assert "histogram_quantile(0.99," in p99 and "r1_serving_request_seconds_bucket" in p99
    gpu = RULES["GpuMemoryHigh"]["expr"]
    assert comparison(gpu) == (">", thresholds.GPU_MEMORY_FRACTION)
    assert selectors(gpu) == {"r1_gpu_memory_used_bytes", "r1_gpu_memory_total_bytes"}
    errors = RULES["ServingErrorRateHigh"]["expr"]
    assert comparison(errors) == (">", thresholds.SERVING_ERROR_RATIO)
    assert 'status=~"5.."' in errors and "r1_serving_load_failures_total" in errors


def test_five_slow_answers_in_a_row_alert_at_once_against_the_serving_budget():
    rule = RULES["ServingConsecutiveSlowRequests"]
    assert thresholds.SLOW_STREAK == 5
    assert comparison(rule["expr"]) == (">=", thresholds.SLOW_STREAK)
    assert selectors(rule["expr"]) == {"r1_serving_consecutive_slow_requests"}
    assert rule.get("for", "0m") in {"0s", "0m"} and rule["labels"]["severity"] == "warning"
    # The serving process judges each answer against the budget the p99 alert fires at.
    assert ServingMetrics().slow_streaks.budget_seconds == thresholds.SERVING_P99_SECONDS


def test_a_queue_alert_waits_for_ten_minutes_of_growth_and_a_lost_worker_alerts():
    queue = RULES["QueueGrowing"]
    assert queue["for"] == thresholds.QUEUE_GROWING_FOR == "10m"
    assert "[10m]" in queue["expr"] and selectors(queue["expr"]) == {"r1_queue_depth"}
    assert comparison(RULES["WorkerLost"]["expr"]) == ("==", 0.0)
    assert selectors(RULES["WorkerLost"]["expr"]) == {"r1_worker_up"}


def test_prometheus_loads_the_rules_and_scrapes_web_and_serving():
    rule_files = PROMETHEUS["rule_files"]
    assert all((DEPLOY / "prometheus" / f).is_file() for f in rule_files)
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in PROMETHEUS["scrape_configs"]
    }
    assert targets["r1-platform"] == ["web:8000"]
    assert "serve-cpu:8001" in targets["r1-serving"]
    for job_targets in targets.values():
        for target in job_targets:
            assert target.split(":")[0] in COMPOSE["services"], target


# -- Grafana ------------------------------------------------------------------------------------


def test_the_dashboard_uses_the_provisioned_datasource():
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for panel in (p for dashboard in DASHBOARDS for p in dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
    for dashboard in DASHBOARDS:
        for variable in dashboard.get("templating", {}).get("list", []):
            assert variable["datasource"]["uid"] == source["uid"], variable["name"]
    assert len({d["uid"] for d in DASHBOARDS}) == len(DASHBOARDS) >= 2


def test_every_panel_parses_and_names_only_exposed_metrics():
    exposed = exposed_series() | BUILTIN | RECORDED
    for panel, expr in panel_targets(*DASHBOARDS):
        assert selectors(expr) <= exposed, (panel["title"], selectors(expr) - exposed)


def test_the_dashboard_shows_what_the_issue_asks_for():
    shown = set().union(*(selectors(expr) for _, expr in panel_targets()))
    assert {
        "r1_jobs",
        "r1_stage_duration_seconds_bucket",
        "r1_queue_depth",
        "r1_worker_up",
        "r1_worker_last_heartbeat_timestamp_seconds",
        "r1_gpu_utilization_ratio",
        "r1_gpu_memory_used_bytes",
        "r1_serving_requests_total",
        "r1_serving_request_seconds_bucket",
        "r1_serving_load_failures_total",
        "r1_serving_consecutive_slow_requests",
        "ALERTS",
    } <= shown
    exprs = " ".join(expr for _, expr in panel_targets())
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    by_title = {p["title"]: p for p in DASHBOARD["panels"]}
    assert line_at(by_title["p99 latency"]) == thresholds.SERVING_P99_SECONDS
    assert line_at(by_title["GPU memory used"]) == thresholds.GPU_MEMORY_FRACTION
    assert line_at(by_title["Error rate"]) == thresholds.SERVING_ERROR_RATIO
    assert line_at(by_title["Slow requests in a row"]) == thresholds.SLOW_STREAK


def line_at(panel: dict) -> float:
    defaults = panel["fieldConfig"]["defaults"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] == "line"
    return defaults["thresholds"]["steps"][-1]["value"]


def test_the_dashboard_provider_reads_the_folder_compose_mounts():
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "r1platform.yml").read_text()
    )["providers"][0]
    mounts = dict(
        v.rsplit(":", 2)[:2]
        for v in COMPOSE["services"]["grafana"]["volumes"]
        if v.startswith("./")
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


# -- compose ------------------------------------------------------------------------------------


def test_compose_mounts_files_that_exist():
    binds = [
        v.split(":")[0]
        for service in COMPOSE["services"].values()
        for v in service.get("volumes", [])
        if isinstance(v, str) and v.startswith("./")
    ]
    assert "./deploy/prometheus" in binds
    for source in binds:
        assert (ROOT / source).exists(), source
    prometheus = COMPOSE["services"]["prometheus"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]


def test_compose_gives_each_metrics_writer_a_folder_web_reads():
    services = COMPOSE["services"]
    folders = {
        name: s.get("environment", {}).get("PROMETHEUS_MULTIPROC_DIR")
        for name, s in services.items()
        if name in {"web", "beat"} or name.startswith("worker-")
    }
    web = folders.pop("web")
    assert web and all(folders.values()), folders
    # One folder each (a container is a PID namespace of its own), all below web's.
    assert len(set(folders.values())) == len(folders)
    assert all(f.startswith(web + "/") for f in folders.values())
    for name in ("web", "beat", "worker-cpu", "worker-gpu0"):
        assert "r1-metrics:/var/run/r1-metrics" in services[name]["volumes"], name
    assert COMPOSE["volumes"]["r1-metrics"]["driver_opts"]["type"] == "tmpfs"
    # The serving process keeps its own registry: no multiprocess folder.
    assert "PROMETHEUS_MULTIPROC_DIR" not in services["serve-cpu"].get("environment", {})
    assert services["web"]["command"][:3] == ["gunicorn", "-c", "gunicorn.conf.py"]
    # The image carries the file the command names.
    assert "gunicorn.conf.py" in (ROOT / "Dockerfile").read_text()


# -- gunicorn.conf.py ---------------------------------------------------------------------------


@pytest.fixture
def gunicorn_conf() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("gunicorn_conf", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gunicorn_wipes_its_own_files_at_start_and_marks_dead_workers(
    gunicorn_conf, tmp_path, monkeypatch
):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    (tmp_path / "counter_1.db").write_bytes(b"old run")
    (tmp_path / "worker-cpu").mkdir()
    (tmp_path / "worker-cpu" / "counter_2.db").write_bytes(b"another service's")

    gunicorn_conf.on_starting(server=None)

    assert not (tmp_path / "counter_1.db").exists()
    assert (tmp_path / "worker-cpu" / "counter_2.db").exists()
    (tmp_path / "gauge_livesum_42.db").write_bytes(b"")
    (tmp_path / "counter_42.db").write_bytes(b"")

    gunicorn_conf.child_exit(server=None, worker=types.SimpleNamespace(pid=42))

    # Its live gauges go; its counters stay, so totals never go down.
    assert not (tmp_path / "gauge_livesum_42.db").exists()
    assert (tmp_path / "counter_42.db").exists()
    assert gunicorn_conf.workers >= 1 and gunicorn_conf.bind.endswith(":8000")


def test_up_starts_everything_in_one_wiped_metrics_folder(settings, monkeypatch):
    from r1platform.core.management.commands import up

    stale = Path(settings.R1_HOME) / "metrics" / "counter_7.db"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"old run")
    envs: list[dict] = []
    monkeypatch.setattr(up, "_has_cuda", lambda: False)

    def popen(cmd, env, **kw):
        envs.append(env)
        return SimpleNamespace(pid=len(envs))

    monkeypatch.setattr(up.subprocess, "Popen", popen)

    command = up.Command()
    command._start({}, command._env("127.0.0.1", 5000), "127.0.0.1", 8000, 5000, None)

    assert not stale.exists()
    assert len(envs) >= 3  # web, worker, beat (and MLflow's UI)
    assert {env["PROMETHEUS_MULTIPROC_DIR"] for env in envs} == {str(stale.parent)}
