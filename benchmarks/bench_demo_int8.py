"""The demo's INT8: is the version `./r1 up` registers kept, and faster than FP32 at batch 32?

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_demo_int8.py           # ~1-2 minutes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_demo_int8.py --quick   # smoke run

Runs the demo's own pipeline (``r1platform.core.demo.demo_pipeline``, without the certify stage,
which needs a worker's hardware profile) on the demo model (``pipelines.demo``, two hidden layers
of ``DEMO_HIDDEN``, trained here on scikit-learn's digits) through the platform's stages:
fine-tune -> INT8 static (calibrated on digits) -> compile (onnxruntime) -> evaluate ->
benchmark. The benchmark stage times the upload (TorchScript, eager), the fine-tuned FP32
model, its FP32 ONNX export, the INT8 model and the compiled INT8 model interleaved in one run.
The table is the stage's rows (p50/p99/throughput, shapes, steady or not) and its
``speedup_vs_upload`` / ``speedup_vs_parent``; below it, which versions were kept and why.

Threads: ``--threads`` (default 1) intra-op threads for onnxruntime (``R1_ENGINE_THREADS``) and
torch, and OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and windows")
    args = parser.parse_args()
    os.environ["R1_ENGINE_THREADS"] = str(args.threads)
    warnings.filterwarnings("ignore")

    import torch

    torch.set_num_threads(args.threads)
    # demo_pipeline lives beside the Django models the demo seeds; nothing is written to them.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")
    import django

    django.setup()

    from pipelines.core import DatasetRef
    from pipelines.demo import (
        DEMO_HIDDEN,
        DIGITS_INPUT,
        build_digits_classifier,
        write_digits_dataset,
    )
    from pipelines.pipeline import run_local
    from r1platform.core.demo import demo_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = work / "digits.pt", work / "digits.csv"
        print("training the demo model ...", file=sys.stderr)
        epochs = 5 if args.quick else 20
        accuracy = build_digits_classifier(model, epochs=epochs, hidden=DEMO_HIDDEN)
        write_digits_dataset(data)
        stages = demo_pipeline(1)
        for stage in stages:
            if stage["name"] == "benchmark":
                stage["settings"] = {"batch_sizes": [1, 32]}
                if args.quick:
                    stage["settings"].update(max_windows=4, min_seconds=0.05)
        ctx = run_local(
            str(model),
            "torchscript",
            _specs(DIGITS_INPUT),
            stages,
            str(work / "run"),
            task="classification",
            show_progress=True,
            datasets={"1": DatasetRef(id="1", path=str(data), format="csv", target="label")},
        )

        print(
            f"\nDemo model: MLP 64 -> {' -> '.join(map(str, DEMO_HIDDEN))} -> 10, "
            f"test accuracy {accuracy:.4f}; {args.threads} intra-op thread(s), "
            f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}\n"
        )
        print(
            "| model | precision | batch | shapes | p50 ms | p99 ms | samples/s | steady "
            "| vs upload | vs parent |"
        )
        print("|---|---|---:|---|---:|---:|---:|---|---:|---:|")
        metrics = {k: v for r in ctx.results.values() for k, v in (r.metrics or {}).items()}
        for row in ctx.benchmarks:
            artifact = ctx.artifacts.get(row.artifact) or ctx.ancestors.get(row.artifact)
            precision = artifact.precision if artifact else "?"
            up = metrics.get(f"speedup_vs_upload.{row.artifact}.b{row.batch_size}")
            par = metrics.get(f"speedup_vs_parent.{row.artifact}.b{row.batch_size}")
            shapes = ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in row.shapes.items())
            print(
                f"| {row.artifact} | {precision} | {row.batch_size} | {shapes} "
                f"| {row.p50_ms:.4f} | {row.p99_ms:.4f} | {row.throughput:,.0f} "
                f"| {'yes' if row.converged else 'no'} "
                f"| {_ratio(up)} | {_ratio(par)} |"
            )
        print("\nStages:")
        for result in ctx.results.values():
            print(f"- {result.stage_id}: {result.status.value}: {result.message[:300]}")
    return 0


def _specs(specs: list) -> list[dict]:
    return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs]


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


if __name__ == "__main__":
    sys.exit(main())
