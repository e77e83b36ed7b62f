"""A soak run (not collected by pytest): `editor serve` on a fresh SQLite database with the bundled
tiny model, driven for a set time by a fixed number of concurrent clients with a steady mix of
fills, edits (with If-Match), regenerations, reads and small batch jobs. Every 10 s it samples the
server's resident memory, open file descriptors and threads (from /proc) and the database's size
(with its WAL); per minute it reports those and the p50/p95 latency. It fails on any 5xx, on
anything acknowledged that is not stored at the end, or on growth beyond the stated bounds
between the end of the warm-up and the end of the run. Writes JSON and Markdown.

    .venv/bin/python -m tests.fuzz.run_soak --minutes 60 --out results/soak   # the issue's run
    .venv/bin/python -m tests.fuzz.run_soak --minutes 2                       # the CI-sized one
(tests/test_soak.py runs the CI-sized one.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port, wait_ready

DOCUMENT = "Dear [MASK 3 name=greeting],\nthank you for [MASK 6]. Kind regards, [MASK 2 name=sign]"
# The share of each action in the steady mix (weights).
MIX = {"fill": 35, "edit": 25, "regenerate": 15, "read": 20, "batch": 5}
SAMPLE_EVERY_S = 10.0
# Growth allowed between the end of the warm-up and the end of the run.
BOUNDS = {"rss_mib": 64.0, "fds": 16, "threads": 8, "db_kib_per_revision": 64.0}


@dataclass
class Soak:
    base: str
    pid: int
    database: Path
    started: float = field(default_factory=time.perf_counter)
    latencies: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))  # minute -> seconds
    statuses: dict[int, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    actions: Counter[str] = field(default_factory=Counter)
    samples: list[dict[str, float]] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    acknowledged: dict[int, set[int]] = field(default_factory=dict)  # document -> revision numbers
    batch_jobs: list[int] = field(default_factory=list)

    def minute(self) -> int:
        return int((time.perf_counter() - self.started) // 60)

    def record(self, action: str, response: httpx.Response, seconds: float) -> None:
        minute = self.minute()
        self.latencies[minute].append(seconds)
        self.statuses[minute][response.status_code] += 1
        self.actions[action] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{action} -> {response.status_code}: {response.text[:300]}")


def process_figures(pid: int, database: Path) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    database_bytes = sum(path.stat().st_size for path in database.parent.glob(database.name + "*") if path.is_file())
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"].strip()),
        "db_mib": database_bytes / 2**20,
    }


async def sampler(soak: Soak, until: float) -> None:
    while time.perf_counter() < until:
        soak.samples.append(
            {"t_s": round(time.perf_counter() - soak.started, 1)} | process_figures(soak.pid, soak.database)
        )
        await asyncio.sleep(SAMPLE_EVERY_S)


async def timed(soak: Soak, action: str, client: httpx.AsyncClient, method: str, url: str, **kw: Any) -> httpx.Response:
    started = time.perf_counter()
    response = await client.request(method, url, **kw)
    soak.record(action, response, time.perf_counter() - started)
    return response


async def client_loop(soak: Soak, client: httpx.AsyncClient, documents: list[int], until: float, seed: int) -> None:
    rng = random.Random(seed)
    actions, weights = list(MIX), list(MIX.values())
    while time.perf_counter() < until:
        action = rng.choices(actions, weights)[0]
        doc = rng.choice(documents)
        url = f"/api/v1/documents/{doc}"
        if action == "fill":
            response = await timed(soak, action, client, "POST", f"{url}/fill", json={"options": {"temperature": 0.8}})
            if response.status_code == 201:
                soak.acknowledged[doc].add(response.json()["number"])
        elif action == "edit":
            current = await client.get(url)
            words = " ".join(rng.choice(["warm", "kind", "brief", "clear", "late"]) for _ in range(rng.randint(1, 30)))
            body = {"source": f"{DOCUMENT} P.S. {words}"}
            await timed(soak, action, client, "PATCH", url, json=body, headers={"If-Match": current.headers["etag"]})
        elif action == "regenerate" and soak.acknowledged[doc]:
            number = max(soak.acknowledged[doc])
            response = await timed(
                soak, action, client, "POST", f"{url}/revisions/{number}/spans/0/regenerate", json={}
            )
            if response.status_code == 201:
                soak.acknowledged[doc].add(response.json()["number"])
        elif action == "batch":
            records = [{"id": f"r{n}", "topic": rng.choice(["tea", "rain", "maps"])} for n in range(3)]
            template = {"id": "{id}", "line": "About {topic}: [MASK 6]"}
            response = await timed(
                soak, action, client, "POST", "/api/v1/batches", json={"template": template, "records": records}
            )
            if response.status_code == 202:
                soak.batch_jobs.append(response.json()["id"])
        else:
            await timed(soak, "read", client, "GET", f"{url}/revisions?limit=5")


async def drive(soak: Soak, minutes: float, concurrency: int) -> dict[str, Any]:
    until = soak.started + minutes * 60
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=soak.base, timeout=600, limits=limits) as client:
        documents = []
        for n in range(concurrency * 2):
            created = await client.post("/api/v1/documents", json={"title": f"soak {n}", "source": DOCUMENT})
            documents.append(int(created.json()["id"]))
            soak.acknowledged[documents[-1]] = set()
        tasks = [client_loop(soak, client, documents, until, seed) for seed in range(concurrency)]
        await asyncio.gather(sampler(soak, until), *tasks)
        soak.samples.append(
            {"t_s": round(time.perf_counter() - soak.started, 1)} | process_figures(soak.pid, soak.database)
        )
        lost = []
        for doc, numbers in soak.acknowledged.items():
            listing = (await client.get(f"/api/v1/documents/{doc}/revisions?limit=1")).json()
            stored = set()
            for offset in range(0, listing["total"], 100):
                page = (await client.get(f"/api/v1/documents/{doc}/revisions?limit=100&offset={offset}")).json()
                stored |= {item["number"] for item in page["items"]}
            if not numbers <= stored:
                lost.append(f"document {doc}: {sorted(numbers - stored)[:10]}")
        deadline = time.perf_counter() + 300
        unfinished = list(soak.batch_jobs)
        while unfinished and time.perf_counter() < deadline:
            states = [(await client.get(f"/api/v1/batches/{job}")).json()["status"] for job in unfinished]
            unfinished = [job for job, state in zip(unfinished, states, strict=True) if state in ("pending", "running")]
            await asyncio.sleep(1)
    return {"lost": lost, "batch_jobs_unfinished": len(unfinished)}


def per_minute(soak: Soak) -> list[dict[str, Any]]:
    rows = []
    for minute in sorted(soak.latencies):
        seconds = sorted(soak.latencies[minute])
        in_minute = [s for s in soak.samples if minute * 60 <= s["t_s"] < (minute + 1) * 60] or soak.samples[-1:]
        rows.append(
            {
                "minute": minute + 1,
                "requests": len(seconds),
                "statuses": {str(k): v for k, v in sorted(soak.statuses[minute].items())},
                "p50_s": round(statistics.median(seconds), 3),
                "p95_s": round(seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))], 3),
                "rss_mib": round(max(s["rss_mib"] for s in in_minute), 1),
                "fds": max(int(s["fds"]) for s in in_minute),
                "threads": max(int(s["threads"]) for s in in_minute),
                "db_mib": round(max(s["db_mib"] for s in in_minute), 2),
            }
        )
    return rows


def growth(soak: Soak, warmup_s: float) -> dict[str, float]:
    after = [s for s in soak.samples if s["t_s"] >= warmup_s] or soak.samples
    first, last = after[0], soak.samples[-1]
    revisions = sum(len(numbers) for numbers in soak.acknowledged.values()) or 1
    return {
        "rss_mib": round(last["rss_mib"] - first["rss_mib"], 1),
        "fds": last["fds"] - first["fds"],
        "threads": last["threads"] - first["threads"],
        "db_kib_per_revision": round(last["db_mib"] * 1024 / revisions, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Soak: {report['minutes']} min, {report['concurrency']} concurrent clients, tiny model",
        "",
        f"Machine: {report['machine']}. Mix (weights): {report['mix']}. Requests: {report['requests']} "
        f"({report['actions']}); revisions acknowledged: {report['revisions']}; batch jobs: {report['batch_jobs']}.",
        "",
        f"- 5xx answers: {len(report['server_errors'])}; acknowledged but lost: {len(report['lost'])}; "
        f"batch jobs unfinished at the end: {report['batch_jobs_unfinished']}",
        f"- growth after the {report['warmup_s']:.0f} s warm-up: {report['growth']} (bounds: {report['bounds']})",
        f"- passed: {report['passed']}",
        "",
        "| minute | requests | statuses | p50 s | p95 s | RSS MiB | fds | threads | db MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["per_minute"]:
        lines.append(
            f"| {row['minute']} | {row['requests']} | {row['statuses']} | {row['p50_s']} | {row['p95_s']} | "
            f"{row['rss_mib']} | {row['fds']} | {row['threads']} | {row['db_mib']} |"
        )
    return "\n".join(lines) + "\n"


def run_soak(minutes: float, concurrency: int = 4, model: str = "tiny") -> dict[str, Any]:
    """Start `editor serve` on a fresh database, drive it for `minutes`, stop it; the report."""
    warmup_s = min(120.0, minutes * 60 / 4)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        database = Path(tmp) / "soak.db"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDITOR_")}
        env |= {"EDITOR_DATABASE_URL": f"sqlite:///{database}", "EDITOR_KEEP_STEP_TRACE": "true"}
        command = [sys.executable, "-m", "editor", "serve", "--port", str(port), "--device", "cpu", "--model", model]
        server = subprocess.Popen(
            [*command, "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_ready(base, server, timeout=300)
            soak = Soak(base=base, pid=server.pid, database=database)
            end = asyncio.run(drive(soak, minutes, concurrency))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    grown = growth(soak, warmup_s)
    within = all(grown[key] <= bound for key, bound in BOUNDS.items())
    report = {
        "minutes": minutes,
        "concurrency": concurrency,
        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (shared)",
        "mix": MIX,
        "requests": sum(soak.actions.values()),
        "actions": dict(soak.actions),
        "revisions": sum(len(numbers) for numbers in soak.acknowledged.values()),
        "batch_jobs": len(soak.batch_jobs),
        "server_errors": soak.server_errors,
        "warmup_s": warmup_s,
        "growth": grown,
        "bounds": BOUNDS,
        "per_minute": per_minute(soak),
        "samples": soak.samples,
        **end,
    }
    report["passed"] = within and not soak.server_errors and not end["lost"] and not end["batch_jobs_unfinished"]
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Four panels over the run: resident memory, open files and threads, database size, and the
    per-minute p50/p95 latency, with the warm-up marked (growth is measured after it)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    samples, rows = report["samples"], report["per_minute"]
    minutes = [s["t_s"] / 60 for s in samples]
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [
        (axes[0][0], [("rss_mib", "RSS (MiB)")], "server memory"),
        (axes[0][1], [("fds", "open files"), ("threads", "threads")], "file descriptors and threads"),
        (axes[1][0], [("db_mib", "database + WAL (MiB)")], "database size"),
    ]
    for axis, series, title in panels:
        for key, name in series:
            axis.plot(minutes, [s[key] for s in samples], label=name)
        axis.set_title(title)
        axis.legend(loc="upper left")
    latency = axes[1][1]
    latency.plot([r["minute"] - 0.5 for r in rows], [r["p50_s"] for r in rows], marker=".", label="p50")
    latency.plot([r["minute"] - 0.5 for r in rows], [r["p95_s"] for r in rows], marker=".", label="p95")
    latency.set_title("latency per minute (s)")
    latency.legend(loc="upper left")
    for axis in axes.flat:
        axis.axvline(report["warmup_s"] / 60, color="grey", linestyle=":", linewidth=1)
        axis.set_ylim(0, axis.get_ylim()[1] * 1.3)  # room above the lines for the legend
    for axis in axes[1]:
        axis.set_xlabel("minutes")
    figure.suptitle(
        f"Soak: {report['minutes']:g} min, {report['concurrency']} clients, {report['requests']} requests, "
        f"{len(report['server_errors'])} 5xx, {len(report['lost'])} lost"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--model", default="tiny", help="model for `editor serve --model` (default: the bundled tiny)")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md and OUT.png")
    args = parser.parse_args()
    report = run_soak(args.minutes, args.concurrency, args.model)
    text = markdown(report)
    print(text)
    if args.out is not None:
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        args.out.with_suffix(".md").write_text(text, encoding="utf-8")
        plot(report, args.out.with_suffix(".png"))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
