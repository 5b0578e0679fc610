"""LoRA fine-tuning step time and adapter size on a real language model, by the platform's own
finetune stage (peft), fp32 against bf16 autocast.

    python benchmarks/bench_llm_lora.py --checkpoint DIR     # a checkpoint folder, e.g. the FP32
                                                             # one bench_llm_reference.py writes

Sequence 128 (every text cut to 128 tokens), batch 4, rank 8 on the attention and MLP
projections, ``--steps`` optimizer steps (the mean over all, the first included), ``--threads``
intra-op threads, OMP_WAIT_POLICY=PASSIVE. The data is prompt/completion pairs made from the
standard library's docstrings (loss on the completion only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from benchmarks.bench_llm_reference import corpus
    from pipelines.core import Artifact, DatasetRef, PipelineContext
    from pipelines.stages.llm_finetune import LlmFinetune

    work = Path(tempfile.mkdtemp(prefix="r1-bench-lora-"))
    texts = corpus(40_000)
    rows = [{"prompt": t[:200], "completion": t[200:900]} for t in texts if len(t) > 400]
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = DatasetRef(
        id="1",
        path=str(data),
        format="jsonl",
        splits={"train": 1.0, "validation": 0.0, "test": 0.0, "seed": 0},
    )
    print(f"{len(rows)} prompt/completion pairs; sequence 128, batch 4, rank 8")
    print("| precision | s/step | tokens/s | adapter MB | trainable parameters |")
    print("|---|---|---|---|---|")
    for precision in ("no", "bf16"):
        workdir = work / precision
        workdir.mkdir()
        source = Artifact("input", str(args.checkpoint), "hf_checkpoint", "fp32", [], [])
        ctx = PipelineContext.start(workdir, source, task="text-generation", datasets={"1": ref})
        result = LlmFinetune().run(
            ctx,
            "01-finetune",
            {
                "dataset_id": 1,
                "max_steps": args.steps,
                "batch_size": 4,
                "max_seq_length": 128,
                "mixed_precision": precision,
                "threads": args.threads,
                "eval_examples": 0,
            },
            lambda f, m: None,
        )
        m = result.metrics
        label = "fp32" if precision == "no" else "bf16 autocast"
        print(
            f"| {label} | {m['seconds_per_step']:.2f} | {m['tokens_per_second']:.0f} | "
            f"{m['adapter_mb']:.2f} | {int(m['trainable_parameters']):,} |"
        )


if __name__ == "__main__":
    main()
