"""A small client for the Label Studio REST API: the calls bulk pre-labelling and corrections capture need.

Tasks (paginated, optionally filtered), predictions (list, fetch, write one or many, delete) and annotations.
Credentials come from `backend.ls_auth.LabelStudioAuth` and go only to the LS origin: every request URL is built from
`ls_url`, and redirects are never followed. Transient failures (connection errors, 429, 5xx) are retried with
exponential backoff; after the last try `LabelStudioAPIError` says what failed and how often it was tried.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from backend.errors import BackendError
from backend.ls_auth import LabelStudioAuth, origin

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class LabelStudioAPIError(BackendError):
    """Label Studio refused a call or stayed unreachable. `http_status` is LS's answer (None: no answer)."""

    status = 503
    code = "ls_unavailable"

    def __init__(self, message: str, *, http_status: int | None = None, status: int | None = None,
                 code: str | None = None, field: str | None = None) -> None:
        super().__init__(message, status=status, code=code, field=field)
        self.http_status = http_status


class LabelStudioClient:
    """Label Studio REST calls with retries. Thread-safe (one pooled httpx client); close it, or use it in `with`."""

    def __init__(self, ls_url: str, auth: LabelStudioAuth | None, *, timeout: float = 30.0, retries: int = 4,
                 backoff: float = 0.5, max_backoff: float = 10.0) -> None:
        if origin(ls_url) is None:
            raise ValueError("the Label Studio URL must be an absolute http(s) URL")
        self.ls_url = ls_url.rstrip("/")
        self.auth = auth
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        # trust_env=False: no proxy or .netrc credentials from the environment; no redirects: credentials stay on LS.
        self._http = httpx.Client(timeout=timeout, trust_env=False, follow_redirects=False)

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    # --- projects and tasks -------------------------------------------------------------------------------------

    def get_project(self, project: int) -> dict[str, Any]:
        """`GET /api/projects/{id}` (label_config, model_version, …)."""
        return self.request("GET", f"/api/projects/{int(project)}")

    def iter_tasks(self, project: int, *, query: dict[str, Any] | None = None, page_size: int = 100,
                   fields: str = "all") -> Iterator[dict[str, Any]]:
        """Every task of `project`, page by page (`GET /api/tasks?project=…&page=…`).

        `query`: a Data Manager query, e.g. `{"filters": {"conjunction": "and", "items": [...]}}` (sent as JSON).
        `fields="all"` includes each task's predictions and annotations; `"task_only"` omits them.
        """
        page = 1
        seen = 0
        while True:
            params: dict[str, Any] = {"project": int(project), "page": page, "page_size": page_size, "fields": fields}
            if query:
                params["query"] = json.dumps(query)
            try:
                body = self.request("GET", "/api/tasks", params=params)
            except LabelStudioAPIError as error:
                if error.http_status == 404 and page > 1:  # DRF answers 404 for a page past the end
                    return
                raise
            tasks = body.get("tasks", []) if isinstance(body, dict) else body
            total = body.get("total") if isinstance(body, dict) else None
            yield from tasks
            seen += len(tasks)
            if len(tasks) < page_size or (total is not None and seen >= total):
                return
            page += 1

    def get_task(self, task: int) -> dict[str, Any]:
        """`GET /api/tasks/{id}`."""
        return self.request("GET", f"/api/tasks/{int(task)}")

    # --- predictions --------------------------------------------------------------------------------------------

    def list_predictions(self, *, task: int | None = None, project: int | None = None) -> list[dict[str, Any]]:
        """Predictions of one task or of a whole project (`GET /api/predictions?task=…|project=…`)."""
        if (task is None) == (project is None):
            raise ValueError("give exactly one of task= or project=")
        params = {"task": int(task)} if task is not None else {"project": int(project)}  # type: ignore[arg-type]
        body = self.request("GET", "/api/predictions", params=params)
        return body.get("results", []) if isinstance(body, dict) else body

    def get_prediction(self, prediction: int) -> dict[str, Any]:
        """`GET /api/predictions/{id}`."""
        return self.request("GET", f"/api/predictions/{int(prediction)}")

    def create_prediction(self, task: int, result: list[dict[str, Any]], *, score: float | None = None,
                          model_version: str | None = None, retry: bool = True) -> dict[str, Any]:
        """`POST /api/predictions` for one task; returns the stored prediction (with its id).

        `retry=False` makes a single attempt: a write whose answer got lost could otherwise be stored twice, so
        callers that can re-check what LS holds do their own retrying.
        """
        body = {"task": int(task), "result": result, "score": score, "model_version": model_version}
        return self.request("POST", "/api/predictions", json=body, retries=None if retry else 0)

    def import_predictions(self, project: int, predictions: Sequence[dict[str, Any]], *,
                           retry: bool = True) -> dict[str, Any]:
        """`POST /api/projects/{id}/import/predictions` with `[{task, result, score, model_version}, …]` (one call).
        `retry` as in `create_prediction`."""
        return self.request("POST", f"/api/projects/{int(project)}/import/predictions", json=list(predictions),
                            retries=None if retry else 0)

    def delete_prediction(self, prediction: int) -> None:
        """`DELETE /api/predictions/{id}` (a prediction that is already gone counts as deleted)."""
        try:
            self.request("DELETE", f"/api/predictions/{int(prediction)}")
        except LabelStudioAPIError as error:
            if error.http_status != 404:
                raise

    # --- annotations --------------------------------------------------------------------------------------------

    def get_annotation(self, annotation: int) -> dict[str, Any]:
        """`GET /api/annotations/{id}`."""
        return self.request("GET", f"/api/annotations/{int(annotation)}")

    def list_annotations(self, task: int) -> list[dict[str, Any]]:
        """`GET /api/tasks/{id}/annotations`."""
        return self.request("GET", f"/api/tasks/{int(task)}/annotations")

    # --- transport ----------------------------------------------------------------------------------------------

    def request(self, method: str, path: str, *, params: dict[str, Any] | None = None, json: Any = None,
                retries: int | None = None) -> Any:
        """One API call on the LS origin with retries; returns the decoded JSON (None for an empty body)."""
        if not path.startswith("/"):
            raise ValueError("path must start with /")
        url = self.ls_url + path
        attempts = 1 + (self.retries if retries is None else retries)
        refreshed = False
        last, last_status = "", None
        attempt = 0
        while attempt < attempts:
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            attempt += 1
            headers = {"Accept": "application/json"}
            if self.auth is not None:
                headers.update(self.auth.headers_for(url))
            try:
                response = self._http.request(method, url, params=params, json=json, headers=headers)
            except httpx.TransportError as error:
                last, last_status = f"{type(error).__name__}: {error}", None
                log.warning("LS %s %s: %s (attempt %d/%d)", method, path, last, attempt, attempts)
                continue
            if response.status_code == 401 and self.auth is not None and self.auth.is_pat and not refreshed:
                self.auth.invalidate()  # the access token may have expired early: fetch a new one, once
                refreshed = True
                attempt -= 1
                continue
            if response.status_code in RETRY_STATUSES:
                last, last_status = f"HTTP {response.status_code}: {_snippet(response)}", response.status_code
                log.warning("LS %s %s: %s (attempt %d/%d)", method, path, last, attempt, attempts)
                continue
            if response.is_success:
                return response.json() if response.content else None
            raise _refused(method, path, response)
        raise LabelStudioAPIError(f"Label Studio {method} {path} failed after {attempts} attempt(s): {last}",
                                  http_status=last_status)


def _snippet(response: httpx.Response, limit: int = 300) -> str:
    text = response.text.strip().replace("\n", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def _refused(method: str, path: str, response: httpx.Response) -> LabelStudioAPIError:
    status = response.status_code
    what = f"Label Studio refused {method} {path} with HTTP {status}"
    if status in (401, 403):
        return LabelStudioAPIError(f"{what}: check LABEL_STUDIO_API_KEY (legacy token or Personal Access Token) and "
                                   "that its user may access this project", http_status=status, status=502,
                                   code="ls_auth_failed", field="LABEL_STUDIO_API_KEY")
    if 300 <= status < 400:
        return LabelStudioAPIError(f"{what} (a redirect to {response.headers.get('location')!r}; check "
                                   "LABEL_STUDIO_URL)", http_status=status, status=502, code="ls_redirect")
    if status == 404:
        return LabelStudioAPIError(f"{what}: not found", http_status=status, status=404, code="ls_not_found")
    return LabelStudioAPIError(f"{what}: {_snippet(response)}", http_status=status, status=422, code="ls_rejected")
