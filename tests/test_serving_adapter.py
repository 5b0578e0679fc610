"""A LoRA adapter version served: over its base checkpoint, merged into one set of weights, behind
the same OpenAI-compatible routes; the deployments source finds the base through the lineage."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from pipelines.core import Artifact
from pipelines.llm.runtime import open_text_model
from r1platform.serving.app import ServingOptions, build_app
from r1platform.serving.server import serving_in_thread
from r1platform.serving.source import StaticModelSource
from tests.llm_fixtures import tiny_llama
from tests.test_serving_openai import PROMPT, TEAM_A, greedy, post, text_spec


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    config.init_lora_weights = False  # random B: the adapter changes what the model says
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapter")
    base = tiny_llama(root / "base")
    return base, make_adapter(base, root / "adapter")


def test_an_adapter_is_served_over_its_base_as_peft_decodes_it(folders):
    base_folder, adapter_folder = folders
    base = Artifact("llm v1", str(base_folder), "hf_checkpoint", "fp32", [], [])
    spec = text_spec(TEAM_A, "tuned", adapter_folder, version=2, fmt="lora_adapter", base=base)
    plain = text_spec(TEAM_A, "llm", base_folder)
    source = StaticModelSource([spec, plain], {"token-a": TEAM_A})
    app = build_app(source, ServingOptions(poll_seconds=0.2))
    adapter = Artifact("tuned v2", str(adapter_folder), "lora_adapter", "fp32", [], [])
    reference = open_text_model(adapter, threads=1, base=base)  # peft, unmerged
    plain_reference = open_text_model(base, threads=1)
    ids = reference.encode(PROMPT)
    want, count, finish = greedy(reference, ids, 10)
    assert want != greedy(plain_reference, ids, 10)[0], "the adapter must change the output"
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)
        served = app.state.runtime.lookup(TEAM_A, "tuned")
        assert served is not None and served.ready, served and served.error
        body = {"model": "tuned", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
        answer = post(url, "completions", body).json()
        assert answer["choices"][0]["text"] == want
        assert answer["usage"]["completion_tokens"] == count
        assert answer["choices"][0]["finish_reason"] == finish
        other = post(url, "completions", {**body, "model": "llm"}).json()
        assert other["choices"][0]["text"] == greedy(plain_reference, ids, 10)[0]


def test_an_adapter_without_its_base_does_not_load_and_says_why(folders):
    _, adapter_folder = folders
    spec = text_spec(TEAM_A, "orphan", adapter_folder, fmt="lora_adapter")
    app = build_app(StaticModelSource([spec], {"token-a": TEAM_A}), ServingOptions())
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)
        served = app.state.runtime.lookup(TEAM_A, "orphan")
        assert served is not None and not served.ready
        assert "base" in served.error
        answer = post(url, "completions", {"model": "orphan", "prompt": "a", "max_tokens": 2})
        assert answer.status_code == 503


def test_a_model_on_a_vllm_pool_without_vllm_answers_503_with_the_engine_servers_reason(
    folders, tmp_path, settings
):
    """The runtime starts the pool's engine servers instead of an engine in process; here
    (no vLLM, no GPU) they cannot start, and the model says why while the others serve."""
    settings.R1_WORK_DIR = tmp_path
    base_folder, _ = folders
    spec = text_spec(TEAM_A, "big", base_folder, text_engine="vllm")
    plain = text_spec(TEAM_A, "llm", base_folder)
    app = build_app(StaticModelSource([spec, plain], {"token-a": TEAM_A}), ServingOptions())
    with serving_in_thread(app) as url:
        assert app.state.runtime.synced.wait(60)
        served = app.state.runtime.lookup(TEAM_A, "big")
        assert served is not None and served.upstream is not None and served.text is None
        # Its replica is "starting" until the supervisor sees that vllm cannot start.
        deadline = time.monotonic() + 60
        while True:
            answer = post(url, "completions", {"model": "big", "prompt": "a", "max_tokens": 2})
            assert answer.status_code == 503
            message = answer.json()["error"]["message"]
            if "starting" not in message or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "vllm" in message.lower(), message
        ok = post(url, "completions", {"model": "llm", "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200
    assert served.upstream.replicas and all(r.state != "ready" for r in served.upstream.replicas)


def test_on_an_engine_server_pool_an_adapter_needs_its_base_served_there(
    folders, tmp_path, settings
):
    """vLLM's multi-LoRA: the adapter is loaded into its base's servers, so it waits for them;
    servers started without LoRA cannot take it without a restart, and it says so."""
    settings.R1_WORK_DIR = tmp_path
    base_folder, adapter_folder = folders
    base = Artifact("llm v1", str(base_folder), "hf_checkpoint", "fp32", [], [])
    adapter = text_spec(
        TEAM_A, "tuned", adapter_folder, version=2, fmt="lora_adapter", base=base,
        text_engine="vllm",
    )  # fmt: skip
    alone = build_app(StaticModelSource([adapter], {"token-a": TEAM_A}), ServingOptions())
    with serving_in_thread(alone):
        assert alone.state.runtime.synced.wait(60)
        served = alone.state.runtime.lookup(TEAM_A, "tuned")
        assert not served.ready and "promote the checkpoint it was trained on" in served.reason
    with_base = [text_spec(TEAM_A, "llm", base_folder, text_engine="vllm"), adapter]
    app = build_app(StaticModelSource(with_base, {"token-a": TEAM_A}), ServingOptions())
    with serving_in_thread(app):
        assert app.state.runtime.synced.wait(60)
        served = app.state.runtime.lookup(TEAM_A, "tuned")
        assert not served.ready and "without a restart" in served.reason
        assert app.state.runtime.lookup(TEAM_A, "llm").upstream is not None
