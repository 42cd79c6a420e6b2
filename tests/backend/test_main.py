"""`python -m backend`: help, configuration errors and sub-command help answer clearly."""

from __future__ import annotations

import subprocess
import sys

from tests.backend.conftest import REPO


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backend", *args], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=60)


def test_help_lists_commands_and_environment():
    result = run("--help")
    assert result.returncode == 0
    for text in ("serve", "worker", "REDIS_URL", "PREDICT_TIMEOUT", "BASIC_AUTH_USER"):
        assert text in result.stdout


def test_worker_without_redis_explains_itself(base_env):
    result = run("worker", env=base_env)
    assert result.returncode == 2 and "REDIS_URL" in result.stderr


def test_invalid_configuration_is_reported_without_a_traceback(base_env):
    result = run("serve", env={**base_env, "PREDICT_TIMEOUT": "500"})
    assert result.returncode == 2
    assert "PREDICT_TIMEOUT" in result.stderr and "Traceback" not in result.stderr


def test_prelabel_and_corrections_commands_explain_themselves():
    result = run("corrections", "--help")
    assert result.returncode == 0 and "report" in result.stdout and "train" in result.stdout
    result = run("prelabel", "--help")
    assert result.returncode == 0 and "--project" in result.stdout


def test_a_missing_checkpoint_is_one_clear_line(base_env, tmp_path):
    for command in (["serve", "--port", "1"], ["worker"]):
        env = {**base_env, "EVF_SAM_CHECKPOINT": str(tmp_path / "no-such-model")}
        if command[0] == "worker":
            env["REDIS_URL"] = "redis://127.0.0.1:6379/15"
        result = run(*command, env=env)
        assert result.returncode == 1, result.stderr
        assert "cannot load the model" in result.stderr and "Traceback" not in result.stderr
