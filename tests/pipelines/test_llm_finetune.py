"""finetune for language models: LoRA on tiny random Llama and GPT-2 checkpoints.

Runs are a few optimizer steps on one thread; most of the file's time is importing transformers
and peft once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from pipelines.core import Artifact, Cancelled, DatasetRef, PipelineContext, PipelineError
from pipelines.core import StageResult as Result
from pipelines.datasets.text_corpus import load_pairs
from pipelines.llm.lora import CHECKPOINT_FILENAME
from pipelines.llm.lora_data import IGNORE, build_examples
from pipelines.llm.lora_model import INERT_BASE_PREFIX
from pipelines.stages.llm_finetune import ADAPTER_DIR, MERGED_DIR, LlmFinetune
from tests.llm_fixtures import tiny_gpt2, tiny_llama

# peft 0.21 asks transformers 5 by a deprecated name when it loads an adapter.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")

DATASET = "5"
SENTENCE = "the quick brown fox jumps over the lazy dog"
# One thread, so runs are reproducible bit for bit and do not fight over the 2 cores.
QUICK: dict[str, Any] = {"dataset_id": int(DATASET), "threads": 1, "eval_examples": 8}
PROBE = "a language model predicts the next token"


def noop(fraction: float, message: str) -> None:
    """A progress callback that ignores its calls."""


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny checkpoints and one dataset of each kind fine-tuning reads (and test cases)."""
    root = tmp_path_factory.mktemp("llm-finetune")
    pairs = [
        {"prompt": f"question {i}: what jumps?", "completion": " the quick brown fox"}
        for i in range(20)
    ]
    chats = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": f"count to {i % 5 + 1}"},
                {"role": "assistant", "content": " ".join(str(n) for n in range(i % 5 + 1))},
                {"role": "user", "content": "thanks"},
                {"role": "assistant", "content": "ok"},
            ]
        }
        for i in range(20)
    ]
    cases = [{"prompt": "2+2=", "expected": "4", "check": "contains"} for _ in range(4)]
    return {
        "llama": tiny_llama(root / "llama"),
        "gpt2": tiny_gpt2(root / "gpt2"),
        "text": _jsonl(root / "text.jsonl", [{"text": SENTENCE}] * 40),
        "prompt_completion": _jsonl(root / "pairs.jsonl", pairs),
        "messages": _jsonl(root / "chats.jsonl", chats),
        "test_cases": _jsonl(root / "cases.jsonl", cases),
    }


def _ref(folders: dict[str, Path], kind: str) -> DatasetRef:
    return DatasetRef(id=DATASET, path=str(folders[kind]), format="jsonl")


def _ctx(workdir: Path, folders: dict[str, Path], model: str, kind: str) -> PipelineContext:
    workdir.mkdir(parents=True, exist_ok=True)
    source = Artifact(
        key="input",
        path=str(folders[model]),
        format="hf_checkpoint",
        precision="fp32",
        inputs=[],
        outputs=[],
    )
    return PipelineContext.start(
        workdir, source, task="text-generation", datasets={DATASET: _ref(folders, kind)}
    )


def _logits(model: Any, tokenizer: Any) -> torch.Tensor:
    ids = torch.tensor([tokenizer(PROBE).input_ids])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load(folder: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _with_adapter(base: Path, adapter: Path) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(_load(base)[0], str(adapter)).eval()


@pytest.fixture(scope="module")
def llama_run(
    folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[PipelineContext, Result]:
    """Ten steps of LoRA with merge on the repeated sentence."""
    ctx = _ctx(tmp_path_factory.mktemp("llama-run") / "work", folders, "llama", "text")
    settings = {**QUICK, "max_steps": 10, "learning_rate": 1e-2, "log_every_steps": 2}
    return ctx, LlmFinetune().run(ctx, "02-finetune", {**settings, "merge": True}, noop)


def test_lora_lowers_the_loss_on_a_repeated_text(
    llama_run: tuple[PipelineContext, Result],
) -> None:
    ctx, result = llama_run
    m = result.metrics

    assert m["steps"] == 10 and m["final_loss"] < m["initial_loss"] - 0.5
    assert m["val_loss"] < m["initial_val_loss"] - 0.5
    curve = [(h["step"], h["metrics"]) for h in result.history if "loss" in h["metrics"]]
    assert [step for step, _ in curve] == [2, 4, 6, 8, 10]
    assert curve[-1][1]["loss"] < curve[0][1]["loss"]
    lrs = [values["lr"] for _, values in curve]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < 1e-3  # warm-up 1 step, then cosine
    assert m["seconds_per_step"] > 0 and m["tokens_per_second"] > 0
    # LoRA on Linear(in, out) trains r * (in + out): per layer q 64->64, k and v 64->32, o 64->64,
    # gate and up 64->128, down 128->64; two layers, rank 8.
    assert m["trainable_parameters"] == 2 * 8 * (128 + 96 + 96 + 128 + 3 * 192)
    assert m["resumed_from_step"] == 0
    assert "adapter" in result.message and "resumed" not in result.message


def test_the_adapter_is_a_small_child_of_its_base_that_names_no_downloadable_base(
    llama_run: tuple[PipelineContext, Result], folders: dict[str, Path]
) -> None:
    ctx, result = llama_run
    adapter = ctx.artifacts["02-finetune.adapter"]
    assert result.outputs == ["02-finetune.adapter", "02-finetune"]
    assert (adapter.format, adapter.parent, adapter.produced_by) == (
        "lora_adapter",
        "input",
        "finetune",
    )
    folder = Path(adapter.path)
    assert folder == ctx.workdir / "02-finetune" / ADAPTER_DIR
    files = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert not any(name.endswith(".bin") for name in files)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == INERT_BASE_PREFIX + "input"
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base_bytes = (folders["llama"] / "model.safetensors").stat().st_size
    adapter_bytes = (folder / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < base_bytes / 4
    assert result.metrics["adapter_mb"] == pytest.approx(adapter_bytes / 2**20, abs=1e-3)
    # The tokenizer files are the base's, byte for byte (ONNX Runtime GenAI reads their class).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (folders["llama"] / name).read_bytes()
    assert not (ctx.workdir / "02-finetune" / CHECKPOINT_FILENAME).exists()
    assert ctx.state["02-finetune"]["completed"] is True


def test_the_adapter_changes_the_logits_and_the_merge_matches_it(
    llama_run: tuple[PipelineContext, Result], folders: dict[str, Path]
) -> None:
    ctx, _ = llama_run
    adapter = ctx.artifacts["02-finetune.adapter"]
    merged = ctx.artifacts["02-finetune"]
    assert ctx.current == "02-finetune"  # the merged checkpoint, for quantize to take
    assert (merged.format, merged.parent) == ("hf_checkpoint", "02-finetune.adapter")
    assert Path(merged.path) == ctx.workdir / "02-finetune" / MERGED_DIR

    base, tokenizer = _load(folders["llama"])
    with_adapter = _logits(_with_adapter(folders["llama"], Path(adapter.path)), tokenizer)
    base_logits = _logits(base, tokenizer)
    merged_model, merged_tokenizer = _load(Path(merged.path))

    assert (with_adapter - base_logits).abs().max() > 1e-2
    assert torch.allclose(_logits(merged_model, merged_tokenizer), with_adapter, atol=1e-4)
    files = {p.name for p in Path(merged.path).iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((Path(merged.path) / "config.json").read_text())
    assert config["use_cache"] is True and "_name_or_path" not in config


def test_prompt_completion_trains_on_the_completion_only(folders: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folders["llama"]), local_files_only=True)
    data = build_examples(_ref(folders, "prompt_completion"), tokenizer, "train", 64)

    assert data.kind == "prompt_completion" and len(data.examples) == data.rows == 16
    pairs = load_pairs(_ref(folders, "prompt_completion"), "train")
    for example, (prompt, completion) in zip(data.examples, pairs, strict=True):
        prompt_ids = tokenizer(prompt).input_ids
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids + [0]  # EOS
        n = len(prompt_ids)
        assert example.input_ids == prompt_ids + completion_ids
        assert example.labels == [IGNORE] * n + completion_ids
        assert example.trained_tokens == len(completion_ids)
    # Cut to fewer tokens than the prompt: nothing left to train on, so dropped.
    short = build_examples(_ref(folders, "prompt_completion"), tokenizer, "train", 4)
    assert short.examples == [] and short.dropped == 16 and short.truncated == 16


def test_messages_train_on_the_assistant_turns_only(folders: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folders["llama"]), local_files_only=True)
    data = build_examples(_ref(folders, "messages"), tokenizer, "train", 128)

    assert data.loss_on == "assistant turns" and data.all_token_conversations == 0
    for example in data.examples:
        trained = [t for t in example.labels if t != IGNORE]
        text = tokenizer.decode(trained[:-1])
        # Both assistant turns (and the template's newline after each) and a final EOS.
        assert text.endswith("\nok\n") and trained[-1] == 0
        assert "user" not in text and "system" not in text and "assistant" not in text
        full = tokenizer.decode(example.input_ids)
        assert full.startswith("system: be brief\nuser: count to")


def test_a_template_that_rewrites_earlier_turns_trains_on_all_tokens(
    folders: dict[str, Path],
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folders["llama"]), local_files_only=True)
    # The header counts the messages, so no rendering extends the one before it.
    tokenizer.chat_template = (
        "{{ messages|length }} messages\n"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    data = build_examples(_ref(folders, "messages"), tokenizer, "train", 128)

    assert data.all_token_conversations == data.rows == len(data.examples) == 16
    assert "on all tokens" in data.loss_on
    for example in data.examples:
        assert example.labels == example.input_ids
        assert tokenizer.decode(example.input_ids).startswith("5 messages\nsystem: be brief")


def test_a_killed_run_resumes_from_its_checkpoint_with_the_same_weights(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    settings = {
        **QUICK,
        "max_steps": 6,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "checkpoint_every_steps": 2,
        "dropout": 0.2,  # the RNG matters: it must be restored too
        "seed": 3,
    }
    whole = _ctx(tmp_path / "whole", folders, "llama", "text")
    uninterrupted = LlmFinetune().run(whole, "02-finetune", settings, noop)

    killed = _ctx(tmp_path / "killed", folders, "llama", "text")

    def cancel_at_step_3(fraction: float, message: str) -> None:
        if message.startswith("step 3/"):
            raise Cancelled()

    with pytest.raises(Cancelled):
        LlmFinetune().run(killed, "02-finetune", settings, cancel_at_step_3)
    assert killed.state["02-finetune"]["step"] == 2
    assert (killed.workdir / "02-finetune" / CHECKPOINT_FILENAME).is_file()
    assert not (killed.workdir / "02-finetune" / ADAPTER_DIR).exists()

    messages: list[str] = []
    resumed = LlmFinetune().run(
        PipelineContext.load(killed.workdir) or killed,
        "02-finetune",
        settings,
        lambda fraction, message: messages.append(message),
    )

    assert "resuming from step 2" in messages
    assert not any(m.startswith(("step 1/", "step 2/")) for m in messages)
    assert resumed.metrics["resumed_from_step"] == 2 and "resumed from step 2" in resumed.message
    assert resumed.metrics["final_loss"] == uninterrupted.metrics["final_loss"]
    assert [h["step"] for h in resumed.history] == [h["step"] for h in uninterrupted.history]
    a = load_file(str(whole.workdir / "02-finetune" / ADAPTER_DIR / "adapter_model.safetensors"))
    b = load_file(str(killed.workdir / "02-finetune" / ADAPTER_DIR / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_gpt2_trains_on_chats_with_its_conv1d_projections(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    ctx = _ctx(tmp_path / "work", folders, "gpt2", "messages")
    settings = {**QUICK, "max_steps": 3, "learning_rate": 1e-2, "gradient_checkpointing": True}
    result = LlmFinetune().run(ctx, "03-finetune", {**settings, "merge": True}, noop)

    adapter = ctx.artifacts["03-finetune.adapter"]
    assert adapter.meta["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert adapter.meta["loss_on"] == "assistant turns"
    config = json.loads((Path(adapter.path) / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert result.metrics["final_loss"] < result.metrics["initial_loss"]

    _, tokenizer = _load(folders["gpt2"])
    with_adapter = _logits(_with_adapter(folders["gpt2"], Path(adapter.path)), tokenizer)
    merged, _ = _load(Path(ctx.artifacts["03-finetune"].path))
    assert torch.allclose(_logits(merged, tokenizer), with_adapter, atol=1e-4)


def test_without_merge_the_adapter_is_current(folders: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(tmp_path / "work", folders, "llama", "prompt_completion")
    settings = {**QUICK, "max_steps": 2, "target_modules": ["v_proj", "q_proj"], "rank": 2}
    result = LlmFinetune().run(ctx, "02-finetune", settings, noop)

    assert result.outputs == ["02-finetune"] and ctx.current == "02-finetune"
    adapter = ctx.current_artifact
    assert adapter.format == "lora_adapter" and adapter.meta["loss_on"] == "completion tokens"
    assert result.metrics["trainable_parameters"] == 2 * 2 * ((64 + 64) + (64 + 32))
    assert LlmFinetune.produces_for(LlmFinetune.Settings.model_validate(settings)) == (
        "lora_adapter"
    )


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"target_modules": ["lm_head"]}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"device": "cpu", "mixed_precision": "fp16"}, "fp16"),
        ({"epochs": 1, "bogus": 1}, "bogus"),
    ],
)
def test_bad_settings_are_refused(given: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        LlmFinetune.Settings.model_validate({"dataset_id": 1, **given})


@pytest.mark.parametrize(
    ("kind", "given", "expected"),
    [
        ("test_cases", {}, "holds test cases"),
        ("text", {"target_modules": ["nope_proj"]}, "not projections of this model"),
    ],
)
def test_a_dataset_or_module_it_cannot_train_on_is_refused(
    folders: dict[str, Path],
    tmp_path: Path,
    kind: str,
    given: dict[str, Any],
    expected: str,
) -> None:
    ctx = _ctx(tmp_path / "work", folders, "llama", kind)
    with pytest.raises(PipelineError, match=expected):
        LlmFinetune().run(ctx, "02-finetune", {**QUICK, **given}, noop)
    assert ctx.current == "input" and list(ctx.artifacts) == ["input"]


def test_a_quantized_checkpoint_is_refused(folders: dict[str, Path], tmp_path: Path) -> None:
    ctx = _ctx(tmp_path / "work", folders, "llama", "text")
    ctx.current_artifact.precision = "int8"
    with pytest.raises(PipelineError, match="needs a float checkpoint"):
        LlmFinetune().run(ctx, "02-finetune", QUICK, noop)
    assert LlmFinetune.precision_for(None, "int4")[1] is not None
    assert LlmFinetune.precision_for(None, "bf16") == ("bf16", None)
