"""Which MatMuls of a language model INT4 hurts most, measured, and which to keep in INT8.

The score is the one NVIDIA Model Optimizer's AutoQuantize uses: for a linear layer whose
output is ``Y`` and whose quantized weight gives ``Y + dY``, the loss rises by about
``0.5 * sum(dY**2 * g**2)`` where ``g`` is the loss's gradient at ``Y`` (a diagonal Fisher
approximation of the second-order term). One forward and one backward pass per calibration
window give every layer's ``g``; ``dY`` is the layer's input times its quantization error, the
cost of one more matmul per layer. Nothing is quantized in place: the weights only ever read.

The quantization simulated is the model builder's MatMulNBits: blocks of ``block_size`` weights
along the input dimension, one scale per block (and a zero point when asymmetric), rounded to
the nearest level. It is a proxy for k-quant's searched scales: the ranking is what is used,
and the built model's perplexity is measured afterwards as for any other build.

:func:`choose_int8` then keeps in INT8 the layers that buy the most loss per extra byte, until
the body's average weight width reaches ``effective_bits`` (4: all INT4; 8: all INT8). Each
projection is chosen alone: the build keeps q, k and v as separate MatMuls (``fuse_qkv=false``)
so that each can have its own width.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pipelines.core import PipelineError

__all__ = [
    "MatMulCost",
    "choose_int8",
    "fake_quantize",
    "measure_sensitivity",
    "onnx_name",
    "projections",
]

_ATTENTION = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|attn)\.([qkvo])_proj$")
_MLP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(gate|up|down)_proj$")


@dataclass(frozen=True)
class MatMulCost:
    """One unit the builder quantizes: its estimated loss increase under INT4 and under INT8."""

    module: str  # the torch module, "model.layers.3.mlp.down_proj"
    node: str  # the builder's MatMul, "/model/layers.3/mlp/down_proj/MatMul"
    params: int
    int4: float
    int8: float

    @property
    def gain_per_param(self) -> float:
        """Loss saved by INT8 instead of INT4, per weight (what an extra 4 bits buys)."""
        return (self.int4 - self.int8) / self.params if self.params else 0.0


def onnx_name(module_name: str) -> str | None:
    """The model builder's MatMul node for a torch module (None: not a decoder-layer
    projection). Q, K and V are separate nodes when the build passes ``fuse_qkv=false``."""
    found = _ATTENTION.search(module_name)
    if found:
        layer, proj = found.groups()
        return f"/model/layers.{layer}/attn/{proj}_proj/MatMul"
    found = _MLP.search(module_name)
    if found:
        layer, proj = found.groups()
        return f"/model/layers.{layer}/mlp/{proj}_proj/MatMul"
    return None


def projections(model: Any) -> dict[str, Any]:
    """The model's decoder-layer projections the builder writes as MatMuls, by module name."""
    import torch

    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and onnx_name(name) is not None
    }


def fake_quantize(weight: Any, bits: int, block_size: int, symmetric: bool) -> Any:
    """``weight`` ([out, in]) rounded as MatMulNBits stores it: blocks of ``block_size`` along
    ``in``, one scale per block (symmetric: levels -2**(bits-1) .. 2**(bits-1)-1 around 0;
    asymmetric: 0 .. 2**bits-1 with a zero point), then read back as float."""
    import torch

    out_features, in_features = weight.shape
    pad = (-in_features) % block_size
    w = torch.nn.functional.pad(weight.float(), (0, pad)).reshape(out_features, -1, block_size)
    if symmetric:
        half = 2 ** (bits - 1)
        scale = w.abs().amax(dim=-1, keepdim=True) / half
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(w / scale), -half, half - 1)
        back = q * scale
    else:
        top = 2**bits - 1
        lo = torch.clamp(w.amin(dim=-1, keepdim=True), max=0.0)
        hi = torch.clamp(w.amax(dim=-1, keepdim=True), min=0.0)
        scale = (hi - lo) / top
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = torch.clamp(torch.round(-lo / scale), 0, top)
        q = torch.clamp(torch.round(w / scale) + zero, 0, top)
        back = (q - zero) * scale
    return back.reshape(out_features, -1)[:, :in_features].to(weight.dtype)


def measure_sensitivity(
    model: Any,
    windows: Sequence[Sequence[int]],
    *,
    block_size: int = 32,
    symmetric: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> list[MatMulCost]:
    """Every decoder-layer projection's estimated loss increase under INT4 and INT8, summed
    over ``windows`` (token ids of calibration text, each scored as one sequence).

    ``model`` is a transformers causal LM whose decoder layers name their projections as Llama
    does (``q/k/v/o_proj``, ``gate/up/down_proj``); PipelineError when none does.
    """
    import torch

    linears = projections(model)
    if not linears:
        raise PipelineError(
            "measured sensitivity needs decoder layers with Llama-style projections "
            "(q/k/v/o_proj, gate/up/down_proj); this model has none"
        )
    usable = [list(w) for w in windows if len(w) >= 2]
    if not usable:
        raise PipelineError("measured sensitivity needs calibration text of two tokens or more")
    inputs: dict[str, Any] = {}
    grads: dict[str, Any] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(module: Any, args: tuple[Any, ...], output: Any) -> None:
            inputs[name] = args[0].detach()
            output.register_hook(lambda g: grads.__setitem__(name, g.detach()))

        return hook

    def differentiable(module: Any, args: tuple[Any, ...], output: Any) -> Any:
        return output.detach().requires_grad_(True)  # gradients flow from here, not to weights

    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [m.register_forward_hook(keep(n)) for n, m in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(differentiable))
    scores = {name: {4: 0.0, 8: 0.0} for name in linears}
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for index, ids in enumerate(usable):
            tensor = torch.tensor([ids], dtype=torch.long)
            with torch.enable_grad():
                loss = model(input_ids=tensor, labels=tensor).loss
                loss.backward()
            with torch.no_grad():
                for name, module in linears.items():
                    x, g = inputs.pop(name), grads.pop(name, None)
                    if g is None:
                        continue
                    for bits in (4, 8):
                        error = fake_quantize(module.weight, bits, block_size, symmetric)
                        dy = torch.nn.functional.linear(x.float(), (error - module.weight).float())
                        scores[name][bits] += 0.5 * float((dy.square() * g.float().square()).sum())
            if progress is not None:
                progress(
                    (index + 1) / len(usable), f"sensitivity: window {index + 1}/{len(usable)}"
                )
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
        inputs.clear()
        grads.clear()
    return [
        MatMulCost(
            module=name,
            node=onnx_name(name) or name,
            params=module.weight.numel(),
            int4=scores[name][4],
            int8=scores[name][8],
        )
        for name, module in linears.items()
    ]


def choose_int8(costs: Sequence[MatMulCost], effective_bits: float) -> list[MatMulCost]:
    """The projections to keep in INT8 so that the body averages at most ``effective_bits`` bits a
    weight, chosen by the loss each saves per extra bit (greedy, skipping what does not fit)."""
    if not 4.0 <= effective_bits <= 8.0:
        raise PipelineError(f"effective_bits must be between 4 and 8, got {effective_bits}")
    total = sum(c.params for c in costs)
    budget = (effective_bits - 4.0) / 4.0 * total
    chosen: list[MatMulCost] = []
    spent = 0
    for cost in sorted(costs, key=lambda c: c.gain_per_param, reverse=True):
        if cost.gain_per_param <= 0:
            break
        if spent + cost.params <= budget:
            chosen.append(cost)
            spent += cost.params
    return chosen
