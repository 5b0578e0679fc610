"""The platform's own engine on a CUDA GPU against the same engine on the CPU, side by side.

    python benchmarks/bench_gpu.py                 # every reference model, batch 1, 32, 256
    python benchmarks/bench_gpu.py --quick         # the MLP only, short windows

Builds the reference models of ``bench_backends.py`` (an MLP, a small CNN, a 2-layer
transformer encoder, d_model 128, sequence 64), exports each to TorchScript and ONNX, and loads
them through ``pipelines.engines.load_engine`` exactly as the benchmark stage and the serving
process do: TorchScript on ``cuda`` (``torch-cuda``: numpy in, CUDA tensors inside, numpy out, so
every call pays both copies, as a served request does), TorchScript on ``cpu`` and ONNX on
``cpu`` (onnxruntime, ORT_ENABLE_ALL). Each engine's output is compared with the CPU TorchScript
output first. The three are timed together with ``pipelines.latency.measure_interleaved``
(round-robin windows, order rotated each round); a row whose windows did not agree within 10%
is marked ``unsteady`` and its ratio is not printed as a speedup.

Needs a CUDA GPU (exits with a reason without one). The table goes to stdout, progress to
stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_backends import DEFAULT_MODELS, SPECS, Prepared, _export, _rng_input  # noqa: E402
from tqdm import tqdm  # noqa: E402

from pipelines.core import Artifact, TensorSpec  # noqa: E402
from pipelines.engines.base import EngineOptions, cuda_available  # noqa: E402
from pipelines.engines.load import load_engine  # noqa: E402
from pipelines.latency import measure_interleaved  # noqa: E402

ENGINES = ("cuda_ts", "cpu_ts", "cpu_ort")
LABELS = {
    "cuda_ts": "TorchScript on CUDA",
    "cpu_ts": "TorchScript on CPU",
    "cpu_ort": "ONNX Runtime on CPU",
}


def _artifact(path: Path, fmt: str, input_name: str, shape: tuple[int, ...]) -> Artifact:
    spec = TensorSpec(input_name, ["batch", *shape], "float32")
    return Artifact("input", str(path), fmt, "fp32", [spec], [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(SPECS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if not cuda_available():
        print("bench_gpu: no CUDA GPU on this machine; nothing to compare", file=sys.stderr)
        return 2
    if args.quick:
        args.models, args.batches = ["mlp"], [1, 32]
    import torch

    device = torch.cuda.get_device_name(0)
    options = EngineOptions(threads=args.threads)
    print(f"# {device}; torch {torch.__version__}; CPU engines {args.threads} threads\n")
    print("| model | batch | engine | p50 ms | p99 ms | samples/s | vs CPU TorchScript | windows |")
    print("|---|---|---|---|---|---|---|---|")
    bar = tqdm(total=len(args.models) * len(args.batches), file=sys.stderr, desc="bench_gpu")
    with tempfile.TemporaryDirectory(prefix="r1-bench-gpu-") as tmp:
        for name in args.models:
            spec = SPECS[name]
            prepared = Prepared(spec, spec.build())
            _export(prepared, Path(tmp))
            ts = _artifact(
                prepared.paths["torchscript"], "torchscript", spec.input_name, spec.sample_shape
            )
            onnx = _artifact(prepared.paths["onnx"], "onnx", spec.input_name, spec.sample_shape)
            engines = {
                "cuda_ts": load_engine(ts, "cuda", options=options),
                "cpu_ts": load_engine(ts, "cpu", options=options),
                "cpu_ort": load_engine(onnx, "cpu", options=options),
            }
            for batch in args.batches:
                feed = {spec.input_name: _rng_input(spec, batch)}
                reference = next(iter(engines["cpu_ts"].run(feed).values()))
                diffs = {
                    key: float(np.max(np.abs(next(iter(e.run(feed).values())) - reference)))
                    for key, e in engines.items()
                }
                stats = measure_interleaved(
                    {key: (lambda e=e, f=feed: e.run(f)) for key, e in engines.items()},
                    warmup=5,
                    iterations=10 if args.quick else 30,
                    min_seconds=0.2 if args.quick else 1.0,
                    max_windows=6 if args.quick else 10,
                )
                base = stats["cpu_ts"]
                for key in ENGINES:
                    s = stats[key]
                    steady = s.converged and base.converged
                    ratio = base.p50_ms / s.p50_ms if s.p50_ms > 0 else float("inf")
                    vs = f"{ratio:.2f}x" if steady else f"unsteady ({ratio:.2f}x)"
                    print(
                        f"| {name} {tuple(feed[spec.input_name].shape)} | {batch} | "
                        f"{LABELS[key]} (max diff {diffs[key]:.1e}) | {s.p50_ms:.3f} | "
                        f"{s.p99_ms:.3f} | {s.throughput(batch):,.0f} | {vs} | "
                        f"{s.windows} (±{s.spread:.0%}) |",
                        flush=True,
                    )
                bar.update(1)
            del engines
    bar.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
