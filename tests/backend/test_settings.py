"""Settings: env names and aliases, validation, secrets kept out of reprs and summaries."""

import pytest
from pydantic import ValidationError

from backend.settings import REPO_ROOT, Settings, redact_url


@pytest.fixture
def env(monkeypatch):
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_HOST", "LABEL_STUDIO_API_KEY", "LABEL_STUDIO_ACCESS_TOKEN",
                 "REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "EVF_SAM_CHECKPOINT", "PREDICT_TIMEOUT",
                 "MEDIA_ALLOWED_HOSTS", "WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_are_embedded_mode_on_port_9090(env):
    settings = Settings()
    assert settings.embedded
    assert settings.port == 9090
    assert settings.predict_timeout < 100
    assert settings.checkpoint in ("models/evf-demo", str(REPO_ROOT / "models/evf-demo"))


def test_aliases_and_lists(env):
    env.setenv("LABEL_STUDIO_HOST", "http://ls:8080/")
    env.setenv("LABEL_STUDIO_ACCESS_TOKEN", "tok-123")
    env.setenv("MEDIA_ALLOWED_HOSTS", "a.example, b.example")
    settings = Settings()
    assert settings.label_studio_url == "http://ls:8080"
    assert settings.label_studio_api_key.get_secret_value() == "tok-123"
    assert settings.media_allowed_hosts == ["a.example", "b.example"]


def test_secrets_never_appear_in_repr_or_summary(env):
    env.setenv("REDIS_URL", "redis://:hunter2@127.0.0.1:6379/3")
    env.setenv("LABEL_STUDIO_API_KEY", "sekret-key")
    env.setenv("BASIC_AUTH_USER", "u")
    env.setenv("BASIC_AUTH_PASS", "p4ss-word")
    env.setenv("WEBHOOK_SECRET", "hook-secret")
    settings = Settings()
    text = repr(settings) + str(settings.describe())
    for secret in ("hunter2", "sekret-key", "p4ss-word", "hook-secret"):
        assert secret not in text
    assert settings.describe()["redis"] == "redis://***@127.0.0.1:6379/3"
    assert not settings.embedded


@pytest.mark.parametrize("name, value", [("PREDICT_TIMEOUT", "120"), ("LABEL_STUDIO_URL", "localhost:8080"),
                                         ("BASIC_AUTH_USER", "only-user")])
def test_invalid_values_are_rejected_by_name(env, name, value):
    env.setenv(name, value)
    with pytest.raises(ValidationError, match=name if name != "BASIC_AUTH_USER" else "BASIC_AUTH_PASS"):
        Settings()


def test_redact_url_without_password_is_unchanged():
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize("value", ["auto", "on", "off"])
def test_prompt_graphs_switch_takes_auto_on_off(env, value):
    env.setenv("EVF_SAM_PROMPT_GRAPHS", value)
    assert Settings().evf_sam_prompt_graphs == value


def test_prompt_graphs_default_to_off_and_refuse_other_values(env):
    """Off by default until the CUDA path has been measured on a GPU (docs/PERFORMANCE.md)."""
    env.delenv("EVF_SAM_PROMPT_GRAPHS", raising=False)
    assert Settings().evf_sam_prompt_graphs == "off"
    env.setenv("EVF_SAM_PROMPT_GRAPHS", "yes")
    with pytest.raises(ValidationError, match="EVF_SAM_PROMPT_GRAPHS"):
        Settings()
