"""Every dashboard URL, walked from the resolver: anonymous users are sent to log in, members of
another team get 404 for team A's objects, team A's members get the page, and no POST gets past
CSRF without the token.

A new URL pattern is picked up automatically; one with an argument this file cannot fill fails
the test until it is taught below (``OBJECT_FOR``), so no page goes unchecked.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from django.conf import settings
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.urls.resolvers import RoutePattern

from r1platform.accounts.models import ApiToken
from r1platform.certification.models import Certification, CertStatus
from r1platform.core import storage
from r1platform.datasets.models import Dataset
from r1platform.deployments.models import PromotionRequest, ServingPool
from r1platform.jobs.models import Job, JobStatus
from r1platform.registry.models import RegisteredModel
from r1platform.registry.services import register_version
from r1platform.schedules.models import PipelineTemplate, Schedule
from r1platform.workers.models import HardwareProfile
from tests.certification_data import suite_report

SKIPPED_PREFIXES = ("admin/", "api/")  # covered by Django's admin and tests/test_api.py
# /metrics is for Prometheus, not a dashboard page: no login, an optional bearer token of its
# own (tests/test_metrics.py checks that rule).
SKIPPED_NAMES = {"login", "logout", "metrics", "favicon"}


@dataclass(frozen=True)
class Route:
    name: str  # "namespace:name"
    route: str  # the full pattern, for messages
    kwargs: tuple[str, ...]  # the converters' argument names


def dashboard_routes() -> list[Route]:
    """Every named URL pattern of the site, recursively, except admin, API, login and logout."""
    found: list[Route] = []

    def walk(patterns, prefix: str, namespace: str) -> None:
        for p in patterns:
            route = prefix + str(p.pattern)
            if route.startswith(SKIPPED_PREFIXES):
                continue
            if isinstance(p, URLResolver):
                ns = f"{namespace}{p.namespace}:" if p.namespace else namespace
                walk(p.url_patterns, route, ns)
            elif isinstance(p, URLPattern):
                assert p.name, f"URL {route!r} has no name"
                if p.name in SKIPPED_NAMES:
                    continue
                names = tuple(p.pattern.converters) if isinstance(p.pattern, RoutePattern) else ()
                found.append(Route(namespace + p.name, route, names))

    walk(get_resolver().url_patterns, "", "")
    return found


ROUTES = dashboard_routes()


@pytest.fixture
def objects_a(team, user, media) -> dict[str, object]:
    """One of each object, all belonging to team A."""
    (media / "models").mkdir(parents=True, exist_ok=True)
    (media / "models" / "x.onnx").write_bytes(b"team A's model")
    model = RegisteredModel.objects.create(team=team, name="private", mlflow_name="perm-a.private")
    version = register_version(
        model,
        relative_file="models/x.onnx",
        sha256="a" * 64,
        size_bytes=10,
        format="onnx",
        precision="fp32",
        inputs=[],
        outputs=[],
    )
    job = Job.objects.create(
        team=team,
        version=version,
        stages=[{"name": "benchmark", "settings": {}}],
        queue="cpu",
        idempotency_key=uuid.uuid4().hex,
        status=JobStatus.QUEUED,
    )
    dataset = Dataset.objects.create(
        team=team,
        name="private",
        version=1,
        format="csv",
        file="datasets/x.csv",
        sha256="b" * 64,
        size_bytes=10,
        rows=3,
        schema={
            "columns": [{"name": "x", "dtype": "float64"}, {"name": "label", "dtype": "int64"}]
        },
    )
    profile = HardwareProfile.objects.create(
        key="onnxruntime-cpu-perm-00000000",
        backend="onnxruntime",
        backend_version="1.0.0",
        device_kind="cpu",
        device_name="Perm CPU",
    )
    snapshot = profile.as_pipeline().to_dict()
    certification = Certification.objects.create(
        team=team,
        version=version,
        profile=profile,
        level="basic",
        status=CertStatus.PASSED,
        job=job,
        engine_sha256=version.sha256,
        profile_snapshot=snapshot,
        suite_version="1.0.0",
        report=suite_report(profile=snapshot, engine_sha256=version.sha256),
    )
    # Stand-ins for the rendered reports: these tests are about who may read them.
    for kind in ("html", "pdf", "json"):
        relative = f"certificates/team-{team.pk}/cert-{certification.pk}.{kind}"
        storage.write_atomic(relative, b'{"model": "private"}')
        setattr(certification, f"report_{kind}", relative)
    certification.save()
    pool = ServingPool.objects.create(name="perm-pool", profile=profile)
    template = PipelineTemplate.objects.create(
        team=team, name="private", stages=[{"name": "benchmark", "settings": {}}]
    )
    # Made directly, with no beat entry: these tests are about who may see and change it.
    schedule = Schedule.objects.create(
        team=team,
        name="private retraining",
        model=model,
        template=template,
        dataset_name="private",
        pool=pool,
        cron="0 3 * * *",
    )
    promotion = PromotionRequest.objects.create(
        team=team,
        model=model,
        pool=pool,
        stage="production",
        version=version,
        requested_by=user,
    )
    return {
        "model": model,
        "version": version,
        "job": job,
        "dataset": dataset,
        "certification": certification,
        "promotion": promotion,
        "template": template,
        "schedule": schedule,
        "team": team,
        "token": ApiToken.issue(user, team, name="private")[0],
    }


# Which object fills each URL's <pk>, and which query string a page needs.
OBJECT_FOR = {
    "registry:model_detail": "model",
    "registry:version_detail": "version",
    "registry:version_download": "version",
    "registry:version_mirror": "version",
    "registry:compare": "model",
    "accounts:revoke": "token",
    "jobs:job_detail": "job",
    "jobs:job_cancel": "job",
    "datasets:dataset_detail": "dataset",
    "certification:detail": "certification",
    "certification:recertify": "certification",
    "certification:report_html": "certification",
    "certification:report_pdf": "certification",
    "certification:report_json": "certification",
    "certification:certify": "version",
    "certification:certify_everywhere": "version",
    "certification:matrix": "model",
    "deployments:model": "model",
    "deployments:promote": "model",
    "deployments:rollback": "model",
    "deployments:audit": "model",
    "deployments:approve": "promotion",
    "deployments:reject": "promotion",
    "notifications:save": "team",
    "notifications:send_test": "team",
    "schedules:schedule_detail": "schedule",
    "schedules:schedule_edit": "schedule",
    "schedules:schedule_toggle": "schedule",
    "schedules:schedule_run": "schedule",
    "schedules:schedule_delete": "schedule",
    "schedules:template_edit": "template",
    "schedules:template_delete": "template",
    "mlflow:experiment": "team",
    "mlflow:job_run": "job",
    "mlflow:version_run": "version",
    "mlflow:model_version": "version",
    "mlflow:model": "model",
    "serving:playground": "model",
}
# A POST that team A may make but that this file's objects cannot satisfy: the answer it gets.
# (The playground of a model with no production deployment says so: tests/test_playground.py.)
REFUSED_POST = {"serving:playground": 409}
QUERY_FOR = {"jobs:job_new": lambda objs: f"?version={objs['version'].pk}"}


def url_for(route: Route, objs: dict[str, object]) -> str:
    kwargs = {}
    for arg in route.kwargs:
        assert arg == "pk" and route.name in OBJECT_FOR, (
            f"teach test_permissions how to fill {arg!r} of {route.name} ({route.route})"
        )
        kwargs[arg] = objs[OBJECT_FOR[route.name]].pk
    query = QUERY_FOR[route.name](objs) if route.name in QUERY_FOR else ""
    return reverse(route.name, kwargs=kwargs) + query


def test_it_finds_every_dashboard_page_in_the_resolver():
    names = {r.name for r in ROUTES}

    assert {
        "registry:model_list",
        "registry:model_upload",
        "registry:model_detail",
        "registry:version_detail",
        "jobs:job_list",
        "jobs:job_new",
        "jobs:job_detail",
        "jobs:job_cancel",
        "datasets:dataset_list",
        "datasets:dataset_upload",
        "datasets:dataset_detail",
        "certification:list",
        "certification:detail",
        "certification:recertify",
        "certification:report_html",
        "certification:report_pdf",
        "certification:report_json",
        "certification:certify",
        "certification:certify_everywhere",
        "certification:matrix",
        "deployments:model",
        "deployments:promote",
        "deployments:rollback",
        "deployments:audit",
        "deployments:approve",
        "deployments:reject",
        "workers:worker_list",
    } <= names
    assert not any(r.route.startswith(SKIPPED_PREFIXES) for r in ROUTES)


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_it_sends_anonymous_users_to_log_in(client, objects_a, route):
    url = url_for(route, objects_a)

    for method in (client.get, client.post):
        response = method(url)
        assert response.status_code == 302, (route.name, method.__name__)
        assert response["Location"].startswith(reverse(settings.LOGIN_URL) + "?next=")
    objects_a["job"].refresh_from_db()
    assert objects_a["job"].status == JobStatus.QUEUED


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_it_hides_team_a_objects_from_team_b(client, objects_a, outsider, route):
    client.force_login(outsider)
    url = url_for(route, objects_a)
    get = client.get(url)

    if not route.kwargs and route.name not in QUERY_FOR:
        # A list or a blank form: it renders, but shows nothing of team A.
        assert get.status_code == 200, route.name
        assert "private" not in get.content.decode()
        return
    if get.status_code == 405:  # POST only: the lookup answers the POST
        post = client.post(url)
        assert post.status_code == 404, route.name
    else:
        assert get.status_code == 404, route.name
    objects_a["job"].refresh_from_db()
    assert objects_a["job"].status == JobStatus.QUEUED, "team B changed team A's job"


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_it_serves_team_a_objects_to_team_a(client, objects_a, user, route):
    client.force_login(user)
    url = url_for(route, objects_a)

    get = client.get(url)

    assert get.status_code in (200, 405), route.name
    if route.name == "registry:version_download":
        assert b"".join(get.streaming_content) == b"team A's model"
    elif get.status_code == 405:
        post = client.post(url)
        assert post.status_code in (200, 302, REFUSED_POST.get(route.name)), route.name
    elif route.kwargs or route.name in QUERY_FOR:
        assert "private" in get.content.decode(), "the page shows team A's model"


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: r.name)
def test_it_refuses_a_post_without_the_csrf_token(objects_a, user, route):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)

    response = strict.post(url_for(route, objects_a), {"name": "x"})

    assert response.status_code == 403, route.name
    objects_a["job"].refresh_from_db()
    assert objects_a["job"].status == JobStatus.QUEUED


def test_it_accepts_a_post_that_carries_the_csrf_token(objects_a, user):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    job = objects_a["job"]
    page = strict.get(job.get_absolute_url())
    token = page.cookies[settings.CSRF_COOKIE_NAME].value

    response = strict.post(
        reverse("jobs:job_cancel", args=[job.pk]), HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="true"
    )

    job.refresh_from_db()
    assert response.status_code == 200
    assert job.status == JobStatus.CANCELLED
