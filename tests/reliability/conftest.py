"""Fixtures of the reliability suite: the backend test fixtures (real Redis DB, subprocess factories, tiny
checkpoint), plus a loopback server of bad and odd images and a private `redis-server` that tests may stop."""

from __future__ import annotations

import io
import shutil
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from PIL import Image

from tests.backend.conftest import (  # noqa: F401 - fixtures are registered by importing them here
    Process, _spawn, base_env, free_port, image_server, model_env, png_bytes, redis_db, rq_stack, start_server, start_worker,
    tiny_checkpoint)
from tests.backend.http_servers import Request, Server, serve


# --- images --------------------------------------------------------------------------------------------------------

def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def huge_png_header(width: int = 20000, height: int = 20000) -> bytes:
    """A 1x1 PNG whose IHDR claims `width` x `height` (valid CRC): a few dozen bytes announcing 400 M pixels."""
    data = bytearray(png_bytes(1, 1))
    ihdr = 8 + 8  # signature, then length + type of the first chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def odd_images() -> dict[str, bytes]:
    """Name -> bytes of every image variant the bad-input tests serve (all tiny)."""
    good = png_bytes(48, 40)
    gradient = Image.linear_gradient("L").resize((48, 40))
    palette = Image.new("RGB", (48, 40), (10, 120, 200)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    frames = [Image.new("RGB", (48, 40), color) for color in ((200, 0, 0), (0, 200, 0))]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "good.png": good,
        "cmyk.jpg": _save(Image.new("CMYK", (48, 40), (0, 200, 200, 0)), "JPEG"),
        "gray16.png": _save(Image.fromarray(np.asarray(gradient, dtype=np.uint16) * 257), "PNG"),
        "palette.png": _save(palette, "PNG"),
        "animated.gif": animated.getvalue(),
        "corrupt.png": good[:16] + bytes(range(256)) * 4,
        "truncated.png": good[: len(good) // 2],
        "huge.png": huge_png_header(),
        "large.png": huge_png_header(8000, 8000),  # 64 M pixels: under Pillow's bomb limit, over MAX_IMAGE_PIXELS
        "empty.png": b"",
        "page.html": b"<html><body>not an image</body></html>",
    }


@dataclass
class MediaHost:
    """A loopback media server: `url(name)`; `slow/<seconds>/<name>` answers after a sleep."""

    server: Server

    def url(self, name: str) -> str:
        return f"{self.server.url}/{name}"


@pytest.fixture(scope="session")
def media_host() -> Iterator[MediaHost]:
    files = odd_images()
    server = Server()
    for name, body in files.items():
        kind = ("text/html" if name.endswith(".html") else "image/gif" if name.endswith(".gif")
                else "image/jpeg" if name.endswith(".jpg") else "image/png")
        server.route(f"/{name}", body=body, headers={"Content-Type": kind})
    # the right bytes under a non-image content type: the backend trusts the bytes, not the header
    server.route("/png-as-text", body=files["good.png"], headers={"Content-Type": "text/plain"})

    def slow(request: Request) -> tuple[int, dict, bytes]:
        time.sleep(float(request.path.split("/")[2]))
        return 200, {"Content-Type": "image/png"}, files["good.png"]

    for seconds in ("3", "6"):
        server.routes[f"/slow/{seconds}/good.png"] = slow
    with serve(server) as running:
        yield MediaHost(running)


# --- a Redis of our own ----------------------------------------------------------------------------------------

@dataclass
class PrivateRedis:
    """A `redis-server` on a free loopback port that only this test run uses (so it may be stopped and restarted)."""

    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        pytest.fail("private redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def env(self, run: str) -> dict[str, str]:
        return {"REDIS_URL": self.url, "REDIS_KEY_PREFIX": f"evf-{run}", "QUEUE_INTERACTIVE": f"{run}-interactive",
                "QUEUE_BATCH": f"{run}-batch"}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    instance = PrivateRedis(free_port(), tmp_path)
    instance.start()
    yield instance
    instance.stop()


# --- recording servers on other loopback addresses ---------------------------------------------------------------

def spawn_worker(env: dict[str, str], name: str, log_dir: Path, connection: redis.Redis,
                 ready_timeout: float = 180.0) -> Process:
    """`python -m backend worker --name NAME`, returned once it registered on `connection` (any Redis, unlike
    tests/backend's `start_worker`, which watches the shared test DB). The caller stops it."""
    process = Process(_spawn(["worker", "--name", name], env, log_dir / f"{name}.log"), log_dir / f"{name}.log")
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.popen.poll() is not None:
            pytest.fail(f"worker exited with {process.popen.returncode}:\n{process.log()[-3000:]}")
        try:
            if connection.sismember(f"rq:workers:{env['QUEUE_INTERACTIVE']}", f"rq:worker:{name}"):
                return process
        except redis.exceptions.ConnectionError:
            pass
        time.sleep(0.2)
    process.stop(signal.SIGKILL)
    pytest.fail(f"worker {name} did not register in time:\n{process.log()[-3000:]}")
