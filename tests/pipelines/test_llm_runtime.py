"""Running language models: torch and ONNX Runtime GenAI greedy decoding, log-likelihoods,
perplexity windows, LoRA adapters over their base, and the model builder's options and failures.

One tiny random Llama and one fp32 ONNX Runtime GenAI build of it per module (the build is a
subprocess of a few seconds); every model runs on one thread.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.core import Artifact, Cancelled, PipelineContext, PipelineError
from pipelines.engines import EngineUnavailable, load_engine
from pipelines.llm import TEXT_GENERATION
from pipelines.llm.builder import (
    BuildSettings,
    build_ort_genai,
    builder_arguments,
    builder_problem,
    convert_checkpoint,
    run_streamed,
)
from pipelines.llm.perplexity import measure_perplexity, perplexity, windows
from pipelines.llm.runtime import TextModel, open_in_context, open_text_model, text_parent
from tests.llm_fixtures import tiny_gpt2, tiny_llama

PROMPTS = ["the quick brown fox", "a language model predicts the next token from", "hi"]
TEXTS = [
    "perplexity is the exponential of the mean negative log likelihood",
    "quantized weights make decoding faster when memory bandwidth bounds it",
]


def _artifact(key: str, path: Path, fmt: str, parent: str | None = None) -> Artifact:
    return Artifact(
        key=key, path=str(path), format=fmt, precision="fp32", inputs=[], outputs=[], parent=parent
    )


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-runtime")


@pytest.fixture(scope="module")
def llama(root: Path) -> Path:
    return tiny_llama(root / "llama")


@pytest.fixture(scope="module")
def ort_fp32(root: Path, llama: Path) -> Path:
    """The same Llama built by ONNX Runtime GenAI's model builder in fp32 (no quantization)."""
    out = root / "ort-fp32"
    lines: list[str] = []
    build_ort_genai(
        llama, out, root / "cache", BuildSettings("fp32"), lambda f, m: lines.append(m), threads=1
    )
    assert lines[-1] == "model builder: done"
    return out


@pytest.fixture(scope="module")
def torch_model(llama: Path) -> TextModel:
    model = open_text_model(_artifact("input", llama, "hf_checkpoint"), threads=1)
    yield model
    model.close()


@pytest.fixture(scope="module")
def ort_model(ort_fp32: Path) -> TextModel:
    model = open_text_model(_artifact("ort", ort_fp32, "ort_genai"), threads=1)
    yield model
    model.close()


def test_torch_and_ort_genai_agree_greedily(torch_model: TextModel, ort_model: TextModel) -> None:
    assert torch.get_num_threads() == 1
    assert (torch_model.backend, ort_model.backend) == ("torch", "onnxruntime-genai")
    assert torch_model.context_length == ort_model.context_length == 128
    assert torch_model.eos_token_ids == ort_model.eos_token_ids == {0}
    prompts = [torch_model.encode(p) for p in PROMPTS]
    assert prompts == [ort_model.encode(p) for p in PROMPTS]
    ours = torch_model.generate(prompts, 12, stop_at_eos=False)
    theirs = ort_model.generate(prompts, 12, stop_at_eos=False)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a.tokens) == len(b.tokens) == 12
        assert a.tokens[:8] == b.tokens[:8]
        assert a.ttft_s > 0 and len(a.token_times_s) == 11 and a.tpot_s is not None
        assert b.ttft_s > 0 and len(b.token_times_s) == 11
    # (Random tokens need not be valid UTF-8, so decoding is compared on the prompts.)
    assert [torch_model.decode(p) for p in prompts] == PROMPTS
    assert [ort_model.decode(p) for p in prompts] == PROMPTS


def test_a_left_padded_batch_decodes_as_each_prompt_alone(torch_model: TextModel) -> None:
    prompts = [torch_model.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == 3  # padding is exercised
    together = torch_model.generate(prompts, 10, stop_at_eos=False)
    for prompt, generation in zip(prompts, together, strict=True):
        alone = torch_model.generate([prompt], 10, stop_at_eos=False)[0]
        assert generation.tokens == alone.tokens


def test_on_token_streams_every_step_and_eos_stops(torch_model: TextModel) -> None:
    prompt = torch_model.encode(PROMPTS[0])
    seen: list[tuple[int, list[int]]] = []
    made = torch_model.generate([prompt], 6, on_token=lambda step, t: seen.append((step, t)))[0]
    assert [s for s, _ in seen] == list(range(len(seen)))
    assert [t[0] for _, t in seen][: len(made.tokens)] == made.tokens
    # Make the first greedy token the end of sequence: generation stops there, empty.
    assert made.tokens and not made.stopped_at_eos
    torch_model.eos_token_ids = {made.tokens[0]}
    try:
        stopped = torch_model.generate([prompt], 6)[0]
    finally:
        torch_model.eos_token_ids = {0}
    assert stopped.tokens == [] and stopped.stopped_at_eos and stopped.ttft_s > 0


def test_log_likelihood_matches_the_models_own_loss(
    torch_model: TextModel, ort_model: TextModel
) -> None:
    ids = torch_model.encode(TEXTS[0])
    nll, count = torch_model.negative_log_likelihood(ids)
    tensor = torch.tensor([ids])
    with torch.no_grad():
        loss = torch_model.model(tensor, labels=tensor).loss  # type: ignore[attr-defined]
    assert count == len(ids) - 1
    assert nll == pytest.approx(float(loss) * count, rel=1e-5)
    ort_nll, ort_count = ort_model.negative_log_likelihood(ids)
    assert ort_count == count and ort_nll == pytest.approx(nll, rel=1e-4)
    assert torch_model.negative_log_likelihood(ids[:1]) == (0.0, 0)


def test_perplexity_is_the_token_weighted_mean_over_windows(torch_model: TextModel) -> None:
    ids = [torch_model.encode(t) for t in TEXTS]
    whole = measure_perplexity(torch_model, ids, 128)
    total = sum(torch_model.negative_log_likelihood(i)[0] for i in ids)
    tokens = sum(len(i) - 1 for i in ids)
    assert whole.tokens == tokens and whole.windows == 2 and whole.texts == 2
    assert whole.perplexity == pytest.approx(math.exp(total / tokens), rel=1e-6)
    assert perplexity(torch_model, TEXTS, 128) == pytest.approx(whole.perplexity, rel=1e-9)
    # Windows of 8 tokens sharing one: every token but the first is still scored once.
    cut = measure_perplexity(torch_model, ids, 8)
    assert cut.tokens == tokens and cut.windows > 2
    assert cut.perplexity != pytest.approx(whole.perplexity, rel=1e-6)  # less context
    with pytest.raises(PipelineError, match="at least one text"):
        perplexity(torch_model, [], 64)
    with pytest.raises(PipelineError, match="two tokens"):
        measure_perplexity(torch_model, [[5]], 64)


def test_windows_score_every_token_once() -> None:
    for n in range(2, 40):
        ids = list(range(n))
        cut = windows(ids, 5)
        assert all(2 <= len(w) <= 5 for w in cut)
        assert [t for w in cut for t in w[1:]] == ids[1:]
    with pytest.raises(PipelineError, match="at least 2"):
        windows([1, 2, 3], 1)


def test_generate_refuses_what_does_not_fit(torch_model: TextModel, ort_model: TextModel) -> None:
    for model in (torch_model, ort_model):
        with pytest.raises(PipelineError, match="exceeds"):
            model.generate([[5] * 120], 9)
        with pytest.raises(PipelineError, match="empty prompt"):
            model.generate([[]], 3)
        with pytest.raises(PipelineError, match="context"):
            model.negative_log_likelihood([5] * 129)
        assert model.generate([], 3) == []


def test_ort_genai_decodes_a_batch_of_mixed_lengths(ort_model: TextModel) -> None:
    prompts = [ort_model.encode(p) for p in [*PROMPTS, PROMPTS[0]]]
    together = ort_model.generate(prompts, 6, stop_at_eos=False)
    assert together[0].tokens == together[3].tokens
    for prompt, generation in zip(prompts, together, strict=True):
        assert generation.tokens == ort_model.generate([prompt], 6, stop_at_eos=False)[0].tokens


def test_opening_refuses_what_no_runtime_runs(root: Path, llama: Path) -> None:
    with pytest.raises(PipelineError, match="convert it to a checkpoint"):
        open_text_model(_artifact("g", root / "x.gguf", "gguf"))
    with pytest.raises(PipelineError, match="missing"):
        open_text_model(_artifact("m", root / "nowhere", "hf_checkpoint"))
    with pytest.raises(PipelineError, match="LoRA adapter"):
        open_text_model(_artifact("a", llama, "lora_adapter"))
    with pytest.raises(PipelineError, match="only a LoRA adapter takes a base"):
        open_text_model(
            _artifact("m", llama, "hf_checkpoint"), base=_artifact("b", llama, "hf_checkpoint")
        )


def test_the_engine_registry_opens_text_models(llama: Path) -> None:
    engine = load_engine(_artifact("input", llama, "hf_checkpoint"), "cpu", family=TEXT_GENERATION)
    try:
        assert isinstance(engine, TextModel) and engine.family == TEXT_GENERATION
    finally:
        engine.close()  # type: ignore[attr-defined]
    with pytest.raises(EngineUnavailable, match="base checkpoint"):
        load_engine(_artifact("a", llama, "lora_adapter"), "cpu", family=None)


def test_a_lora_adapter_runs_over_its_base_unmerged(root: Path, llama: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(llama, local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    config.init_lora_weights = False  # random B: the adapter changes the outputs
    peft_model = get_peft_model(base, config)
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    merged = peft_model.merge_and_unload().eval()

    ctx = PipelineContext.start(root / "work-lora", _artifact("x", llama, "hf_checkpoint"))
    ctx.add_artifact(_artifact("01-finetune", adapter, "lora_adapter", parent="input"))
    assert text_parent(ctx, ctx.current_artifact).key == "input"  # type: ignore[union-attr]
    ids = [int(i) for i in open_text_model(ctx.artifacts["input"], threads=1).encode(TEXTS[1])]
    with open_in_context(ctx, ctx.current_artifact, threads=1) as model:
        assert model.backend == "torch-peft"
        nll, count = model.negative_log_likelihood(ids)
        tensor = torch.tensor([ids])
        with torch.no_grad():
            expected = float(merged(tensor, labels=tensor).loss) * count
        assert nll == pytest.approx(expected, rel=1e-4)
        with open_text_model(ctx.artifacts["input"], threads=1) as plain:
            assert abs(plain.negative_log_likelihood(ids)[0] - nll) > 1e-3


def test_builder_options_keep_embeddings_and_lm_head_higher() -> None:
    int4, notes = builder_arguments(BuildSettings("int4", 64, "k_quant", 2), tied_embeddings=False)
    assert "block_size=64" in int4 and "algo_config=k_quant" in int4
    assert "accuracy_level=2" in int4 and "hf_remote=false" in int4
    assert "matmul_mixed_precision=last_matmul:int8" in int4 and notes == []
    int8, _ = builder_arguments(BuildSettings("int8"), tied_embeddings=True)
    assert "nodes_to_exclude=/lm_head/MatMul" in int8 and "shared_embeddings=false" in int8
    shared, _ = builder_arguments(
        BuildSettings("int4", keep_embeddings=False, keep_lm_head=False), tied_embeddings=True
    )
    assert not any(o.startswith(("shared_embeddings", "nodes_to", "matmul_mixed")) for o in shared)
    _, notes = builder_arguments(BuildSettings("int8", keep_embeddings=False), True)
    assert notes and "embeddings kept float" in notes[0]
    mixed, _ = builder_arguments(
        BuildSettings("int4", sensitive_layers="int8", symmetric=False), tied_embeddings=False
    )
    assert "matmul_mixed_precision=last_matmul:int8,mixed_layers:int8" in mixed
    assert "is_symmetric=false" in mixed
    plain, _ = builder_arguments(BuildSettings("int8", sensitive_layers="int8"), False)
    assert not any("mixed_layers" in o or "is_symmetric" in o for o in plain)  # int4 only


def test_the_builder_refuses_and_reports_failures(root: Path, llama: Path) -> None:
    gpt2 = tiny_gpt2(root / "gpt2")
    assert "does not convert GPT2LMHeadModel" in (builder_problem(gpt2) or "")
    assert builder_problem(llama) is None
    # Streaming, the error tail and the timeout, on a stand-in for the builder (it is slow to
    # start: it imports torch).
    script = "import sys\nfor i in range(30): print('line', i)\nprint('Boom: bad weights')\n"
    seen: list[str] = []
    with pytest.raises(PipelineError, match=r"failed \(exit status 3\).*line 29 \| Boom: bad"):
        run_streamed([sys.executable, "-c", script + "sys.exit(3)"], {}, seen.append, 60)
    assert seen[:2] == ["line 0", "line 1"] and len(seen) == 31
    assert (
        run_streamed([sys.executable, "-c", script], {}, seen.append, 60)[-1] == "Boom: bad weights"
    )
    slow = [sys.executable, "-c", "import time\nprint('started', flush=True)\ntime.sleep(60)"]
    with pytest.raises(PipelineError, match="ran longer than 0.5 s.*started"):
        run_streamed(slow, {}, seen.append, 0.5)

    def cancel(line: str) -> None:
        raise Cancelled("job cancelled")

    started = time.monotonic()
    with pytest.raises(Cancelled):
        run_streamed(slow, {}, cancel, 60)
    assert time.monotonic() - started < 30  # killed, not waited for
    with pytest.raises(PipelineError, match="ran longer than 0.2 s"):
        build_ort_genai(
            llama, root / "out-slow", root / "cache-s", BuildSettings("int8"), noop, timeout_s=0.2
        )
    assert not (llama / "genai_config.json").exists()  # nothing written beside the input


def test_a_checkpoint_converts_to_bf16(root: Path, llama: Path) -> None:
    out = root / "bf16"
    convert_checkpoint(llama, out, "bf16", threads=1)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_bytes() == (llama / "tokenizer.json").read_bytes()
    with open_text_model(_artifact("bf16", out, "hf_checkpoint"), threads=1) as model:
        # bf16 is computed in bf16 where oneDNN has bf16 kernels (AVX512-BF16), else in fp32.
        native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        assert model.dtype == (torch.bfloat16 if native else torch.float32)  # type: ignore[attr-defined]
        assert model.generate([model.encode("the quick")], 3)[0].ttft_s > 0
    with pytest.raises(PipelineError, match="fp16 or bf16"):
        convert_checkpoint(llama, root / "int8", "int8")


def test_the_builder_reads_gemma3_rope_settings_as_transformers_4_wrote_them() -> None:
    from pipelines.llm.builder_child import flat_rope

    nested = {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    config = flat_rope(SimpleNamespace(rope_parameters=nested))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert config.rope_theta == 1_000_000.0 and config.rope_local_base_freq == 10_000.0
    flat = {"rope_type": "default", "rope_theta": 500_000.0}  # Llama's, left as it is
    assert flat_rope(SimpleNamespace(rope_parameters=dict(flat))).rope_parameters == flat


def test_ort_genai_puts_the_bos_token_first_as_the_checkpoint_tokenizer_does(
    tmp_path: Path,
) -> None:
    from pipelines.llm.runtime import _leading_bos

    processor = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A"}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps({"post_processor": processor}))
    (tmp_path / "tokenizer_config.json").write_text("{}")
    assert _leading_bos(tmp_path) == 2
    (tmp_path / "tokenizer.json").write_text(json.dumps({"post_processor": None}))
    assert _leading_bos(tmp_path) is None  # GPT-2 style: nothing first
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True}))
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"bos_token_id": 1}}))
    assert _leading_bos(tmp_path) == 1
