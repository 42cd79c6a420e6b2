"""Run state of pre-labelling: progress per job (`JobState`) and per-task claims (`Claims`), in Redis or in memory."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

STATE_TTL = 7 * 24 * 3600


class JobState:
    """Progress of prelabel jobs: Redis hashes/sets when `redis` is given, else process memory (embedded mode).

    Per job: `info` (project, model_version, planned counts, status), the set of finished task ids, failures
    (task id -> code and message) and tasks skipped while running. Recording is idempotent, so a retried chunk never
    counts a task twice; a task that failed and then succeeded counts as done.
    """

    def __init__(self, redis: Any = None, prefix: str = "evf") -> None:
        self.redis = redis
        self.prefix = prefix
        self._memory: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _key(self, job_id: str, part: str = "") -> str:
        return f"{self.prefix}:prelabel:{job_id}" + (f":{part}" if part else "")

    def create(self, job_id: str, **info: Any) -> None:
        """Start a job's record (status, project, …)."""
        self.update(job_id, created_at=time.time(), **info)

    def update(self, job_id: str, **info: Any) -> None:
        """Set fields of a job's info (JSON values)."""
        info = {**info, "updated_at": time.time()}
        if self.redis is None:
            with self._lock:
                self._memory.setdefault(job_id, {"info": {}, "done": set(), "failed": {}, "skipped": {}})
                self._memory[job_id]["info"].update(info)
            return
        with self.redis.pipeline() as pipe:
            pipe.hset(self._key(job_id), mapping={k: json.dumps(v) for k, v in info.items()})
            pipe.expire(self._key(job_id), STATE_TTL)
            pipe.execute()

    def mark(self, job_id: str, task_id: int, outcome: str, code: str = "", message: str = "") -> None:
        """Record a task as "done", "failed" (with a reason) or "skipped" (with a reason)."""
        if self.redis is None:
            with self._lock:
                entry = self._memory[job_id]
                if outcome == "done":
                    entry["done"].add(task_id)
                    entry["failed"].pop(task_id, None)
                elif task_id not in entry["done"]:
                    entry[outcome][task_id] = {"code": code, "message": message}
            return
        reason = json.dumps({"code": code, "message": message})
        with self.redis.pipeline() as pipe:
            if outcome == "done":
                pipe.sadd(self._key(job_id, "done"), task_id)
                pipe.hdel(self._key(job_id, "failed"), task_id)
            else:
                pipe.hset(self._key(job_id, outcome), task_id, reason)
            for part in ("done", "failed", "skipped"):
                pipe.expire(self._key(job_id, part), STATE_TTL)
            pipe.execute()
        if outcome == "failed" and self.redis.sismember(self._key(job_id, "done"), task_id):
            self.redis.hdel(self._key(job_id, "failed"), task_id)

    def get(self, job_id: str, *, max_failures: int = 100) -> dict[str, Any] | None:
        """The job's report: counts, status and failures (None for an unknown job)."""
        if self.redis is None:
            with self._lock:
                entry = self._memory.get(job_id)
                if entry is None:
                    return None
                info, done = dict(entry["info"]), set(entry["done"])
                failed, skipped = dict(entry["failed"]), dict(entry["skipped"])
        else:
            with self.redis.pipeline() as pipe:
                pipe.hgetall(self._key(job_id))
                pipe.smembers(self._key(job_id, "done"))
                pipe.hgetall(self._key(job_id, "failed"))
                pipe.hgetall(self._key(job_id, "skipped"))
                raw, done_raw, failed_raw, skipped_raw = pipe.execute()
            if not raw:
                return None
            info = {k.decode(): json.loads(v) for k, v in raw.items()}
            done = {int(t) for t in done_raw}
            failed = {int(t): json.loads(v) for t, v in failed_raw.items()}
            skipped = {int(t): json.loads(v) for t, v in skipped_raw.items()}
        failed = {t: r for t, r in failed.items() if t not in done}
        skipped = {t: r for t, r in skipped.items() if t not in done and t not in failed}
        to_do = int(info.get("to_do", 0))
        remaining = max(0, to_do - len(done) - len(failed) - len(skipped))
        status = info.get("status", "queued")
        if status == "running" and remaining == 0:
            status = "finished"
        return {"job_id": job_id, "type": "prelabel", **info, "status": status, "done": len(done),
                "failed": len(failed), "skipped": len(skipped), "remaining": remaining,
                "failures": [{"task": t, **r} for t, r in sorted(failed.items())[:max_failures]]}


class Claims:
    """Exclusive claims on (project, model_version, task) so overlapping runs never predict a task twice.

    Redis: `SET NX` with a TTL (a crashed run's claims expire), re-entrant for the same owner (a retried chunk of the
    same job); released only by its owner. Without Redis: a process-local table.
    """

    _RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

    def __init__(self, redis: Any = None, prefix: str = "evf", ttl: int = 600) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()

    def _key(self, project: int, model_version: str, task_id: int) -> str:
        return f"{self.prefix}:prelabel:claim:{project}:{model_version}:{task_id}"

    def claim(self, project: int, model_version: str, task_id: int, owner: str) -> bool:
        """True when `owner` now holds the task's claim."""
        key = self._key(project, model_version, task_id)
        if self.redis is None:
            with self._lock:
                if self._held.setdefault(key, owner) != owner:
                    return False
                return True
        if self.redis.set(key, owner, nx=True, ex=self.ttl):
            return True
        current = self.redis.get(key)
        if current is not None and current.decode() == owner:
            self.redis.expire(key, self.ttl)
            return True
        return False

    def release(self, project: int, model_version: str, task_id: int, owner: str) -> None:
        """Give the claim up (only if `owner` holds it)."""
        key = self._key(project, model_version, task_id)
        if self.redis is None:
            with self._lock:
                if self._held.get(key) == owner:
                    del self._held[key]
            return
        self.redis.eval(self._RELEASE, 1, key, owner)
