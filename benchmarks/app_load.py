"""Loopback load test of `nitrofusion app`: many clients "typing" at once, then one alone.

Starts the server in its own process (the embedded student on CPU by default, 127.0.0.1, a free port),
then runs `--clients` concurrent clients for `--seconds`: each sends a new request every 100-200 ms with
its client id and a rising request id, the prompt growing a character at a time, like a user typing. Old
requests are not cancelled by the client (as the page does not; `--abort` cancels them): the server
drops those still waiting (409) and delivers those it was drawing, marked `X-Superseded`, which is what
is measured. Then one client types alone for `--single-seconds`.

Counted: errors (anything but 200, 409 superseded and 503 busy, or a failed connection; must be 0),
completed images (and how many of them were superseded while drawn), superseded and busy replies,
p50/p95 latency of completed requests, the median time from a keystroke to the first image of that
prompt or a newer one ("keystroke -> image"), the median time between two images a client receives
while typing, and the server's RSS before and after. Prints a markdown table; writes JSON to `--out`.
Stops by itself.

    python benchmarks/app_load.py [--clients 20] [--seconds 30] [--single-seconds 10] [--out FILE]
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROMPTS = [
    "a photo of a sneaker",
    "a red leather bag on a table",
    "a striped cotton shirt",
    "an ankle boot, studio light",
    "a summer dress with flowers",
    "a wool pullover, folded",
    "a pair of trousers",
    "a sandal on the beach",
]


@dataclass
class ClientLog:
    sent: dict[int, float] = field(default_factory=dict)  # request id -> time sent
    done: dict[int, float] = field(default_factory=dict)  # request id -> time its image arrived (200 only)
    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # completed requests: send -> image
    errors: list[str] = field(default_factory=list)
    aborted: int = 0
    stale: int = 0  # images that arrived marked X-Superseded (a newer keystroke came while they were drawn)

    def keystroke_to_image(self) -> list[float]:
        """For each request: time until an image for it or a newer request of this client arrived."""
        out, best = [], None
        for rid in sorted(self.sent, reverse=True):
            if rid in self.done:
                best = self.done[rid] if best is None else min(best, self.done[rid])
            if best is not None:
                out.append(best - self.sent[rid])
        return out

    def image_gaps(self) -> list[float]:
        """Seconds between consecutive images this client received: how often its picture changes."""
        times = sorted(self.done.values())
        return [b - a for a, b in zip(times, times[1:])]


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "nitrofusion.app.cli", "--port", "0", "--model", args.model]
    cmd += ["--queue-size", str(args.queue_size)] + (["--device", args.device] if args.device else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the server exited with status {proc.wait()}")
        if "http://" in line:
            return proc, line.split()[2]
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def typing_client(
    c: httpx.AsyncClient, i: int, until: float, log: ClientLog, abort: bool, budget: list[int]
) -> None:
    rng = random.Random(i)
    text, pos = PROMPTS[i % len(PROMPTS)], rng.randrange(3, 8)
    client_id = f"bench-{i}-{time.time_ns()}"
    pending: set[asyncio.Task] = set()
    previous: asyncio.Task | None = None
    rid = 0
    while time.perf_counter() < until and budget[0] > 0:
        budget[0] -= 1
        rid += 1
        pos += 1
        if pos > len(text):  # the prompt is typed out: start the next one
            text, pos = PROMPTS[(PROMPTS.index(text) + 1) % len(PROMPTS)], 3
        if abort and previous is not None and not previous.done():
            previous.cancel()  # a client that aborts its older requests on every keystroke
            log.aborted += 1
        log.sent[rid] = time.perf_counter()
        previous = asyncio.create_task(send(c, client_id, rid, text[:pos], log))
        pending.add(previous)
        previous.add_done_callback(pending.discard)
        await asyncio.sleep(rng.uniform(0.1, 0.2))
    if pending:
        await asyncio.wait(pending, timeout=60)


async def send(c: httpx.AsyncClient, client_id: str, rid: int, prompt: str, log: ClientLog) -> None:
    body = {"prompt": prompt, "steps": 1, "seed": 0, "client": client_id, "request_id": rid}
    t0 = time.perf_counter()
    try:
        r = await c.post("/api/generate", json=body)
    except asyncio.CancelledError:
        raise
    except httpx.HTTPError as exc:
        log.errors.append(f"{type(exc).__name__}: {exc}")
        return
    t1 = time.perf_counter()
    log.statuses.append(r.status_code)
    if r.status_code == 200:
        if not r.content.startswith(b"\x89PNG"):
            log.errors.append("200 without a PNG")
            return
        log.done[rid] = t1
        log.latencies.append(t1 - t0)
        log.stale += r.headers.get("x-superseded") == "true"
    elif r.status_code == 409 or (r.status_code == 503 and _is_busy(r)):
        return  # superseded, or the model's line was full: the load working as designed
    else:
        log.errors.append(f"{r.status_code}: {r.text[:200]}")


def _is_busy(r: httpx.Response) -> bool:
    """A full line's 503 (marked busy), not an out-of-memory one."""
    try:
        return r.json().get("busy") is True
    except ValueError:
        return False


async def phase(
    url: str, clients: int, seconds: float, abort: bool, max_requests: int
) -> tuple[list[ClientLog], float]:
    """The clients' logs, and the seconds from the first request to the last reply: images still
    being drawn when typing stops are counted, so they are divided by the time they took too."""
    logs = [ClientLog() for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients * 16, max_keepalive_connections=clients * 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        start = time.perf_counter()
        until, budget = start + seconds, [max_requests]
        await asyncio.gather(*(typing_client(c, i, until, logs[i], abort, budget) for i in range(clients)))
    return logs, time.perf_counter() - start


def summarise(logs: list[ClientLog], seconds: float) -> dict:
    statuses = [s for log in logs for s in log.statuses]
    lat = sorted(x for log in logs for x in log.latencies)
    k2i = [x for log in logs for x in log.keystroke_to_image()]
    gaps = [x for log in logs for x in log.image_gaps()]

    def q(xs: list[float], p: float) -> float | None:
        return round(statistics.quantiles(xs, n=100)[p - 1] * 1000, 1) if len(xs) >= 2 else None

    return {
        "requests": sum(len(log.sent) for log in logs),
        "errors": sum(len(log.errors) for log in logs),
        "error_samples": [e for log in logs for e in log.errors][:5],
        "completed": statuses.count(200),
        "completed_superseded_while_drawn": sum(log.stale for log in logs),
        "superseded_409": statuses.count(409),
        "busy_503": statuses.count(503),
        "aborted_by_client": sum(log.aborted for log in logs),
        "images_per_s": round(statuses.count(200) / seconds, 2),
        "latency_p50_ms": q(lat, 50),
        "latency_p95_ms": q(lat, 95),
        "keystroke_to_image_median_ms": round(statistics.median(k2i) * 1000, 1) if k2i else None,
        "between_images_median_ms": round(statistics.median(gaps) * 1000, 1) if gaps else None,
    }


async def wait_idle(c: httpx.AsyncClient, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        models = (await c.get("/api/health")).json()["models"].values()
        if all(not m["running"] and m["waiting"] == 0 for m in models):
            return
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace, url: str, pid: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for i in range(5):  # warm the HTTP path too before measuring memory
            (await c.post("/api/generate", json={"prompt": f"warm {i}"})).raise_for_status()
        rss_start = rss_mb(pid)
        load = summarise(*await phase(url, args.clients, args.seconds, args.abort, args.max_requests))
        await wait_idle(c)
        single = summarise(*await phase(url, 1, args.single_seconds, args.abort, args.max_requests))
        await wait_idle(c)
        server = (await c.get("/api/health")).json()["models"]
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "load": load,
        "single_client": single,
        "server_stats": server,
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_mb(pid), 1),
    }


def table(r: dict) -> str:
    load, single = r["load"], r["single_client"]
    rows = [
        ("requests sent", load["requests"], single["requests"]),
        ("errors", load["errors"], single["errors"]),
        ("completed images", load["completed"], single["completed"]),
        (
            "of which superseded while drawn (X-Superseded)",
            load["completed_superseded_while_drawn"],
            single["completed_superseded_while_drawn"],
        ),
        ("dropped stale (409 superseded)", load["superseded_409"], single["superseded_409"]),
        ("busy (503)", load["busy_503"], single["busy_503"]),
        ("images / s", load["images_per_s"], single["images_per_s"]),
        ("latency p50 (ms), completed", load["latency_p50_ms"], single["latency_p50_ms"]),
        ("latency p95 (ms), completed", load["latency_p95_ms"], single["latency_p95_ms"]),
        ("keystroke -> image, median (ms)", *(x["keystroke_to_image_median_ms"] for x in (load, single))),
        ("between a client's images, median (ms)", *(x["between_images_median_ms"] for x in (load, single))),
    ]
    lines = [
        f"| | {r['clients']} clients, {r['seconds']:g} s | 1 client alone |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {a} | {b} |" for name, a, b in rows),
        "",
        f"Server RSS: {r['rss_start_mb']} MB at start, {r['rss_end_mb']} MB at the end.",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--single-seconds", type=float, default=10, help="the lone typing client's run")
    p.add_argument("--model", default="embedded")
    p.add_argument("--device", default="cpu")
    p.add_argument("--queue-size", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=50_000, help="hard cap on requests per phase")
    p.add_argument("--abort", action="store_true", help="cancel the previous request client-side (the page does not)")
    p.add_argument("--out", default="outputs/app_load.json")
    args = p.parse_args()
    if args.clients < 1 or args.seconds <= 0 or args.single_seconds <= 0:
        p.error("--clients must be at least 1, --seconds and --single-seconds positive")

    proc, url = start_server(args)
    try:
        result = asyncio.run(run(args, url, proc.pid))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["command"] = "python benchmarks/app_load.py " + " ".join(sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nJSON: {out}")
    return 1 if result["load"]["errors"] or result["single_client"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
