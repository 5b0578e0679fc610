"""FP8 and INT4-AWQ post-training quantization on a GPU with NVIDIA's Model Optimizer.

``quantize_with_modelopt`` loads a checkpoint on the CUDA device, calibrates it with
``modelopt.torch.quantization.quantize`` (``FP8_DEFAULT_CFG`` or ``INT4_AWQ_CFG``) on a few
hundred text samples, and writes the unified Hugging Face checkpoint of
``modelopt.torch.export.export_hf_checkpoint`` (safetensors with the quantization config that
TensorRT-LLM's ``trtllm-build``/LLM API and vLLM load). It is written against ModelOpt 0.47's
documented API and runs only on GPU workers with the ``modelopt`` extra installed
(``pip install 'r1platform[modelopt]'``); both are checked first, with a reason.

**Never run yet:** no machine the team has used had an NVIDIA GPU. Its test is ``gpu``-marked.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from pipelines.core import PipelineError
from pipelines.engines.base import EngineUnavailable, cuda_available
from pipelines.llm.perplexity import windows

__all__ = ["MODELOPT_PRECISIONS", "modelopt_problem", "quantize_with_modelopt"]

#: The precision setting -> ModelOpt's preset config name.
MODELOPT_PRECISIONS = {"fp8": "FP8_DEFAULT_CFG", "int4_awq": "INT4_AWQ_CFG"}


def modelopt_problem() -> str | None:
    """Why this worker cannot run ModelOpt (None: it can)."""
    if not cuda_available():
        return (
            "FP8 and INT4-AWQ are calibrated on an NVIDIA GPU with Model Optimizer; this worker "
            "has no CUDA GPU (use int8 or int4, which ONNX Runtime GenAI builds on any worker)"
        )
    if importlib.util.find_spec("modelopt") is None:
        return "Model Optimizer is not installed on this worker: pip install 'r1platform[modelopt]'"
    return None


def quantize_with_modelopt(
    checkpoint: Path,
    out: Path,
    precision: str,
    texts: Sequence[str],
    judged_ids: Sequence[Sequence[int]],
    progress: Callable[[float, str], None],
    *,
    max_length: int = 512,
) -> float:
    """Calibrate ``checkpoint`` to ``precision`` (fp8 | int4_awq) on ``texts``, write ``out``,
    and return the quantized model's perplexity on ``judged_ids`` (the parent's token ids, in
    windows of ``max_length``), measured on the calibrated model before export."""
    problem = modelopt_problem()
    if problem is not None:
        raise EngineUnavailable(problem)
    if precision not in MODELOPT_PRECISIONS:
        raise PipelineError(f"ModelOpt precision must be one of {', '.join(MODELOPT_PRECISIONS)}")
    if not texts:
        raise PipelineError("ModelOpt calibration needs at least one text")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = str(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False, dtype=torch.bfloat16
    ).to("cuda")
    model.eval()
    batches = [
        tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
        for text in texts
    ]

    def forward_loop(m: torch.nn.Module) -> None:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                m(**{k: v.to("cuda") for k, v in batch.items()})
                progress(0.1 + 0.7 * (i + 1) / len(batches), f"calibrating {i + 1}/{len(batches)}")

    progress(0.05, f"ModelOpt {precision}: {len(batches)} calibration texts")
    config = getattr(mtq, MODELOPT_PRECISIONS[precision])
    mtq.quantize(model, config, forward_loop)
    out.mkdir(parents=True, exist_ok=True)
    progress(0.8, "perplexity of the calibrated model")
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in judged_ids:
            for window in windows(ids, max_length):
                tensor = torch.tensor([window], device="cuda")
                loss = model(input_ids=tensor, labels=tensor).loss
                nll += float(loss) * (len(window) - 1)
                count += len(window) - 1
    if count == 0:
        raise PipelineError("no text had two tokens or more: perplexity cannot be measured")
    perplexity = math.exp(nll / count) if nll / count < 700 else math.inf
    progress(0.85, "exporting the quantized checkpoint")
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    tokenizer.save_pretrained(str(out))
    progress(1.0, f"ModelOpt {precision} checkpoint written")
    return perplexity
