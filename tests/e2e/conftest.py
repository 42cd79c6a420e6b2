"""A real Label Studio 1.23.2 for the e2e tests: installed on demand into `.venv-ls`, one server per test session
(started from a cached, migrated template data dir), stopped with its whole process group at the end."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from backend import rle
from scripts.ls_harness import (
    LABEL_CONFIG,
    REPO,
    BackendServer,
    LabelStudioClient,
    LabelStudioServer,
    backend_environment,
    copy_data_dir,
    ensure_installed,
    personal_access_token,
    spawn,
    stop_process_group,
    template_data_dir,
)
from tests.backend.conftest import RedisDB, redis_db  # noqa: F401 - the session's Redis DB, shared fixture

DEMO_MODEL = REPO / "models" / "evf-demo"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def regions_by_label(result: list[dict], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Decode brush regions (checking their shape against the image) into one mask per label."""
    width, height = size
    masks: dict[str, np.ndarray] = {}
    for region in result:
        assert (region["type"], region["from_name"], region["to_name"]) == ("brushlabels", "tag", "image")
        assert (region["original_width"], region["original_height"]) == (width, height)
        [label] = region["value"]["brushlabels"]
        mask = rle.decode(region["value"]["rle"], height, width)
        masks[label] = masks.get(label, np.zeros_like(mask)) | mask
    return masks


@pytest.fixture(scope="session")
def label_config() -> str:
    """The shipped `label_config.xml`."""
    return LABEL_CONFIG.read_text()


@pytest.fixture(scope="session")
def document_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LOCAL_FILES_DOCUMENT_ROOT of the session's Label Studio; tasks point at files below it."""
    return tmp_path_factory.mktemp("ls-files")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory, document_root: Path) -> Iterator[LabelStudioServer]:
    """The session's Label Studio on a free loopback port (legacy token + PAT auth, local files, loopback ML URLs)."""
    ensure_installed()
    data_dir = copy_data_dir(template_data_dir(), tmp_path_factory.mktemp("ls") / "data")
    server = LabelStudioServer(data_dir, document_root).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ls(label_studio: LabelStudioServer) -> Iterator[LabelStudioClient]:
    """API client with the legacy token."""
    client = label_studio.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def ls_pat(label_studio: LabelStudioServer) -> str:
    """The user's Personal Access Token (created through the web login, once per session)."""
    return personal_access_token(label_studio.url, label_studio.credentials, label_studio.data_dir / "pat.txt")


# --- the backend Label Studio talks to: `python -m backend serve` + `python -m backend worker` on real Redis -------

BASIC_AUTH = ("labelstudio", "e2e-basic-secret")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped demo model when present, else a tiny random checkpoint (masks then carry no meaning)."""
    if DEMO_MODEL.is_dir():
        return DEMO_MODEL
    from evf_sam.testing import make_tiny_checkpoint

    return Path(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-evf"), family="sam", seed=0))


@pytest.fixture(scope="session")
def corrections_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CORRECTIONS_DIR of the session's backend (a dataset in the evf_sam.data.layout format)."""
    return tmp_path_factory.mktemp("corrections")


@pytest.fixture(scope="session")
def backend_env(label_studio: LabelStudioServer, ls_pat: str, redis_db: RedisDB, checkpoint: Path,
                corrections_dir: Path) -> dict[str, str]:
    """Queue mode on the session's Redis DB; Basic auth on; images fetched from LS with the PAT (no local reads)."""
    return backend_environment(
        **redis_db.env(), LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=ls_pat,
        CORRECTIONS_DIR=str(corrections_dir), CHECKPOINTS_DIR=str(corrections_dir.parent / "checkpoints"),
        EVF_SAM_CHECKPOINT=str(checkpoint), EVF_SAM_DEVICE="cpu", OMP_NUM_THREADS="1",
        BASIC_AUTH_USER=BASIC_AUTH[0], BASIC_AUTH_PASS=BASIC_AUTH[1], PREDICT_TIMEOUT="80",
        WORKER_POLL_SECONDS="1")


@dataclass
class Worker:
    """A `python -m backend worker --name NAME` process and its log. Stop it with `stop_process_group(w.process)`."""

    process: subprocess.Popen
    name: str
    log_path: Path

    @classmethod
    def spawn(cls, env: dict[str, str], name: str, log_path: Path) -> Worker:
        """Start it and return at once (it loads the model before it registers)."""
        return cls(spawn([sys.executable, "-m", "backend", "worker", "--name", name], env, log_path), name, log_path)

    def wait_registered(self, redis_db: RedisDB, timeout: float = 300) -> Worker:
        """Wait until Redis lists it; fails the test with its log if it exits or takes longer than `timeout` s."""
        client = redis_db.client()
        deadline = time.monotonic() + timeout
        while not client.sismember("rq:workers", f"rq:worker:{self.name}"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                stop_process_group(self.process)
                pytest.fail(f"worker {self.name} did not register:\n"
                            f"{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        return self


@pytest.fixture(scope="session")
def backend_worker(backend_env: dict[str, str], redis_db: RedisDB,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """One `python -m backend worker`, registered with Redis before the tests use it."""
    worker = Worker.spawn(backend_env, f"e2e-{redis_db.run_id}", tmp_path_factory.mktemp("worker") / "worker.log")
    yield worker.wait_registered(redis_db).process
    stop_process_group(worker.process)


@pytest.fixture(scope="session")
def backend(backend_env: dict[str, str], backend_worker: subprocess.Popen,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendServer]:
    """`python -m backend serve` in queue mode (the model runs in `backend_worker`)."""
    server = BackendServer(backend_env, tmp_path_factory.mktemp("backend") / "server.log").start()
    yield server
    server.stop()
