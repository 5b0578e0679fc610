"""The serving process gives back what large request bodies took (a real uvicorn process).

20 bodies of 31 MiB at once used to leave ~450-690 MiB held in the process after they were all
answered, with a peak near 1.8 GiB: each body was held twice (chunks, then the joined copy),
and glibc kept the freed memory in its heaps. Now large bodies share a budget, are held once,
and their buffers go back to the system when freed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest
import requests
from onnx import TensorProto, helper

from tests.conftest import ROOT, stop_process_group
from tests.test_body_limits import _free_port

MiB = 1024 * 1024
TOKEN = "token-of-team-1"

SERVE = """
import sys
from pathlib import Path
import django
django.setup()
from pipelines.core import Artifact
from r1platform.core.storage import sha256_file
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serve
from r1platform.serving.source import ModelSpec, StaticModelSource
path, port, token = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
artifact = Artifact(key="relu v1", path=str(path), format="onnx", precision="fp32",
                    inputs=[], outputs=[])
spec = ModelSpec(team_id=1, team="team-1", name="relu", version=1, artifact=artifact,
                 sha256=sha256_file(path)[0])
source = StaticModelSource([spec], {token: 1})
serve(build_app(source, ServingOptions(poll_seconds=0.5, metrics_token="")), "127.0.0.1", port)
"""


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


@pytest.fixture
def serving(tmp_path):
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "relu",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(path), str(port), TOKEN],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield proc.pid, url
    finally:
        stop_process_group(proc)


def test_twenty_concurrent_31_mib_bodies_leave_nothing_held(serving):
    pid, url = serving
    body = b"x" * (31 * MiB)  # under the 32 MiB limit; not JSON, so each is answered 400
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = memory_kib(pid)["VmRSS"]

    def post(_: int) -> int:
        return requests.post(f"{url}/v2/models/relu/infer", data=body, headers=headers).status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(post, range(20)))
    time.sleep(1.0)  # the trim runs in a thread once the last large body is released
    after = memory_kib(pid)

    assert statuses == [400] * 20
    held_mib = (after["VmRSS"] - before) / 1024
    peak_mib = (after["VmHWM"] - before) / 1024
    assert held_mib < 64, f"{held_mib:.0f} MiB still held after the requests"
    assert peak_mib < 700, f"the peak was {peak_mib:.0f} MiB over the start"
    # Still serving: a small request right after is answered.
    ok = requests.post(
        f"{url}/v2/models/relu/infer",
        json={"inputs": [{"name": "x", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}]},
        headers=headers,
    )
    assert ok.status_code == 200, ok.text
