"""Error types: class defaults, overrides, JSON body, pickling (jobs move errors between processes)."""

from __future__ import annotations

import pickle

import pytest

from backend.errors import AuthError, BackendError, BadRequest, ConfigError, MediaError, PromptError, Unavailable


@pytest.mark.parametrize("kind,status,code", [
    (BadRequest, 422, "bad_request"), (ConfigError, 422, "bad_label_config"), (PromptError, 422, "bad_prompt"),
    (MediaError, 422, "bad_image"), (AuthError, 401, "unauthorized"), (Unavailable, 503, "unavailable"),
])
def test_defaults(kind: type[BackendError], status: int, code: str) -> None:
    error = kind("something is wrong", field="x")
    assert isinstance(error, BackendError)
    assert (error.status, error.code, error.field, error.message, str(error)) == \
        (status, code, "x", "something is wrong", "something is wrong")


def test_overrides_body_and_pickle() -> None:
    error = MediaError("host not allowed", status=403, code="media_forbidden", field="data.image")
    assert error.to_dict() == {"error": "media_forbidden", "message": "host not allowed", "field": "data.image"}
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is MediaError
    assert (copy.status, copy.code, copy.field, copy.message) == \
        (403, "media_forbidden", "data.image", "host not allowed")
    assert BadRequest("bad json", status=400).status == 400
