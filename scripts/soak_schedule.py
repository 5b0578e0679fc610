"""Leave a schedule running against a live platform and report what it ran and decided.

Against a platform started with ``./r1 up`` (its worker, beat and web all running):

    TOKEN=$(.venv/bin/python manage.py issue_token demo demo)
    .venv/bin/python scripts/soak_schedule.py --token "$TOKEN" --minutes 5 --fresh-data-at 150

It makes (once) a serving pool on the worker's onnxruntime profile, creates a schedule on the
demo model that runs every minute (fine-tune on the newest digits data, then certify on the
pool's profile), uploads a new version of the dataset once, part-way through, and after the
given minutes prints every run with its decision, then the platform's own metrics.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url.rstrip("/"), token

    def call(self, method: str, path: str, body: object = None, raw: bytes | None = None,
             content_type: str = "application/json") -> object:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                text = answer.read()
        except urllib.error.HTTPError as exc:
            raise SystemExit(f"{method} {path}: {exc.code} {exc.read().decode()[:500]}") from None
        return json.loads(text) if text else None

    def text(self, path: str) -> str:
        request = urllib.request.Request(self.url + path)
        request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.read().decode()


def multipart(fields: dict[str, str], file_name: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(f"{value}\r\n".encode())
    out.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
        "Content-Type: text/csv\r\n\r\n".encode()
    )
    out.write(content + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def fresh_digits_csv(seed: int) -> bytes:
    """The digits data again, with every image shifted by noise: new data, same task."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    features = np.clip(digits.data + rng.normal(0, 0.5, digits.data.shape), 0, 16)
    lines = [",".join([f"p{i}" for i in range(features.shape[1])] + ["label"])]
    for row, label in zip(features, digits.target, strict=True):
        lines.append(",".join(f"{v:.3f}" for v in row) + f",{int(label)}")
    return ("\n".join(lines) + "\n").encode()


def ensure_pool(api: Api, name: str) -> str:
    for pool in api.call("GET", "/api/v1/pools"):  # type: ignore[union-attr]
        if pool["name"] == name:
            return pool["profile"] if isinstance(pool["profile"], str) else pool["profile"]["key"]
    profiles = api.call("GET", "/api/v1/profiles?served=true")
    onnx = [p for p in profiles if p["backend"] == "onnxruntime"]  # type: ignore[union-attr]
    if not onnx:
        raise SystemExit("no live worker serves an onnxruntime profile: is ./r1 up running?")
    key = onnx[0]["key"]
    subprocess.run(
        [sys.executable, "manage.py", "create_pool", name, "--profile", key], cwd=ROOT, check=True
    )
    return key


def _side(run: dict, side: str) -> str:
    version, value = run.get(f"{side}_number"), run.get(f"{side}_score")
    if version is None:
        return ""
    return f"v{version}" + (f" {value:.4f}" if value is not None else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--token", required=True)
    parser.add_argument("--model", default="digits-mlp")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--pool", default="cpu")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--fresh-data-at", type=float, default=150.0, help="seconds in")
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    api = Api(args.url, args.token)

    models = api.call("GET", f"/api/v1/models?q={args.model}")
    model = next(m for m in models if m["name"] == args.model)  # type: ignore[union-attr]
    ensure_pool(api, args.pool)
    name = f"soak-{time.strftime('%H%M%S')}"
    schedule = api.call("POST", "/api/v1/schedules", {
        "name": name,
        "model_id": model["id"],
        "template": [{"name": "finetune", "settings": {"epochs": args.epochs}},
                     {"name": "certify", "settings": {"level": "basic"}}],
        "dataset": args.dataset,
        "pool": args.pool,
        "cron": "* * * * *",
        "margin": args.margin,
        "enabled": True,
    })  # fmt: skip
    sid = schedule["id"]  # type: ignore[index]
    print(f"schedule {sid} ({name}): every minute on {args.model}, pool {args.pool}")

    started = time.monotonic()
    total = args.minutes * 60
    uploaded = False
    seen: dict[int, str] = {}
    with tqdm(total=round(total), unit="s", desc="soak") as bar:
        while (elapsed := time.monotonic() - started) < total:
            if not uploaded and elapsed >= args.fresh_data_at:
                body, ctype = multipart(
                    {"name": args.dataset, "target": "label"}, "digits-fresh.csv",
                    fresh_digits_csv(int(time.time())),
                )  # fmt: skip
                ds = api.call("POST", "/api/v1/datasets", raw=body, content_type=ctype)
                tqdm.write(f"{elapsed:6.0f} s  uploaded {args.dataset} v{ds['version']}")  # type: ignore[index]
                uploaded = True
            for run in api.call("GET", f"/api/v1/schedules/{sid}/runs"):  # type: ignore[union-attr]
                state = f"{run['decision']}: {run['reason']}"
                if seen.get(run["id"]) != state:
                    seen[run["id"]] = state
                    tqdm.write(f"{elapsed:6.0f} s  run {run['id']} {state}")
            time.sleep(5)
            bar.update(round(time.monotonic() - started) - bar.n)

    api.call("PATCH", f"/api/v1/schedules/{sid}", {"enabled": False})
    runs = api.call("GET", f"/api/v1/schedules/{sid}/runs")
    print("\n| run | trigger | data | job | decision | champion | challenger | metric | reason |")
    print("| ---: | --- | --- | ---: | --- | --- | --- | --- | --- |")
    for run in reversed(runs):  # type: ignore[arg-type]
        data = f"v{run['dataset_version']}" if run.get("dataset_version") else ""
        print(
            f"| {run['id']} | {run['trigger']} | {data} | {run.get('job_id') or ''} | "
            f"{run['decision']} | {_side(run, 'champion')} | {_side(run, 'challenger')} | "
            f"{run.get('metric') or ''} | {run['reason']} |"
        )
    print("\nmetrics (/metrics, r1_ families):")
    for line in api.text("/metrics").splitlines():
        if line.startswith("r1_") and not line.startswith(("r1_stage_duration_seconds_bucket",)):
            print("  " + line)


if __name__ == "__main__":
    main()
