"""The serving runtime over real HTTP (uvicorn on loopback), from a static model list.

The deployments-backed source, real API tokens, promotion hot swap and ``manage.py serve`` are in
``test_serving_deployments.py``.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import requests
import torch
from onnx import TensorProto, helper

from pipelines.core import Artifact, TensorSpec
from r1platform.core.storage import sha256_file
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import ModelSpec, StaticModelSource

TEAM_A, TEAM_B = 1, 2
TOKEN_A, TOKEN_B = "token-of-team-a", "token-of-team-b"
A = {"Authorization": f"Bearer {TOKEN_A}"}
B = {"Authorization": f"Bearer {TOKEN_B}"}
METRICS_TOKEN = "metrics-scrape-token"  # /metrics wants it (or a team token: its models only)
MAX_BODY = 64 * 1024
DIGITS_INPUT = TensorSpec(name="input", shape=["batch", 64], dtype="float32")


def gather_onnx(path: Path) -> Path:
    """Rows of a 10x4 table picked by an INT64 index: an index past 9 fails inside onnxruntime."""
    table = helper.make_tensor(
        "table", TensorProto.FLOAT, [10, 4], np.arange(40, dtype=np.float32).tolist()
    )
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["rows"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["batch", 1, 4])],
        [table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def spec(
    team: int, name: str, path: Path, version: int = 1, inputs=(), fmt="onnx", **kw
) -> ModelSpec:
    kw.setdefault("sha256", sha256_file(path)[0])
    artifact = Artifact(
        key=f"{name} v{version}",
        path=str(path),
        format=fmt,
        precision="fp32",
        inputs=list(inputs),
        outputs=[],
    )
    return ModelSpec(
        team_id=team, team=f"team-{team}", name=name, version=version, artifact=artifact, **kw
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory, mlp_onnx, digits_torchscript) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("served")
    corrupt = folder / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07not a protobuf model at all" * 10)
    altered = folder / "altered.onnx"
    shutil.copyfile(mlp_onnx, altered)
    return {
        "mlp": mlp_onnx,
        "digits": digits_torchscript,
        "gather": gather_onnx(folder / "gather.onnx"),
        "corrupt": corrupt,
        "altered": altered,
    }


@pytest.fixture(scope="module")
def server(files) -> str:
    """Team A: mlp, digits (TorchScript), gather, corrupt (not ONNX), altered (sha256 differs);
    team B: its own mlp."""
    models = [
        spec(TEAM_A, "mlp", files["mlp"], max_queue_delay_ms=40),
        spec(TEAM_A, "digits", files["digits"], inputs=[DIGITS_INPUT], fmt="torchscript"),
        spec(TEAM_A, "gather", files["gather"], max_queue_delay_ms=40),
        spec(TEAM_A, "corrupt", files["corrupt"]),
        spec(TEAM_A, "altered", files["altered"], sha256="0" * 64),
        spec(TEAM_B, "mlp", files["mlp"], version=7),
    ]
    source = StaticModelSource(models, {TOKEN_A: TEAM_A, TOKEN_B: TEAM_B})
    options = ServingOptions(max_body_bytes=MAX_BODY, poll_seconds=0.2, metrics_token=METRICS_TOKEN)
    app = build_app(source, options)
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        yield url


def onnxruntime_answer(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def infer(url: str, model: str, body: object, headers=A, **kw) -> requests.Response:
    return requests.post(f"{url}/v2/models/{model}/infer", json=body, headers=headers, **kw)


def mlp_request(x: np.ndarray, nested: bool = False) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {
        "inputs": [{"name": "features", "shape": list(x.shape), "datatype": "FP32", "data": data}]
    }


def metric(url: str, name: str, **labels: str) -> float:
    """A sample's value from /metrics (0 when absent)."""
    scrape = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    text = requests.get(f"{url}/metrics", headers=scrape).text
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            return float(match.group(2))
    return 0.0


def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


# -- health, metadata, answers ---------------------------------------------------------------------


def test_it_reports_health_without_a_token(server):
    assert requests.get(f"{server}/v2/health/live").status_code == 200
    assert requests.get(f"{server}/v2/health/ready").status_code == 200
    meta = requests.get(f"{server}/v2").json()
    assert "binary_tensor_data" in meta["extensions"]


def test_it_describes_a_model_in_the_protocols_terms(server):
    answer = requests.get(f"{server}/v2/models/mlp", headers=A)
    assert answer.status_code == 200
    assert answer.json() == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 16]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
    }
    assert requests.get(f"{server}/v2/models/mlp/ready", headers=A).status_code == 200
    assert requests.get(f"{server}/v2/models/mlp/versions/1", headers=A).status_code == 200


@pytest.mark.parametrize("nested", [False, True], ids=["flat data", "nested data"])
def test_it_answers_as_onnxruntime_does(server, files, nested):
    x = rows(1, 3)
    answer = infer(server, "mlp", {"id": "req-1", **mlp_request(x, nested)})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("mlp", "1", "req-1")
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("logits", "FP32", [3, 4])
    expected = onnxruntime_answer(files["mlp"], {"features": x})[0]
    np.testing.assert_allclose(np.reshape(output["data"], (3, 4)), expected, rtol=1e-6, atol=1e-6)


def test_it_serves_torchscript_and_describes_the_outputs_it_did_not_declare(server, files):
    meta = requests.get(f"{server}/v2/models/digits", headers=A).json()
    assert meta["platform"] == "pytorch_libtorch"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 10]}]
    x = np.random.default_rng(3).random((2, 64), dtype=np.float32)
    body = {
        "inputs": [{"name": "input", "shape": [2, 64], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "output"}],
    }
    answer = infer(server, "digits", body)
    assert answer.status_code == 200, answer.text
    with torch.inference_mode():
        expected = torch.jit.load(str(files["digits"]))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(
        np.reshape(answer.json()["outputs"][0]["data"], (2, 10)), expected, rtol=1e-5, atol=1e-5
    )


def test_it_speaks_tritons_binary_tensor_extension(server, files):
    """The request tritonclient.http sends by default: binary input, binary outputs."""
    x = rows(2, 2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "features",
                    "shape": [2, 16],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    answer = requests.post(
        f"{server}/v2/models/mlp/versions/1/infer",
        data=header + x.tobytes(),
        headers={
            **A,
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert answer.status_code == 200, answer.text
    length = int(answer.headers["Inference-Header-Content-Length"])
    [output] = json.loads(answer.content[:length])["outputs"]
    assert output["parameters"]["binary_data_size"] == 2 * 4 * 4
    served = np.frombuffer(answer.content[length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(served, onnxruntime_answer(files["mlp"], {"features": x})[0])


def test_dynamic_batching_runs_concurrent_requests_together_and_returns_each_its_rows(
    server, files
):
    # Requests of 1 to 3 rows: a batch of more than 4 rows holds several requests.
    batched_before = _batches_over(server, "team-1/mlp", 4)
    inputs = [rows(10 + i, 1 + i % 3) for i in range(12)]
    start = threading.Barrier(len(inputs))

    def call(x: np.ndarray) -> np.ndarray:
        start.wait()
        answer = infer(server, "mlp", mlp_request(x))
        assert answer.status_code == 200, answer.text
        return np.reshape(answer.json()["outputs"][0]["data"], (len(x), 4))

    with ThreadPoolExecutor(len(inputs)) as pool:
        answers = list(pool.map(call, inputs))
    session = ort.InferenceSession(str(files["mlp"]), providers=["CPUExecutionProvider"])
    for x, served in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(served, session.run(None, {"features": x})[0], atol=1e-5)
    assert _batches_over(server, "team-1/mlp", 4) > batched_before


def _batches_over(url: str, model: str, rows: int) -> float:
    """How many batches the engine ran with more than ``rows`` rows (``rows`` a bucket bound)."""
    every = metric(url, "r1_serving_batch_size_count", model=model)
    return every - metric(url, "r1_serving_batch_size_bucket", model=model, le=f"{rows:.1f}")


def test_without_batching_each_request_runs_alone(files):
    source = StaticModelSource([spec(TEAM_A, "mlp", files["mlp"])], {TOKEN_A: TEAM_A})
    options = ServingOptions(batching=False, poll_seconds=0.2, metrics_token=METRICS_TOKEN)
    app = build_app(source, options)
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: infer(url, "mlp", mlp_request(rows(i, 1))), range(16)))
        assert [c.status_code for c in codes] == [200] * 16
        assert metric(url, "r1_serving_batch_size_count", model="team-1/mlp") == 16
        assert _batches_over(url, "team-1/mlp", 1) == 0


# -- callers ---------------------------------------------------------------------------------------


def test_it_needs_a_known_team_token(server):
    body = mlp_request(rows(3, 1))
    assert infer(server, "mlp", body, headers={}).status_code == 401
    refused = infer(server, "mlp", body, headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert "error" in refused.json()
    assert requests.get(f"{server}/v2/models/mlp", headers={}).status_code == 401


def test_a_team_sees_only_its_own_models(server):
    assert infer(server, "gather", {}, headers=B).status_code == 404
    assert requests.get(f"{server}/v2/models/gather/ready", headers=B).status_code == 404
    # Both teams have a model named mlp: each token reaches its own.
    assert infer(server, "mlp", mlp_request(rows(4, 1)), headers=B).json()["model_version"] == "7"
    assert infer(server, "mlp", mlp_request(rows(4, 1)), headers=A).json()["model_version"] == "1"


# -- bad input -------------------------------------------------------------------------------------


def _mlp(**override) -> dict:
    tensor = {"name": "features", "shape": [1, 16], "datatype": "FP32", "data": [0.5] * 16}
    return {"inputs": [{**tensor, **override}]}


BAD_REQUESTS = {
    "wrong dim": ("mlp", _mlp(shape=[1, 15], data=[0.5] * 15), 400, "fixes it at 16"),
    "wrong rank": ("mlp", _mlp(shape=[16], data=[0.5] * 16), 400, "rank"),
    "wrong datatype": ("mlp", _mlp(datatype="INT64", data=[1] * 16), 400, "takes FP32"),
    "unknown datatype": ("mlp", _mlp(datatype="FLOAT"), 400, "datatype"),
    "missing input": ("mlp", {"inputs": [{**_mlp()["inputs"][0], "name": "x"}]}, 400, "missing"),
    "no inputs": ("mlp", {"inputs": []}, 400, "inputs"),
    "data short of shape": ("mlp", _mlp(data=[0.5] * 15), 400, "holds 16 values"),
    "ragged data": ("mlp", _mlp(data=[[0.5] * 8, [0.5] * 7]), 400, "ragged"),
    "text data": ("mlp", _mlp(data=["a"] * 16), 400, "must be numbers"),
    "float for INT64": (
        "gather",
        {"inputs": [{"name": "index", "shape": [1, 1], "datatype": "INT64", "data": [1.5]}]},
        400,
        "integers",
    ),
    "over FP32 range": ("mlp", _mlp(data=[1e40] * 16), 400, "range"),
    "batch over max": ("mlp", _mlp(shape=[33, 16], data=[0.5] * 33 * 16), 400, "batch"),
    "unknown output": ("mlp", {**_mlp(), "outputs": [{"name": "probs"}]}, 400, "no output"),
    "binary size lies": ("mlp", _mlp(parameters={"binary_data_size": 64}), 400, "binary"),
    "unknown model": ("resnet", _mlp(), 404, "not served"),
    "version not served": ("mlp/versions/3", _mlp(), 404, "version 3"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_is_a_4xx_with_the_reason_and_harms_nothing(server, case):
    model, body, status, reason = BAD_REQUESTS[case]
    answer = infer(server, model, body)
    assert answer.status_code == status
    assert reason in answer.json()["error"]
    assert infer(server, "mlp", mlp_request(rows(5, 1))).status_code == 200
    assert infer(server, "mlp", mlp_request(rows(5, 1)), headers=B).status_code == 200


@pytest.mark.parametrize(
    "body, status",
    [(b'{"inputs": [', 400), (b"[1, 2]", 400), (b"\xff\xfe", 400), (b"x" * (MAX_BODY + 1), 413)],
    ids=["truncated JSON", "not an object", "not UTF-8", "body over the limit"],
)
def test_malformed_and_oversized_bodies_are_refused(server, body, status):
    answer = requests.post(f"{server}/v2/models/mlp/infer", data=body, headers=A)
    assert answer.status_code == status
    assert answer.json()["error"]
    assert infer(server, "mlp", mlp_request(rows(6, 1))).status_code == 200


# -- isolation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, reason",
    [("corrupt", "did not load"), ("altered", "no longer matches the sha256")],
)
def test_a_model_that_cannot_load_is_not_ready_and_the_others_answer(server, model, reason):
    ready = requests.get(f"{server}/v2/models/{model}/ready", headers=A)
    assert ready.status_code == 503
    assert reason in ready.json()["error"]
    assert infer(server, model, _mlp()).status_code == 503
    assert requests.get(f"{server}/v2/models/{model}", headers=A).status_code == 503
    assert infer(server, "mlp", mlp_request(rows(7, 1))).status_code == 200
    assert metric(server, "r1_serving_load_failures_total", model=f"team-1/{model}") == 1


def test_an_engine_error_fails_only_the_request_that_caused_it(server):
    def gather(index: int) -> requests.Response:
        body = {
            "inputs": [{"name": "index", "shape": [1, 1], "datatype": "INT64", "data": [index]}]
        }
        return infer(server, "gather", body)

    # Sent together, so they share batches: the bad ones must not fail the good ones.
    indexes = [3, 99, 5, 7, -50, 1]
    with ThreadPoolExecutor(len(indexes)) as pool:
        answers = dict(zip(indexes, pool.map(gather, indexes), strict=True))
    for index, answer in answers.items():
        if 0 <= index < 10:
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"][0]["data"] == [4 * index + k for k in range(4)]
        else:
            assert answer.status_code == 500
            assert "out of" in answer.json()["error"] or "bounds" in answer.json()["error"]
    assert requests.get(f"{server}/v2/models/gather/ready", headers=A).status_code == 200
    assert infer(server, "mlp", mlp_request(rows(8, 1))).status_code == 200


def test_metrics_expose_requests_latency_batches_queue_failures_and_readiness(server):
    assert infer(server, "mlp", mlp_request(rows(9, 2))).status_code == 200
    mlp = {"model": "team-1/mlp"}
    assert metric(server, "r1_serving_requests_total", **mlp, version="1", status="200") >= 1
    assert metric(server, "r1_serving_request_seconds_count", **mlp) >= 1
    assert metric(server, "r1_serving_batch_size_sum", **mlp) >= 2
    assert "r1_serving_queue_depth{" in requests.get(f"{server}/metrics", headers=A).text
    assert metric(server, "r1_serving_load_failures_total", model="team-1/corrupt") == 1
    assert metric(server, "r1_serving_models_ready") == 4  # mlp, digits, gather, team B's mlp


def test_a_new_version_that_fails_to_load_leaves_the_serving_one_in_place(files):
    source = StaticModelSource([spec(TEAM_A, "mlp", files["mlp"])], {TOKEN_A: TEAM_A})
    app = build_app(source, ServingOptions(poll_seconds=0.1, metrics_token=METRICS_TOKEN))
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(30)

        def version() -> str:
            answer = infer(url, "mlp", mlp_request(rows(11, 1)))
            assert answer.status_code == 200, answer.text
            return answer.json()["model_version"]

        source.set_models([spec(TEAM_A, "mlp", files["corrupt"], version=2, revision=2)])
        eventually(lambda: metric(url, "r1_serving_load_failures_total", model="team-1/mlp") == 1)
        assert version() == "1"
        source.set_models([spec(TEAM_A, "mlp", files["mlp"], version=3, revision=3)])
        eventually(lambda: version() == "3")
        source.set_models([])  # undeployed
        eventually(lambda: infer(url, "mlp", mlp_request(rows(11, 1))).status_code == 404)
        assert metric(url, "r1_serving_models_ready") == 0
