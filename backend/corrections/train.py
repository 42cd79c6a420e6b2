"""Fine-tune on the collected corrections and promote the result only if it is better.

`python -m backend corrections train` or the `START_TRAINING` webhook:

1. snapshot the corrections dataset (hard links, so captures running meanwhile change nothing) with a deterministic
   held-out slice: an image goes to `val` when the hash of its content hash falls below `holdout` (all regions of an
   image stay on one side). `deleted` records (empty masks of removed regions) are left out of training;
2. evaluate the active checkpoint on the held-out slice (cIoU / gIoU through the predictor, `evf_sam.evaluate`);
3. fine-tune it with `evf_sam.train.train` into `CHECKPOINTS_DIR/<name>` with the `TrainingRecipe` of the settings
   (CORRECTIONS_TRAIN_*: steps or epochs, learning rate, batch size, warm-up share, trainable parts), each value
   overridable per run (CLI flags, the START_TRAINING event's `extra_params`);
4. evaluate the new checkpoint the same way; promote it only when gIoU improves (ties keep the old one);
5. record the decision and both numbers in `CHECKPOINTS_DIR/training.json` (`/health` shows it) and, when promoted,
   publish the new checkpoint path in Redis (`<prefix>:active_checkpoint`, read by `promoted_checkpoint`). Workers
   and the embedded server switch to it before their next job (`backend.jobs.get_runtime` serves the active
   checkpoint; CHECKPOINTS_DIR must be shared with the workers). The new weights have a new fingerprint, hence a
   new `model_version`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from backend.corrections.capture import CorrectionsStore
from backend.errors import BackendError, BadRequest
from backend.settings import (Holdout, MinRecords, Settings, TrainBatchSize, TrainEpochs, TrainLr, TrainParts,
                              TrainSteps, TrainWarmup, get_settings)
from evf_sam.data import layout

log = logging.getLogger(__name__)

DECISIONS_FILE = "training.json"
TRAIN_JOB = "backend.corrections.train.run_training_job"
TRAINING_TIMEOUT = 6 * 3600


class TrainingRecipe(BaseModel):
    """How a run fine-tunes: `epochs` > 0 wins over `steps`; `warmup` is a share of the steps; empty `parts` means
    the family's default trainable parts. Built by `recipe` from the settings and per-run overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: TrainSteps
    epochs: TrainEpochs
    lr: TrainLr
    batch_size: TrainBatchSize
    warmup: TrainWarmup
    parts: TrainParts
    holdout: Holdout
    min_records: MinRecords

    def total_steps(self, train_records: int) -> int:
        """Optimizer steps for `train_records` training records (epochs x batches per epoch, else `steps`)."""
        return self.epochs * -(-train_records // self.batch_size) if self.epochs else self.steps

    def warmup_steps(self, total: int) -> int:
        """The warm-up share of `total` steps, in steps."""
        return round(self.warmup * total)


def recipe(settings: Settings, **overrides: Any) -> TrainingRecipe:
    """The settings' recipe (CORRECTIONS_TRAIN_*, CORRECTIONS_HOLDOUT, CORRECTIONS_MIN_RECORDS) with the non-None
    `overrides` applied; a bad value is a BadRequest naming it. An override of `steps` alone clears the epochs."""
    values: dict[str, Any] = {
        "steps": settings.corrections_train_steps, "epochs": settings.corrections_train_epochs,
        "lr": settings.corrections_train_lr, "batch_size": settings.corrections_train_batch_size,
        "warmup": settings.corrections_train_warmup, "parts": settings.corrections_train_parts,
        "holdout": settings.corrections_holdout, "min_records": settings.corrections_min_records}
    given = {key: value for key, value in overrides.items() if value is not None}
    if "steps" in given and "epochs" not in given:
        values["epochs"] = 0
    try:
        return TrainingRecipe(**{**values, **given})
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"][:1]) or "recipe"
        raise BadRequest(f"training {field}: {problem['msg']} (got {problem.get('input')!r})", field=field) from None


class TrainingBusy(BackendError):
    """Another training run holds the lock."""

    status = 409
    code = "training_running"


def checkpoints_dir(settings: Settings) -> Path:
    """Where fine-tuned checkpoints and the decision log live (CHECKPOINTS_DIR)."""
    return Path(settings.checkpoints_dir)


def active_key(settings: Settings) -> str:
    """Redis key holding the path of the promoted checkpoint (workers compare it with theirs between jobs)."""
    return f"{settings.redis_key_prefix}:active_checkpoint"


def decisions(settings: Settings) -> dict[str, Any]:
    """The decision log: `{"active": path | None, "runs": [...]}` (what /health can show)."""
    path = checkpoints_dir(settings) / DECISIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"active": None, "runs": []}


def training_status(settings: Settings) -> dict[str, Any] | None:
    """For /health: the promoted checkpoint and the last run's decision and numbers (None before any run)."""
    log_ = decisions(settings)
    if not log_["runs"]:
        return None
    last = log_["runs"][-1]
    return {"active_checkpoint": log_["active"], "runs": len(log_["runs"]),
            "last_run": {key: last[key] for key in ("checkpoint", "promoted", "before", "after", "finished_at")}}


def promoted_checkpoint(settings: Settings, redis: Any = None) -> str | None:
    """The checkpoint promoted by the last successful training (Redis key first, then training.json), or None.
    Workers compare it with the checkpoint they serve between jobs and reload when it differs."""
    if redis is not None:
        value = redis.get(active_key(settings))
        if value:
            return value.decode()
    return decisions(settings).get("active")


def active_checkpoint(settings: Settings) -> str:
    """The checkpoint to fine-tune from and serve: the last promoted one, else EVF_SAM_CHECKPOINT."""
    promoted = decisions(settings).get("active")
    return promoted if promoted and Path(promoted).is_dir() else settings.checkpoint


def in_holdout(key: str, holdout: float) -> bool:
    """Deterministic held-out membership from a stable key (an image's content hash)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < holdout


def snapshot(corrections_dir: Path, out: Path, holdout: float) -> dict[str, int]:
    """Copy the usable records into `out` (files hard-linked) with split train/val; returns the counts."""
    records = [r for r in CorrectionsStore(corrections_dir).records() if r.extra.get("kind") != "deleted"]
    rows, counts = [], {"train": 0, "val": 0}
    for record in records:
        split = "val" if in_holdout(record.image_hash or record.image, holdout) else "train"
        for path in (record.image, record.mask):
            _link(corrections_dir / path, out / path)
        rows.append(layout.Record.from_dict({**record.to_dict(), "split": split}))
        counts[split] += 1
    layout.write_records(out, rows)
    return counts


def _link(source: Path, target: Path) -> None:
    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _scores(checkpoint: str, data: Path, device: str) -> dict[str, float]:
    from evf_sam.evaluate import evaluate

    result = evaluate(checkpoint, data, split="val", device=device, progress=False)["splits"]["val"]
    return {"ciou": round(float(result["ciou"]), 6), "giou": round(float(result["giou"]), 6),
            "pairs": int(result["pairs"])}


@contextlib.contextmanager
def _training_lock(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".training.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingBusy("a training run is already in progress") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _device(settings: Settings) -> str:
    if settings.evf_sam_device != "auto":
        return settings.evf_sam_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_from_corrections(settings: Settings | None = None, *, corrections_dir: str | Path | None = None,
                           redis: Any = None, **overrides: Any) -> dict[str, Any]:
    """Evaluate, fine-tune, evaluate, promote if better (module docstring). `overrides`: TrainingRecipe fields
    (None keeps the setting). Returns the recorded decision."""
    settings = settings or get_settings()
    plan = recipe(settings, **overrides)
    source = Path(corrections_dir or settings.corrections_dir)
    root = checkpoints_dir(settings)
    with _training_lock(root):
        name = f"evf-ft-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        work = root / "runs" / name
        counts = snapshot(source, work / "data", plan.holdout)
        if counts["train"] + counts["val"] < plan.min_records or not counts["train"] or not counts["val"]:
            shutil.rmtree(work, ignore_errors=True)
            raise BadRequest(f"not enough corrections to train: {counts['train']} train / {counts['val']} held-out "
                             f"record(s) in {source} (need {plan.min_records} in total and both sides non-empty)",
                             code="not_enough_corrections", field="CORRECTIONS_DIR")
        from evf_sam.train import train

        base = active_checkpoint(settings)
        device = _device(settings)
        started = time.time()
        before = _scores(base, work / "data", device)
        total = plan.total_steps(counts["train"])
        result = train(base, work / "data", root / name, train_split="train", val_split=None, max_steps=total,
                       batch_size=plan.batch_size, lr=plan.lr, warmup_steps=plan.warmup_steps(total),
                       trainable=plan.parts or None, device=device, progress=False)
        after = _scores(str(result.checkpoint), work / "data", device)
        promoted = after["giou"] > before["giou"]
        decision = {"checkpoint": str(result.checkpoint), "base": base, "promoted": promoted,
                    "before": before, "after": after, "steps": result.steps, "records": counts,
                    "recipe": plan.model_dump(),
                    "seconds": round(time.time() - started, 1), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                            time.gmtime())}
        log_ = decisions(settings)
        log_["runs"].append(decision)
        if promoted:
            log_["active"] = str(result.checkpoint.resolve())
        else:
            shutil.rmtree(result.checkpoint, ignore_errors=True)  # keep the numbers, not the weights
        layout.atomic_write_bytes(root / DECISIONS_FILE, json.dumps(log_, indent=2).encode())
        shutil.rmtree(work, ignore_errors=True)
        if promoted and redis is not None:
            redis.set(active_key(settings), log_["active"])
        log.info("training %s: gIoU %.4f -> %.4f, %s", name, before["giou"], after["giou"],
                 "promoted" if promoted else "kept the active checkpoint")
        return decision


def run_training_job(payload: dict[str, Any]) -> dict[str, Any]:
    """RQ job (long timeout) behind START_TRAINING: the settings' recipe with the payload's overrides."""
    from backend.queueing import redis_connection

    settings = get_settings()
    redis = redis_connection(settings) if settings.redis_url else None
    return train_from_corrections(settings, redis=redis, **payload)


# START_TRAINING's extra_params keys that override the recipe for one run (TrainingRecipe field names).
EVENT_OVERRIDES = {"train_steps": "steps", "train_epochs": "epochs", "train_lr": "lr",
                   "train_batch_size": "batch_size", "train_warmup": "warmup", "train_parts": "parts"}


def on_start_training(event: dict[str, Any]) -> dict[str, Any]:
    """Webhook job for START_TRAINING: queue the training run with a long timeout (Redis) or start a thread.
    The recipe is the settings' (CORRECTIONS_TRAIN_*), with the `train_*` keys of the project's extra_params
    (EVENT_OVERRIDES) applied; a bad value is a BadRequest before anything is queued."""
    settings = get_settings()
    extra = event.get("extra_params") if isinstance(event.get("extra_params"), dict) else {}
    payload = {field: extra[key] for key, field in EVENT_OVERRIDES.items() if extra.get(key) is not None}
    recipe(settings, **payload)
    if settings.redis_url is None:
        threading.Thread(target=_train_logged, args=(payload,), name="evf-training", daemon=True).start()
        return {"status": "started"}
    from rq import Callback, Queue

    from backend.queueing import BATCH, make_queues, on_job_failure, redis_connection

    queue = make_queues(settings, redis_connection(settings))[BATCH]
    job = queue.enqueue_many([Queue.prepare_data(TRAIN_JOB, args=(payload,), timeout=TRAINING_TIMEOUT,
                                                 result_ttl=settings.failure_ttl, failure_ttl=settings.failure_ttl,
                                                 on_failure=Callback(on_job_failure),
                                                 description="train from corrections")])[0]
    return {"status": "queued", "job_id": job.id}


def _train_logged(payload: dict[str, Any]) -> None:
    try:
        run_training_job(payload)
    except BackendError as error:
        log.warning("training not run: %s", error.message)
    except Exception:  # noqa: BLE001 - a background thread must report, not vanish
        log.exception("training failed")
