"""Job functions: plain, importable, JSON in and JSON out.

The same functions run inline (embedded mode, on a server thread) and in RQ workers (`python -m backend worker`).
`backend.model` builds their payloads; nothing here knows about HTTP or queues.

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
    # The predictor (its embedding cache) is not thread-safe; embedded mode and in-process callers share it.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def info(self) -> dict[str, str]:
        """What /health and the worker registry report about the model."""
        return {"model_name": self.model_name, "fingerprint": self.fingerprint, "family": self.family,
                "device": self.device, "dtype": self.dtype, "checkpoint": self.checkpoint}


_runtimes: dict[tuple[str, str, str], Runtime] = {}
_runtime_lock = threading.Lock()
_fetchers: dict[str | None, Any] = {}
_fetcher_lock = threading.Lock()


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The process-wide model, loaded on first use only.

    It serves the checkpoint that training from corrections promoted last (CHECKPOINTS_DIR/training.json), else
    EVF_SAM_CHECKPOINT. When a new checkpoint is promoted, the next call loads it and drops the old model, so
    workers and the embedded server switch between two jobs without a restart.
    """
    from backend.corrections.train import active_checkpoint

    settings = settings or get_settings()
    checkpoint = active_checkpoint(settings)
    key = (checkpoint, settings.evf_sam_device, settings.evf_sam_dtype)
    with _runtime_lock:
        if key not in _runtimes:
            runtime = _load_runtime(settings, checkpoint)
            _runtimes.clear()
            _runtimes[key] = runtime
        return _runtimes[key]


def _load_runtime(settings: Settings, checkpoint: str) -> Runtime:
    import torch

    import evf_sam
    from evf_sam.errors import CheckpointError

    if settings.evf_sam_checkpoint == DEMO_CHECKPOINT and not Path(checkpoint).is_dir():
        raise CheckpointError(f"the default demo model {checkpoint} is missing; set EVF_SAM_CHECKPOINT to a "
                              "checkpoint directory or a Hugging Face repo id")
    device = settings.evf_sam_device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model = evf_sam.load_model(checkpoint, device=device, dtype=getattr(torch, settings.evf_sam_dtype))
    predictor = evf_sam.EvfPredictor(model, cache_size=settings.embedding_cache_size,
                                     max_image_batch=settings.image_batch_size,
                                     max_prompt_batch=settings.prompt_batch_size)
    runtime = Runtime(predictor=predictor,
                      model_name=model.model_name, fingerprint=model.fingerprint, family=model.family,
                      device=device, dtype=settings.evf_sam_dtype, checkpoint=checkpoint)
    log.info("loaded %s (%s) on %s/%s in %.1f s", runtime.model_name, runtime.fingerprint, device,
             settings.evf_sam_dtype, time.perf_counter() - started)
    return runtime


def _get_fetcher(settings: Settings, hostname: str | None) -> Any:
    """One ImageFetcher per LS base URL. Credentials go only with the configured LABEL_STUDIO_URL."""
    from backend.ls_auth import LabelStudioAuth
    from backend.media import ImageFetcher

    ls_url = settings.label_studio_url or (hostname.rstrip("/") if hostname else None)
    with _fetcher_lock:
        if ls_url not in _fetchers:
            auth = None
            if settings.label_studio_url and settings.label_studio_api_key:
                auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())
            _fetchers[ls_url] = ImageFetcher(
                ls_url, auth, local_files_root=settings.local_files_document_root,
                allowed_hosts=settings.media_allowed_hosts, max_bytes=settings.max_image_bytes,
                max_pixels=settings.max_image_pixels, timeout=settings.media_timeout)
        return _fetchers[ls_url]


def predict_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Predict brush masks for one task; returns the LS prediction `{"result", "score", "model_version"}`.

    All prompts of an image run in one predictor call. An empty mask yields no region (so a task with nothing
    found returns `"result": []`). Raises `backend.errors.BackendError` for bad media or prompts.
    """
    settings = get_settings()
    runtime = get_runtime(settings)
    options = payload.get("options") or {}
    task_id = payload.get("task_id")
    model_version = format_model_version(runtime.model_name, runtime.fingerprint, payload["prompt_hash"])
    fetcher = _get_fetcher(settings, payload.get("hostname"))

    groups = payload["images"]
    images = [fetcher.fetch(group["url"], task_id=task_id) for group in groups]
    # Arrays, not PIL images: the fetcher already applied the EXIF orientation, the predictor must not redo it.
    with runtime.lock:
        batches = runtime.predictor.predict_batch(
            [(np.asarray(image), [request["prompt"] for request in group["requests"]])
             for image, group in zip(images, groups)],
            semantic=bool(options.get("semantic", False)))

    regions: list[dict[str, Any]] = []
    for image, group, predictions in zip(images, groups, batches):
        width, height = image.size
        for number, (request, prediction) in enumerate(zip(group["requests"], predictions)):
            for index, mask in enumerate(_postprocess(prediction.mask, options)):
                region_id = _region_id(task_id, group["to_name"], number, request, index, model_version)
                regions.append(_region(region_id, group["to_name"], request, mask, width, height,
                                       _confidence(prediction.score)))
    score = float(np.mean([region["score"] for region in regions])) if regions else 0.0
    log.info("task %s: %d region(s) from %d prompt(s), score %.3f", task_id, len(regions),
             sum(len(group["requests"]) for group in groups), score)
    return {"result": regions, "score": round(score, 4), "model_version": model_version}


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
