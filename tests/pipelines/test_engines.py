"""pipelines.engines: loading every runnable format and running it with checked inputs.

Real models throughout (ONNX graphs built here or exported from torch, TorchScript modules, one
AOTInductor package), run through real onnxruntime and torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from pipelines.backends import available_backends
from pipelines.core import Artifact, PipelineContext, PipelineError, TensorSpec
from pipelines.engines import (
    ENGINE_FORMATS,
    EngineInputError,
    EngineUnavailable,
    cuda_available,
    load_engine,
)
from pipelines.onnx_io import read_tensor_specs
from pipelines.stages import Compile

from .conftest import ModelFile


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny models on a small shared CPU: one thread is several times faster than two fighting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def onnx_artifact(path: Path, key: str = "input", precision: str = "fp32") -> Artifact:
    inputs, outputs = read_tensor_specs(path)
    return Artifact(
        key=key, path=str(path), format="onnx", precision=precision, inputs=inputs, outputs=outputs
    )


def save_graph(path: Path, nodes: list, inputs: list, outputs: list) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def two_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x [batch, 4] float -> relu = Relu(x), neg = Neg(x)."""
    path = tmp_path_factory.mktemp("engines") / "two_outputs.onnx"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    relu = helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["batch", 4])
    neg = helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Relu", ["x"], ["relu"]), helper.make_node("Neg", ["x"], ["neg"])]
    return save_graph(path, nodes, [x], [relu, neg])


@pytest.fixture(scope="module")
def int32_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ids [batch, 3] int32 -> as_float = Cast(ids, float)."""
    path = tmp_path_factory.mktemp("engines") / "ids.onnx"
    ids = helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", 3])
    out = helper.make_tensor_value_info("as_float", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("Cast", ["ids"], ["as_float"], to=TensorProto.FLOAT)]
    return save_graph(path, nodes, [ids], [out])


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0, x.sum(dim=1, keepdim=True)


class Named(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"doubled": x * 2.0, "total": x.sum(dim=1)}


class Brain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 3.0).to(torch.bfloat16)


def scripted(module: nn.Module, path: Path, outputs: list[str] | None = None) -> Artifact:
    torch.jit.script(module).save(str(path))
    return Artifact(
        key="input",
        path=str(path),
        format="torchscript",
        precision="fp32",
        inputs=[TensorSpec("x", ["batch", 4], "float32")],
        outputs=[TensorSpec(n, ["batch", 4], "float32") for n in outputs or []],
    )


def batch(rows: int, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)


# -- every format ---------------------------------------------------------------------------------


def test_it_runs_onnx_and_returns_every_output_by_name(two_outputs: Path) -> None:
    engine = load_engine(onnx_artifact(two_outputs), device="cpu")
    x = batch(3, 4)

    out = engine.run({"x": x})

    assert (engine.backend, engine.device) == ("onnxruntime", "cpu")
    assert engine.output_names == ["relu", "neg"] and list(out) == ["relu", "neg"]
    np.testing.assert_array_equal(out["relu"], np.maximum(x, 0))
    np.testing.assert_array_equal(out["neg"], -x)
    assert engine.batch_range is None  # a dynamic batch: the caller narrows it if it wants


def test_it_runs_an_onnx_mlp_like_the_torch_module_it_came_from(onnx_mlp: ModelFile) -> None:
    engine = load_engine(onnx_mlp.fresh_artifact(), device="cpu")
    x = batch(5)

    out = engine.run({"x": x})

    with torch.inference_mode():
        expected = onnx_mlp.module(torch.from_numpy(x)).numpy()
    assert [s.name for s in engine.inputs] == ["x"] and engine.inputs[0].shape == ["batch", 64]
    np.testing.assert_allclose(out["output"], expected, rtol=1e-4, atol=1e-5)


def test_it_names_torchscript_outputs_from_the_artifact_else_output_n(tmp_path: Path) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    declared = load_engine(scripted(Pair(), tmp_path / "a.pt", ["twice", "total"]), "cpu")
    undeclared = load_engine(scripted(Pair(), tmp_path / "b.pt"), "cpu")
    single = load_engine(scripted(nn.ReLU(), tmp_path / "c.pt"), "cpu")

    named = declared.run({"x": x})
    numbered = undeclared.run({"x": x})
    one = single.run({"x": x})

    assert list(named) == ["twice", "total"] and declared.backend == "torch"
    np.testing.assert_array_equal(named["twice"], x * 2)
    assert list(numbered) == ["output_0", "output_1"]
    np.testing.assert_array_equal(numbered["output_1"], x.sum(axis=1, keepdims=True))
    assert list(one) == ["output"] and single.output_names == ["output"]
    assert all(isinstance(v, np.ndarray) for v in [*named.values(), *numbered.values()])


def test_it_names_dict_outputs_by_key_and_returns_bf16_as_float32(tmp_path: Path) -> None:
    x = np.ones((2, 4), dtype=np.float32)

    named = load_engine(scripted(Named(), tmp_path / "d.pt"), "cpu").run({"x": x})
    brain = load_engine(scripted(Brain(), tmp_path / "e.pt"), "cpu").run({"x": x})

    assert list(named) == ["doubled", "total"]
    np.testing.assert_array_equal(named["total"], np.full(2, 4.0, dtype=np.float32))
    assert brain["output"].dtype == np.float32
    np.testing.assert_array_equal(brain["output"], np.full((2, 4), 3.0, dtype=np.float32))


def test_it_runs_an_aotinductor_package_like_its_torchscript(
    ts_mlp: ModelFile, tmp_path: Path
) -> None:
    workdir = tmp_path / "jobs" / "job-1"
    workdir.mkdir(parents=True)
    ctx = PipelineContext.start(workdir, ts_mlp.fresh_artifact())
    Compile().run(ctx, "01-compile", {"backend": "aotinductor"}, lambda f, m: None)
    package = ctx.current_artifact
    x = batch(3)

    engine = load_engine(package, "auto", tmp_path / "jobs" / "cache")
    out = engine.run({"x": x})
    eager = load_engine(ctx.artifacts["input"], package.meta["device"]).run({"x": x})

    assert engine.backend.startswith("aotinductor") and engine.device == package.meta["device"]
    assert list(out) == ["output"] and out["output"].shape == (3, 10)
    np.testing.assert_allclose(out["output"], eager["output"], rtol=1e-3, atol=1e-4)
    with pytest.raises(EngineInputError, match="rank"):
        engine.run({"x": x[0]})


# -- feed checks ----------------------------------------------------------------------------------


def test_it_refuses_missing_and_unknown_input_names(onnx_two_inputs: ModelFile) -> None:
    engine = load_engine(onnx_two_inputs.fresh_artifact(), "cpu")
    a = batch(2, 16)

    with pytest.raises(EngineInputError, match=r"missing input\(s\) \['b'\]"):
        engine.run({"a": a})
    with pytest.raises(EngineInputError, match=r"unknown input\(s\) \['c'\]; the model takes"):
        engine.run({"a": a, "b": a, "c": a})


def test_it_refuses_a_wrong_rank_and_a_fixed_dim_that_differs(onnx_mlp: ModelFile) -> None:
    engine = load_engine(onnx_mlp.fresh_artifact(), "cpu")

    with pytest.raises(EngineInputError, match=r"rank 3 .* takes rank 2: \[batch, 64\]"):
        engine.run({"x": np.zeros((2, 64, 1), dtype=np.float32)})
    with pytest.raises(EngineInputError, match="dim 1 of input 'x' is 63 but the model fixes it"):
        engine.run({"x": np.zeros((2, 63), dtype=np.float32)})


def test_it_refuses_inputs_whose_batch_sizes_disagree(onnx_two_inputs: ModelFile) -> None:
    engine = load_engine(onnx_two_inputs.fresh_artifact(), "cpu")

    with pytest.raises(EngineInputError, match="dim 'batch' is 2 in input 'a' but 3 in 'b'"):
        engine.run({"a": batch(2, 16), "b": batch(3, 16)})


def test_it_never_converts_between_int_float_and_bool(
    onnx_mlp: ModelFile, int32_input: Path
) -> None:
    floats = load_engine(onnx_mlp.fresh_artifact(), "cpu")
    ints = load_engine(onnx_artifact(int32_input), "cpu")

    with pytest.raises(EngineInputError, match="is int64 but the model takes float32"):
        floats.run({"x": np.ones((2, 64), dtype=np.int64)})
    with pytest.raises(EngineInputError, match="is float32 but the model takes int32"):
        ints.run({"ids": np.ones((2, 3), dtype=np.float32)})
    with pytest.raises(EngineInputError, match="is bool but the model takes int32"):
        ints.run({"ids": np.ones((2, 3), dtype=bool)})


def test_it_casts_widths_only_when_every_value_survives(
    onnx_mlp: ModelFile, int32_input: Path
) -> None:
    floats = load_engine(onnx_mlp.fresh_artifact(), "cpu")
    ints = load_engine(onnx_artifact(int32_input), "cpu")
    x = batch(2)

    as_float64 = floats.run({"x": x.astype(np.float64)})["output"]
    as_int64 = ints.run({"ids": np.array([[1, -2, 3]], dtype=np.int64)})["as_float"]

    np.testing.assert_array_equal(as_float64, floats.run({"x": x})["output"])
    np.testing.assert_array_equal(as_int64, [[1.0, -2.0, 3.0]])
    with pytest.raises(EngineInputError, match="beyond the range of float32"):
        floats.run({"x": np.full((1, 64), 1e300)})
    with pytest.raises(EngineInputError, match=r"values 1\.\.1099511627776, outside the int32"):
        ints.run({"ids": np.array([[1, 2, 2**40]], dtype=np.int64)})


def test_it_refuses_a_batch_outside_the_range(
    onnx_mlp: ModelFile, onnx_fixed_batch: ModelFile
) -> None:
    dynamic = load_engine(onnx_mlp.fresh_artifact(), "cpu")
    fixed = load_engine(onnx_fixed_batch.fresh_artifact(), "cpu")
    dynamic.batch_range = (2, 4)

    assert dynamic.run({"x": batch(4)})["output"].shape == (4, 10)
    with pytest.raises(EngineInputError, match=r"a batch of 5 is outside .*batch sizes 2\.\.4"):
        dynamic.run({"x": batch(5)})
    with pytest.raises(EngineInputError, match="a batch of 1 is outside"):
        dynamic.run({"x": batch(1)})
    assert fixed.batch_range == (1, 1)
    with pytest.raises(EngineInputError, match=r"outside what this engine takes \(batch size 1\)"):
        fixed.run({"x": batch(2)})
    assert dynamic.batch_problem(8) == "outside the engine's batch range 2-4"


def test_it_checks_feeds_once_when_preparing_a_timed_call(onnx_mlp: ModelFile) -> None:
    engine = load_engine(onnx_mlp.fresh_artifact(), "cpu")

    with engine.context():
        call = engine.prepare({"x": batch(3)})
        first = call()
        with pytest.raises(EngineInputError):
            engine.prepare({"x": np.ones((3, 64), dtype=np.int32)})

    assert np.asarray(first[0]).shape == (3, 10)


# -- where an engine cannot run -------------------------------------------------------------------


def test_it_says_why_an_engine_cannot_load_here(onnx_mlp: ModelFile, tmp_path: Path) -> None:
    artifact = onnx_mlp.fresh_artifact()
    garbage = tmp_path / "model.engine"
    garbage.write_bytes(b"not an engine")

    with pytest.raises(PipelineError, match="its file .* is missing"):
        load_engine(dataclasses.replace(artifact, path=str(tmp_path / "gone")))
    with pytest.raises(EngineUnavailable, match="no engine runs keras models"):
        load_engine(Artifact("k", str(garbage), "keras", "fp32", [], []))
    with pytest.raises(PipelineError, match=r"cannot load input \(onnx\)"):
        load_engine(Artifact("input", str(garbage), "onnx", "fp32", [], []))
    assert set(ENGINE_FORMATS) == {"onnx", "torchscript", "aotinductor", "tensorrt"}


@pytest.mark.skipif(cuda_available(), reason="checks a worker without a CUDA GPU")
def test_it_refuses_gpu_only_engines_on_a_cpu_worker(onnx_mlp: ModelFile, tmp_path: Path) -> None:
    blob = tmp_path / "model.bin"
    blob.write_bytes(b"compiled elsewhere")
    aoti = Artifact("a", str(blob), "aotinductor", "fp32", [], [], meta={"device": "cuda"})

    with pytest.raises(EngineUnavailable, match="compiled for cuda and this worker has no CUDA"):
        load_engine(aoti)
    with pytest.raises(EngineUnavailable, match="device cuda was asked for"):
        load_engine(onnx_mlp.fresh_artifact(), device="cuda")
    if available_backends()["tensorrt"] is not None:
        trt = Artifact("t", str(blob), "tensorrt", "fp16", [], [])
        with pytest.raises(EngineUnavailable, match="TensorRT engines need a CUDA GPU"):
            load_engine(trt)


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA GPU")
def test_it_runs_torchscript_on_the_gpu_and_returns_cpu_arrays(ts_mlp: ModelFile) -> None:
    engine = load_engine(ts_mlp.fresh_artifact(), device="cuda")
    x = batch(4)

    out = engine.run({"x": x})
    on_cpu = load_engine(ts_mlp.fresh_artifact(), device="cpu").run({"x": x})

    assert (engine.backend, engine.device, engine.torch_cuda) == ("torch-cuda", "cuda", True)
    assert isinstance(out["output"], np.ndarray)
    np.testing.assert_allclose(out["output"], on_cpu["output"], rtol=1e-3, atol=1e-4)
