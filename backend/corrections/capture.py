"""Corrections capture: an annotator's brush masks become dataset records, paired with the prediction they started
from.

Webhook jobs (ARCHITECTURE §2.3): `ANNOTATION_CREATED` / `ANNOTATION_UPDATED` (and bulk `ANNOTATIONS_CREATED`) record an
annotation, `ANNOTATIONS_DELETED` removes it. For each annotation:

1. decode its brush regions (editor RLE with literal chunks and anti-aliased alpha; a pixel is inside at alpha >= 128);
2. find the prediction it started from: `parent_prediction` (fetched through the LS API), else the task's latest one;
3. pair regions per (control, label) greedily by IoU (same region id first) and classify each pair:
   `accepted` (mask unchanged), `edited` (same region or IoU >= 0.5), `redrawn` (overlapping but IoU < 0.5),
   `deleted` (a predicted region the annotator removed: empty corrected mask), `added` (no predicted counterpart;
   every region of an annotation made without a prediction);
4. write `images/<hash>.png`, `masks/…png` and one `records.jsonl` line per (annotation, region) in the dataset layout
   of `evf_sam.data.layout`, atomically and under a file lock (several workers may capture at once).

Idempotent: records of an annotation are replaced as a whole, only by a newer `updated_at` (duplicate or out-of-order
webhooks change nothing); a deleted annotation leaves a tombstone so a late update cannot bring it back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from backend import rle
from backend.errors import BackendError, BadRequest
from backend.ls_client import LabelStudioAPIError, LabelStudioClient
from evf_sam.data import layout

log = logging.getLogger(__name__)

ALPHA_THRESHOLD = 128  # editor brushes are anti-aliased: half-covered pixels count as inside
EDIT_IOU = 0.5
BRUSH_TYPES = ("brushlabels", "brush")
TOMBSTONES_FILE = "deleted_annotations.json"
LOCK_FILE = ".capture.lock"
KINDS = ("accepted", "edited", "redrawn", "deleted", "added")


# --- the dataset directory ---------------------------------------------------------------------------------------

class CorrectionsStore:
    """The corrections dataset directory (`CORRECTIONS_DIR`): records, masks, images, tombstones; one writer at a
    time."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock across processes (fcntl on a lock file) for read-modify-write of the records."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def records(self) -> list[layout.Record]:
        """Every record ([] before the first capture)."""
        if not (self.root / layout.RECORDS_FILE).is_file():
            return []
        return layout.read_records(self.root)

    def tombstones(self) -> dict[str, str]:
        """annotation id -> when it was deleted."""
        path = self.root / TOMBSTONES_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def _write_tombstones(self, tombstones: dict[str, str]) -> None:
        layout.atomic_write_bytes(self.root / TOMBSTONES_FILE, json.dumps(tombstones, sort_keys=True).encode())

    def is_current(self, annotation_id: int, updated_at: str | None) -> bool:
        """True when the stored version of the annotation is as new as `updated_at` (or it was deleted)."""
        if str(annotation_id) in self.tombstones():
            return True
        stored = [r.updated_at for r in self.records() if r.annotation_id == annotation_id]
        return bool(stored) and not _newer(updated_at, stored[0])

    def replace(self, annotation_id: int, updated_at: str | None, records: list[layout.Record]) -> bool:
        """Replace the annotation's records (under the lock) unless a newer or equal version is stored.
        Returns False when nothing changed."""
        with self.locked():
            if self.is_current(annotation_id, updated_at):
                return False
            old = self.records()
            kept = [r for r in old if r.annotation_id != annotation_id]
            layout.write_records(self.root, kept + records)
            self._remove_unused_files(old, kept + records)
            return True

    def remove(self, annotation_ids: list[int], *, tombstone: bool = True) -> int:
        """Drop the annotations' records (and their mask files); returns how many records went."""
        ids = set(annotation_ids)
        if not tombstone and not (self.root / layout.RECORDS_FILE).is_file():
            return 0
        with self.locked():
            old = self.records()
            kept = [r for r in old if r.annotation_id not in ids]
            if len(kept) != len(old):
                layout.write_records(self.root, kept)
                self._remove_unused_files(old, kept)
            if tombstone:
                now = _now()
                self._write_tombstones({**self.tombstones(), **{str(i): now for i in ids}})
            return len(old) - len(kept)

    def _remove_unused_files(self, old: list[layout.Record], new: list[layout.Record]) -> None:
        used = {p for r in new for p in (r.mask, r.predicted_mask, r.image) if p}
        for path in {p for r in old for p in (r.mask, r.predicted_mask, r.image) if p} - used:
            (self.root / path).unlink(missing_ok=True)


# --- regions and matching ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    """One decoded brush region."""

    region_id: str
    from_name: str
    to_name: str
    label: str
    mask: np.ndarray


def brush_regions(result: list[dict[str, Any]] | None, height: int, width: int) -> list[Region]:
    """The brush regions of an LS `result` list, decoded at the image's size (BadRequest for a broken RLE)."""
    regions = []
    for index, item in enumerate(result or []):
        if not isinstance(item, dict) or item.get("type") not in BRUSH_TYPES:
            continue
        value = item.get("value") or {}
        if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
            continue
        try:
            mask = rle.decode(value["rle"], height, width, alpha_threshold=ALPHA_THRESHOLD)
        except BadRequest as error:
            raise BadRequest(f"region {item.get('id')!r} (result[{index}]): {error.message}; the image is "
                             f"{width}x{height}", code="bad_rle", field=f"annotation.result[{index}]") from None
        labels = value.get("brushlabels") or [""]
        regions.append(Region(str(item.get("id", index)), str(item.get("from_name", "")),
                              str(item.get("to_name", "")), str(labels[0]), mask))
    return regions


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (two empty masks: 1.0)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def match(predicted: list[Region], corrected: list[Region]) -> list[tuple[Region | None, Region | None, float | None,
                                                                        str]]:
    """Pair predicted and corrected regions per (control, image, label): greedy by IoU, same region id first.
    Returns (predicted, corrected, IoU, kind) for every region of both sides."""
    pairs: list[tuple[Region | None, Region | None, float | None, str]] = []
    groups = {(r.from_name, r.to_name, r.label) for r in predicted + corrected}
    for group in sorted(groups):
        preds = [r for r in predicted if (r.from_name, r.to_name, r.label) == group]
        corrs = [r for r in corrected if (r.from_name, r.to_name, r.label) == group]
        scores = sorted(((iou(p.mask, c.mask), p.region_id == c.region_id, i, j)
                         for i, p in enumerate(preds) for j, c in enumerate(corrs)),
                        key=lambda s: (s[1], s[0]), reverse=True)
        used_p: set[int] = set()
        used_c: set[int] = set()
        for value, same_id, i, j in scores:
            if i in used_p or j in used_c or (value == 0.0 and not same_id):
                continue
            used_p.add(i)
            used_c.add(j)
            if np.array_equal(preds[i].mask, corrs[j].mask):
                kind = "accepted"
            elif same_id or value >= EDIT_IOU:
                kind = "edited"
            else:
                kind = "redrawn"
            pairs.append((preds[i], corrs[j], value, kind))
        pairs += [(p, None, 0.0, "deleted") for i, p in enumerate(preds) if i not in used_p]
        pairs += [(None, c, None, "added") for j, c in enumerate(corrs) if j not in used_c]
    return pairs


# --- capture -----------------------------------------------------------------------------------------------------

@dataclass
class CaptureContext:
    """What capture needs around it: the dataset, the LS API (None: no predictions looked up) and an image fetcher."""

    store: CorrectionsStore
    client: LabelStudioClient | None
    fetcher: Any  # backend.media.ImageFetcher
    prompt_field: str = "prompt"
    max_pixels: int = 50_000_000


def find_prediction(annotation: dict[str, Any], task_id: int, client: LabelStudioClient | None) -> dict | None:
    """The prediction the annotator started from: `parent_prediction`, else the task's latest prediction."""
    if client is None:
        return None
    parent = annotation.get("parent_prediction")
    if isinstance(parent, dict):
        parent = parent.get("id")
    if parent:
        try:
            return client.get_prediction(int(parent))
        except LabelStudioAPIError as error:
            if error.http_status != 404:
                raise
            log.warning("annotation %s: parent prediction %s is gone; using the task's latest", annotation.get("id"),
                        parent)
    predictions = client.list_predictions(task=task_id)
    return max(predictions, key=lambda p: (str(p.get("created_at") or ""), p.get("id", 0)), default=None)


def _prompts_by_label(task: dict[str, Any], annotation: dict[str, Any], label_config: str | None,
                      extra_params: dict[str, Any] | None, prompt_field: str) -> dict[tuple[str, str], str]:
    """(control, label) -> the prompt that produced it: the annotation's TextArea text, the task's prompt field, the
    per-label prompts, or the label itself (ARCHITECTURE §4)."""
    from backend import label_config as ls_config
    from backend import prompts

    if not label_config:
        return {}
    found: dict[tuple[str, str], str] = {}
    context = {"result": [r for r in annotation.get("result") or [] if isinstance(r, dict)
                          and r.get("type") == "textarea"]}
    try:
        targets = ls_config.parse(label_config).targets
    except BackendError:
        return {}
    for target in targets:
        try:
            requests = prompts.resolve(task, target, context=context, extra_params=extra_params,
                                       prompt_field=prompt_field)
        except BackendError:
            continue
        for request in requests:
            found.setdefault((target.from_name, request.label), request.prompt)
    return found


def _image_url(task: dict[str, Any], to_name: str, label_config: str | None) -> str:
    from backend import label_config as ls_config

    data = task.get("data") or {}
    if label_config:
        try:
            for target in ls_config.parse(label_config).targets:
                if target.to_name == to_name and isinstance(data.get(target.value_key), str):
                    return data[target.value_key]
        except BackendError:
            pass
    urls = [v for k, v in data.items() if k in (to_name, "image") and isinstance(v, str)]
    if not urls:
        raise BadRequest(f"task {task.get('id')}: cannot tell which data field holds the image of {to_name!r} "
                         "(no label config available)", field="task.data")
    return urls[0]


def capture_annotation(annotation: dict[str, Any], task: dict[str, Any], ctx: CaptureContext, *,
                       label_config: str | None = None, extra_params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record one annotation (module docstring); returns what happened: recorded / unchanged / removed."""
    annotation_id = int(annotation["id"])
    task_id = int(task.get("id") or annotation.get("task"))
    updated_at = annotation.get("updated_at") or annotation.get("created_at")
    if annotation.get("was_cancelled"):
        removed = ctx.store.remove([annotation_id], tombstone=False)
        return {"annotation": annotation_id, "status": "removed", "records": removed, "reason": "skipped task"}
    if ctx.store.is_current(annotation_id, updated_at):
        return {"annotation": annotation_id, "status": "unchanged", "reason": "stored version is as new or deleted"}

    result = [r for r in annotation.get("result") or [] if isinstance(r, dict) and r.get("type") in BRUSH_TYPES]
    prediction = find_prediction(annotation, task_id, ctx.client)
    to_names = {str(r.get("to_name", "")) for r in result + list((prediction or {}).get("result") or [])
                if isinstance(r, dict) and r.get("type") in BRUSH_TYPES}
    records: list[layout.Record] = []
    if not to_names and not any(r.annotation_id == annotation_id for r in ctx.store.records()):
        return {"annotation": annotation_id, "status": "nothing to record",
                "reason": "no brush regions and no prediction"}
    if to_names:
        if not isinstance(task.get("data"), dict):
            if ctx.client is None:
                raise BadRequest(f"annotation {annotation_id}: the webhook carries no task data and the Label Studio "
                                 "API is not configured (LABEL_STUDIO_URL, LABEL_STUDIO_API_KEY)", field="task")
            task = ctx.client.get_task(task_id)
        records = _records_for(annotation, task, prediction, sorted(to_names), ctx, label_config, extra_params)
    if not ctx.store.replace(annotation_id, updated_at, records):
        for record in records:  # this version lost the race: its mask files are nobody's
            for path in (record.mask, record.predicted_mask):
                if path:
                    (ctx.store.root / path).unlink(missing_ok=True)
        return {"annotation": annotation_id, "status": "unchanged", "reason": "a newer version was stored meanwhile"}
    kinds = {kind: sum(r.extra.get("kind") == kind for r in records) for kind in KINDS}
    log.info("annotation %s of task %s: %d record(s) %s", annotation_id, task_id, len(records), kinds)
    return {"annotation": annotation_id, "status": "recorded", "records": len(records), "kinds": kinds,
            "prediction": (prediction or {}).get("id")}


def _records_for(annotation: dict[str, Any], task: dict[str, Any], prediction: dict[str, Any] | None,
                 to_names: list[str], ctx: CaptureContext, label_config: str | None,
                 extra_params: dict[str, Any] | None) -> list[layout.Record]:
    from backend.media import decode_image

    annotation_id, task_id = int(annotation["id"]), int(task.get("id") or annotation.get("task"))
    prompts = _prompts_by_label(task, annotation, label_config, extra_params, ctx.prompt_field)
    now = _now()
    version = uuid.uuid4().hex[:8]
    records = []
    for to_name in to_names:
        raw = ctx.fetcher.fetch_bytes(_image_url(task, to_name, label_config), task_id=task_id)
        image = decode_image(raw, max_pixels=ctx.max_pixels)
        image_hash = hashlib.sha256(raw).hexdigest()[:16]
        image_path = f"{layout.IMAGES_DIR}/{image_hash}.png"
        if not (ctx.store.root / image_path).is_file():
            layout.save_image(ctx.store.root / image_path, image)
        height, width = image.height, image.width
        corrected = [r for r in brush_regions(annotation.get("result"), height, width) if r.to_name == to_name]
        predicted = [r for r in brush_regions((prediction or {}).get("result"), height, width) if r.to_name == to_name]
        for number, (pred, corr, value, kind) in enumerate(match(predicted, corrected)):
            region = corr or pred
            assert region is not None
            # A name unique to this capture: a concurrent capture of the same annotation never overwrites these files.
            stem = f"{layout.MASKS_DIR}/a{annotation_id}-{version}-{_slug(to_name)}-{number}"
            mask_path = f"{stem}.png"
            layout.save_mask(ctx.store.root / mask_path,
                             corr.mask if corr is not None else np.zeros((height, width), bool))
            pred_path = None
            if pred is not None:
                pred_path = f"{stem}-pred.png"
                layout.save_mask(ctx.store.root / pred_path, pred.mask)
            prompt = prompts.get((region.from_name, region.label)) or \
                (" ".join(region.label.replace("_", " ").split()).lower() or "object")
            records.append(layout.Record(
                image=image_path, mask=mask_path, prompt=prompt, label=region.label, predicted_mask=pred_path,
                iou=None if value is None else round(value, 6),
                model_version=(prediction or {}).get("model_version") if pred is not None else None,
                task_id=task_id, annotation_id=annotation_id, image_hash=image_hash,
                created_at=annotation.get("created_at"),
                updated_at=annotation.get("updated_at") or annotation.get("created_at"),
                extra={"kind": kind, "region_id": region.region_id, "from_name": region.from_name,
                       "to_name": to_name, "prediction_id": (prediction or {}).get("id"),
                       "project": annotation.get("project"), "recorded_at": now}))
    return records


# --- webhook entry points ----------------------------------------------------------------------------------------

_contexts: dict[int, CaptureContext] = {}


def context_from_settings(settings: Any = None) -> CaptureContext:
    """The process's CaptureContext for the backend settings (LS client only when LABEL_STUDIO_URL and the key are
    set); made once per settings object."""
    from backend.settings import get_settings

    settings = settings or get_settings()
    if id(settings) not in _contexts:
        _contexts[id(settings)] = _make_context(settings)
    return _contexts[id(settings)]


def _make_context(settings: Any) -> CaptureContext:
    from backend.ls_auth import LabelStudioAuth
    from backend.media import ImageFetcher
    from backend.prelabel import make_client

    client = auth = None
    if settings.label_studio_url and settings.label_studio_api_key:
        client = make_client(settings)
        auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key.get_secret_value())
    else:
        log.warning("LABEL_STUDIO_URL/LABEL_STUDIO_API_KEY unset: corrections are recorded without their predictions")
    fetcher = ImageFetcher(settings.label_studio_url, auth, local_files_root=settings.local_files_document_root,
                           allowed_hosts=settings.media_allowed_hosts, max_bytes=settings.max_image_bytes,
                           max_pixels=settings.max_image_pixels, timeout=settings.media_timeout)
    return CaptureContext(CorrectionsStore(settings.corrections_dir), client, fetcher,
                          prompt_field=settings.prompt_field, max_pixels=settings.max_image_pixels)


def handle_event(event: dict[str, Any], ctx: CaptureContext | None = None) -> dict[str, Any]:
    """Webhook job for ANNOTATION_CREATED / ANNOTATION_UPDATED / ANNOTATIONS_CREATED / ANNOTATIONS_DELETED."""
    action = event.get("action")
    ctx = ctx or context_from_settings()
    if action == "ANNOTATIONS_DELETED":
        ids = [int(a["id"] if isinstance(a, dict) else a) for a in event.get("annotations") or []]
        return {"action": action, "removed": ctx.store.remove(ids), "annotations": ids}
    project = event.get("project") if isinstance(event.get("project"), dict) else {}
    label_config = project.get("label_config") or event.get("label_config")
    if not label_config and ctx.client is not None and project.get("id"):
        label_config = ctx.client.get_project(int(project["id"])).get("label_config")
    annotations = event.get("annotation")
    tasks = event.get("task")
    if isinstance(annotations, dict):
        task = tasks if isinstance(tasks, dict) else {"id": annotations.get("task")}
        annotations, tasks = [{"task": task.get("id"), **annotations}], [task]
    by_id = {t.get("id"): t for t in tasks or [] if isinstance(t, dict)}
    outcomes = []
    for annotation in annotations or []:
        task = by_id.get(annotation.get("task")) or {"id": annotation.get("task")}
        outcomes.append(capture_annotation(annotation, task, ctx, label_config=label_config,
                                           extra_params=event.get("extra_params") or _stored_extra_params(project)))
    return {"action": action, "annotations": outcomes}


def _stored_extra_params(project: dict[str, Any]) -> dict[str, Any] | None:
    """The extra_params LS sent to /setup for this project (kept in Redis by the server), for prompt lookup."""
    from backend.model import ProjectStore
    from backend.queueing import redis_connection
    from backend.settings import get_settings

    settings = get_settings()
    if settings.redis_url is None or not project.get("id"):
        return None
    with redis_connection(settings) as redis:
        return ProjectStore(redis, settings.redis_key_prefix).get(str(project["id"])).get("extra_params")


def _newer(candidate: str | None, stored: str | None) -> bool:
    """True when timestamp `candidate` is later than `stored` (ISO 8601; unknown stored time: True)."""
    if stored is None:
        return True
    if candidate is None:
        return False
    try:
        return datetime.fromisoformat(candidate.replace("Z", "+00:00")) > \
            datetime.fromisoformat(stored.replace("Z", "+00:00"))
    except ValueError:
        return candidate > stored


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)[:40] or "image"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
