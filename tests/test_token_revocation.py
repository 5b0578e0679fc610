"""A token works only while its user is an active member of its team: in the API (every operation,
listed from the API itself) and in a real `manage.py serve` process, within a couple of seconds.
The serving process's /metrics wants the metrics token (or a team token: its own models only).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path

import onnxruntime as ort
import pytest
import requests
from django.contrib.auth import get_user_model

from r1platform.accounts.models import ApiToken, Membership, Team, hash_token
from r1platform.api.api import api as platform_api
from r1platform.deployments.models import ServingPool
from r1platform.jobs.models import Job
from r1platform.registry.models import RegisteredModel
from r1platform.schedules.models import PipelineTemplate
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from r1platform.serving.tokens import TokenCache, TokensUnavailable
from r1platform.workers.models import HardwareProfile
from tests.conftest import ROOT, platform_env
from tests.test_serving import eventually, spec
from tests.test_serving_deployments import POOL, X, _free_port, deploy, infer, upload

# No broker here: every job these tests queue is recorded by ``enqueued`` (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("enqueued")

METRICS_TOKEN = "scrape-secret"


def remove_member(user, team: Team) -> None:
    Membership.objects.filter(user=user, team=team).delete()


def deactivate(user, team: Team) -> None:
    user.is_active = False
    user.save()  # as the admin does


def deactivate_in_bulk(user, team: Team) -> None:
    get_user_model().objects.filter(pk=user.pk).update(is_active=False)  # no signal sent


LOSSES: dict[str, Callable[[object, Team], None]] = {
    "member removed": remove_member,
    "user deactivated": deactivate,
    "user deactivated by a bulk update": deactivate_in_bulk,
}


# -- the rule --------------------------------------------------------------------------------------


def test_a_token_is_usable_while_its_user_is_an_active_member(user, team, other_team):
    token, _ = ApiToken.issue(user, team)
    elsewhere, _ = ApiToken.issue(user, other_team)  # never a member of team B
    assert list(ApiToken.objects.usable()) == [token]

    remove_member(user, team)
    token.refresh_from_db()
    assert not ApiToken.objects.usable().exists()
    assert token.revoked_at is not None  # shown revoked in the admin
    Membership.objects.create(user=user, team=team)  # rejoining does not bring old tokens back
    assert not ApiToken.objects.usable().exists()

    fresh, _ = ApiToken.issue(user, team)
    assert list(ApiToken.objects.usable()) == [fresh]
    deactivate(user, team)
    assert not ApiToken.objects.usable().exists()
    assert elsewhere.pk  # never usable (not a member of team B), and now revoked as well:
    assert not ApiToken.objects.filter(user=user, revoked_at__isnull=True).exists()


def test_leaving_one_team_keeps_the_tokens_of_another(user, team, other_team):
    Membership.objects.create(user=user, team=other_team)
    ApiToken.issue(user, team)
    kept, _ = ApiToken.issue(user, other_team)
    remove_member(user, team)
    assert list(ApiToken.objects.usable()) == [kept]


def test_the_admin_revokes_tokens_and_the_api_refuses_them(admin_client, client, token):
    chosen = ApiToken.objects.get()
    answer = admin_client.post(
        "/admin/accounts/apitoken/",
        {"action": "revoke", "_selected_action": [chosen.pk]},
        follow=True,
    )
    assert b"1 token(s) revoked" in answer.content
    assert ApiToken.objects.get().revoked_at is not None
    assert client.get("/api/v1/models", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 401


# -- the API: every operation ----------------------------------------------------------------------


def api_operations() -> list[tuple[str, str]]:
    """(method, path) of every API operation, from the API's own schema; ids are 1."""
    paths = platform_api.get_openapi_schema()["paths"]
    found = []
    for path, operations in paths.items():
        for method in operations:
            found.append((method.upper(), path.replace("{", "").replace("}", "")))
    return [
        (m, "/".join("1" if p.endswith("_id") else p for p in path.split("/"))) for m, path in found
    ]


def call(client, method: str, path: str, token: str):
    return client.generic(
        method, path, "{}", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}"
    )


def test_it_lists_every_api_operation():
    operations = api_operations()
    assert len(operations) >= 44
    assert ("DELETE", "/api/v1/templates/1") in operations
    assert ("POST", "/api/v1/models") in operations


@pytest.mark.parametrize("loss", LOSSES)
def test_every_api_operation_refuses_the_token_once_its_user_lost_access(
    client, user, team, token, loss
):
    operations = api_operations()
    before = {op: call(client, *op, token).status_code for op in operations}
    assert [op for op, code in before.items() if code == 401] == []

    LOSSES[loss](user, team)

    after = {op: call(client, *op, token).status_code for op in operations}
    assert {op: code for op, code in after.items() if code != 401} == {}


@pytest.mark.parametrize("loss", LOSSES)
def test_reads_uploads_launches_and_deletes_stop_working(client, user, team, token, mlp_onnx, loss):
    auth = {"HTTP_AUTHORIZATION": f"Bearer {token}"}

    def upload_model(name: str):
        with open(mlp_onnx, "rb") as f:
            return client.post(
                "/api/v1/models", {"name": name, "task": "classification", "file": f}, **auth
            )

    def launch(version_id: int):
        body = {"version_id": version_id}
        return client.post("/api/v1/jobs", body, content_type="application/json", **auth)

    def template() -> PipelineTemplate:
        stages = [{"name": "benchmark", "settings": {}}]
        return PipelineTemplate.objects.create(team=team, name="t", stages=stages)

    made = upload_model("revoked-mlp")  # on-commit work (the MLflow mirror) never runs here
    assert made.status_code == 201, made.content
    model_id, version_id = made.json()["id"], made.json()["versions"][0]["id"]
    doomed = template()
    operations: dict[str, Callable[[], object]] = {
        "list models": lambda: client.get("/api/v1/models", **auth),
        "read a model": lambda: client.get(f"/api/v1/models/{model_id}", **auth),
        "read a version": lambda: client.get(f"/api/v1/versions/{version_id}", **auth),
        "list jobs": lambda: client.get("/api/v1/jobs", **auth),
        "upload": lambda: upload_model(f"m{time.monotonic_ns()}"),
        "launch": lambda: launch(version_id),
        "delete a template": lambda: client.delete(f"/api/v1/templates/{doomed.pk}", **auth),
    }
    worked = {name: op().status_code for name, op in operations.items()}
    assert all(200 <= code < 300 for code in worked.values()), worked

    doomed = template()
    models, jobs = RegisteredModel.objects.count(), Job.objects.count()
    LOSSES[loss](user, team)

    refused = {name: op().status_code for name, op in operations.items()}
    assert refused == dict.fromkeys(operations, 401)
    assert RegisteredModel.objects.count() == models and Job.objects.count() == jobs
    assert PipelineTemplate.objects.filter(pk=doomed.pk).exists()


# -- a real serving process ------------------------------------------------------------------------


@pytest.fixture
def pool(transactional_db) -> ServingPool:
    """A CPU pool; the serving process reads the test database from its own connection."""
    profile = HardwareProfile.objects.create(
        key="onnxruntime-cpu-test",
        backend="onnxruntime",
        backend_version=ort.__version__,
        device_kind="cpu",
        device_name="test cpu",
    )
    return ServingPool.objects.create(name=POOL, profile=profile, max_queue_delay_ms=2)


@pytest.fixture
def serve_process(pool, tmp_path) -> Iterator[str]:
    """`manage.py serve` for POOL, polling every 0.2 s, with a metrics token; its URL."""
    port = _free_port()
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "manage.py", "serve", "--pool", POOL, "--port", str(port)]
    cmd += ["--poll-seconds", "0.2"]
    env = platform_env(R1_METRICS_TOKEN=METRICS_TOKEN)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return requests.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
            except requests.ConnectionError:
                return False

        eventually(ready, timeout=60)
        yield url
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def refused_within(seconds: float, check: Callable[[], int]) -> float:
    """How long it took ``check`` to answer 401 (fails past ``seconds``)."""
    started = time.monotonic()
    eventually(lambda: check() == 401, timeout=seconds)
    return time.monotonic() - started


def test_the_serving_process_refuses_tokens_of_removed_members_and_deactivated_users(
    pool, team, user, token, mlp_onnx, django_user_model, request
):
    deploy(upload(team, user, "mlp", mlp_onnx), pool)
    carol = django_user_model.objects.create_user("carol", password="pw-carol-123")
    Membership.objects.create(team=team, user=carol)
    carols = ApiToken.issue(carol, team)[1]
    url = request.getfixturevalue("serve_process")

    assert infer(url, token, "mlp", X).status_code == 200
    assert infer(url, carols, "mlp", X).status_code == 200

    remove_member(user, team)
    assert refused_within(3, lambda: infer(url, token, "mlp", X).status_code) < 3
    refused = infer(url, token, "mlp", X)
    assert "left the team" in refused.json()["error"]
    metadata = requests.get(f"{url}/v2/models/mlp", headers={"Authorization": f"Bearer {token}"})
    assert metadata.status_code == 401
    assert infer(url, carols, "mlp", X).status_code == 200  # the others go on

    deactivate(carol, team)
    assert refused_within(3, lambda: infer(url, carols, "mlp", X).status_code) < 3


def test_the_serving_metrics_need_a_token(
    pool, team, user, token, outsider_token, mlp_onnx, request
):
    deploy(upload(team, user, "mlp", mlp_onnx), pool)
    url = request.getfixturevalue("serve_process")
    assert infer(url, token, "mlp", X).status_code == 200

    def scrape(bearer: str | None) -> requests.Response:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        return requests.get(f"{url}/metrics", headers=headers, timeout=5)

    assert scrape(None).status_code == 401
    assert "team-a" not in scrape(None).text
    assert scrape("not-the-token").status_code == 401
    everything = scrape(METRICS_TOKEN)
    assert everything.status_code == 200
    assert (
        'model="team-a/mlp"' in everything.text and "r1_serving_models_ready 1.0" in everything.text
    )
    own = scrape(token)
    assert own.status_code == 200 and 'model="team-a/mlp"' in own.text
    other = scrape(outsider_token)  # team B's token: no series of team A's models
    assert other.status_code == 200 and "team-a" not in other.text


# -- the serving process when the tokens cannot be read --------------------------------------------


class FailingTokens(StaticModelSource):
    """A static source whose token reads fail once ``down`` is set, as a lost database would."""

    down = False

    def token_teams(self) -> dict[str, int]:
        if self.down:
            raise ConnectionError("the database is unreachable")
        return super().token_teams()


def test_serving_refuses_every_token_once_the_tokens_are_too_old(mlp_onnx: Path):
    source = FailingTokens([spec(1, "mlp", mlp_onnx)], {"team-token": 1})
    options = ServingOptions(poll_seconds=0.1, token_max_age_seconds=1.0, metrics_token="m")
    app = build_app(source, options)
    headers = {"Authorization": "Bearer team-token"}
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        tensor = {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}
        body = {"inputs": [tensor]}

        def answer() -> requests.Response:
            return requests.post(f"{url}/v2/models/mlp/infer", json=body, headers=headers)

        assert answer().status_code == 200
        source.down = True
        time.sleep(0.5)
        assert answer().status_code == 200  # within the allowed age: the last list serves
        eventually(lambda: answer().status_code == 503, timeout=3)
        assert "database is unreachable" in answer().json()["error"]
        metrics = requests.get(f"{url}/metrics", headers={"Authorization": "Bearer m"})
        assert metrics.status_code == 200  # the scrape does not depend on the database
        source.down = False
        eventually(lambda: answer().status_code == 200, timeout=3)


def test_the_token_cache_refuses_when_unread_or_too_old():
    now = [100.0]
    cache = TokenCache(max_age=30, clock=lambda: now[0])
    with pytest.raises(TokensUnavailable, match="not been read"):
        cache.team_for("r1_x")
    cache.replace({hash_token("r1_x"): 7})
    now[0] += 29
    assert cache.team_for("r1_x") == 7 and cache.team_for("r1_y") is None
    now[0] += 2
    with pytest.raises(TokensUnavailable, match="could not be checked for 31 s"):
        cache.team_for("r1_x")
