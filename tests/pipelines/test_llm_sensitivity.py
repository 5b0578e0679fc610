"""Measured mixed precision for INT4: the per-projection sensitivity score predicts which
projection's quantization hurts the loss most, the INT8 choice keeps to its bits budget, and the
model builder writes exactly the chosen MatMuls in INT8 (read back from the built graph)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.core import PipelineError, StageStatus
from pipelines.llm.builder import BuildSettings, build_ort_genai, structured_arguments
from pipelines.llm.sensitivity import (
    MatMulCost,
    choose_int8,
    fake_quantize,
    measure_sensitivity,
    onnx_name,
)
from pipelines.stages.llm_quantize import LlmQuantize
from tests.llm_fixtures import tiny_llama
from tests.pipelines.test_llm_stages import Progress, _ctx

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("sensitivity") / "llama")


@pytest.fixture(scope="module")
def model(llama: Path):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(llama, local_files_only=True).eval()


def _windows(count: int = 3, length: int = 48) -> list[list[int]]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, 300, (length,), generator=generator).tolist() for _ in range(count)]


def _loss(model, windows: list[list[int]]) -> float:
    with torch.no_grad():
        return sum(
            float(model(input_ids=torch.tensor([w]), labels=torch.tensor([w])).loss)
            for w in windows
        )


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quantize_rounds_each_block_to_its_grid(symmetric: bool) -> None:
    weight = torch.randn(8, 40, generator=torch.Generator().manual_seed(1))
    four = fake_quantize(weight, 4, 16, symmetric)
    eight = fake_quantize(weight, 8, 16, symmetric)
    assert four.shape == weight.shape and four.dtype == weight.dtype
    # Each 16-weight block (the last one padded) takes at most 16 distinct values at 4 bits.
    for row in four:
        for block in row.split(16):
            assert len(torch.unique(block)) <= 16
    assert 0 < (eight - weight).abs().max() < (four - weight).abs().max()
    # The error is at most half a step: a step is the block's range over the levels.
    step = (weight.reshape(-1, 8)).abs().max() * 2 / 15
    assert (four - weight).abs().max() <= step
    assert torch.equal(fake_quantize(torch.zeros(2, 16), 4, 16, symmetric), torch.zeros(2, 16))


def test_the_builders_names_for_projections() -> None:
    assert onnx_name("model.layers.3.self_attn.v_proj") == "/model/layers.3/attn/v_proj/MatMul"
    assert onnx_name("model.layers.12.mlp.down_proj") == "/model/layers.12/mlp/down_proj/MatMul"
    assert onnx_name("lm_head") is None and onnx_name("model.layers.0.mlp") is None


def test_the_score_ranks_projections_by_what_their_quantization_costs(model) -> None:
    calibration = _windows()
    costs = measure_sensitivity(model, calibration, block_size=16)
    assert len(costs) == 2 * 7 and len({c.node for c in costs}) == len(costs)
    assert all(c.int4 > c.int8 >= 0 for c in costs)
    # The weights were only read, and their gradient flags are as they were.
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())

    # Quantize the most and the least sensitive projection for real (fake-quantized weights) and
    # measure the loss: the ranking must hold.
    ranked = sorted(costs, key=lambda c: c.int4, reverse=True)
    base = _loss(model, calibration)
    rises = []
    for cost in (ranked[0], ranked[-1]):
        module = model.get_submodule(cost.module)
        kept = module.weight.data.clone()
        module.weight.data = fake_quantize(kept, 4, 16, True)
        rises.append(_loss(model, calibration) - base)
        module.weight.data = kept
    assert rises[0] > rises[1]
    assert rises[0] > 0


def test_a_model_without_llama_projections_is_refused() -> None:
    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 4)

    with pytest.raises(PipelineError, match="Llama-style projections"):
        measure_sensitivity(Plain(), [[1, 2, 3]])


def matmul_bits(model_onnx: Path) -> dict[str, int]:
    """Every MatMulNBits node of a built model (without its ``_Q4``/``_Q8`` suffix) and its bits,
    read from the graph (the weights, in external data, are not loaded)."""
    import onnx

    graph = onnx.load(str(model_onnx), load_external_data=False).graph
    return {
        node.name.rsplit("_Q", 1)[0]: next(a.i for a in node.attribute if a.name == "bits")
        for node in graph.node
        if node.op_type == "MatMulNBits"
    }


def _cost(node: str, params: int, int4: float, int8: float = 0.0) -> MatMulCost:
    return MatMulCost(module=node, node=node, params=params, int4=int4, int8=int8)


def test_int8_goes_to_what_buys_most_per_bit_within_the_budget() -> None:
    costs = [
        _cost("big", 600, 6.0),  # 0.01 a weight
        _cost("small", 100, 5.0),  # 0.05 a weight: first
        _cost("mid", 300, 6.0),  # 0.02 a weight: second
        _cost("free", 100, 1.0, 1.0),  # INT8 saves nothing: never
    ]
    # 5 bits: a quarter of the 1,100 weights (275) may be int8.
    assert [c.node for c in choose_int8(costs, 5.0)] == ["small"]
    # 6 bits: half (550): small then mid (400); big does not fit.
    assert [c.node for c in choose_int8(costs, 6.0)] == ["small", "mid"]
    assert [c.node for c in choose_int8(costs, 8.0)] == ["small", "mid", "big"]
    assert choose_int8(costs, 4.0) == []
    with pytest.raises(PipelineError, match="between 4 and 8"):
        choose_int8(costs, 9.0)


def test_the_builder_writes_the_chosen_matmuls_in_int8(llama: Path, tmp_path: Path) -> None:
    chosen = ("/model/layers.0/attn/v_proj/MatMul", "/model/layers.1/mlp/down_proj/MatMul")
    settings = BuildSettings("int4", int8_nodes=chosen)
    arguments = structured_arguments(settings)
    assert arguments[:3] == ["--builder_config_version", "2", "--target_options"]
    assert "/lm_head/MatMul" in arguments[3]  # the LM head kept int8 as by default
    assert structured_arguments(BuildSettings("int4")) == []
    report = build_ort_genai(
        llama, tmp_path / "out", tmp_path / "cache", settings, lambda f, m: None, threads=1
    )
    assert "fuse_qkv=false" in report.extra_options
    bits = matmul_bits(tmp_path / "out" / "model.onnx")
    assert {name for name, b in bits.items() if b == 8} == {*chosen, "/lm_head/MatMul"}
    assert bits["/model/layers.0/attn/q_proj/MatMul"] == 4  # q, k and v built apart


def test_quantize_int4_with_measured_sensitive_layers(llama: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "measured", llama)
    settings = {"precision": "int4", "sensitive_layers": "measured", "effective_bits": 6.0,
                "calibration_tokens": 64, "max_length": 64, "max_ppl_increase": 10.0,
                "threads": 1}  # fmt: skip
    progress = Progress()
    result = LlmQuantize().run(ctx, "01-quantize", settings, progress)
    assert result.status == StageStatus.SUCCEEDED, result.message
    made = ctx.current_artifact
    measured = made.meta["sensitivity"]
    assert measured["int8_nodes"] and 4.0 < measured["effective_bits"] <= 6.0
    assert len(measured["ranking"]) == 14 and "tokens of the built-in" in measured["calibration"]
    assert 64 <= measured["calibration_tokens"] < 64 + 64
    assert result.metrics["body_effective_bits"] == measured["effective_bits"]
    assert "by measured sensitivity" in result.message
    assert any("sensitivity: window" in line for _, line in progress.lines)
    fractions = [f for f, _ in progress.lines]
    assert fractions == sorted(fractions)  # the build's progress starts after the sensitivity's
    bits = matmul_bits(Path(made.path) / "model.onnx")
    int8 = {name for name, b in bits.items() if b == 8}
    assert int8 == {*measured["int8_nodes"], "/lm_head/MatMul"}


def test_a_budget_of_four_bits_keeps_only_the_lm_head_int8(llama: Path, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "four", llama)
    settings = {"precision": "int4", "effective_bits": 4.0, "calibration_tokens": 32,
                "max_ppl_increase": 10.0, "threads": 1}  # fmt: skip
    result = LlmQuantize().run(ctx, "01-quantize", settings, Progress())
    assert result.status == StageStatus.SUCCEEDED, result.message
    made = ctx.current_artifact
    assert made.meta["sensitivity"]["int8_nodes"] == []  # measured is the default for int4
    bits = matmul_bits(Path(made.path) / "model.onnx")
    assert {name for name, b in bits.items() if b == 8} == {"/lm_head/MatMul"}
