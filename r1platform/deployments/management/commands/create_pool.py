from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import URLValidator

from r1platform.deployments.models import ServingPool
from r1platform.workers.models import HardwareProfile


class Command(BaseCommand):
    help = "Create a serving pool for one hardware profile, or update the one of that name."

    def add_arguments(self, parser):
        parser.add_argument("name", help="a slug, e.g. cpu-a")
        parser.add_argument("--profile", required=True, help="the hardware profile's key")
        parser.add_argument("--description", default="")
        parser.add_argument("--max-batch-size", type=int, default=32)
        parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
        parser.add_argument(
            "--url",
            default=None,
            help="where the dashboard reaches the pool's serving process (its playground), e.g. "
            'http://127.0.0.1:8001; left as it is when not given, "" clears it',
        )
        # Engine servers for language models (r1platform.serving.engine_servers): left as they
        # are when not given.
        parser.add_argument(
            "--text-engine",
            choices=[value for value, _ in ServingPool._meta.get_field("text_engine").choices],
            default=None,
            help="what decodes language models: builtin (in the serving process), or vllm / "
            "trtllm (an engine server per deployment, supervised and proxied; GPU profiles only)",
        )
        parser.add_argument(
            "--engine-replicas",
            type=int,
            default=None,
            help="engine servers per language-model deployment (vllm, trtllm), one per GPU while "
            "there are enough",
        )

    def handle(self, name: str, profile: str, **options) -> None:
        found = HardwareProfile.objects.filter(key=profile).first()
        if found is None:
            known = ", ".join(HardwareProfile.objects.values_list("key", flat=True)) or "none"
            raise CommandError(f"no hardware profile {profile!r}; reported profiles: {known}")
        if options["max_batch_size"] < 1 or options["max_queue_delay_ms"] < 0:
            raise CommandError("--max-batch-size must be at least 1, --max-queue-delay-ms >= 0")
        defaults = {
            "profile": found,
            "description": options["description"],
            "max_batch_size": options["max_batch_size"],
            "max_queue_delay_ms": options["max_queue_delay_ms"],
        }
        if options["url"] is not None:
            defaults["url"] = _serving_url(options["url"])
        defaults.update(_engine_options(found, options["text_engine"], options["engine_replicas"]))
        pool, created = ServingPool.objects.update_or_create(name=name, defaults=defaults)
        reached = f", reached at {pool.url}" if pool.url else ""
        self.stdout.write(
            f"{'created' if created else 'updated'} pool {pool.name} on {found.key}{reached}"
        )


def _engine_options(profile: HardwareProfile, engine: str | None, replicas: int | None) -> dict:
    """The pool's text engine and replicas, as given; CommandError for what cannot run."""
    chosen: dict[str, object] = {}
    if replicas is not None:
        if replicas < 1:
            raise CommandError("--engine-replicas must be at least 1")
        chosen["engine_replicas"] = replicas
    if engine is not None:
        if engine != "builtin" and profile.device_kind != "cuda":
            raise CommandError(
                f"--text-engine {engine} needs a CUDA GPU profile; {profile.key} is "
                f"{profile.device_kind}: use --text-engine builtin"
            )
        chosen["text_engine"] = engine
    return chosen


def _serving_url(url: str) -> str:
    """An http(s) URL with no query or credentials ("" clears it); CommandError otherwise."""
    url = url.strip().rstrip("/")
    if not url:
        return ""
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise CommandError(f"--url {url!r} is not an http:// or https:// URL") from None
    if "@" in url or "?" in url or "#" in url:
        raise CommandError(
            f"--url {url!r}: give the serving process's base URL (no credentials, query or "
            "fragment), e.g. http://127.0.0.1:8001"
        )
    max_length = ServingPool._meta.get_field("url").max_length
    if len(url) > max_length:
        raise CommandError(f"--url is over {max_length} characters")
    return url
