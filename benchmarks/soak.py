"""Bounded load/soak run of the Redis-mode backend on loopback, with faults.

Starts a private `redis-server` (a free loopback port, no persistence), a loopback image server, one
`python -m backend serve` and N `python -m backend worker` processes on a tiny random checkpoint, then drives
LS-shaped /predict calls from concurrent clients while it SIGKILLs random workers (and starts replacements) and
restarts Redis once (empty, as after a crash without persistence). A supervisor restarts any worker that exits on
its own (as a container restart policy would) and counts it.

Counts every task as answered (a prediction), failed with a reason (an empty prediction whose reason the server
logged, or a 503 after the client's retries), or lost (neither: must be 0); duplicated predictions (a task answered
more than once, or a response whose length differs from its request) must be 0. Reports request latency p50/p99 and
the RSS of server and workers over time. Nothing leaves 127.0.0.1; nothing here is part of the test suite.

    .venv/bin/python benchmarks/soak.py --tasks 2000 --clients 8 --workers 2
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import redis
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.backend.ls_payloads import predict_body, setup_body, task  # noqa: E402

FAILURE_LINE = re.compile(r"task (\d+): empty prediction \(([a-z_]+)\)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (20, 20, 20))
    image.paste(Image.new("RGB", (width // 2, height // 2), tuple(rng.randrange(256) for _ in range(3))),
                (width // 4, height // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def start_image_server(count: int) -> tuple[ThreadingHTTPServer, str]:
    files = {f"/img{n}.png": png(48 + 8 * (n % 5), 40 + 8 * (n % 3), n) for n in range(count)}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


class PrivateRedis:
    """A redis-server of our own on a free loopback port (never the shared one)."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(self.directory)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@dataclass
class Stack:
    env: dict[str, str]
    logs: Path
    server: subprocess.Popen | None = None
    url: str = ""
    workers: dict[str, subprocess.Popen] = field(default_factory=dict)
    born: dict[str, float] = field(default_factory=dict)
    kills: int = 0
    unexpected_exits: int = 0
    started_workers: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "backend", *args], cwd=REPO, env=self.env,
                                stdout=(self.logs / log_name).open("ab"), stderr=subprocess.STDOUT)

    def start_worker(self) -> None:
        with self.lock:
            self.started_workers += 1
            name = f"soak-w{self.started_workers}"
            self.workers[name] = self.spawn(["worker", "--name", name], "workers.log")
            self.born[name] = time.monotonic()

    def start_server(self) -> None:
        port = free_port()
        self.server = self.spawn(["serve", "--host", "127.0.0.1", "--port", str(port)], "server.log")
        self.url = f"http://127.0.0.1:{port}"

    def stop_all(self) -> None:
        for process in [self.server, *self.workers.values()]:
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [self.server, *self.workers.values()]:
            if process:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2000, help="tasks to send in total (default 2000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent LS-shaped clients (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="tasks per /predict call (default 4: interactive queue)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--kill-every", type=float, default=20.0,
                        help="mean seconds between SIGKILLs of a random worker; 0 disables (default 20)")
    parser.add_argument("--min-uptime", type=float, default=30.0,
                        help="only kill workers up for at least this many seconds, i.e. serving (default 30)")
    parser.add_argument("--redis-restart-at", type=float, default=0.5,
                        help="restart Redis once this fraction of tasks is sent; 0 disables (default 0.5)")
    parser.add_argument("--retries", type=int, default=60, help="client retries of a 503/connection error (1 s apart)")
    parser.add_argument("--checkpoint", help="checkpoint dir (default: a tiny random one made now)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    work = Path(tempfile.mkdtemp(prefix="evf-soak-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        from evf_sam.testing import make_tiny_checkpoint
        checkpoint = str(make_tiny_checkpoint(work / "tiny", family="sam", seed=0))
    private = PrivateRedis(work)
    private.start()
    httpd, images = start_image_server(16)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LABEL_STUDIO_", "REDIS_", "BASIC_AUTH_", "WEBHOOK_", "EVF_SAM_", "QUEUE_"))}
    env.update({"EVF_SAM_CHECKPOINT": checkpoint, "EVF_SAM_DEVICE": "cpu", "OMP_NUM_THREADS": "1",
                "REDIS_URL": f"redis://127.0.0.1:{private.port}/0", "MEDIA_ALLOWED_HOSTS": "127.0.0.1",
                "WORKER_POLL_SECONDS": "1", "WORKER_MAINTENANCE_INTERVAL": "1", "WORKER_ABANDONED_AFTER": "3",
                "WORKER_HEARTBEAT_INTERVAL": "0.5", "PREDICT_TIMEOUT": "60", "PYTHONUNBUFFERED": "1"})
    stack = Stack(env, work)
    print(f"soak: {args.tasks} tasks, {args.clients} clients x {args.batch} tasks/call, {args.workers} workers, "
          f"kill every ~{args.kill_every:g} s, Redis restart at {args.redis_restart_at:.0%}; logs in {work}")

    stack.start_server()
    for _ in range(args.workers):
        stack.start_worker()
    ready = time.monotonic() + 300
    while time.monotonic() < ready:
        try:
            if httpx.post(stack.url + "/setup", json=setup_body(), timeout=3).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise SystemExit(f"stack not ready; see {work}")

    next_task = iter(range(1, args.tasks + 1))
    task_lock = threading.Lock()
    answers: Counter[int] = Counter()
    nonempty: set[int] = set()
    refused: dict[int, str] = {}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    mismatched = 0
    sent = 0
    done = threading.Event()
    redis_restarted = threading.Event()
    progress = tqdm(total=args.tasks, unit="task", desc="soak")

    def take(count: int) -> list[int]:
        nonlocal sent
        with task_lock:
            ids = list(itertools.islice(next_task, count))
            sent += len(ids)
            return ids

    def client() -> None:
        nonlocal mismatched
        with httpx.Client(timeout=90) as http:
            while ids := take(args.batch):
                body = predict_body([task(n, f"{images}/img{n % 16}.png", prompt=f"object {n % 7}") for n in ids])
                for attempt in range(args.retries + 1):
                    started = time.monotonic()
                    try:
                        response = http.post(stack.url + "/predict", json=body)
                    except httpx.HTTPError as error:
                        with task_lock:
                            statuses[type(error).__name__] += 1
                        reason = f"{type(error).__name__}: {error}"
                    else:
                        with task_lock:
                            statuses[str(response.status_code)] += 1
                        if response.status_code == 200:
                            with task_lock:
                                latencies.append(time.monotonic() - started)
                            results = response.json()["results"]
                            if len(results) != len(ids):
                                mismatched += 1
                            for n, prediction in zip(ids, results):
                                answers[n] += 1
                                if prediction["result"]:
                                    nonempty.add(n)
                            break
                        reason = f"{response.status_code}: {response.text[:200]}"
                    time.sleep(1.0)
                else:
                    for n in ids:
                        refused[n] = reason
                progress.update(len(ids))

    def chaos() -> None:
        while not done.is_set():
            if args.redis_restart_at and not redis_restarted.is_set() and sent >= args.redis_restart_at * args.tasks:
                tqdm.write(f"[{time.strftime('%H:%M:%S')}] restarting Redis (empty)")
                private.stop()
                time.sleep(2.0)
                private.start()
                redis_restarted.set()
            if args.kill_every and rng.random() < 1.0 / args.kill_every:
                with stack.lock:
                    alive = [name for name, p in stack.workers.items()  # loaded and serving, not still starting
                             if p.poll() is None and time.monotonic() - stack.born[name] > args.min_uptime]
                    victim = rng.choice(alive) if alive else None
                    if victim:
                        stack.workers.pop(victim).send_signal(signal.SIGKILL)
                        stack.kills += 1
                if victim:
                    tqdm.write(f"[{time.strftime('%H:%M:%S')}] SIGKILL {victim}; starting a replacement")
                    stack.start_worker()
            with stack.lock:
                exited = [name for name, p in stack.workers.items() if p.poll() is not None]
                for name in exited:
                    tqdm.write(f"[{time.strftime('%H:%M:%S')}] {name} exited by itself "
                               f"(code {stack.workers[name].returncode}); supervisor restarts it")
                    del stack.workers[name]
                    stack.unexpected_exits += 1
            for _ in exited:
                stack.start_worker()
            time.sleep(1.0)

    rss: dict[str, list[tuple[float, float]]] = {"server": [], "workers (mean per process)": []}

    def sample() -> None:
        started = time.monotonic()
        while not done.is_set():
            now = time.monotonic() - started
            try:
                rss["server"].append((now, psutil.Process(stack.server.pid).memory_info().rss / 2**20))
                with stack.lock:
                    pids = [p.pid for p in stack.workers.values() if p.poll() is None]
                values = []
                for pid in pids:
                    try:
                        values.append(psutil.Process(pid).memory_info().rss / 2**20)
                    except psutil.Error:
                        pass
                if values:
                    rss["workers (mean per process)"].append((now, statistics.mean(values)))
            except psutil.Error:
                pass
            time.sleep(2.0)

    started = time.monotonic()
    helpers = [threading.Thread(target=chaos, daemon=True), threading.Thread(target=sample, daemon=True)]
    for thread in helpers:
        thread.start()
    clients = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    elapsed = time.monotonic() - started
    done.set()
    for thread in helpers:
        thread.join(15)
    progress.close()
    stack.stop_all()
    private.stop()
    httpd.shutdown()

    logged = {int(m[1]): m[2] for m in FAILURE_LINE.finditer((work / "server.log").read_text(errors="replace"))}
    executions = Counter(int(m[1]) for m in re.finditer(r"task (\d+): \d+ region\(s\)",
                                                        (work / "workers.log").read_text(errors="replace")))
    all_ids = range(1, args.tasks + 1)
    failed_logged = {n: logged[n] for n in all_ids if answers[n] and n in logged and n not in nonempty}
    answered = [n for n in all_ids if answers[n] and n not in failed_logged]
    lost = [n for n in all_ids if not answers[n] and n not in refused]
    duplicated = [n for n in all_ids if answers[n] > 1]

    def rss_summary(series: list[tuple[float, float]]) -> dict[str, float]:
        if not series:
            return {}
        values = [v for _, v in series]
        window = max(1, len(values) // 5)
        return {"first_fifth_mb": round(statistics.mean(values[:window]), 1),
                "last_fifth_mb": round(statistics.mean(values[-window:]), 1), "max_mb": round(max(values), 1),
                "samples": len(values)}

    report = {
        "tasks_sent": sent, "answered": len(answered),
        "answered_with_regions": len(nonempty),
        "failed_with_reason": len(failed_logged) + len(refused),
        "failure_reasons": dict(Counter(failed_logged.values()) + Counter(r.split(":")[0] for r in refused.values())),
        "lost": len(lost), "duplicated_predictions": len(duplicated), "length_mismatches": mismatched,
        "tasks_run_more_than_once_by_workers": sum(1 for c in executions.values() if c > 1),
        "http_statuses": dict(statuses), "worker_kills": stack.kills, "worker_exits_on_their_own": stack.unexpected_exits,
        "redis_restarts": int(redis_restarted.is_set()), "seconds": round(elapsed, 1),
        "tasks_per_second": round(sent / elapsed, 1),
        "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
        "rss": {name: rss_summary(series) for name, series in rss.items()}, "logs": str(work),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if not lost and not duplicated and not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
