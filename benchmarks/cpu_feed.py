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

Then the worker itself (`--worker-size`, default 1920x1080): an in-process `EvfWorker` on the real Redis takes
`predict_task` jobs of loopback JPEGs in batches of 8 and runs the real job code - fetch, decode, `prepare_image`,
the predictor call, brush RLE, RQ completion - around a model whose device work is left out (`HostOnlyPredictor`:
what stays on the host of a CUDA model's thread is kept, i.e. preprocessing of images not prepared beforehand and the
device-to-host copy and threshold of the full-size logits). Timed: the CPU time of the worker's main thread and of the
whole process per job, for "before" (the previous placement, rebuilt from the same parts: hash and resize in the
predictor call, RQ completion on the main thread, one batch at a time) and "after" (the worker as shipped), in the
same run, alternating rounds. The main thread's CPU per job bounds one worker process at 1000 / ms img/s.
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
from evf_sam.predictor import EvfPredictor, Prediction, PreparedImage, image_key  # noqa: E402
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


class FixedBatch:
    """Stands in for jobs.PredictBatch: every task's answer is `result`, nothing is computed."""

    def __init__(self, payloads: list[dict[str, Any]], result: dict[str, Any]) -> None:
        self.payloads, self.result = payloads, result

    @classmethod
    def of(cls, result: dict[str, Any]) -> Callable[[list[dict[str, Any]]], FixedBatch]:
        return lambda payloads: cls(payloads, result)

    def wait_prepared(self) -> None:
        pass

    def predict(self) -> None:
        pass

    def finish(self, index: int) -> dict[str, Any]:
        return self.result


def redis_round_trip(redis_url: str, result: dict[str, Any], batch_jobs: int, rounds: int) -> tuple[float, float]:
    """(worker main-thread CPU ms, round-trip wall ms) per job of the queue bookkeeping: the server enqueues
    `batch_jobs` predict jobs and waits for them (RedisDispatcher, on a thread), the worker takes them as one batch
    (EvfWorker.execute_job, on this thread) and completes each with `result` (on its pool). The model call is replaced
    by returning `result`, so only transport and RQ bookkeeping are timed."""
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
    original = jobs.PIPELINED[PREDICT_JOB]
    jobs.PIPELINED[PREDICT_JOB] = FixedBatch.of(result)  # type: ignore[assignment]
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
        jobs.PIPELINED[PREDICT_JOB] = original
        worker.register_death()
        _drop_queues(connection, queues)
        dispatcher.close()
        connection.close()


def _drop_queues(connection, queues) -> None:
    """Delete the benchmark's queues, their finished/failed registries and the jobs in them from Redis."""
    for queue in queues:
        for registry in (queue.finished_job_registry, queue.failed_job_registry):
            for job_id in registry.get_job_ids():
                connection.delete(f"rq:job:{job_id}", f"rq:results:{job_id}")
            connection.delete(registry.key)
        connection.delete(queue.key)


def redis_ping(redis_url: str, seconds: float) -> tuple[float, float]:
    """(CPU ms, wall ms) of one Redis round trip from this process: the unit the RQ bookkeeping is made of."""
    from redis import Redis

    connection = Redis.from_url(redis_url)
    try:
        return measure(connection.ping, seconds, min_runs=50, max_runs=5000)
    finally:
        connection.close()


# --- the worker's main thread ------------------------------------------------------------------------------------

class HostOnlyPredictor(EvfPredictor):
    """EvfPredictor without device work: per prompt, a copy of a typical object's full-size logits (the host side of
    the device-to-host copy) and its threshold; images not prepared beforehand are preprocessed here, as the model's
    thread would."""

    def _predict(self, images: list[PreparedImage], prompt_lists: list[list[str]], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> list[list[Prediction]]:
        results = []
        for image, prompts in zip(images, prompt_lists):
            if image.inputs is None:
                self._host_inputs(image.image)
            logits = _object_logits(*image.image.shape[:2])
            results.append([Prediction(mask=(full := logits.copy()) > 0, logits=full, score=0.9) for _ in prompts])
        return results


class PreviousPredictor(HostOnlyPredictor):
    """The previous placement: `prepare_image` only checks the array (on the pool); hashing and preprocessing happen
    in the predictor call, on the model's thread."""

    def prepare_image(self, image: Any) -> PreparedImage:
        return PreparedImage(load_image(image), "", None, ())

    def predict_batch(self, items: Any, semantic: bool = False) -> list[list[Prediction]]:
        return super().predict_batch([(prepared.image, prompts) for prepared, prompts in items], semantic)


_logits_cache: dict[tuple[int, int], np.ndarray] = {}


def _object_logits(height: int, width: int) -> np.ndarray:
    if (height, width) not in _logits_cache:
        _logits_cache[(height, width)] = np.where(object_mask(height, width), 3.0, -3.0).astype(np.float32)
    return _logits_cache[(height, width)]


def previous_worker_class() -> type:
    """EvfWorker with the previous placement: one batch at a time, its jobs completed on the main thread."""
    from backend.worker import EvfWorker

    class PreviousWorker(EvfWorker):
        def _run_batches(self, batch: list, others: list) -> None:
            current = self._start_batch(batch)
            current.run.predict()
            outcomes = list(jobs.get_pool(jobs.get_settings()).map(current.run.finish, range(len(batch))))
            for (job, queue, execution), outcome in zip(batch, outcomes):
                self._release(job)
                if isinstance(outcome, BaseException):
                    self._finalize_failure(job, queue, execution, (type(outcome), outcome, None))
                else:
                    self._finalize_success(job, queue, execution, outcome)

    return PreviousWorker


def tiny_model_at(sam_size: int) -> Any:
    """A tiny random EVF-SAM (CPU) whose preprocessing has the official sizes (SAM `sam_size`², BEiT-3 224²)."""
    from transformers import XLMRobertaTokenizer

    from evf_sam.loading import attach_tokenizer, model_class
    from evf_sam.testing import TINY_CORPUS, tiny_config, train_tokenizer

    directory = tempfile.mkdtemp(prefix="cpu-feed-tokenizer-")
    train_tokenizer(directory, TINY_CORPUS, vocab_size=96)
    config = tiny_config("sam", vocab_size=len(XLMRobertaTokenizer.from_pretrained(directory)))
    config.sam_config["image_size"] = sam_size
    model = model_class(config)(config).eval()
    attach_tokenizer(model, directory)
    return model


def worker_feed(redis_url: str, base_url: str, name: str, threads: int, jobs_per_round: int,
                rounds: int) -> dict[str, dict[str, float]]:
    """Per variant ("before", "after"): main-thread CPU ms, whole-process CPU ms and wall ms per job (medians over
    `rounds` alternating rounds of `jobs_per_round` jobs in batches of 8)."""
    from redis import Redis
    from rq import Queue
    from rq.serializers import JSONSerializer
    from rq.utils import now

    from backend.model import PREDICT_JOB
    from backend.queueing import make_queues
    from backend.settings import Settings, get_settings
    from backend.worker import EvfWorker

    tag = f"cpu-feed-w-{uuid.uuid4().hex[:8]}"
    os.environ.update({"MEDIA_ALLOWED_HOSTS": "127.0.0.1", "WORKER_THREADS": str(threads)})
    get_settings.cache_clear()
    settings = Settings(REDIS_URL=redis_url, QUEUE_INTERACTIVE=f"{tag}-int", QUEUE_BATCH=f"{tag}-bat",
                        REDIS_KEY_PREFIX=tag, RESULT_TTL=60)
    connection = Redis.from_url(redis_url)
    queues = list(make_queues(settings, connection).values())
    model = tiny_model_at(1024)
    runtimes = {variant: jobs.Runtime(predictor=predictor_class(model, cache_size=0, preprocess_device="model"),
                                      model_name="cpu-feed", fingerprint="0123456789", family="sam", device="cuda",
                                      dtype="bfloat16", checkpoint="-", preprocess="device")
                for variant, predictor_class in (("before", PreviousPredictor), ("after", HostOnlyPredictor))}
    classes = {"before": previous_worker_class(), "after": EvfWorker}
    payload = {"hostname": None, "prompt_hash": "abc", "options": {"mask_mode": "semantic"},
               "images": [{"url": f"{base_url}/{name}.jpg", "to_name": "image",
                           "requests": [{"from_name": "tag", "type": "brushlabels", "label": "Cat",
                                         "prompt": "a cat"}]}]}
    original = jobs.get_runtime
    figures: dict[str, dict[str, list[float]]] = {v: {"main": [], "process": [], "wall": []} for v in runtimes}
    task_ids = iter(range(10**6))

    def one_round(variant: str, count: int) -> tuple[float, float, float]:
        jobs.get_runtime = lambda settings=None: runtimes[variant]  # type: ignore[assignment]
        worker = classes[variant](queues, name=f"{tag}-{variant}", connection=connection,
                                  serializer=JSONSerializer)
        worker.batch_jobs, worker.batch_wait = 8, 0.005
        worker.register_birth()
        worker.last_cleaned_at = now()  # maintenance is RQ's loop's business, not timed here
        queues[1].enqueue_many([Queue.prepare_data(PREDICT_JOB, args=({**payload, "task_id": next(task_ids)},),
                                                   result_ttl=60, timeout=600) for _ in range(count)])
        finished = queues[1].finished_job_registry
        before_count = finished.count
        main, process, wall = time.thread_time(), time.process_time(), time.perf_counter()
        while finished.count - before_count < count:
            taken = Queue.dequeue_any(queues, 5, connection=connection, serializer=JSONSerializer)
            if taken is None:
                raise RuntimeError(f"{variant}: only {finished.count - before_count} of {count} jobs finished")
            worker.execute_job(*taken)
        elapsed = [time.thread_time() - main, time.process_time() - process, time.perf_counter() - wall]
        worker.register_death()
        return tuple(value * 1000 / count for value in elapsed)  # type: ignore[return-value]

    try:
        for variant in runtimes:
            one_round(variant, 8)  # warm-up: imports, connections, the pool's threads
        for _ in range(rounds):
            for variant in runtimes:
                main, process, wall = one_round(variant, jobs_per_round)
                figures[variant]["main"].append(main)
                figures[variant]["process"].append(process)
                figures[variant]["wall"].append(wall)
    finally:
        jobs.get_runtime = original
        _drop_queues(connection, queues)
        connection.close()
    return {variant: {key: statistics.median(values) for key, values in parts.items()}
            for variant, parts in figures.items()}


def feeding(measured: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Per variant and target rate: main-thread budget use, worker processes, pool threads and cores needed."""
    rows = []
    for variant, figures in measured.items():
        main, total = figures["main"], figures["process"]
        for model, rate in TARGETS.items():
            rows.append({"variant": variant, "model": model, "rate": rate, "main_ms": main, "total_ms": total,
                         "main_max_img_s": 1000 / main, "processes": int(np.ceil(main * rate / 1000)),
                         "pool_threads": (total - main) * rate / 1000, "cores": total * rate / 1000})
    return rows


# --- report --------------------------------------------------------------------------------------------------------

def stage_figures(args: argparse.Namespace, sizes: list[tuple[int, ...]], directory: Path,
                  base_url: str) -> tuple[dict[str, dict[str, float]], dict[str, float], tuple[float, float]]:
    """ms per image of every stage for each size, fetch+decode img/s on 1 and 2 threads, one Redis PING."""
    results: dict[str, dict[str, float]] = {}
    scaling: dict[str, float] = {}
    for width, height in sizes:
        name = f"{width}x{height}"
        stages = image_stages(height, width, base_url, directory, args.seconds)
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
    return results, scaling, ping


def print_stages(results: dict[str, dict[str, float]], scaling: dict[str, float], ping: tuple[float, float],
                 sizes: list[tuple[int, ...]], skip_redis: bool) -> None:
    largest = f"{sizes[-1][0]}x{sizes[-1][1]}"
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
              ("redis_batch1", "Redis/RQ per job, batches of 1 (worker main thread CPU)"),
              ("redis_batch1_wall", "Redis/RQ per job, batches of 1 (round trip wall)"),
              ("redis_batch8", "Redis/RQ per job, batches of 8 (worker main thread CPU)"),
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
    if not skip_redis:
        print(f"{'ratio: Redis worker CPU per job, batches of 1 / batches of 8':<66}"
              + "".join(f"{results[n]['redis_batch1'] / results[n]['redis_batch8']:>11.1f}x" for n in names))
    print(f"fetch+decode of {largest} JPEGs: {scaling['1']:.1f} img/s on 1 thread, {scaling['2']:.1f} img/s on 2 "
          f"threads ({scaling['2'] / scaling['1']:.2f}x)")


def print_worker(measured: dict[str, dict[str, float]], rows: list[dict[str, Any]], size: str, threads: int) -> None:
    before, after = measured["before"], measured["after"]
    print(f"\nthe worker, {size} JPEGs over loopback, one prompt each, batches of 8, WORKER_THREADS={threads}, device "
          "work left out (ms per job, medians of rounds)")
    print(f"{'':<44}{'before':>10}{'after':>10}{'ratio':>9}")
    for key, label in (("main", "main thread CPU"), ("process", "whole worker CPU (all threads)"),
                       ("wall", "wall (this machine, no GPU)")):
        print(f"{label:<44}{before[key]:>10.2f}{after[key]:>10.2f}{before[key] / after[key]:>8.1f}x")
    print(f"{'img/s one main thread can sustain':<44}{1000 / before['main']:>10.0f}{1000 / after['main']:>10.0f}"
          f"{before['main'] / after['main']:>8.1f}x")
    print("\nfeeding one GPU: worker processes (main threads), pool threads and cores (all threads) needed")
    print(f"{'placement':<10}{'model @ img/s':<17}{'main ms':>9}{'max img/s':>11}{'processes':>11}{'pool thr.':>11}"
          f"{'cores':>8}")
    for row in rows:
        print(f"{row['variant']:<10}{row['model'] + ' @ ' + str(int(row['rate'])):<17}{row['main_ms']:>9.2f}"
              f"{row['main_max_img_s']:>11.0f}{row['processes']:>11d}{row['pool_threads']:>11.1f}{row['cores']:>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="640x480,1920x1080,4000x3000", help="WxH,WxH,...")
    parser.add_argument("--seconds", type=float, default=0.5, help="time spent per stage and size (median counts)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--rounds", type=int, default=20, help="batches timed for the Redis round trip")
    parser.add_argument("--skip-redis", action="store_true", help="no Redis here: leave the Redis rows at 0")
    parser.add_argument("--worker-size", default="1920x1080", help="WxH of the worker measurement's images")
    parser.add_argument("--worker-threads", type=int, default=4, help="WORKER_THREADS for the worker measurement")
    parser.add_argument("--worker-jobs", type=int, default=48, help="jobs per round of the worker measurement")
    parser.add_argument("--worker-rounds", type=int, default=3, help="rounds per variant (before/after)")
    parser.add_argument("--skip-stages", action="store_true", help="only the worker measurement")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-image cost on one core; the worker's threads add cores, not speed per image

    sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]
    results: dict[str, dict[str, float]] = {}
    scaling: dict[str, float] = {}
    ping = (0.0, 0.0)
    if not args.skip_stages:
        with tempfile.TemporaryDirectory() as tmp, http_server(Path(tmp)) as base_url:
            results, scaling, ping = stage_figures(args, sizes, Path(tmp), base_url)
        print_stages(results, scaling, ping, sizes, args.skip_redis)
    measured: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    if not args.skip_redis:
        width, height = (int(v) for v in args.worker_size.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp, http_server(Path(tmp)) as base_url:
            name = f"{width}x{height}"
            (Path(tmp) / f"{name}.jpg").write_bytes(encoded(photo(height, width), "JPEG"))
            measured = worker_feed(args.redis_url, base_url, name, args.worker_threads, args.worker_jobs,
                                   args.worker_rounds)
        rows = feeding(measured)
        print_worker(measured, rows, args.worker_size, args.worker_threads)
    if args.json:
        args.json.write_text(json.dumps({"stages_ms": results, "prepare_img_per_s": scaling,
                                         "worker_ms_per_job": measured, "feeding": rows,
                                         "redis_ping_ms": {"cpu": ping[0], "wall": ping[1]},
                                         "load_average": os.getloadavg()[0]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
