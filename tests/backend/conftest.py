"""Real parts for backend tests: a Redis DB of our own, a loopback image server, a tiny checkpoint,
and factories for `python -m backend serve` / `python -m backend worker` subprocesses."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
TEST_DBS = range(8, 16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Redis ---------------------------------------------------------------------------------------------------------

@dataclass
class RedisDB:
    """A Redis database claimed for this test session (flushed before and after), plus unique queue names."""

    number: int
    run_id: str

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{REDIS_PORT}/{self.number}"

    def client(self) -> redis.Redis:
        return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=self.number)

    def env(self) -> dict[str, str]:
        return {"REDIS_URL": self.url, "REDIS_KEY_PREFIX": f"evf-{self.run_id}",
                "QUEUE_INTERACTIVE": f"{self.run_id}-interactive", "QUEUE_BATCH": f"{self.run_id}-batch"}


@pytest.fixture(scope="session")
def redis_db() -> Iterator[RedisDB]:
    """Claims a free DB (8..15) with a lock key in DB 0, so parallel runs of other engineers do not collide."""
    admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    try:
        admin.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"these tests need a real Redis at {REDIS_HOST}:{REDIS_PORT} (.ci/run starts one)")
    run_id = uuid.uuid4().hex[:8]
    for number in TEST_DBS:
        if admin.set(f"evf-test:db-claim:{number}", run_id, nx=True, ex=3600):
            break
    else:
        pytest.fail("no free Redis test DB among 8..15 (stale claims expire after an hour)")
    db = RedisDB(number, run_id)
    db.client().flushdb()
    yield db
    db.client().flushdb()
    admin.delete(f"evf-test:db-claim:{number}")


# --- images --------------------------------------------------------------------------------------------------------

def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    image = Image.new("RGB", (width, height), (20, 20, 20))
    image.paste(Image.new("RGB", (width // 2, height // 2), color), (width // 4, height // 4))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def exif_rotated_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored as width x height whose EXIF orientation (6) makes browsers show it as height x width."""
    image = Image.new("RGB", (width, height), (40, 90, 160))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


@dataclass
class ImageServer:
    """Loopback HTTP server for task images. `?delay=SECONDS` slows a response down (to hold a job busy)."""

    url: str
    files: dict[str, bytes]
    hits: list[str] = field(default_factory=list)

    def image_url(self, name: str, delay: float = 0.0) -> str:
        return f"{self.url}/{name}" + (f"?delay={delay}" if delay else "")


@pytest.fixture(scope="session")
def image_server() -> Iterator[ImageServer]:
    files = {"red.png": png_bytes(64, 48), "small.png": png_bytes(40, 32), "exif.jpg": exif_rotated_jpeg(60, 40),
             "broken.png": b"\x89PNG\r\n\x1a\n this is not an image"}
    server_state = ImageServer(url="", files=files)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            parts = urlsplit(self.path)
            server_state.hits.append(parts.path)
            delay = float(parse_qs(parts.query).get("delay", ["0"])[0])
            if delay:
                time.sleep(delay)
            body = files.get(parts.path.lstrip("/"))
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg" if parts.path.endswith(".jpg") else "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    server_state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield server_state
    httpd.shutdown()
    httpd.server_close()


# --- model ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evf_sam.testing import make_tiny_checkpoint

    return Path(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-evf"), family="sam", seed=0))


@pytest.fixture(scope="session")
def base_env() -> dict[str, str]:
    """Environment shared by every backend process of the tests (no Redis: add `redis_db.env()` for RQ mode;
    no checkpoint: use `model_env` for processes that load the model)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LABEL_STUDIO_", "REDIS_", "BASIC_AUTH_", "WEBHOOK_", "EVF_SAM_", "QUEUE_"))}
    env.update({"EVF_SAM_DEVICE": "cpu", "LOG_LEVEL": "INFO",
                "MEDIA_ALLOWED_HOSTS": "127.0.0.1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "WORKER_POLL_SECONDS": "1", "WORKER_MAINTENANCE_INTERVAL": "1", "WORKER_ABANDONED_AFTER": "3",
                "WORKER_HEARTBEAT_INTERVAL": "0.5", "PREDICT_TIMEOUT": "60"})
    return env


@pytest.fixture(scope="session")
def model_env(base_env: dict[str, str], tiny_checkpoint: Path) -> dict[str, str]:
    """`base_env` plus the tiny checkpoint."""
    return {**base_env, "EVF_SAM_CHECKPOINT": str(tiny_checkpoint)}


# --- processes -----------------------------------------------------------------------------------------------------

@dataclass
class Process:
    """A backend subprocess; `log()` returns what it printed so far."""

    popen: subprocess.Popen
    log_path: Path
    url: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_file = log_path.open("wb")
    return subprocess.Popen([sys.executable, "-m", "backend", *args], cwd=REPO, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Process]]:
    """`start_server(env)` -> a running `python -m backend serve` on a free loopback port (stopped at session end)."""
    started: list[Process] = []
    logs = tmp_path_factory.mktemp("server-logs")

    def start(env: dict[str, str], ready_timeout: float = 120.0) -> Process:
        port = free_port()
        log_path = logs / f"server-{port}.log"
        process = Process(_spawn(["serve", "--host", "127.0.0.1", "--port", str(port)], env, log_path), log_path,
                          url=f"http://127.0.0.1:{port}")
        started.append(process)
        auth = (env["BASIC_AUTH_USER"], env["BASIC_AUTH_PASS"]) if env.get("BASIC_AUTH_USER") else None
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                pytest.fail(f"server exited with {process.popen.returncode}:\n{process.log()[-3000:]}")
            try:
                if httpx.get(f"{process.url}/health", auth=auth, timeout=1).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail(f"server not healthy after {ready_timeout} s:\n{process.log()[-3000:]}")

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def start_worker(tmp_path_factory: pytest.TempPathFactory, redis_db: RedisDB) -> Iterator[Callable[..., Process]]:
    """`start_worker(env, name=…)` -> a `python -m backend worker` that has registered with Redis.
    `start_worker(env, names=[…])` starts several at once (they load the model in parallel) and returns a dict."""
    started: list[Process] = []
    logs = tmp_path_factory.mktemp("worker-logs")

    def wait_ready(process: Process, name: str, env: dict[str, str], deadline: float, burst: bool) -> None:
        client = redis_db.client()
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                if burst:
                    return
                pytest.fail(f"worker exited with {process.popen.returncode}:\n{process.log()[-3000:]}")
            if client.sismember(f"rq:workers:{env['QUEUE_INTERACTIVE']}", f"rq:worker:{name}"):
                return
            time.sleep(0.2)
        pytest.fail(f"worker {name} did not register in time:\n{process.log()[-3000:]}")

    def start(env: dict[str, str], name: str | None = None, ready_timeout: float = 180.0,
              extra_args: tuple[str, ...] = (), names: list[str] | None = None) -> Process | dict[str, Process]:
        wanted = names or [name or f"w-{uuid.uuid4().hex[:6]}"]
        processes = {}
        for worker_name in wanted:
            log_path = logs / f"{worker_name}.log"
            processes[worker_name] = Process(_spawn(["worker", "--name", worker_name, *extra_args], env, log_path),
                                             log_path)
            started.append(processes[worker_name])
        deadline = time.monotonic() + ready_timeout
        for worker_name, process in processes.items():
            wait_ready(process, worker_name, env, deadline, burst="--burst" in extra_args)
        return processes if names else processes[wanted[0]]

    yield start
    for process in started:
        process.stop()


# --- shared running stacks -----------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def embedded_server(start_server: Callable[..., Process], model_env: dict[str, str]) -> Process:
    """`python -m backend serve` without Redis: the model runs in the server process."""
    return start_server(dict(model_env))


@dataclass
class RQStack:
    server: Process
    worker: Process
    env: dict[str, str]


@pytest.fixture(scope="session")
def rq_stack(start_server: Callable[..., Process], start_worker: Callable[..., Process], model_env: dict[str, str],
             redis_db: RedisDB) -> RQStack:
    """A Redis-mode server (no model in it) and one worker process on this session's queues."""
    env = {**model_env, **redis_db.env()}
    worker = start_worker(env, name=f"stack-{redis_db.run_id}")
    return RQStack(server=start_server(env), worker=worker, env=env)
