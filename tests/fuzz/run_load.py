"""A bounded loopback load test (not collected by pytest): starts `editor serve` on a fresh
database (the bundled model unless --model), sends N concurrent fills of one stored document, and
checks that every answer is 201, 429 or 503, and that every 201 left exactly one revision (none
lost, none extra). Prints the figures as Markdown (and with --json, writes them to a file).

    .venv/bin/python -m tests.fuzz.run_load --fills 50
    .venv/bin/python -m tests.fuzz.run_load --fills 24 --model tiny --replicas 2   # on Ray Serve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.servers import free_port, wait_ready

DOCUMENT = (
    "Dear [MASK 3 name=greeting],\nThank you for ordering [MASK 6]. Your refund of $[MASK 3 as=number] "
    'will reach you [MASK 8 must="Monday"].\nKind regards, [MASK 2 name=sign]'
)


async def one_fill(client: httpx.AsyncClient, doc_id: int, temperature: float) -> tuple[int, float, int | None]:
    started = time.perf_counter()
    response = await client.post(f"/api/v1/documents/{doc_id}/fill", json={"options": {"temperature": temperature}})
    number = response.json().get("number") if response.status_code == 201 else None
    return response.status_code, time.perf_counter() - started, number


async def run(base: str, fills: int, temperature: float) -> dict[str, object]:
    limits = httpx.Limits(max_connections=fills + 5)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        created = await client.post("/api/v1/documents", json={"title": "load", "source": DOCUMENT})
        doc_id = int(created.json()["id"])
        started = time.perf_counter()
        answers = await asyncio.gather(*(one_fill(client, doc_id, temperature) for _ in range(fills)))
        wall = time.perf_counter() - started
        stored = (await client.get(f"/api/v1/documents/{doc_id}/revisions?limit=100")).json()
    statuses = Counter(status for status, _, _ in answers)
    done = sorted(number for status, _, number in answers if status == 201 and number is not None)
    stored_numbers = sorted(item["number"] for item in stored["items"])
    latencies = sorted(seconds for status, seconds, _ in answers if status == 201)
    return {
        "statuses": dict(sorted(statuses.items())),
        "only_201_429_503": set(statuses) <= {201, 429, 503},
        "one_revision_each": stored["total"] == len(done) and stored_numbers == done == list(range(1, len(done) + 1)),
        "wall_s": round(wall, 2),
        "fills_per_s": round(len(done) / wall, 3),
        "p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "max_s": round(latencies[-1], 3) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fills", type=int, default=50)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--unbatched", action="store_true", help="also run the fills with temperature 1 (one by one)")
    parser.add_argument("--replicas", type=int, default=None, help="serve with N Ray Serve replicas (editor[ray])")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDITOR_")}
        env["EDITOR_DATABASE_URL"] = f"sqlite:///{Path(tmp) / 'load.db'}"
        command = [sys.executable, "-m", "editor", "serve", "--port", str(port), "--device", "cpu"]
        if args.model:
            command += ["--model", args.model]
        if args.replicas:
            command += ["--replicas", str(args.replicas)]
        server = subprocess.Popen(
            [*command, "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_ready(base, server, timeout=300)
            print(
                "| batching | statuses | only 201/429/503 | one revision per 201 | wall s | fills/s | p50 s | max s |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            ok = True
            runs = [("greedy (batched)", 0.0)] + ([("temperature 1 (alone)", 1.0)] if args.unbatched else [])
            report = []
            for label, temperature in runs:
                figures = asyncio.run(run(base, args.fills, temperature))
                report.append({"batching": label, "fills": args.fills, "replicas": args.replicas, **figures})
                ok = ok and bool(figures["only_201_429_503"]) and bool(figures["one_revision_each"])
                print(
                    f"| {label} | {figures['statuses']} | {figures['only_201_429_503']} | "
                    f"{figures['one_revision_each']} | {figures['wall_s']} | {figures['fills_per_s']} | "
                    f"{figures['p50_s']} | {figures['max_s']} |"
                )
            if args.json_path:
                Path(args.json_path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
