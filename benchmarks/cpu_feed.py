"""CPU cost per image of a worker job, stage by stage, and how many CPU threads feed one GPU.

    .venv/bin/python benchmarks/cpu_feed.py                          # 640x480, 1920x1080, 4000x3000
    .venv/bin/python benchmarks/cpu_feed.py --sizes 1920x1080 --json cpu_feed.json

Stages, each timed on this machine with the code the worker runs (torch on one thread; median of several runs):
fetch from a loopback HTTP server (a separate `python -m http.server` process, through `ImageFetcher`), JPEG and PNG
decode, the embedding-cache content hash, preprocessing for the shipped demo model (SAM 256², BEiT-3 224²) and for
the official models (SAM 1024², BEiT-3 224²) on the CPU versus the host part of GPU-side preprocessing (the uint8
resize the CPU still does plus a host copy of the uint8 bytes standing in for the upload), the mask from the
full-size logits, the brush RLE of a typical mask, and the Redis/RQ round trip of a job (server enqueue -> worker take,
start, finish with a result of that size -> server reads the result) with batches of 1 and of 8 jobs.

The worker splits this work in two: downloads, decoding and RLE run on WORKER_THREADS threads; hashing, preprocessing,
the mask threshold and the Redis bookkeeping run on the worker's main thread, one image after the other. The report
gives, per size and preprocessing path, the CPU milliseconds per image of each part, the cores needed at 70 img/s
(EVF-SAM target) and 200 img/s (EVF-SAM2 target), and whether the main-thread part fits the per-image time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from backend import jobs, rle  # noqa: E402
from backend.media import ImageFetcher, decode_image  # noqa: E402
from evf_sam.predictor import image_key  # noqa: E402
from evf_sam.transforms import beit_input, load_image, resize_longest_side, sam_input  # noqa: E402

TARGETS = {"EVF-SAM": 70.0, "EVF-SAM2": 200.0}  # img/s per GPU (issue #8)
PROMPTS_PER_IMAGE = 1


# --- inputs --------------------------------------------------------------------------------------------------------

def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour fields, a few hard-edged shapes and sensor-like grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 96), max(2, width // 96), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(width // 20, width // 3)), y0 + int(rng.integers(height // 20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 4, (height, width, 1)).astype(np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def object_mask(height: int, width: int) -> np.ndarray:
    """A typical predicted object: one smooth blob covering about a fifth of the image, with a notch."""
    yy, xx = np.ogrid[:height, :width]
    mask = ((yy - 0.55 * height) / (0.3 * height)) ** 2 + ((xx - 0.45 * width) / (0.25 * width)) ** 2 < 1
    mask[int(0.5 * height):int(0.6 * height), int(0.4 * width):int(0.5 * width)] = False
    return mask


def encoded(image: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 6}))
    return buffer.getvalue()


# --- timing --------------------------------------------------------------------------------------------------------

def measure(function: Callable[[], object], min_seconds: float, min_runs: int = 3,
            max_runs: int = 200) -> tuple[float, float]:
    """(CPU ms, wall ms) of one call of `function`, medians: at least `min_runs` runs and about `min_seconds` in all.
    CPU time is this thread's (time.thread_time), so other processes on a shared machine do not inflate it."""
    function()  # warm-up (imports, caches, connection pools)
    cpu: list[float] = []
    wall: list[float] = []
    started = time.perf_counter()
    while len(cpu) < min_runs or (time.perf_counter() - started < min_seconds and len(cpu) < max_runs):
        cpu_begin, wall_begin = time.thread_time(), time.perf_counter()
        function()
        cpu.append((time.thread_time() - cpu_begin) * 1000)
        wall.append((time.perf_counter() - wall_begin) * 1000)
    return statistics.median(cpu), statistics.median(wall)


def cpu_ms(function: Callable[[], object], min_seconds: float) -> float:
    return measure(function, min_seconds)[0]


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[str]:
    """`python -m http.server` in its own process on a free loopback port; yields its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the loopback HTTP server did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


# --- stages --------------------------------------------------------------------------------------------------------

def image_stages(height: int, width: int, base_url: str, directory: Path, min_seconds: float) -> dict[str, float]:
    """ms per image of every CPU stage except Redis, for one image size."""
    image = photo(height, width)
    jpeg, png = encoded(image, "JPEG"), encoded(image, "PNG")
    name = f"{width}x{height}"
    (directory / f"{name}.jpg").write_bytes(jpeg)
    (directory / f"{name}.png").write_bytes(png)
    fetcher = ImageFetcher(None, None, allowed_hosts=["127.0.0.1"])
    decoded = load_image(np.asarray(decode_image(jpeg, max_pixels=10**9)))
    logits = np.where(object_mask(height, width), 3.0, -3.0).astype(np.float32)
    host_logits = np.empty_like(logits)
    mask = logits > 0
    resized_1024 = resize_longest_side(decoded, 1024)
    upload = np.empty(decoded.nbytes + resized_1024.nbytes, dtype=np.uint8)

    def gpu_host_part(long_side: int) -> None:
        """What the CPU still does with EVF_SAM_PREPROCESS=device: the uint8 longest-side resize (PIL), and the
        uint8 bytes of the resized and of the original image (BEiT input) copied once for the upload."""
        resized = resize_longest_side(decoded, long_side)
        upload[:resized.nbytes] = resized.reshape(-1)
        upload[resized.nbytes:resized.nbytes + decoded.nbytes] = decoded.reshape(-1)

    def cpu_preprocess(size: int, mode: str) -> None:
        sam_input(decoded, size, mode)
        beit_input(decoded, 224)

    def decode_reduced() -> np.ndarray:
        """JPEG decoded by libjpeg at the smallest 1/2^k scale that keeps the long side >= 1024 (PIL draft)."""
        with Image.open(io.BytesIO(jpeg)) as opened:
            scale = max(1, 2 ** int(np.log2(max(width, height) / 1024)))
            opened.draft("RGB", (width // scale, height // scale))
            return np.asarray(opened.convert("RGB"))

    def mask_from_logits() -> None:
        np.copyto(host_logits, logits)  # the device-to-host copy of the float32 logits, host side
        _ = host_logits > 0

    fetch_cpu, fetch_wall = measure(lambda: fetcher.fetch_bytes(f"{base_url}/{name}.jpg"), min_seconds)
    stages = {
        "jpeg_bytes": float(len(jpeg)), "png_bytes": float(len(png)),
        "fetch_jpeg": fetch_cpu, "fetch_jpeg_wall": fetch_wall,
        "decode_jpeg": cpu_ms(lambda: load_image(np.asarray(decode_image(jpeg, max_pixels=10**9))), min_seconds),
        "decode_jpeg_reduced": cpu_ms(decode_reduced, min_seconds),
        "decode_png": cpu_ms(lambda: load_image(np.asarray(decode_image(png, max_pixels=10**9))), min_seconds),
        "hash": cpu_ms(lambda: image_key(decoded), min_seconds),
        "cpu_pre_demo": cpu_ms(lambda: cpu_preprocess(256, "sam"), min_seconds),
        "cpu_pre_evf_sam": cpu_ms(lambda: cpu_preprocess(1024, "sam"), min_seconds),
        "cpu_pre_evf_sam2": cpu_ms(lambda: cpu_preprocess(1024, "legacy"), min_seconds),
        "gpu_pre_host_demo": cpu_ms(lambda: gpu_host_part(256), min_seconds),
        "gpu_pre_host_official": cpu_ms(lambda: gpu_host_part(1024), min_seconds),
        "resize_1024": cpu_ms(lambda: resize_longest_side(decoded, 1024), min_seconds),
        "mask_from_logits": cpu_ms(mask_from_logits, min_seconds) * PROMPTS_PER_IMAGE,
        "rle": cpu_ms(lambda: mask.any() and rle.encode(mask), min_seconds) * PROMPTS_PER_IMAGE,
    }
    fetcher.close()
    return stages


def prepare_scaling(base_url: str, name: str, threads: int, count: int = 16) -> float:
    """Images/s of fetch + decode (the pool's share of a job) with `threads` threads."""
    fetcher = ImageFetcher(None, None, allowed_hosts=["127.0.0.1"])

    def one(_: int) -> None:
        load_image(np.asarray(decode_image(fetcher.fetch_bytes(f"{base_url}/{name}.jpg"), max_pixels=10**9)))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))  # warm-up
        started = time.perf_counter()
        list(pool.map(one, range(count)))
        elapsed = time.perf_counter() - started
    fetcher.close()
    return count / elapsed


def redis_round_trip(redis_url: str, result: dict[str, Any], batch_jobs: int, rounds: int) -> tuple[float, float]:
    """(worker CPU ms, round-trip wall ms) per job of the queue bookkeeping: the server enqueues `batch_jobs` predict
    jobs and waits for them (RedisDispatcher, on a thread), the worker takes them as one batch and completes each
    (EvfWorker.execute_job, on this thread) with `result`. The model call is replaced by returning `result`, so only
    transport and RQ bookkeeping are timed."""
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer

    from backend.model import PREDICT_JOB
    from backend.queueing import RedisDispatcher
    from backend.settings import Settings
    from backend.worker import EvfWorker

    tag = f"cpu-feed-{uuid.uuid4().hex[:8]}"
    settings = Settings(REDIS_URL=redis_url, QUEUE_INTERACTIVE=f"{tag}-int", QUEUE_BATCH=f"{tag}-bat",
                        REDIS_KEY_PREFIX=tag, RESULT_TTL=60)
    dispatcher = RedisDispatcher(settings)
    connection = Redis.from_url(redis_url)
    queues = list(dispatcher.queues.values())
    worker = EvfWorker(queues, name=tag, connection=connection, serializer=JSONSerializer)
    worker.batch_jobs, worker.batch_wait = batch_jobs, 0.005
    worker.register_birth()
    original = jobs.BATCHED[PREDICT_JOB]
    jobs.BATCHED[PREDICT_JOB] = lambda payloads: [result for _ in payloads]
    payload = {"task_id": 1, "hostname": None, "prompt_hash": "abc", "options": {"mask_mode": "semantic"},
               "images": [{"url": "http://127.0.0.1/x.jpg", "to_name": "image",
                           "requests": [{"from_name": "tag", "type": "brushlabels", "label": "Cat",
                                         "prompt": "a cat"}]}]}
    try:
        worker_cpu, wall = [], []
        for _ in range(rounds + 1):
            outcomes: list[Any] = []
            started = time.perf_counter()
            server = threading.Thread(target=lambda: outcomes.extend(dispatcher.run(
                PREDICT_JOB, [payload] * batch_jobs, interactive=False, timeout=30)))
            server.start()
            taken = Queue.dequeue_any(queues, 10, connection=connection, serializer=JSONSerializer)
            if taken is None:
                raise RuntimeError("no job arrived")
            cpu_started = time.thread_time()
            worker.execute_job(*taken)
            worker_cpu.append((time.thread_time() - cpu_started) * 1000 / batch_jobs)
            server.join()
            wall.append((time.perf_counter() - started) * 1000 / batch_jobs)
            if len(outcomes) != batch_jobs or not all(outcome.ok for outcome in outcomes):
                raise RuntimeError(f"round trip failed: {outcomes}")
        return statistics.median(worker_cpu[1:]), statistics.median(wall[1:])
    finally:
        jobs.BATCHED[PREDICT_JOB] = original
        worker.register_death()
        for queue in queues:
            for registry in (queue.finished_job_registry, queue.failed_job_registry):
                for job_id in registry.get_job_ids():
                    connection.delete(f"rq:job:{job_id}", f"rq:results:{job_id}")
                connection.delete(registry.key)
            connection.delete(queue.key)
        dispatcher.close()
        connection.close()


def redis_ping(redis_url: str, seconds: float) -> tuple[float, float]:
    """(CPU ms, wall ms) of one Redis round trip from this process: the unit the RQ bookkeeping is made of."""
    from redis import Redis

    connection = Redis.from_url(redis_url)
    try:
        return measure(connection.ping, seconds, min_runs=50, max_runs=5000)
    finally:
        connection.close()


# --- report --------------------------------------------------------------------------------------------------------

def report(size: str, stages: dict[str, float]) -> list[dict[str, Any]]:
    """Per model and preprocessing path: pool-thread ms, main-thread ms, cores and main-thread budget per target."""
    rows = []
    pool_ms = stages["fetch_jpeg"] + stages["decode_jpeg"] + stages["rle"]
    for model, rate in TARGETS.items():
        key = "evf_sam" if model == "EVF-SAM" else "evf_sam2"
        for path, pre in (("CPU preprocessing", stages[f"cpu_pre_{key}"]),
                          ("GPU preprocessing", stages["gpu_pre_host_official"])):
            main_ms = stages["hash"] + pre + stages["mask_from_logits"] + stages["redis_batch8"]
            total = pool_ms + main_ms
            rows.append({"size": size, "model": model, "rate": rate, "path": path, "pool_ms": pool_ms,
                         "main_ms": main_ms, "total_ms": total, "cores": total * rate / 1000,
                         "pool_threads": pool_ms * rate / 1000, "main_budget_ms": 1000 / rate,
                         "main_fits": main_ms <= 1000 / rate})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="640x480,1920x1080,4000x3000", help="WxH,WxH,...")
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent per stage and size (median counts)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--rounds", type=int, default=20, help="batches timed for the Redis round trip")
    parser.add_argument("--skip-redis", action="store_true", help="no Redis here: leave the Redis rows at 0")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-image cost on one core; the worker's threads add cores, not speed per image

    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    results: dict[str, dict[str, float]] = {}
    scaling: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, http_server(Path(tmp)) as base_url:
        for width, height in sizes:
            name = f"{width}x{height}"
            stages = image_stages(height, width, base_url, Path(tmp), args.seconds)
            result = {"result": [{"id": "0123456789ab", "from_name": "tag", "to_name": "image", "type": "brushlabels",
                                  "original_width": width, "original_height": height, "image_rotation": 0,
                                  "value": {"format": "rle", "rle": rle.encode(object_mask(height, width)),
                                            "brushlabels": ["Cat"]}, "score": 0.9, "readonly": False}],
                      "score": 0.9, "model_version": "evf-demo-0123456789-pabcdef"}
            stages["result_json_bytes"] = float(len(json.dumps(result)))
            if args.skip_redis:
                stages.update(dict.fromkeys(("redis_batch1", "redis_batch1_wall", "redis_batch8",
                                             "redis_batch8_wall"), 0.0))
            else:
                stages["redis_batch1"], stages["redis_batch1_wall"] = redis_round_trip(args.redis_url, result, 1,
                                                                                       args.rounds)
                stages["redis_batch8"], stages["redis_batch8_wall"] = redis_round_trip(args.redis_url, result, 8,
                                                                                       max(3, args.rounds // 4))
            results[name] = stages
        ping = (0.0, 0.0) if args.skip_redis else redis_ping(args.redis_url, args.seconds)
        largest = f"{sizes[-1][0]}x{sizes[-1][1]}"
        for threads in (1, 2):
            scaling[str(threads)] = prepare_scaling(base_url, largest, threads)

    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__} on 1 "
          "thread; CPU ms of the calling thread per image (median), wall ms where marked")
    print(f"one Redis PING: {ping[0] * 1000:.0f} us CPU, {ping[1] * 1000:.0f} us wall (scale the Redis rows by this "
          "for another machine)")
    labels = [("fetch_jpeg", "fetch JPEG over loopback HTTP (client CPU)"),
              ("fetch_jpeg_wall", "fetch JPEG over loopback HTTP (wall)"), ("decode_jpeg", "decode JPEG -> RGB array"),
              ("decode_jpeg_reduced", "  (decode JPEG at reduced size, PIL draft to long side >= 1024)"),
              ("decode_png", "decode PNG -> RGB array"), ("hash", "content hash (embedding cache key)"),
              ("cpu_pre_demo", "preprocess on CPU: demo (SAM 256 + BEiT 224)"),
              ("gpu_pre_host_demo", "GPU preprocessing, host part: demo"),
              ("cpu_pre_evf_sam", "preprocess on CPU: EVF-SAM (SAM 1024 + BEiT 224)"),
              ("cpu_pre_evf_sam2", "preprocess on CPU: EVF-SAM2 (1024 stretched + BEiT 224)"),
              ("gpu_pre_host_official", "GPU preprocessing, host part: official (resize 1024 + uint8 copy)"),
              ("resize_1024", "  (of which the uint8 longest-side resize to 1024, PIL)"),
              ("mask_from_logits", "mask from full-size logits (copy + threshold)"),
              ("rle", "brush RLE of a typical mask"),
              ("redis_batch1", "Redis/RQ per job, batches of 1 (worker CPU)"),
              ("redis_batch1_wall", "Redis/RQ per job, batches of 1 (round trip wall)"),
              ("redis_batch8", "Redis/RQ per job, batches of 8 (worker CPU)"),
              ("redis_batch8_wall", "Redis/RQ per job, batches of 8 (round trip wall)")]
    names = list(results)
    print(f"{'stage':<66}" + "".join(f"{name:>12}" for name in names))
    for key in ("jpeg_bytes", "png_bytes", "result_json_bytes"):
        print(f"{key.replace('_', ' '):<66}" + "".join(f"{results[n][key] / 1024:>10.0f}KB" for n in names))
    for key, label in labels:
        print(f"{label:<66}" + "".join(f"{results[n][key]:>12.2f}" for n in names))
    print(f"{'ratio: CPU preprocessing / GPU preprocessing host part (EVF-SAM)':<66}"
          + "".join(f"{results[n]['cpu_pre_evf_sam'] / results[n]['gpu_pre_host_official']:>11.1f}x"
                    for n in names))
    if not args.skip_redis:
        print(f"{'ratio: Redis worker CPU per job, batches of 1 / batches of 8':<66}"
              + "".join(f"{results[n]['redis_batch1'] / results[n]['redis_batch8']:>11.1f}x" for n in names))
    print(f"fetch+decode of {largest} JPEGs: {scaling['1']:.1f} img/s on 1 thread, {scaling['2']:.1f} img/s on 2 "
          f"threads ({scaling['2'] / scaling['1']:.2f}x)")

    rows = [row for name in names for row in report(name, results[name])]
    print("\nfeeding one GPU (pool = WORKER_THREADS threads: fetch + decode + RLE; main = the worker's main thread: "
          "hash + preprocessing + mask + Redis, batches of 8)")
    print(f"{'size':<11}{'model @ img/s':<17}{'preprocessing':<19}{'pool ms':>9}{'main ms':>9}{'cores':>7}"
          f"{'pool thr.':>10}{'main budget':>13}")
    for row in rows:
        print(f"{row['size']:<11}{row['model'] + ' @ ' + str(int(row['rate'])):<17}{row['path']:<19}"
              f"{row['pool_ms']:>9.1f}{row['main_ms']:>9.1f}{row['cores']:>7.1f}{row['pool_threads']:>10.1f}"
              f"{row['main_budget_ms']:>8.1f} ms {'ok' if row['main_fits'] else 'OVER'}")
    if args.json:
        args.json.write_text(json.dumps({"stages_ms": results, "prepare_img_per_s": scaling, "feeding": rows,
                                         "redis_ping_ms": {"cpu": ping[0], "wall": ping[1]},
                                         "load_average": os.getloadavg()[0]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
