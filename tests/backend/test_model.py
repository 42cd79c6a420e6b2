"""The model class's pure parts: model_version format, project ids, mask options, the project store."""

from __future__ import annotations

import pytest

from backend.errors import BackendError
from backend.model import EvfSamBackend, MaskOptions, ProjectStore, format_model_version, project_key
from backend.settings import Settings
from tests.backend.ls_payloads import LABEL_CONFIG


def test_model_version_format():
    assert format_model_version("evf-demo", "0123456789abcdef", "fedcba987654") == "evf-demo-01234567-pfedcba"


@pytest.mark.parametrize("raw, key", [("7.1795508784", "7"), (7, "7"), ("12", "12"), (None, "default")])
def test_project_key_takes_the_id_part(raw, key):
    assert project_key(raw) == key


def test_mask_options_follow_extra_params_and_name_bad_values():
    settings = Settings(MASK_MIN_AREA=4)
    assert MaskOptions.resolve(settings, None).min_area == 4
    options = MaskOptions.resolve(settings, {"mask_mode": "instances", "min_area": 9, "other": "ignored"})
    assert (options.mask_mode, options.min_area) == ("instances", 9)
    with pytest.raises(BackendError) as error:
        MaskOptions.resolve(settings, {"min_area": -1})
    assert error.value.field == "extra_params.min_area"
    with pytest.raises(BackendError) as error:
        MaskOptions.resolve(settings, {"mask_mode": "polygons"})
    assert error.value.field == "extra_params.mask_mode"


class FixedModel:
    """Dispatcher stand-in that only answers model_info (model_version needs nothing else)."""

    redis = None

    def model_info(self) -> dict[str, str]:
        return {"model_name": "tiny", "fingerprint": "0123456789abcdef"}


def version(label_config: str = LABEL_CONFIG, extra_params=None, **settings) -> str:
    backend = EvfSamBackend("1.1", label_config, dispatcher=FixedModel(), store=ProjectStore(),
                            settings=Settings(**settings))
    return backend.setup(extra_params=extra_params)


def test_model_version_changes_with_prompts_and_mask_options_only():
    base = version()
    assert base.startswith("tiny-01234567-p") and base == version()
    assert base != version(extra_params={"prompts": {"Cat": "a cat"}})
    assert base != version(extra_params={"min_area": 3})
    assert base != version(MASK_MODE="instances")
    assert base != version(LABEL_CONFIG.replace("Cat", "Dog"))


@pytest.mark.parametrize("use_redis", [False, True])
def test_project_store_round_trip(use_redis, redis_db):
    store = ProjectStore(redis_db.client() if use_redis else None, prefix=f"evf-{redis_db.run_id}-store")
    assert store.get("7") == {}
    store.update("7", extra_params={"min_area": 3}, hostname="http://ls")
    store.update("7", hostname="http://ls2")
    state = store.get("7")
    assert state["extra_params"] == {"min_area": 3} and state["hostname"] == "http://ls2"
    store.add_version("b-1")
    store.add_version("a-1")
    store.add_version("b-1")
    assert store.versions() == ["a-1", "b-1"]


def test_setup_rejects_prompts_for_unknown_labels():
    with pytest.raises(BackendError) as error:
        version(extra_params={"prompts": {"Dog": "a dog"}})
    assert error.value.status == 422 and error.value.field == "extra_params.prompts.Dog"
