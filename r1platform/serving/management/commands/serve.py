from __future__ import annotations

import os

# One process with its own registry, scraped on its own port: prometheus-client's multiprocess
# mode (chosen when it is first imported, below) stays off even where the platform's web and
# workers run with it (r1platform.monitoring), or every ServingMetrics would share one file.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from r1platform.deployments.models import ServingPool, Stage
from r1platform.serving.app import DEFAULT_MAX_BODY_BYTES, ServingOptions, build_app
from r1platform.serving.deployments_source import DeploymentSource
from r1platform.serving.server import serve


class Command(BaseCommand):
    help = (
        "Serve every model deployed to a pool over the Open Inference Protocol (KServe v2, as "
        "Triton speaks it), with dynamic batching; promotions and rollbacks swap models live."
    )

    def add_arguments(self, parser):
        parser.add_argument("--pool", required=True, help="the serving pool's name")
        parser.add_argument("--port", type=int, default=8001)
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--stage", choices=Stage.values, default=Stage.PRODUCTION)
        parser.add_argument(
            "--no-batching", action="store_true", help="run every request alone, never batched"
        )
        parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
        parser.add_argument(
            "--poll-seconds",
            type=float,
            default=1.0,
            help="how often deployments and tokens are read again",
        )

    def handle(self, *args, **opts) -> None:
        if not ServingPool.objects.filter(name=opts["pool"]).exists():
            known = ", ".join(ServingPool.objects.values_list("name", flat=True)) or "none"
            raise CommandError(f"no serving pool {opts['pool']!r} (pools: {known})")
        if opts["max_body_bytes"] < 1 or opts["poll_seconds"] <= 0:
            raise CommandError("--max-body-bytes and --poll-seconds must be positive")
        connection.close()  # the poller thread opens its own
        options = ServingOptions(
            batching=not opts["no_batching"],
            max_body_bytes=opts["max_body_bytes"],
            poll_seconds=opts["poll_seconds"],
        )
        self.stdout.write(
            f"serving pool {opts['pool']} ({opts['stage']}) on http://{opts['host']}:{opts['port']}"
        )
        app = build_app(DeploymentSource(opts["pool"], opts["stage"]), options)
        serve(app, opts["host"], opts["port"])
