"""Certify the demo's digits classifier as the demo pipeline makes it, at the scenario level,
through the platform's own serving runtime: the source's three criteria measured on this machine.

    python benchmarks/certify_demo.py                 # defaults: 2,000 requests, 30 s of QPS
    python benchmarks/certify_demo.py --qps-seconds 5 # shorter

Builds the demo classifier (TorchScript, hidden 1024x1024, trained here on scikit-learn's
digits), runs the demo's stages on it (export to ONNX, static INT8 calibrated on digits, compile
for onnxruntime) and then the certify stage at the scenario level with the demo's test cases
(``pipelines.demo.write_digits_test_cases``) and the certify defaults: 2,000 API requests at
concurrency 8, QPS per card for 30 s with 32 clients, threshold 500 per card. The serving
runtime is the one ``manage.py serve`` runs, on loopback, with dynamic batching; the load client
runs in its own process. Prints the criteria and every check, and writes the report's JSON to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qps-seconds", type=float, default=30.0)
    parser.add_argument("--level", default="scenario")
    parser.add_argument("--out", type=Path, default=Path("certificate-demo.json"))
    args = parser.parse_args()

    import django

    django.setup()
    from tqdm import tqdm

    import r1platform.serving.probe as platform
    from pipelines.certification import serving_probe
    from pipelines.certification.profiles import detect_profiles
    from pipelines.core import Artifact, DatasetRef, PipelineContext
    from pipelines.demo import (
        DEMO_HIDDEN,
        DIGITS_INPUT,
        build_digits_classifier,
        write_digits_dataset,
        write_digits_test_cases,
    )
    from pipelines.pipeline import run_pipeline
    from pipelines.stages import validate_pipeline

    serving_probe.register(platform.serving_probe)
    serving_probe.register_server(platform.serving_server)
    profile = next(p for p in detect_profiles() if p.backend == "onnxruntime")
    bar = tqdm(total=100, desc="certify demo", file=sys.stderr, mininterval=1.0)

    def progress(index: int, fraction: float, message: str) -> None:
        bar.set_postfix_str(message[:60], refresh=False)
        bar.update(max(round(100 * (index + fraction) / 4) - bar.n, 0))

    with tempfile.TemporaryDirectory(prefix="r1-certify-demo-") as tmp:
        root = Path(tmp)
        accuracy = build_digits_classifier(root / "digits.pt", hidden=DEMO_HIDDEN)
        write_digits_dataset(root / "digits.csv", "csv")
        cases = write_digits_test_cases(root / "cases.jsonl")
        datasets = {
            "1": DatasetRef("1", str(root / "digits.csv"), "csv", target="label"),
            "2": DatasetRef(
                "2", str(root / "cases.jsonl"), "jsonl", schema={"test_cases": {"count": cases}}
            ),
        }
        source = Artifact("input", str(root / "digits.pt"), "torchscript", "fp32", DIGITS_INPUT, [])
        ctx = PipelineContext.start(root / "job", source, "classification", datasets)
        stages = [
            {"name": "export_onnx", "settings": {}},
            {"name": "quantize", "settings": {"mode": "int8_static", "calibration_dataset_id": 1}},
            {"name": "compile", "settings": {"backend": "onnxruntime"}},
            {
                "name": "certify",
                "settings": {
                    "profile": profile.key,
                    "level": args.level,
                    "golden_dataset_id": 1,
                    "test_cases_dataset_id": 2,
                    "qps_seconds": args.qps_seconds,
                },
            },
        ]
        results = run_pipeline(ctx, validate_pipeline("torchscript", stages, "fp32"), progress)
        bar.close()
        report = results[-1].details
    print(f"demo classifier: held-out accuracy {accuracy:.3f}; profile {profile.label}")
    print(f"verdict: {report['verdict']} ({report['level']})\n")
    print("| level | criterion | measured | threshold | verdict |")
    print("|---|---|---|---|---|")
    for c in report["criteria"]:
        print(
            f"| {c['level']} | {c['title']} | {c['value']} {c['unit']} | {c['comparison']} "
            f"{c['threshold']} | {c['verdict']} |"
        )
    print("\n| check | verdict | summary |\n|---|---|---|")
    for check in report["checks"]:
        print(f"| {check['id']} | {check['verdict']} | {check['summary']} |")
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
