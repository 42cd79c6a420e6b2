"""A real Label Studio for the e2e tests and the demo: install it (own venv), run it on loopback, talk to its REST API.

Used by `tests/e2e/conftest.py` and `scripts/demo.py`. Label Studio 1.23.2 lives in `.venv-ls` (it would downgrade
redis/rq in `.venv`). A fresh data dir needs ≈45 s of database migrations, so `template_data_dir()` builds one once
and every run starts from a `cp -a` copy (≈5 s to healthy).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"
LS_VENV = REPO / ".venv-ls"
LABEL_CONFIG = REPO / "label_config.xml"
E2E_DIR = REPO / ".e2e"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Credentials:
    """The Label Studio user created at first start, and its legacy API token (tests and demo only)."""

    email: str = "admin@example.com"
    password: str = "admin-pass-123"
    token: str = "e2etoken0123456789abcdef"


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started, or answered an API call with an error."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_installed(venv: Path = LS_VENV) -> Path:
    """Install label-studio into `venv` unless already there (≈100 s, ≈1 GB); returns its `label-studio` script."""
    result = subprocess.run(["bash", str(REPO / "scripts" / "ls_install.sh")], env={**os.environ, "LS_VENV": str(venv)},
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise LabelStudioError(f"installing label-studio=={LS_VERSION} into {venv} failed:\n{result.stderr[-3000:]}")
    return venv / "bin" / "label-studio"


def environment(data_dir: Path, port: int, document_root: Path, credentials: Credentials) -> dict[str, str]:
    """Label Studio's environment: first-start user + legacy token, local files, loopback ML/webhook URLs allowed,
    no Sentry, analytics or version checks (nothing leaves the machine)."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("LABEL_STUDIO_", "DJANGO_", "VIRTUAL_ENV", "PYTHON"))}
    env.update({
        "LABEL_STUDIO_USERNAME": credentials.email,
        "LABEL_STUDIO_PASSWORD": credentials.password,
        "LABEL_STUDIO_USER_TOKEN": credentials.token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LOCAL_FILES_SERVING_ENABLED": "true",
        "LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
        "SENTRY_DSN": "", "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_HOST": f"http://127.0.0.1:{port}",
        "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
    })
    return env


def _child_setup() -> None:
    """In the child before exec: own process group (stopped as a whole) and SIGTERM when our process dies."""
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group of `process` (started with `_child_setup`), SIGKILL it after `timeout` s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
    except ProcessLookupError:
        process.wait(10)


def spawn(args: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path = REPO) -> subprocess.Popen:
    """Start `args` in its own process group, output to `log_path`; it gets SIGTERM if this process dies."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(list(args), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=_child_setup)


class LabelStudioServer:
    """One `label-studio start` process on 127.0.0.1 with its own data dir. Use as a context manager or call
    `start()` / `stop()`."""

    def __init__(self, data_dir: Path, document_root: Path, *, port: int | None = None,
                 credentials: Credentials = Credentials(), venv: Path = LS_VENV) -> None:
        self.data_dir = Path(data_dir)
        self.document_root = Path(document_root)
        self.port = port or free_port()
        self.credentials = credentials
        self.venv = venv
        self.log_path = self.data_dir / "label-studio.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> LabelStudioServer:
        """Start and wait for `/health`; raises LabelStudioError with the log tail if it does not come up."""
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", self.port)) == 0:  # LS would silently move to another port
                raise LabelStudioError(f"port {self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [str(self.venv / "bin" / "label-studio"), "start", "--no-browser", "--data-dir", str(self.data_dir),
                "--internal-host", "127.0.0.1", "--port", str(self.port)]
        env = environment(self.data_dir, self.port, self.document_root, self.credentials)
        self.process = spawn(args, env, self.log_path, cwd=self.data_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LabelStudioError(f"label-studio exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).json().get("status") == "UP":
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)
        self.stop()
        raise LabelStudioError(f"label-studio not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"

    def client(self) -> LabelStudioClient:
        """An API client authenticated with the legacy token."""
        return LabelStudioClient(self.url, self.credentials.token)

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def template_data_dir(credentials: Credentials = Credentials(), venv: Path = LS_VENV,
                      root: Path = E2E_DIR) -> Path:
    """A migrated data dir with the user and token of `credentials`, built once (≈45 s) and then reused."""
    template = root / f"ls-template-{LS_VERSION}-{credentials.token[:8]}"
    if (template / ".complete").exists():
        return template
    building = root / f"{template.name}.building-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    with LabelStudioServer(building, building, credentials=credentials, venv=venv):
        pass
    (building / "label-studio.log").unlink(missing_ok=True)
    (building / ".complete").touch()
    shutil.rmtree(template, ignore_errors=True)
    building.rename(template)
    return template


def copy_data_dir(template: Path, target: Path) -> Path:
    """`cp -a` the template into `target` (which must not exist yet)."""
    subprocess.run(["cp", "-a", str(template), str(target)], check=True)
    (target / ".complete").unlink(missing_ok=True)
    return target


class LabelStudioClient:
    """The Label Studio REST calls the tests and the demo use. Every non-2xx answer raises LabelStudioError with
    the status and the body."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Token {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 300:
            raise LabelStudioError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    # --- projects and data ------------------------------------------------------------------------------------------
    def validate_config(self, label_config: str) -> None:
        """LS's own check of a label config (`POST /api/projects/validate/`); raises with LS's message if invalid."""
        self.call("POST", "/api/projects/validate/", json={"label_config": label_config})

    def create_project(self, title: str, label_config: str, **fields: Any) -> dict:
        return self.call("POST", "/api/projects", json={"title": title, "label_config": label_config, **fields})

    def project(self, project: int) -> dict:
        return self.call("GET", f"/api/projects/{project}/")

    def projects(self) -> list[dict]:
        answer = self.call("GET", "/api/projects", params={"page_size": 1000})
        return answer["results"] if isinstance(answer, dict) else answer

    def add_local_storage(self, project: int, path: Path, title: str = "local images") -> dict:
        """Local-files storage: without one covering the file, `/data/local-files/?d=…` answers 404."""
        return self.call("POST", "/api/storages/localfiles", json={
            "project": project, "path": str(path), "title": title, "use_blob_urls": True})

    def import_tasks(self, project: int, tasks: list[dict]) -> list[int]:
        """Import task dicts (`{"data": {...}}`); returns the new task ids in order."""
        answer = self.call("POST", f"/api/projects/{project}/import", params={"return_task_ids": "true"}, json=tasks)
        return answer["task_ids"]

    def upload_images(self, project: int, paths: Iterable[Path]) -> list[int]:
        """Upload image files (tasks with `/data/upload/<project>/<file>`); returns the new task ids."""
        # one form field per file: LS keeps only the last file of a repeated field name
        files = [(f"file{index}", (Path(path).name, Path(path).read_bytes(), "image/png"))
                 for index, path in enumerate(paths)]
        answer = self.call("POST", f"/api/projects/{project}/import", params={"return_task_ids": "true"},
                           files=files)
        return answer["task_ids"]

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project (up to 1000) with its predictions and annotations."""
        answer = self.call("GET", "/api/tasks", params={"project": project, "page_size": 1000, "fields": "all"})
        return answer["tasks"] if isinstance(answer, dict) else answer

    def task(self, task: int) -> dict:
        return self.call("GET", f"/api/tasks/{task}")

    # --- ML backend and predictions --------------------------------------------------------------------------------
    def connect_backend(self, project: int, url: str, *, title: str = "evf-sam", interactive: bool = True,
                        basic_auth: tuple[str, str] | None = None, extra_params: dict | None = None) -> dict:
        """`POST /api/ml`: LS checks /health and /setup at once and registers `<url>/webhook` for the project."""
        body: dict[str, Any] = {"project": project, "url": url, "title": title, "is_interactive": interactive}
        if basic_auth:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=basic_auth[0], basic_auth_pass=basic_auth[1])
        if extra_params is not None:
            body["extra_params"] = extra_params
        return self.call("POST", "/api/ml", json=body)

    def backends(self, project: int) -> list[dict]:
        return self.call("GET", "/api/ml", params={"project": project})

    def retrieve_predictions(self, project: int, task_ids: Sequence[int] | None = None) -> dict:
        """The Data Manager action "Retrieve Predictions": one /predict call for the selected tasks lacking a
        prediction of the backend's current model_version (all tasks when `task_ids` is None)."""
        selected = {"all": True, "excluded": []} if task_ids is None else {"all": False, "included": list(task_ids)}
        return self.call("POST", "/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": project},
                         json={"selectedItems": selected})

    def create_prediction(self, task: int, result: list[dict], *, score: float, model_version: str) -> dict:
        return self.call("POST", "/api/predictions", json={"task": task, "result": result, "score": score,
                                                           "model_version": model_version})

    def predictions(self, task: int) -> list[dict]:
        return self.call("GET", "/api/predictions", params={"task": task})

    def interactive(self, backend: int, task: int, context: dict) -> dict:
        """`POST /api/ml/{id}/interactive-annotating` (what the editor sends when a TextArea is submitted)."""
        return self.call("POST", f"/api/ml/{backend}/interactive-annotating", json={"task": task, "context": context})


def login_cookies(url: str, credentials: Credentials) -> httpx.Client:
    """A client logged in through the web form (Django session + CSRF cookie), as a browser would be."""
    client = httpx.Client(base_url=url, timeout=30, follow_redirects=False)
    client.get("/user/login/")
    csrf = client.cookies.get("csrftoken")
    form = {"email": credentials.email, "password": credentials.password, "csrfmiddlewaretoken": csrf}
    response = client.post("/user/login/", data=form, headers={"Referer": f"{url}/user/login/"})
    if "sessionid" not in client.cookies:
        raise LabelStudioError(f"login as {credentials.email} failed ({response.status_code})")
    return client


def personal_access_token(url: str, credentials: Credentials, store: Path) -> str:
    """The user's Personal Access Token (a JWT refresh token). LS issues it only once per user (a second
    `POST /api/token/` answers 409), so it is kept in `store` and read from there afterwards."""
    if store.exists():
        return store.read_text().strip()
    client = login_cookies(url, credentials)
    try:
        response = client.post("/api/token/", headers={"X-CSRFToken": client.cookies.get("csrftoken") or "",
                                                       "Referer": f"{url}/"})
    finally:
        client.close()
    if response.status_code != 201:
        raise LabelStudioError(f"POST /api/token/ -> {response.status_code}: {response.text[:500]}")
    token = response.json()["token"]
    store.write_text(token)
    return token


_BACKEND_PREFIXES = ("LABEL_STUDIO_", "REDIS_", "BASIC_AUTH_", "WEBHOOK_", "EVF_SAM_", "QUEUE_", "LOCAL_FILES_")


def backend_environment(**settings: str) -> dict[str, str]:
    """This process's environment without any backend setting it may carry, plus `settings` (env var names)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(_BACKEND_PREFIXES)}
    env.update({"PYTHONUNBUFFERED": "1", **settings})
    return env


class BackendServer:
    """`python -m backend serve` on 127.0.0.1 (configured by `env`, see backend/settings.py), in its own process
    group."""

    def __init__(self, env: dict[str, str], log_path: Path, *, port: int | None = None,
                 python: str = sys.executable) -> None:
        self.env = env
        self.log_path = log_path
        self.port = port or free_port()
        self.python = python
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        user = self.env.get("BASIC_AUTH_USER")
        return (user, self.env["BASIC_AUTH_PASS"]) if user else None

    def start(self, timeout: float = 300.0) -> BackendServer:
        """Start and wait until `/health` answers 200 (embedded mode loads the model first)."""
        args = [self.python, "-m", "backend", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = spawn(args, self.env, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"backend exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", auth=self.auth, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"backend not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else "(no log)"


@dataclass(frozen=True)
class Sample:
    """One synthetic image with, per label, the prompts naming its objects and their ground-truth mask."""

    image: Path
    prompts: dict[str, list[str]]  # label (as in label_config.xml) -> prompts; a task's `data.prompt`
    masks: dict[str, Any]  # label -> bool np.ndarray (H, W), union of the objects its prompts name


def make_samples(out_dir: Path, count: int, *, expressions: int = 1, seed: int = 0, min_side: int = 160,
                 max_side: int = 320) -> list[Sample]:
    """Up to `count` synthetic PNG scenes (evf_sam.data.synthetic) in `out_dir/images` (a scene offering no
    expression is left out); labels are the named shapes."""
    import numpy as np
    from PIL import Image

    from evf_sam.data.synthetic import generate_dataset

    records = generate_dataset(out_dir, count, seed, "demo", expressions=expressions, semantic_ratio=0.0,
                               min_side=min_side, max_side=max_side, image_format="png", progress=False)
    grouped: dict[str, Sample] = {}
    for record in records:
        sample = grouped.setdefault(record.image, Sample(out_dir / record.image, {}, {}))
        label = record.label.capitalize()
        mask = np.asarray(Image.open(out_dir / record.mask)) > 127
        sample.prompts.setdefault(label, []).append(record.prompt)
        sample.masks[label] = sample.masks[label] | mask if label in sample.masks else mask
    return list(grouped.values())
