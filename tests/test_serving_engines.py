"""Engine servers' command lines (vLLM, TensorRT-LLM), replicas over GPUs, the pool's settings,
and (``gpu``-marked) the real engines started, supervised and proxied on a tiny checkpoint."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import orjson
import pytest
from django.core.management import CommandError, call_command

from pipelines.core import Artifact
from r1platform.deployments.models import ServingPool
from r1platform.serving.engine_deployments import EngineDeployment
from r1platform.serving.engine_servers import (
    EngineConfigError,
    EngineServerSpec,
    EngineSettings,
    LoraModule,
    place_replicas,
    replica_specs,
    visible_gpus,
)
from r1platform.serving.metrics import ServingMetrics
from r1platform.serving.source import ModelSpec
from r1platform.serving.stats import ServingStats
from r1platform.workers.models import HardwareProfile


def adapter(folder: Path, rank: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return folder


def test_vllm_serve_gets_the_documented_flags(tmp_path):
    spec = EngineServerSpec("vllm", tmp_path / "base", "support-bot", max_num_seqs=16)
    assert spec.argv(8123) == [
        "vllm", "serve", str(tmp_path / "base"),
        "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "support-bot",
        "--max-num-seqs", "16",
        "--gpu-memory-utilization", "0.9",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    assert spec.upstream_model == "support-bot"
    assert spec.env("k3y") == {"VLLM_API_KEY": "k3y"}  # the key never in argv (ps shows argv)
    assert "k3y" not in " ".join(spec.argv(8123))


def test_vllm_serves_lora_adapters_beside_their_base(tmp_path):
    modules = (
        LoraModule.from_folder("bot-a", adapter(tmp_path / "a", 8)),
        LoraModule.from_folder("bot-b", adapter(tmp_path / "b", 12)),
    )
    spec = EngineServerSpec(
        "vllm", tmp_path / "base", "base", max_num_seqs=8, gpu_memory_utilization=0.45,
        max_model_len=4096, tensor_parallel=2, lora_modules=modules, gpus=("2", "3"),
    )  # fmt: skip
    assert spec.argv(9000)[7:] == [
        "--served-model-name", "base",
        "--max-num-seqs", "8",
        "--gpu-memory-utilization", "0.45",
        "--max-model-len", "4096",
        "--tensor-parallel-size", "2",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",  # 12 rounds up to 16
        "--lora-modules", f"bot-a={tmp_path / 'a'}", f"bot-b={tmp_path / 'b'}",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    assert spec.env("k") == {
        "CUDA_VISIBLE_DEVICES": "2,3",
        "VLLM_API_KEY": "k",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }


def test_trtllm_serve_gets_the_documented_flags_and_is_named_by_its_folder(tmp_path):
    spec = EngineServerSpec(
        "trtllm", tmp_path / "base", "support-bot", max_num_seqs=32, max_model_len=2048,
        max_num_tokens=8192, tensor_parallel=2, gpus=("0", "1"),
    )  # fmt: skip
    assert spec.argv(8200) == [
        "trtllm-serve", str(tmp_path / "base"),
        "--host", "127.0.0.1", "--port", "8200",
        "--backend", "pytorch",
        "--max_batch_size", "32",
        "--max_num_tokens", "8192",
        "--max_seq_len", "2048",
        "--tp_size", "2",
        "--kv_cache_free_gpu_memory_fraction", "0.9",
    ]  # fmt: skip
    assert spec.upstream_model == str(tmp_path / "base")
    assert spec.env("k") == {"CUDA_VISIBLE_DEVICES": "0,1"}  # it takes no key: loopback only


def test_an_adapter_on_trtllm_is_refused_with_the_way_out(tmp_path):
    module = LoraModule.from_folder("bot", adapter(tmp_path / "a", 8))
    with pytest.raises(EngineConfigError, match="merge the adapter"):
        EngineServerSpec("trtllm", tmp_path, "base", max_num_seqs=4, lora_modules=(module,))


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "does not give a LoRA rank"),
        ("{not json", "does not give a LoRA rank"),
        ('{"peft_type": "LORA"}', "does not give a LoRA rank"),
        ('{"r": 1024}', "over vLLM's largest"),
    ],
)
def test_an_adapter_vllm_cannot_take_is_refused(tmp_path, write, message):
    folder = tmp_path / "a"
    folder.mkdir()
    if write is not None:
        (folder / "adapter_config.json").write_text(write)
    with pytest.raises(EngineConfigError, match=message):
        module = LoraModule.from_folder("bot", folder)
        EngineServerSpec("vllm", tmp_path, "b", max_num_seqs=4, lora_modules=(module,)).argv(1)


def test_replicas_take_one_gpu_each_and_share_memory_when_they_share_one():
    assert place_replicas(2, ["0", "1"], 1, 0.9) == [
        place_replicas(1, ["0"], 1, 0.9)[0],
        place_replicas(1, ["1"], 1, 0.9)[0],
    ]
    three = place_replicas(3, ["0", "1"], 1, 0.9)
    assert [p.gpus for p in three] == [("0",), ("1",), ("0",)]
    assert [p.memory_fraction for p in three] == [0.45, 0.9, 0.45]
    assert [p.gpus for p in place_replicas(2, ["0", "1", "2", "3"], 2, 0.8)] == [
        ("0", "1"),
        ("2", "3"),
    ]
    assert [p.gpus for p in place_replicas(2, [], 1, 0.9)] == [(), ()]


def test_replica_specs_follow_the_pools_settings(tmp_path):
    settings = EngineSettings("vllm", replicas=2, max_num_seqs=24, gpus=("0", "1"))
    specs = replica_specs(settings, tmp_path, "bot", {"bot-fr": adapter(tmp_path / "fr", 16)})
    assert [s.gpus for s in specs] == [("0",), ("1",)]
    assert all(s.max_num_seqs == 24 and s.lora_rank() == 16 for s in specs)
    assert [m.name for m in specs[0].lora_modules] == ["bot-fr"]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"engine": "sglang"}, "is not one of"),
        ({"engine": "vllm", "replicas": 0}, "at least one replica"),
        ({"engine": "vllm", "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"engine": "vllm", "max_num_seqs": 0}, "at least 1"),
    ],
)
def test_settings_that_cannot_run_are_refused(kw, message):
    with pytest.raises(EngineConfigError, match=message):
        EngineSettings(**kw)


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert visible_gpus() == ("2", "5")
    pool = EngineSettings.for_pool("trtllm", engine_replicas=3, max_batch_size=48)
    assert (pool.engine, pool.replicas, pool.max_num_seqs) == ("trtllm", 3, 48)
    assert pool.gpus == ("2", "5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == ()


def test_a_deployment_without_a_model_folder_is_refused(tmp_path):
    spec = text_spec(tmp_path / "missing")
    with pytest.raises(EngineConfigError, match="is not a model folder"):
        EngineDeployment.for_spec(spec, EngineSettings("vllm"), ServingMetrics(), ServingStats())


def test_a_deployment_logs_each_replica_under_the_work_dir(tmp_path, settings):
    spec = text_spec(tmp_path)
    deployment = EngineDeployment.for_spec(
        spec, EngineSettings("vllm", replicas=2), ServingMetrics(), ServingStats()
    )
    logs = [r.log_path for r in deployment.replicas]  # type: ignore[attr-defined]
    root = Path(settings.R1_WORK_DIR) / "serving" / "engines" / "team-3-bot-v2-r5"
    assert logs == [root / "replica-0.log", root / "replica-1.log"]
    assert deployment.upstream_model == "bot" and not deployment.ready
    assert [r["state"] for r in deployment.replica_states()] == ["stopped", "stopped"]
    assert deployment.replicas[1].command(8000)[:4] == ["vllm", "serve", str(tmp_path), "--host"]
    # Started without LoRA: a later adapter needs the servers started again.
    assert not deployment.add_adapter("bot-fr", adapter(tmp_path / "fr", 8))
    key = deployment.replicas[0].headers["Authorization"]
    assert deployment.replicas[0].env["VLLM_API_KEY"] == key.removeprefix("Bearer ")  # type: ignore[attr-defined]


# -- the pool's settings -------------------------------------------------------------------------


@pytest.fixture
def profiles(db):
    gpu = HardwareProfile.objects.create(
        key="cuda-h100", backend="onnxruntime", device_kind="cuda", device_name="H100"
    )
    cpu = HardwareProfile.objects.create(
        key="cpu-x86", backend="onnxruntime", device_kind="cpu", device_name="x86"
    )
    return gpu, cpu


def test_create_pool_sets_the_text_engine_and_its_replicas(profiles):
    call_command("create_pool", "llm-gpu", "--profile", "cuda-h100", "--text-engine", "vllm",
                 "--engine-replicas", "2")  # fmt: skip
    pool = ServingPool.objects.get(name="llm-gpu")
    assert (pool.text_engine, pool.engine_replicas) == ("vllm", 2)
    call_command("create_pool", "llm-gpu", "--profile", "cuda-h100", "--description", "kept")
    pool.refresh_from_db()
    assert (pool.text_engine, pool.engine_replicas) == ("vllm", 2)  # not given: left as is


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "cpu-x86", "--text-engine", "vllm"], "needs a CUDA GPU profile"),
        (["--profile", "cuda-h100", "--engine-replicas", "0"], "at least 1"),
    ],
)
def test_create_pool_refuses_engines_that_cannot_run(profiles, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("create_pool", "llm", *args)
    assert not ServingPool.objects.filter(name="llm").exists()


def test_create_pool_refuses_an_unknown_text_engine(profiles):
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("create_pool", "llm", "--profile", "cuda-h100", "--text-engine", "sglang")


# -- the real engines (gpu) ------------------------------------------------------------------------


def text_spec(folder: Path, name: str = "bot") -> ModelSpec:
    artifact = Artifact(f"{name} v2", str(folder), "hf_checkpoint", "fp16", [], [])
    return ModelSpec(team_id=3, team="team-3", name=name, version=2, artifact=artifact, revision=5)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def serve_and_ask(
    deployment: EngineDeployment, specs: list[ModelSpec], once_ready=lambda: None
) -> list[dict]:
    """Start the engine servers (then ``once_ready()``), ask each spec's model once plainly and
    once streamed."""

    async def ask() -> list[dict]:
        answers = []
        for spec in specs:
            body = {"model": spec.name, "prompt": "the quick brown fox", "max_tokens": 8}
            whole = await deployment.forward(spec, "completions", body | {"temperature": 0})
            assert whole.status_code == 200, whole.body
            answers.append(orjson.loads(whole.body))
            stream = await deployment.forward(spec, "completions", body | {"stream": True})
            chunks = [part async for part in stream.body_iterator]  # type: ignore[attr-defined]
            assert chunks[-1].endswith(b"data: [DONE]\n\n"), chunks[-3:]
        await deployment.close()
        return answers

    deployment.start()
    try:
        assert deployment.wait_ready(900), deployment.reason
        once_ready()
        return asyncio.run(ask())
    finally:
        for replica in deployment.replicas:
            replica.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not (_cuda() and shutil.which("vllm")), reason="needs a CUDA GPU and vLLM")
def test_vllm_serves_a_tiny_llama_and_its_adapter_through_the_proxy(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.llm_fixtures import tiny_llama

    base = tiny_llama(tmp_path / "base", hidden=256)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "later")
    settings = EngineSettings(
        "vllm", max_num_seqs=8, max_model_len=128, gpu_memory_utilization=0.3,
        gpus=visible_gpus()[:1], startup_timeout=600, lora_slots=2, max_lora_rank=8,
    )  # fmt: skip
    spec = text_spec(base)
    adapter_spec = text_spec(tmp_path / "adapter", "bot-fr")
    later_spec = text_spec(tmp_path / "later", "bot-de")
    deployment = EngineDeployment.for_spec(
        spec, settings, ServingMetrics(), ServingStats(), adapters={"bot-fr": tmp_path / "adapter"}
    )

    def promote_later() -> None:  # an adapter promoted while the base serves: no restart
        assert deployment.add_adapter("bot-de", tmp_path / "later")

    answers = serve_and_ask(deployment, [spec, adapter_spec, later_spec], promote_later)
    assert [a["model"] for a in answers] == ["bot", "bot-fr", "bot-de"]
    assert deployment.replicas[0].restarts == 0  # type: ignore[attr-defined]
    assert all(a["usage"]["completion_tokens"] > 0 for a in answers)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (_cuda() and shutil.which("trtllm-serve")), reason="needs a CUDA GPU and TensorRT-LLM"
)
def test_trtllm_serves_a_tiny_llama_through_the_proxy(tmp_path):
    from tests.llm_fixtures import tiny_llama

    base = tiny_llama(tmp_path / "base", hidden=256)
    settings = EngineSettings(
        "trtllm", max_num_seqs=8, max_model_len=128, gpu_memory_utilization=0.3,
        gpus=visible_gpus()[:1], startup_timeout=900,
    )  # fmt: skip
    spec = text_spec(base)
    deployment = EngineDeployment.for_spec(spec, settings, ServingMetrics(), ServingStats())
    answers = serve_and_ask(deployment, [spec])
    assert answers[0]["model"] == "bot" and answers[0]["usage"]["completion_tokens"] > 0
