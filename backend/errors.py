"""The backend's exception types: one per failure kind, each carrying its HTTP status, a machine code and the field.

`backend.app` turns any `BackendError` into `{"error": code, "message": message, "field": field}` with `status`, in
one place; job code raises them so a failed task reports the same code and message.
"""

from __future__ import annotations

from typing import Any


class BackendError(Exception):
    """Base of every error the backend reports to a client. `status`/`code` default to the class's values."""

    status: int = 500
    code: str = "backend_error"

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = self.status if status is None else status
        self.code = self.code if code is None else code
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with status/code/field intact (RQ and the embedded queue move failures between threads/processes).
        return (type(self), (self.message,), {"status": self.status, "code": self.code, "field": self.field})

    def to_dict(self) -> dict[str, Any]:
        """The JSON body for this error."""
        return {"error": self.code, "message": self.message, "field": self.field}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.message!r}, status={self.status}, code={self.code!r}, "
                f"field={self.field!r})")


class BadRequest(BackendError):
    """A request body or value that cannot be used (400 for unparsable input, 422 otherwise)."""

    status = 422
    code = "bad_request"


class ConfigError(BackendError):
    """A Label Studio label config the backend cannot serve."""

    status = 422
    code = "bad_label_config"


class PromptError(BackendError):
    """A missing, empty, too long or non-text prompt, or one naming an unknown label."""

    status = 422
    code = "bad_prompt"


class MediaError(BackendError):
    """An image that cannot be used: 422 bad/oversized/non-image, 403 forbidden host or path, 502 unreachable."""

    status = 422
    code = "bad_image"


class AuthError(BackendError):
    """Missing or wrong credentials (ours, or Label Studio refusing ours)."""

    status = 401
    code = "unauthorized"


class Unavailable(BackendError):
    """A dependency (Redis, workers, the model) is not available right now; retrying later may work."""

    status = 503
    code = "unavailable"
