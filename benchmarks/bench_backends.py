"""Eager PyTorch vs ONNX Runtime FP32 vs ONNX Runtime INT8 vs AOTInductor, side by side, on CPU.

    python benchmarks/bench_backends.py            # full run (~3-5 minutes on 2 cores)
    python benchmarks/bench_backends.py --quick    # smoke run: the MLP, tiny windows

Builds three reference models in a temporary folder (an MLP, a small CNN, a 2-layer transformer
encoder, d_model 128, sequence 64), exports each to TorchScript and ONNX, quantizes the ONNX
model to INT8 (dynamic for the MLP and the transformer, static Q/DQ with random calibration data
for the CNN), compiles the TorchScript model with AOTInductor through the compile stage, then
measures every runtime at each batch size with pipelines.latency.measure_windows (windows until
three agree) and prints per model the p50 of each, its ratio to eager and to ORT FP32.

Fairness: torch and onnxruntime get the same number of threads (``--threads``, default: every
core); onnxruntime runs with all graph optimisations (ORT_ENABLE_ALL) and one inter-op thread;
eager means the nn.Module under torch.inference_mode. Each runtime's output is compared with
eager's on the same input before it is timed (max abs diff, and for INT8 the argmax agreement).

Targets reported (2-core CPU): ORT INT8 <= 0.65x ORT FP32 at batch 32 on the transformer, and the
best compiled CNN (ORT FP32, ORT INT8 or AOTInductor) <= 0.5x eager at batch 32.

The table goes to stdout, a progress bar to stderr.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core import Artifact, PipelineContext, TensorSpec  # noqa: E402
from pipelines.latency import WindowedStats, measure_windows  # noqa: E402

RUNTIMES = ("eager", "ort_fp32", "ort_int8", "aoti")
LABELS = {
    "eager": "eager PyTorch",
    "ort_fp32": "ORT FP32",
    "ort_int8": "ORT INT8",
    "aoti": "AOTInductor",
}
INT8_TARGET = 0.65  # transformer, batch 32: ORT INT8 p50 / ORT FP32 p50
CNN_TARGET = 0.50  # CNN, batch 32: best compiled p50 / eager p50


@dataclass
class Spec:
    """A reference model: how to build it, its input, and how to quantize it."""

    name: str
    build: Callable[[], Any]
    input_name: str
    sample_shape: tuple[int, ...]  # without the batch dim
    quantization: str  # "dynamic" or "static_qdq"
    trace: bool = False  # TorchScript by tracing (the transformer) rather than scripting


@dataclass
class Prepared:
    """One model's files and the callables that run it."""

    spec: Spec
    eager: Any
    paths: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runners: dict[str, Callable[[np.ndarray], Callable[[], Any]]] = field(default_factory=dict)
    outputs: dict[str, Callable[[np.ndarray], np.ndarray]] = field(default_factory=dict)


def _mlp() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    ).eval()


def _cnn() -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    ).eval()


def _transformer(d_model: int = 128) -> Any:
    from torch import nn

    layer = nn.TransformerEncoderLayer(
        d_model=d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
    )
    # enable_nested_tensor only matters with padding masks; off keeps the traced graph plain.
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    # TransformerEncoder deep-copies one layer, so untrained layers share identical weights; the
    # ONNX exporter then stores them once, which a trained model never does (and onnxruntime's
    # dynamic quantizer gets a Gemm over such a shared transposed weight wrong). Give each layer
    # its own weights.
    for module in encoder.modules():
        reset = getattr(module, "reset_parameters", None) or getattr(
            module, "_reset_parameters", None
        )
        if reset is not None and module is not encoder:
            reset()
    return encoder


SPECS = {
    "mlp": Spec("mlp", _mlp, "x", (256,), "dynamic"),
    "cnn": Spec("cnn", _cnn, "image", (3, 32, 32), "static_qdq"),
    "transformer": Spec("transformer", _transformer, "x", (64, 128), "dynamic", trace=True),
    # The same encoder at d_model 256 (MiniLM-sized layers are 384): how the INT8 gain grows as
    # matrix multiplies take a larger share of the time. Not in the default set.
    "transformer256": Spec(
        "transformer256", lambda: _transformer(256), "x", (64, 256), "dynamic", trace=True
    ),
}
DEFAULT_MODELS = ["mlp", "cnn", "transformer"]


def _rng_input(spec: Spec, batch: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *spec.sample_shape)).astype(np.float32)


def _export(prepared: Prepared, folder: Path) -> None:
    import torch

    spec, module = prepared.spec, prepared.eager
    example = torch.from_numpy(_rng_input(spec, 2))
    ts_path = folder / f"{spec.name}.pt"
    with torch.no_grad():
        scripted = torch.jit.trace(module, example) if spec.trace else torch.jit.script(module)
    scripted.save(str(ts_path))
    onnx_path = folder / f"{spec.name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(onnx_path),
            input_names=[spec.input_name],
            output_names=["output"],
            dynamic_axes={spec.input_name: {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    prepared.paths.update(torchscript=ts_path, onnx=onnx_path)


def _quantize(prepared: Prepared, folder: Path) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    spec = prepared.spec
    source = prepared.paths["onnx"]
    # Pre-processing folds the exporter's weight Transposes into the initializers: without it
    # quantize_dynamic cannot see those MatMuls' weights and leaves them in float. Symbolic shape
    # inference fails on some graphs (the transformer's Reshapes); then it is skipped.
    pre = folder / f"{spec.name}.pre.onnx"
    error = ""
    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=skip_symbolic)
            if skip_symbolic:
                prepared.notes.append("quant_pre_process without symbolic shape inference")
            break
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}".strip(": ")
    else:  # pre-processing is an optimisation; quantize the raw model
        prepared.notes.append(f"quant_pre_process failed ({error}); quantized the raw model")
        pre = source
    target = folder / f"{spec.name}.int8.onnx"
    if spec.quantization == "dynamic":
        quantize_dynamic(str(pre), str(target), weight_type=QuantType.QInt8)
        quantized = sum(
            1 for n in onnx.load(str(target)).graph.node if n.op_type.endswith("Integer")
        )
        matmuls = sum(1 for n in onnx.load(str(pre)).graph.node if n.op_type in ("MatMul", "Gemm"))
        prepared.notes.append(f"INT8 dynamic: {quantized} of {matmuls} MatMul/Gemm quantized")
    else:

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(
                    [{spec.input_name: _rng_input(spec, 8, seed=100 + i)} for i in range(8)]
                )

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.batches, None)

        quantize_static(
            str(pre),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    prepared.paths["int8"] = target


def _compile_aoti(prepared: Prepared, folder: Path) -> None:
    from pipelines.stages.compile import Compile

    spec = prepared.spec
    inputs = [TensorSpec(spec.input_name, ["batch", *spec.sample_shape], "float32")]
    source = Artifact(
        key="input",
        path=str(prepared.paths["torchscript"]),
        format="torchscript",
        precision="fp32",
        inputs=inputs,
        outputs=[],
    )
    workdir = folder / "jobs" / spec.name
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = PipelineContext.start(workdir, source)
    Compile().run(ctx, "01-compile", {"backend": "aotinductor"}, lambda f, m: None)
    prepared.paths["aoti"] = Path(ctx.current_artifact.path)
    prepared.paths["aoti_cache"] = folder / "jobs" / "cache" / "inductor"
    seconds = ctx.current_artifact.metrics.get("compile_seconds", 0.0)
    prepared.notes.append(f"AOTInductor compile {seconds:.0f} s")


def _ort_session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _make_runners(prepared: Prepared, threads: int) -> None:
    import torch

    from pipelines.backends.aotinductor import load_package

    spec, module = prepared.spec, prepared.eager

    def torch_runner(model: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
        def prepare(x: np.ndarray) -> Callable[[], Any]:
            tensor = torch.from_numpy(x)
            return lambda: model(tensor)

        return prepare

    def ort_runner(session: Any) -> Callable[[np.ndarray], Callable[[], Any]]:
        def prepare(x: np.ndarray) -> Callable[[], Any]:
            feeds = {spec.input_name: x}
            return lambda: session.run(None, feeds)

        return prepare

    fp32 = _ort_session(prepared.paths["onnx"], threads)
    int8 = _ort_session(prepared.paths["int8"], threads)
    package = load_package(prepared.paths["aoti"], prepared.paths["aoti_cache"])
    prepared.runners = {
        "eager": torch_runner(module),
        "ort_fp32": ort_runner(fp32),
        "ort_int8": ort_runner(int8),
        "aoti": torch_runner(package),
    }

    def first(value: Any) -> np.ndarray:
        if isinstance(value, list | tuple):
            value = value[0]
        return value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)

    def output_of(prepare: Callable[[np.ndarray], Callable[[], Any]]) -> Callable:
        return lambda x: first(prepare(x)())

    prepared.outputs = {name: output_of(prep) for name, prep in prepared.runners.items()}


@dataclass
class Measured:
    stats: WindowedStats  # the round with the median p50
    max_abs_diff: float
    agreement: float | None  # argmax agreement with eager, for INT8
    round_p50_ms: list[float] = field(default_factory=list)


def _check(prepared: Prepared, runtime: str, x: np.ndarray, reference: np.ndarray) -> tuple:
    got = prepared.outputs[runtime](x)
    diff = float(np.max(np.abs(got.astype(np.float64) - reference)))
    agreement = None
    if runtime == "ort_int8" and reference.ndim == 2:
        agreement = float(np.mean(got.argmax(axis=1) == reference.argmax(axis=1)))
    return diff, agreement


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    threads = args.threads
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    names = args.models
    batches = args.batch_sizes
    steps = len(names) * (4 + len(batches) * len(RUNTIMES) * args.rounds)
    bar = tqdm(total=steps, file=sys.stderr, unit="step", dynamic_ncols=True)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-backends-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[tuple[int, str], Measured]] = {}
    notes: dict[str, list[str]] = {}
    started = time.perf_counter()
    load_before = os.getloadavg()
    try:
        for name in names:
            spec = SPECS[name]
            torch.manual_seed(0)
            prepared = Prepared(spec, spec.build())
            folder = root / name
            folder.mkdir(exist_ok=True)
            for label, step in (
                ("export", _export),
                ("quantize", _quantize),
                ("aotinductor", _compile_aoti),
            ):
                bar.set_description_str(f"{name}: {label}")
                step(prepared, folder)
                bar.update()
            bar.set_description_str(f"{name}: loading")
            _make_runners(prepared, threads)
            bar.update()
            results[name] = {}
            with torch.inference_mode():
                for batch in batches:
                    x = _rng_input(spec, batch, seed=batch)
                    reference = prepared.outputs["eager"](x).astype(np.float64)
                    checks = {r: _check(prepared, r, x, reference) for r in RUNTIMES}
                    rounds: dict[str, list[WindowedStats]] = {r: [] for r in RUNTIMES}
                    # Rounds interleave the runtimes, so a neighbour's burst of CPU use lands on
                    # one round of each rather than on every window of one runtime.
                    for round_index in range(args.rounds):
                        for runtime in RUNTIMES:
                            bar.set_description_str(
                                f"{name}: {LABELS[runtime]} batch {batch} "
                                f"(round {round_index + 1}/{args.rounds})"
                            )
                            rounds[runtime].append(
                                measure_windows(
                                    prepared.runners[runtime](x),
                                    args.warmup,
                                    args.iterations,
                                    args.min_seconds,
                                    agreement=args.agreement,
                                    max_windows=args.max_windows,
                                )
                            )
                            bar.update()
                    for runtime in RUNTIMES:
                        diff, agreement = checks[runtime]
                        # The median round: a neighbour's burst (this is a shared machine) or
                        # a lucky quiet spell during one round moves neither way.
                        ordered = sorted(rounds[runtime], key=lambda st: st.p50_ms)
                        chosen = ordered[(len(ordered) - 1) // 2]
                        results[name][(batch, runtime)] = Measured(
                            chosen, diff, agreement, [st.p50_ms for st in rounds[runtime]]
                        )
            notes[name] = prepared.notes
            del prepared
    finally:
        bar.close()
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(_report(results, notes, args, threads, elapsed, load_before, os.getloadavg()))
    return 0


def _fmt_ratio(value: float) -> str:
    return f"{value:.2f}x"


def _report(
    results: dict[str, dict[tuple[int, str], Measured]],
    notes: dict[str, list[str]],
    args: argparse.Namespace,
    threads: int,
    elapsed: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    import onnxruntime
    import torch

    lines = [
        f"bench_backends: torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{os.cpu_count()} CPUs, {threads} threads for torch and ORT (intra-op), "
        f"ORT_ENABLE_ALL",
        f"windows: >= {args.iterations} calls and >= {args.min_seconds} s each, until 3 agree "
        f"within {args.agreement:.0%} (max {args.max_windows}); p50 of the last 3 pooled; "
        f"* = did not converge",
        f"{args.rounds} interleaved round(s) per batch size; each runtime's row is its round "
        f"with the median p50 (rounds: every round's p50)",
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; total "
        f"{elapsed:.0f} s",
        "",
    ]
    header = (
        f"{'model':<12} {'batch':>5}  {'runtime':<14} {'p50 ms':>9} {'p90 ms':>9} "
        f"{'win':>4}  {'vs eager':>8}  {'vs ORT FP32':>11}  {'rounds p50 ms':<22}{'max|diff|':>9}"
    )
    for name, rows in results.items():
        lines.append(header)
        lines.append("-" * len(header))
        for batch in sorted({b for b, _ in rows}):
            eager = rows[(batch, "eager")].stats.p50_ms
            fp32 = rows[(batch, "ort_fp32")].stats.p50_ms
            for runtime in RUNTIMES:
                measured = rows[(batch, runtime)]
                s = measured.stats
                mark = "" if s.converged else "*"
                check = f"{measured.max_abs_diff:.1e}"
                if measured.agreement is not None:
                    check += f" ({measured.agreement:.0%} argmax)"
                spread = "/".join(f"{v:.3g}" for v in measured.round_p50_ms)
                lines.append(
                    f"{name:<12} {batch:>5}  {LABELS[runtime]:<14} {s.p50_ms:>9.3f} "
                    f"{s.p90_ms:>9.3f} {s.windows:>3}{mark:<1}  "
                    f"{_fmt_ratio(s.p50_ms / eager):>8}  {_fmt_ratio(s.p50_ms / fp32):>11}  "
                    f"{spread:<22}{check}"
                )
        for note in notes.get(name, []):
            lines.append(f"  note: {note}")
        lines.append("")

    lines.append("targets (batch 32):")
    transformer = results.get("transformer", {})
    if (32, "ort_int8") in transformer:
        ratio = (
            transformer[(32, "ort_int8")].stats.p50_ms / transformer[(32, "ort_fp32")].stats.p50_ms
        )
        verdict = "MET" if ratio <= INT8_TARGET else "MISSED"
        lines.append(
            f"  transformer ORT INT8 / ORT FP32 = {ratio:.2f}x "
            f"(target <= {INT8_TARGET}x): {verdict}"
        )
    else:
        lines.append("  transformer INT8 target: not measured (needs the transformer at batch 32)")
    cnn = results.get("cnn", {})
    if (32, "eager") in cnn:
        eager = cnn[(32, "eager")].stats.p50_ms
        best = min(("ort_fp32", "ort_int8", "aoti"), key=lambda r: cnn[(32, r)].stats.p50_ms)
        ratio = cnn[(32, best)].stats.p50_ms / eager
        verdict = "MET" if ratio <= CNN_TARGET else "MISSED"
        lines.append(
            f"  cnn best compiled ({LABELS[best]}) / eager = {ratio:.2f}x "
            f"(target <= {CNN_TARGET}x): {verdict}"
        )
    else:
        lines.append("  cnn target: not measured (needs the CNN at batch 32)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: the MLP, tiny windows")
    parser.add_argument(
        "--models",
        type=lambda text: [m.strip() for m in text.split(",") if m.strip()],
        default=None,
        help=f"subset of {', '.join(SPECS)} (default: mlp, cnn, transformer; --quick: mlp)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="threads for torch and ORT intra-op alike (default: every core)",
    )
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=None, help="calls per window")
    parser.add_argument("--min-seconds", type=float, default=None, help="seconds per window")
    parser.add_argument("--agreement", type=float, default=0.10)
    parser.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds per batch size (full: 3)"
    )
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="keep the models here (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "warmup": 3 if quick else 10,
        "iterations": 5 if quick else 20,
        "min_seconds": 0.02 if quick else 0.25,
        "max_windows": 3 if quick else 8,
        "rounds": 1 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        args.models = ["mlp"] if quick else list(DEFAULT_MODELS)
    unknown = [m for m in args.models if m not in SPECS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(SPECS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
