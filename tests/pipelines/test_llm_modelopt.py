"""FP8 and INT4-AWQ through NVIDIA Model Optimizer: refused with a reason without a GPU, routed to
the GPU queue, and (gpu-marked, never run yet) calibrated into a checkpoint on a GPU worker."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pipelines.core import Artifact, PipelineContext, PipelineError
from pipelines.engines.base import cuda_available
from pipelines.stages import validate_pipeline
from pipelines.stages.llm_quantize import LlmQuantize
from tests.llm_fixtures import tiny_llama

HAS_MODELOPT = cuda_available() and importlib.util.find_spec("modelopt") is not None


def _ctx(tmp_path: Path) -> PipelineContext:
    folder = tiny_llama(tmp_path / "llama")
    source = Artifact("input", str(folder), "hf_checkpoint", "fp32", [], [])
    workdir = tmp_path / "job"
    workdir.mkdir()
    return PipelineContext.start(workdir, source, task="text-generation")


def test_fp8_and_int4_awq_plan_a_checkpoint_on_the_gpu_queue() -> None:
    # Imported here: the gpu-marked tests of this file run where only pipelines is installed.
    from r1platform.queues import Queue, queue_for

    for precision, stored in (("fp8", "fp8"), ("int4_awq", "int4")):
        stages = [{"name": "quantize", "settings": {"precision": precision}}]
        planned = validate_pipeline("hf_checkpoint", stages, "fp32")
        assert LlmQuantize.produces_for(planned[0].settings) == "hf_checkpoint"
        assert LlmQuantize.precision_for(planned[0].settings, "fp32") == (stored, None)
        assert queue_for(stages) == Queue.GPU.value
    assert queue_for([{"name": "quantize", "settings": {"precision": "int4"}}]) == Queue.CPU.value
    # A version made this way is quantized already: quantizing it again is refused.
    with pytest.raises(Exception, match="fp8"):
        validate_pipeline("hf_checkpoint", [{"name": "quantize"}], "fp8")


@pytest.mark.skipif(cuda_available(), reason="checks the refusal on a worker without a GPU")
def test_without_a_gpu_fp8_is_refused_before_any_work_with_the_reason(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    with pytest.raises(PipelineError, match="no CUDA GPU"):
        LlmQuantize().run(ctx, "01-quantize", {"precision": "fp8"}, lambda f, m: None)
    assert not (ctx.workdir / "01-quantize" / "model").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_MODELOPT, reason="needs a CUDA GPU and nvidia-modelopt")
@pytest.mark.parametrize("precision", ["fp8", "int4_awq"])
def test_modelopt_calibrates_a_checkpoint_held_to_perplexity(tmp_path: Path, precision) -> None:
    ctx = _ctx(tmp_path)
    result = LlmQuantize().run(
        ctx, "01-quantize", {"precision": precision, "max_ppl_increase": 10.0}, lambda f, m: None
    )
    assert result.status.value == "succeeded", result.message
    made = ctx.current_artifact
    assert made.format == "hf_checkpoint" and made.precision in ("fp8", "int4")
    assert (Path(made.path) / "config.json").is_file()
    assert result.metrics["perplexity"] > 1 and "ppl_increase" in result.metrics
