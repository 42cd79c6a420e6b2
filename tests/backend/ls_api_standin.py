"""A Label Studio API stand-in: a real HTTP server on loopback with the few REST routes our client calls.

In-memory projects, tasks, predictions and annotations; legacy-token auth (`Authorization: Token …`); uploaded files
under `/data/upload/…`. Faults for retry tests: `fail(path_prefix, status, times)` answers `status` to the next
`times` matching requests, `fail_after_storing(...)` does the work and then answers `status`, `drop(path_prefix,
times)` closes the connection without an answer. `write_delay` slows writes down (to make overlapping runs overlap).
Every request is recorded (method, path, query, auth header).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.backend.http_servers import serving

TOKEN = "standin-legacy-token"


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None


@dataclass
class LabelStudioStandIn:
    """State and behaviour of the stand-in (thread-safe)."""

    url: str = ""
    token: str = TOKEN
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    predictions: dict[int, dict[str, Any]] = field(default_factory=dict)
    annotations: dict[int, dict[str, Any]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    write_delay: float = 0.0
    _faults: list[list[Any]] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- test helpers -------------------------------------------------------------------------------------------

    def add_project(self, project_id: int, label_config: str) -> None:
        self.projects[project_id] = {"id": project_id, "title": f"p{project_id}", "label_config": label_config,
                                     "model_version": ""}

    def add_task(self, project: int, data: dict[str, Any]) -> int:
        with self._lock:
            task_id = next(self._ids)
            self.tasks[task_id] = {"id": task_id, "project": project, "data": data}
        return task_id

    def add_prediction(self, task: int, result: list[dict[str, Any]], model_version: str,
                       score: float = 0.5) -> int:
        with self._lock:
            return self._store_prediction({"task": task, "result": result, "model_version": model_version,
                                           "score": score})

    def add_annotation(self, task: int, result: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        with self._lock:
            annotation_id = next(self._ids)
            now = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
            self.annotations[annotation_id] = {"id": annotation_id, "task": task, "result": result,
                                               "project": self.tasks[task]["project"], "was_cancelled": False,
                                               "created_at": now, "updated_at": now, "parent_prediction": None,
                                               **extra}
            return self.annotations[annotation_id]

    def predictions_of(self, task: int, model_version: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self.predictions.values()
                    if p["task"] == task and (model_version is None or p["model_version"] == model_version)]

    def fail(self, path_prefix: str, status: int, times: int = 1, method: str | None = None) -> None:
        self._faults.append([path_prefix, status, times, method])

    def fail_after_storing(self, path_prefix: str, status: int, times: int = 1, method: str | None = None) -> None:
        """Do the work, then answer `status` anyway (a write whose success answer got lost)."""
        self._faults.append([path_prefix, ("after", status), times, method])

    def drop(self, path_prefix: str, times: int = 1, method: str | None = None) -> None:
        self._faults.append([path_prefix, "drop", times, method])

    def count(self, method: str, path_prefix: str) -> int:
        return sum(1 for c in self.calls if c.method == method and c.path.startswith(path_prefix))

    # --- routing ------------------------------------------------------------------------------------------------

    def _fault_for(self, method: str, path: str) -> Any:
        with self._lock:
            for fault in self._faults:
                prefix, what, times, only = fault
                if times > 0 and path.startswith(prefix) and only in (None, method):
                    fault[2] -= 1
                    return what
        return None

    def _store_prediction(self, item: dict[str, Any]) -> int:
        prediction_id = next(self._ids)
        task = self.tasks[int(item["task"])]
        self.predictions[prediction_id] = {
            "id": prediction_id, "task": task["id"], "project": task["project"], "result": item.get("result") or [],
            "score": item.get("score"), "model_version": item.get("model_version") or "",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{prediction_id:06d}Z"}
        return prediction_id

    def handle(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        if path.startswith("/data/upload/"):
            data = self.files.get(path[len("/data/upload/"):])
            return (200, data) if data is not None else (404, {"detail": "not found"})
        one = {key: values[0] for key, values in query.items()}
        if match := re.fullmatch(r"/api/projects/(\d+)", path):
            project = self.projects.get(int(match[1]))
            return (200, project) if project else (404, {"detail": "Not found."})
        if match := re.fullmatch(r"/api/projects/(\d+)/import/predictions", path):
            if method != "POST":
                return 405, {"detail": "method not allowed"}
            time.sleep(self.write_delay)
            with self._lock:
                if any(int(item["task"]) not in self.tasks for item in body):
                    return 400, {"detail": "unknown task"}
                for item in body:
                    self._store_prediction(item)
            return 201, {"created": len(body)}
        if path == "/api/tasks":
            with self._lock:
                tasks = sorted((t for t in self.tasks.values() if t["project"] == int(one["project"])),
                               key=lambda t: t["id"])
                if one.get("fields", "all") == "all":
                    tasks = [{**t, "predictions": [p for p in self.predictions.values() if p["task"] == t["id"]]}
                             for t in tasks]
            page, size = int(one.get("page", 1)), int(one.get("page_size", 100))
            chunk = tasks[(page - 1) * size: page * size]
            if page > 1 and not chunk:
                return 404, {"detail": "Invalid page."}
            return 200, {"tasks": chunk, "total": len(tasks)}
        if match := re.fullmatch(r"/api/tasks/(\d+)", path):
            task = self.tasks.get(int(match[1]))
            return (200, task) if task else (404, {"detail": "Not found."})
        if match := re.fullmatch(r"/api/tasks/(\d+)/annotations", path):
            return 200, [a for a in self.annotations.values() if a["task"] == int(match[1])]
        if match := re.fullmatch(r"/api/annotations/(\d+)", path):
            annotation = self.annotations.get(int(match[1]))
            return (200, annotation) if annotation else (404, {"detail": "Not found."})
        if path == "/api/predictions" and method == "GET":
            with self._lock:
                if "task" in one:
                    found = [p for p in self.predictions.values() if p["task"] == int(one["task"])]
                else:
                    found = [p for p in self.predictions.values() if p["project"] == int(one["project"])]
            return 200, found
        if path == "/api/predictions" and method == "POST":
            time.sleep(self.write_delay)
            with self._lock:
                if int(body["task"]) not in self.tasks:
                    return 400, {"detail": "unknown task"}
                return 201, self.predictions[self._store_prediction(body)]
        if match := re.fullmatch(r"/api/predictions/(\d+)", path):
            with self._lock:
                prediction = self.predictions.get(int(match[1]))
                if prediction is None:
                    return 404, {"detail": "Not found."}
                if method == "DELETE":
                    del self.predictions[int(match[1])]
                    return 204, None
                return 200, prediction
        return 404, {"detail": f"no route {method} {path}"}


@contextmanager
def running(state: LabelStudioStandIn | None = None) -> Iterator[LabelStudioStandIn]:
    """Serve the stand-in on 127.0.0.1 (random port) for the duration of the block."""
    ls = state or LabelStudioStandIn()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _handle(self) -> None:
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            auth = self.headers.get("authorization")
            ls.calls.append(Call(self.command, parts.path, query, auth))
            fault = ls._fault_for(self.command, parts.path)
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if isinstance(fault, int):
                status, payload = fault, {"detail": "injected failure"}
            elif auth != f"Token {ls.token}":
                status, payload = 401, {"detail": "Authentication credentials were not provided."}
            else:
                status, payload = ls.handle(self.command, parts.path, query, json.loads(raw) if raw else None)
                if isinstance(fault, tuple):
                    status, payload = fault[1], {"detail": "injected failure after storing"}
            if isinstance(payload, bytes):
                body, content_type = payload, "image/png"
            else:
                body = b"" if payload is None else json.dumps(payload).encode()
                content_type = "application/json"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if body:
                self.wfile.write(body)

        do_GET = do_POST = do_DELETE = do_PATCH = _handle

    with serving(Handler) as url:
        ls.url = url
        yield ls
