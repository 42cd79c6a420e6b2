"""Where jobs run: RQ workers on Redis (`RedisDispatcher`) or a thread of the server (`EmbeddedDispatcher`).

Both run the same job functions (`backend.jobs`) with the same payloads, so the two modes give identical output.
Two priorities: the `interactive` queue is always served before the `batch` queue.
"""

from __future__ import annotations

from backend.queueing.common import (BATCH, INTERACTIVE, Dispatcher, Outcome, failure_reason, is_permanent,
                                     on_job_failure)
from backend.queueing.embedded import EmbeddedDispatcher
from backend.queueing.redis_mode import (RedisDispatcher, make_queues, model_registry_key, publish_model_info,
                                         redis_connection)
from backend.settings import Settings

__all__ = ["BATCH", "INTERACTIVE", "Dispatcher", "EmbeddedDispatcher", "Outcome", "RedisDispatcher",
           "failure_reason", "is_permanent", "make_dispatcher", "make_queues", "model_registry_key",
           "on_job_failure", "publish_model_info", "redis_connection"]


def make_dispatcher(settings: Settings) -> Dispatcher:
    """Redis/RQ when REDIS_URL is set, else embedded (which loads the model now)."""
    return EmbeddedDispatcher(settings) if settings.embedded else RedisDispatcher(settings)
