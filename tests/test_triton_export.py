"""`manage.py export_triton`: every config.pbtxt parses back as Triton's inference.ModelConfig.

The message classes are built here from a FileDescriptorProto carrying a faithful subset of
Triton's ``model_config.proto`` (triton-inference-server/common, protobuf/model_config.proto):
the real message, field and enum names and numbers. A misspelt field, a wrong type or an enum
value Triton does not have fails the parse.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from pipelines.core import Artifact, TensorSpec
from r1platform.core import storage
from r1platform.deployments.models import Deployment, ServingPool
from r1platform.registry.services import upload_model
from r1platform.serving.source import ModelSpec
from r1platform.serving.triton import export_models
from r1platform.workers.models import HardwareProfile

F = descriptor_pb2.FieldDescriptorProto
DATA_TYPES = [
    "TYPE_INVALID",
    "TYPE_BOOL",
    "TYPE_UINT8",
    "TYPE_UINT16",
    "TYPE_UINT32",
    "TYPE_UINT64",
    "TYPE_INT8",
    "TYPE_INT16",
    "TYPE_INT32",
    "TYPE_INT64",
    "TYPE_FP16",
    "TYPE_FP32",
    "TYPE_FP64",
    "TYPE_STRING",
    "TYPE_BF16",
]


def _message(file, name: str, *fields: tuple[str, int, int, int, str]):
    """fields: (name, number, type, label, type_name)."""
    message = file.message_type.add(name=name)
    for field_name, number, kind, label, type_name in fields:
        field = message.field.add(name=field_name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name
    return message


@pytest.fixture(scope="module")
def model_config():
    """Triton's inference.ModelConfig (the fields an export writes, and their neighbours)."""
    one, many = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    file = descriptor_pb2.FileDescriptorProto(
        name="model_config_subset.proto", package="inference", syntax="proto3"
    )
    data_type = file.enum_type.add(name="DataType")
    for number, name in enumerate(DATA_TYPES):
        data_type.value.add(name=name, number=number)
    _message(file, "ModelTensorReshape", ("shape", 1, F.TYPE_INT64, many, ""))
    tensor = [
        ("name", 1, F.TYPE_STRING, one, ""),
        ("data_type", 2, F.TYPE_ENUM, one, ".inference.DataType"),
        ("reshape", 5, F.TYPE_MESSAGE, one, ".inference.ModelTensorReshape"),
        ("is_shape_tensor", 6, F.TYPE_BOOL, one, ""),
    ]
    _message(
        file,
        "ModelInput",
        *tensor,
        ("dims", 4, F.TYPE_INT64, many, ""),
        ("allow_ragged_batch", 7, F.TYPE_BOOL, one, ""),
        ("optional", 8, F.TYPE_BOOL, one, ""),
    )
    _message(
        file,
        "ModelOutput",
        *tensor,
        ("dims", 3, F.TYPE_INT64, many, ""),
        ("label_filename", 4, F.TYPE_STRING, one, ""),
    )
    _message(
        file,
        "ModelDynamicBatching",
        ("preferred_batch_size", 1, F.TYPE_INT32, many, ""),
        ("max_queue_delay_microseconds", 2, F.TYPE_UINT64, one, ""),
        ("preserve_ordering", 3, F.TYPE_BOOL, one, ""),
    )
    group = _message(
        file,
        "ModelInstanceGroup",
        ("name", 1, F.TYPE_STRING, one, ""),
        ("count", 2, F.TYPE_INT32, one, ""),
        ("gpus", 3, F.TYPE_INT32, many, ""),
        ("kind", 4, F.TYPE_ENUM, one, ".inference.ModelInstanceGroup.Kind"),
        ("profile", 5, F.TYPE_STRING, many, ""),
    )
    kind = group.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=number)
    _message(
        file,
        "ModelConfig",
        ("name", 1, F.TYPE_STRING, one, ""),
        ("platform", 2, F.TYPE_STRING, one, ""),
        ("max_batch_size", 4, F.TYPE_INT32, one, ""),
        ("input", 5, F.TYPE_MESSAGE, many, ".inference.ModelInput"),
        ("output", 6, F.TYPE_MESSAGE, many, ".inference.ModelOutput"),
        ("instance_group", 7, F.TYPE_MESSAGE, many, ".inference.ModelInstanceGroup"),
        ("default_model_filename", 8, F.TYPE_STRING, one, ""),
        ("dynamic_batching", 11, F.TYPE_MESSAGE, one, ".inference.ModelDynamicBatching"),
        ("backend", 17, F.TYPE_STRING, one, ""),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse(model_config, path: Path):
    return text_format.Parse(path.read_text(), model_config())


def test_the_subset_is_strict(model_config):
    with pytest.raises(text_format.ParseError):
        text_format.Parse("max_batch: 8", model_config())
    with pytest.raises(text_format.ParseError):
        text_format.Parse("input [ { name: 'x' data_type: TYPE_FLOAT32 } ]", model_config())


@pytest.fixture
def pool(db) -> ServingPool:
    profile = HardwareProfile.objects.create(
        key="onnxruntime-cpu-test",
        backend="onnxruntime",
        backend_version="1",
        device_kind="cpu",
        device_name="test cpu",
    )
    return ServingPool.objects.create(
        name="cpu-pool", profile=profile, max_queue_delay_ms=2.5, max_batch_size=16
    )


def deploy(team, user, pool, name: str, path: Path, **upload) -> Deployment:
    version = upload_model(
        team=team,
        user=user,
        name=name,
        task="classification",
        uploaded=storage.spool_local_file(path),
        **upload,
    )
    return Deployment.objects.create(
        team=team, model=version.model, pool=pool, stage="production", version=version
    )


def test_it_exports_a_pools_deployments_as_a_triton_repository(
    model_config, pool, team, user, mlp_onnx, tmp_path
):
    deployment = deploy(team, user, pool, "mlp", mlp_onnx)
    out = tmp_path / "repository"
    call_command("export_triton", "--pool", "cpu-pool", "--out", str(out))

    config = parse(model_config, out / "mlp" / "config.pbtxt")
    assert (config.name, config.platform, config.max_batch_size) == ("mlp", "onnxruntime_onnx", 16)
    [features] = config.input
    assert (features.name, list(features.dims)) == ("features", [16])
    assert features.data_type == DATA_TYPES.index("TYPE_FP32")
    [logits] = config.output
    assert (logits.name, list(logits.dims)) == ("logits", [4])
    assert list(config.dynamic_batching.preferred_batch_size) == [16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    [group] = config.instance_group
    assert (group.count, group.kind) == (1, 2)  # KIND_CPU
    model_file = out / "mlp" / "1" / "model.onnx"
    assert storage.sha256_file(model_file)[0] == deployment.version.sha256


def test_an_altered_file_is_not_exported_and_the_command_says_why(
    pool, team, user, mlp_onnx, tmp_path
):
    deploy(team, user, pool, "mlp", mlp_onnx)
    altered = deploy(team, user, pool, "altered", mlp_onnx)
    stored = storage.media_path(altered.version.file)
    stored.write_bytes(stored.read_bytes() + b"\x00")
    out = tmp_path / "repository"
    with pytest.raises(CommandError, match="altered: .*sha256"):
        call_command("export_triton", "--pool", "cpu-pool", "--out", str(out))
    assert (out / "mlp" / "config.pbtxt").is_file()
    assert not (out / "altered").exists()


def _spec(tmp_path: Path, fmt: str, inputs, outputs, **kw) -> ModelSpec:
    path = tmp_path / f"model.{fmt}"
    path.write_bytes(b"engine bytes: the export copies the file, it does not load it")
    artifact = Artifact(
        key=fmt,
        path=str(path),
        format=fmt,
        precision="fp16",
        inputs=inputs,
        outputs=outputs,
        meta=kw.pop("meta", {}),
    )
    return ModelSpec(
        team_id=1,
        team="team-a",
        name=f"{fmt}-model",
        version=3,
        artifact=artifact,
        sha256=storage.sha256_file(path)[0],
        **kw,
    )


def test_tensorrt_and_torchscript_follow_their_backends_conventions(model_config, tmp_path):
    image = [TensorSpec("image", ["batch", 3, "height", "width"], "float16")]
    scores = [TensorSpec("scores", ["batch", 1000], "float16")]
    tensorrt = _spec(
        tmp_path,
        "tensorrt",
        image,
        scores,
        device="cuda",
        max_batch_size=32,
        meta={"batch_range": [1, 8]},
    )
    torchscript = _spec(
        tmp_path,
        "torchscript",
        [TensorSpec("x", ["batch", 64], "float32")],
        [TensorSpec("y", ["batch", 10], "float32")],
        max_queue_delay_ms=0,
    )
    aoti = _spec(tmp_path, "aotinductor", [], [])
    result = export_models([tensorrt, torchscript, aoti], tmp_path / "repository")

    assert result.skipped == {
        "team-a/aotinductor-model": "Triton has no backend for aotinductor models"
    }
    plan = parse(model_config, tmp_path / "repository" / "tensorrt-model" / "config.pbtxt")
    assert (plan.platform, plan.max_batch_size) == ("tensorrt_plan", 8)  # the engine's profile
    assert list(plan.input[0].dims) == [3, -1, -1]
    assert plan.input[0].data_type == DATA_TYPES.index("TYPE_FP16")
    assert plan.instance_group[0].kind == 1  # KIND_GPU
    assert (tmp_path / "repository" / "tensorrt-model" / "3" / "model.plan").is_file()
    script = parse(model_config, tmp_path / "repository" / "torchscript-model" / "config.pbtxt")
    assert script.platform == "pytorch_libtorch"
    assert ([t.name for t in script.input], [t.name for t in script.output]) == (["x__0"], ["y__0"])
    assert not script.HasField("dynamic_batching")  # the pool's delay is 0: no batching wait
    assert (tmp_path / "repository" / "torchscript-model" / "3" / "model.pt").is_file()


def test_a_model_whose_outputs_do_not_follow_the_batch_is_exported_unbatched(
    model_config, tmp_path
):
    column_sums = _spec(
        tmp_path,
        "tensorrt",
        [TensorSpec("x", ["rows", 4], "float32")],
        [TensorSpec("sums", [1, 4], "float32")],
        max_batch_size=32,
    )
    export_models([column_sums], tmp_path / "repository")
    config = parse(model_config, tmp_path / "repository" / "tensorrt-model" / "config.pbtxt")
    assert config.max_batch_size == 0
    assert (list(config.input[0].dims), list(config.output[0].dims)) == ([-1, 4], [1, 4])
    assert not config.HasField("dynamic_batching")


def test_an_onnx_model_with_external_data_is_exported_with_its_data_files(tmp_path):
    """An archive version (ONNX with external data) runs from its unpacked folder: the
    repository gets the data files beside model.onnx, where the graph says they are."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 2), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[weight],
    )
    unpacked = tmp_path / "unpacked"
    (unpacked / "weights").mkdir(parents=True)
    path = unpacked / "model.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(path),
        save_as_external_data=True,
        location="weights/w.bin",
        size_threshold=0,
    )
    spec = ModelSpec(
        team_id=1,
        team="team-a",
        name="external",
        version=2,
        artifact=Artifact(
            key="v2",
            path=str(path),
            format="onnx",
            precision="fp32",
            inputs=[TensorSpec("x", ["batch", 4], "float32")],
            outputs=[TensorSpec("y", ["batch", 2], "float32")],
        ),
    )

    result = export_models([spec], tmp_path / "repo")

    assert not result.skipped, result.skipped
    version_dir = tmp_path / "repo" / "external" / "2"
    assert sorted(
        str(p.relative_to(version_dir)) for p in version_dir.rglob("*") if p.is_file()
    ) == [
        "model.onnx",
        "weights/w.bin",
    ]
    import onnxruntime

    session = onnxruntime.InferenceSession(str(version_dir / "model.onnx"))
    assert session.run(None, {"x": np.ones((1, 4), np.float32)})[0].tolist() == [[4.0, 4.0]]
