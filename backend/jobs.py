"""Job functions: plain, importable, JSON in and JSON out.

The same functions run inline (embedded mode, on a server thread) and in RQ workers (`python -m backend worker`).
`backend.model` builds their payloads; nothing here knows about HTTP or queues. Workers and the embedded server run
several `predict_task` payloads through one model call with its batched form `predict_tasks` (see `BATCHED`), made of
the stages of `PredictBatch`: prepare (fetch, decode, check prompts, content hash, CPU preprocessing; on the
WORKER_THREADS pool) -> one predictor call (the caller's thread) -> finish (regions, brush RLE; on the pool).
Workers drive those stages themselves (`PIPELINED`) to prepare the next batch while the model runs.

`predict_task` payload (one Label Studio task):

    {"task_id": 7,                              # LS task id (media presigning, region ids, logs)
     "hostname": "http://ls:8080" | None,       # LS base URL from /setup or params.hostname
     "prompt_hash": "3f2a9c",                   # prompt-set hash, the "-p…" part of model_version
     "options": {"mask_mode": "semantic" | "instances", "min_area": 0, "fill_holes_below": 0,
                 "max_instances": 20, "semantic": false},
     "images": [{"url": "/data/upload/1/cat.jpg", "to_name": "image",
                 "requests": [{"from_name": "tag", "type": "brushlabels", "label": "Cat", "prompt": "a cat"}]}]}
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from backend import rle
from backend.model import format_model_version
from backend.settings import DEMO_CHECKPOINT, Settings, get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The model loaded in this process, with the facts `model_version` is made of."""

    predictor: Any  # evf_sam.EvfPredictor
    model_name: str
    fingerprint: str
    family: str
    device: str
    dtype: str
    checkpoint: str
    preprocess: str = "cpu"  # where images are resized/normalised: "cpu" or "device"
    # The predictor (its embedding cache) is not thread-safe; embedded mode and in-process callers share it.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def info(self) -> dict[str, str]:
        """What /health and the worker registry report about the model."""
        return {"model_name": self.model_name, "fingerprint": self.fingerprint, "family": self.family,
                "device": self.device, "dtype": self.dtype, "preprocess": self.preprocess,
                "checkpoint": self.checkpoint}


_runtimes: dict[tuple[str, str, str, str], Runtime] = {}
_runtime_lock = threading.Lock()
FETCHER_CACHE_SIZE = 32  # LS base URLs whose ImageFetcher is kept (hostnames come from requests)
_fetchers: OrderedDict[str | None, Any] = OrderedDict()  # least recently used first
_fetcher_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process-wide model, loaded on first use only.

    It serves the checkpoint that training from corrections promoted last (CHECKPOINTS_DIR/training.json), else
    EVF_SAM_CHECKPOINT. When a new checkpoint is promoted, the next call loads it and drops the old model, so
    workers and the embedded server switch between two jobs without a restart.
    """
    from backend.corrections.train import active_checkpoint

    settings = settings or get_settings()
    checkpoint = active_checkpoint(settings)
    key = (checkpoint, settings.evf_sam_device, settings.evf_sam_dtype, settings.evf_sam_preprocess)
    with _runtime_lock:
        if key not in _runtimes:
            runtime = _load_runtime(settings, checkpoint)
            _runtimes.clear()
            _runtimes[key] = runtime
        return _runtimes[key]


def _load_runtime(settings: Settings, checkpoint: str) -> Runtime:
    import torch

    import evf_sam
    from backend import placement
    from evf_sam.acceleration import accelerate
    from evf_sam.errors import CheckpointError

    if settings.evf_sam_checkpoint == DEMO_CHECKPOINT and not Path(checkpoint).is_dir():
        raise CheckpointError(f"the default demo model {checkpoint} is missing; set EVF_SAM_CHECKPOINT to a "
                              "checkpoint directory or a Hugging Face repo id")
    where = placement.resolve(settings.evf_sam_device, settings.evf_sam_dtype, settings.evf_sam_preprocess,
                              visible_gpus=placement.visible_gpus())
    started = time.perf_counter()
    model = evf_sam.load_model(checkpoint, device=where.device, dtype=getattr(torch, where.dtype))
    on_cuda = where.device.startswith("cuda")
    speedups = accelerate(model, fused_attention=_switched_on(settings.evf_sam_fused_attention, on_cuda),
                          compile_encoder=settings.evf_sam_compile,
                          prompt_graphs=_switched_on(settings.evf_sam_prompt_graphs, on_cuda))
    # Jobs use masks and scores only: the float32 logits stay on the device.
    predictor = evf_sam.EvfPredictor(model, cache_size=settings.embedding_cache_size,
                                     max_image_batch=settings.image_batch_size,
                                     max_prompt_batch=settings.prompt_batch_size,
                                     preprocess_device=where.preprocess, return_logits=False)
    runtime = Runtime(predictor=predictor,
                      model_name=model.model_name, fingerprint=model.fingerprint, family=model.family,
                      device=where.device, dtype=where.dtype, checkpoint=checkpoint,
                      preprocess="device" if where.preprocess else "cpu")
    log.info("loaded %s (%s) on %s/%s, preprocessing on %s, %s, in %.1f s", runtime.model_name, runtime.fingerprint,
             runtime.device, runtime.dtype, runtime.preprocess, speedups, time.perf_counter() - started)
    return runtime


def _switched_on(switch: str, on_cuda: bool) -> bool:
    """An "auto" | "on" | "off" speed-up setting: "auto" means on for a CUDA model."""
    return switch == "on" or (switch == "auto" and on_cuda)


def _get_fetcher(settings: Settings, hostname: str | None) -> Any:
    """One ImageFetcher per LS base URL, for the FETCHER_CACHE_SIZE most recently used ones. Credentials go only
    with the configured LABEL_STUDIO_URL."""
    from backend.ls_auth import LabelStudioAuth
    from backend.media import ImageFetcher

    ls_url = settings.label_studio_url or (hostname.rstrip("/") if hostname else None)
    with _fetcher_lock:
        fetcher = _fetchers.get(ls_url)
        if fetcher is not None:
            _fetchers.move_to_end(ls_url)
            return fetcher
        auth = None
        if settings.label_studio_url and settings.label_studio_api_key:
            auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())
        fetcher = ImageFetcher(
            ls_url, auth, local_files_root=settings.local_files_document_root,
            allowed_hosts=settings.media_allowed_hosts, max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels, timeout=settings.media_timeout)
        # Not closed at eviction (another thread may still be fetching with it): it closes when let go.
        _fetchers[ls_url] = fetcher
        if len(_fetchers) > FETCHER_CACHE_SIZE:
            _fetchers.popitem(last=False)
        return fetcher


def predict_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict brush masks for one task; returns the LS prediction `{"result", "score", "model_version"}`.

    All prompts of an image run in one predictor call. An empty mask yields no region (so a task with nothing
    found returns `"result": []`). Raises `backend.errors.BackendError` for bad media or prompts.
    """
    [outcome] = predict_tasks([payload])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def predict_tasks(payloads: Sequence[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
    """Predict several tasks with one predictor call (all their images and prompts at once): for each payload, in
    order, its LS prediction (as `predict_task` returns it) or the exception that failed it.

    Downloads, decoding, hashing, preprocessing and mask encoding run on WORKER_THREADS threads. A task with a bad
    image or prompt fails alone; should the batched model call itself fail, every task is predicted on its own so only
    the culprit fails.
    """
    batch = PredictBatch(payloads)
    batch.predict()
    return _each(get_pool(get_settings()), batch.finish, range(len(payloads)))


class PredictBatch:
    """`predict_task` payloads on their way through one model call, in three stages.

    Creating it queues each task's preparation on the pool (fetch, decode, prompt check, `prepare_image`) and returns
    at once; `predict()` waits for them and runs the model on the calling thread; `finish(i)`, from any thread,
    turns task i's masks into its LS prediction (or returns the exception that failed it). Raises whatever loading
    the model raises.
    """

    def __init__(self, payloads: Sequence[dict[str, Any]], settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.runtime = get_runtime(self.settings)
        pool = get_pool(self.settings)
        self._prepared = [pool.submit(_guarded(_prepare), payload, self.settings, self.runtime)
                          for payload in payloads]
        self._outcomes: list[Any] | None = None

    def __len__(self) -> int:
        return len(self._prepared)

    def wait_prepared(self) -> None:
        """Block until every task is prepared (or failed preparing)."""
        for future in self._prepared:
            future.result()

    def predict(self) -> None:
        """Wait for the prepared tasks, then predict all of them with one predictor call per `semantic` flag."""
        outcomes: list[Any] = [future.result() for future in self._prepared]
        ready = [index for index, outcome in enumerate(outcomes) if isinstance(outcome, _Prepared)]
        for index, predictions in zip(ready, _predict(self.runtime, [outcomes[index] for index in ready])):
            outcomes[index] = predictions if isinstance(predictions, Exception) else (outcomes[index], predictions)
        self._outcomes = outcomes

    def finish(self, index: int) -> dict[str, Any] | Exception:
        """Task `index`'s LS prediction, or the exception that failed it (after `predict`)."""
        if self._outcomes is None:
            raise RuntimeError("PredictBatch.finish before predict")
        outcome = self._outcomes[index]
        return outcome if isinstance(outcome, Exception) else _guarded(_finish)(*outcome)


@dataclass
class _Prepared:
    """A task ready for the model: its payload, prepared images (evf_sam.predictor.PreparedImage: uint8 RGB,
    EXIF-transposed, keyed, preprocessed on the CPU) and model_version."""

    payload: dict[str, Any]
    images: list[Any]
    model_version: str

    @property
    def items(self) -> list[tuple[Any, list[str]]]:
        """(image, prompts) per image, as the predictor takes them."""
        return [(image, [request["prompt"] for request in group["requests"]])
                for image, group in zip(self.images, self.payload["images"])]

    @property
    def semantic(self) -> bool:
        return bool((self.payload.get("options") or {}).get("semantic", False))


def _prepare(payload: dict[str, Any], settings: Settings, runtime: Runtime) -> _Prepared:
    """Fetch, decode, hash and preprocess the task's images and check its prompts (so a bad task fails before the
    batched call)."""
    from evf_sam.transforms import check_prompts

    model_version = format_model_version(runtime.model_name, runtime.fingerprint, payload["prompt_hash"])
    fetcher = _get_fetcher(settings, payload.get("hostname"))
    images = []
    for group in payload["images"]:
        check_prompts([request["prompt"] for request in group["requests"]])
        # An array, not the PIL image: the fetcher already applied the EXIF orientation, the predictor must not.
        image = np.asarray(fetcher.fetch(group["url"], task_id=payload.get("task_id")))
        images.append(runtime.predictor.prepare_image(image))
    return _Prepared(payload, images, model_version)


def _predict(runtime: Runtime, tasks: list[_Prepared]) -> list[list[Any] | Exception]:
    """One predictor call per `semantic` flag over all the tasks' images; per task its predictions per image."""
    outcomes: list[list[Any] | Exception] = [[] for _ in tasks]
    for semantic in sorted({task.semantic for task in tasks}):
        members = [index for index, task in enumerate(tasks) if task.semantic == semantic]
        items = [item for index in members for item in tasks[index].items]
        try:
            with runtime.lock:
                predictions = runtime.predictor.predict_batch(items, semantic=semantic)
        except Exception as error:  # noqa: BLE001 - isolated below: only the tasks that fail alone fail
            if len(members) == 1:
                outcomes[members[0]] = error
                continue
            log.warning("batched prediction of %d tasks failed (%s); predicting them one by one", len(members),
                        error)
            for index in members:
                outcomes[index] = _predict(runtime, [tasks[index]])[0]
            continue
        start = 0
        for index in members:
            count = len(tasks[index].images)
            outcomes[index] = predictions[start:start + count]
            start += count
    return outcomes


def _finish(task: _Prepared, predictions: list[list[Any]]) -> dict[str, Any]:
    """Masks -> the LS prediction: optional cleanup, one region per mask (or component), brush RLE."""
    payload, model_version = task.payload, task.model_version
    options = payload.get("options") or {}
    task_id = payload.get("task_id")
    regions: list[dict[str, Any]] = []
    for image, group, image_predictions in zip(task.images, payload["images"], predictions):
        height, width = image.image.shape[:2]
        for number, (request, prediction) in enumerate(zip(group["requests"], image_predictions)):
            for index, mask in enumerate(_postprocess(prediction.mask, options)):
                region_id = _region_id(task_id, group["to_name"], number, request, index, model_version)
                regions.append(_region(region_id, group["to_name"], request, mask, width, height,
                                       _confidence(prediction.score)))
    score = float(np.mean([region["score"] for region in regions])) if regions else 0.0
    log.info("task %s: %d region(s) from %d prompt(s), score %.3f", task_id, len(regions),
             sum(len(group["requests"]) for group in payload["images"]), score)
    return {"result": regions, "score": round(score, 4), "model_version": model_version}


def get_pool(settings: Settings) -> ThreadPoolExecutor:
    """The process-wide thread pool of the per-image CPU work (WORKER_THREADS threads); workers also complete their
    RQ jobs on it."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(settings.worker_threads, thread_name_prefix="evf-cpu")
        return _pool


def _guarded(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, returning the Exception it raises instead of raising it (the caller reports it as that task's
    failure)."""
    def guarded(*args: Any) -> Any:
        try:
            return function(*args)
        except Exception as error:  # noqa: BLE001 - see above
            return error

    return guarded


def _each(pool: ThreadPoolExecutor, function: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """`function` over `items` (on the pool when there are several); each result, or the Exception it raised."""
    if len(items) <= 1:
        return [_guarded(function)(item) for item in items]
    return list(pool.map(_guarded(function), items))


def _confidence(predicted_iou: float) -> float:
    """The decoder's predicted IoU clipped to [0, 1]: an under-trained head can predict values outside it, and
    Label Studio silently drops imported predictions with a negative score."""
    return min(1.0, max(0.0, float(predicted_iou)))


def _postprocess(mask: np.ndarray, options: dict[str, Any]) -> list[np.ndarray]:
    """Optional cleanup, then one mask (semantic) or one per connected component (instances); empty ones dropped."""
    min_area = int(options.get("min_area", 0))
    fill_holes = int(options.get("fill_holes_below", 0))
    if min_area or fill_holes:
        mask = rle.clean_mask(mask, min_area=min_area, fill_holes_below=fill_holes)
    if options.get("mask_mode", "semantic") == "instances":
        return rle.split_instances(mask, min_area=min_area, max_instances=int(options.get("max_instances", 20)))
    return [mask] if mask.any() else []


def _region_id(task_id: Any, to_name: str, number: int, request: dict[str, Any], index: int,
               model_version: str) -> str:
    """Deterministic, so a retried or re-run job returns identical regions."""
    key = f"{task_id}|{to_name}|{number}|{request['from_name']}|{request['label']}|{request['prompt']}|{index}|"
    return hashlib.sha1((key + model_version).encode()).hexdigest()[:12]


def _region(region_id: str, to_name: str, request: dict[str, Any], mask: np.ndarray, width: int, height: int,
            score: float) -> dict[str, Any]:
    value: dict[str, Any] = {"format": "rle", "rle": rle.encode(mask)}
    if request["type"] == "brushlabels":
        value["brushlabels"] = [request["label"]]
    return {"id": region_id, "from_name": request["from_name"], "to_name": to_name, "type": request["type"],
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": value, "score": round(score, 4), "readonly": False}


def record_event(event: dict[str, Any]) -> dict[str, Any]:
    """Webhook job: log what arrived, hand it to its handler (corrections capture, auto pre-labelling, training) and
    return a summary with the handler's outcome."""
    annotation = event.get("annotation")
    summary = {
        "action": event.get("action"),
        "project": _id_of(event.get("project")),
        "task": _id_of(event.get("task")),
        "annotation": _id_of(annotation) if not isinstance(annotation, list) else [_id_of(a) for a in annotation],
        "received_at": event.get("received_at"),
    }
    log.info("webhook event recorded: %s", summary)
    action = event.get("action")
    if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"):
        from backend.corrections.capture import handle_event

        summary["outcome"] = handle_event(event)
    elif action == "TASKS_CREATED":
        from backend.prelabel import on_tasks_created

        summary["outcome"] = on_tasks_created(event)
    elif action == "START_TRAINING":
        from backend.corrections.train import on_start_training

        summary["outcome"] = on_start_training(event)
    return summary


def _id_of(value: Any) -> Any:
    return value.get("id") if isinstance(value, dict) else value


# Job functions whose jobs may run together (worker and embedded mode), mapped to their batched form, and for
# workers to the staged form behind it.
BATCHED: dict[str, Callable[[Sequence[dict[str, Any]]], list[Any]]] = {f"{__name__}.predict_task": predict_tasks}
PIPELINED: dict[str, Callable[[Sequence[dict[str, Any]]], PredictBatch]] = {f"{__name__}.predict_task": PredictBatch}
