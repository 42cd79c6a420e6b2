"""A real Label Studio 1.23.2 for the e2e tests: installed on demand into `.venv-ls`, one server per test session
(started from a cached, migrated template data dir), stopped with its whole process group at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.ls_harness import (
    LABEL_CONFIG,
    LabelStudioClient,
    LabelStudioServer,
    copy_data_dir,
    ensure_installed,
    personal_access_token,
    template_data_dir,
)


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
