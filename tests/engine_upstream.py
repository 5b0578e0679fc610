"""An OpenAI-compatible engine server for the proxy tests, run as its own process.

What ``vllm serve`` is to the serving process on a GPU pool, this project's own serving app is
here on the CPU: one tiny checkpoint, decoded by the built-in engine, served under ``NAME`` to
the bearer token in ``R1_UPSTREAM_TOKEN``, healthy at ``/v2/models/NAME/ready``.

    python -m tests.engine_upstream MODEL_DIR PORT NAME
"""

from __future__ import annotations

import os
import sys


def main(folder: str, port: int, name: str) -> None:
    # A process of its own, as `manage.py serve` is: never prometheus-client's multiprocess
    # mode (an empty folder setting would put its files in the working directory).
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from pipelines.core import Artifact
    from r1platform.serving.app import ServingOptions, build_app
    from r1platform.serving.server import serve
    from r1platform.serving.source import ModelSpec, StaticModelSource

    artifact = Artifact(f"{name} v1", folder, "hf_checkpoint", "fp32", [], [])
    spec = ModelSpec(team_id=1, team="upstream", name=name, version=1, artifact=artifact)
    source = StaticModelSource([spec], {os.environ["R1_UPSTREAM_TOKEN"]: 1})
    print(f"engine upstream: serving {name} from {folder} on port {port}", flush=True)
    serve(
        build_app(
            source, ServingOptions(poll_seconds=0.5, metrics_token=os.environ["R1_UPSTREAM_TOKEN"])
        ),
        "127.0.0.1",
        port,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
