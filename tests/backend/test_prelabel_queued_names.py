"""The function paths a prelabel run stores in Redis (job function, failure callback) are the package-level names,
and they resolve: jobs queued before `backend/prelabel.py` became a package still run."""

from __future__ import annotations

from rq.job import Job
from rq.serializers import JSONSerializer

import backend.prelabel
from backend.prelabel import Plan, enqueue
from backend.settings import Settings


def test_queued_chunks_name_package_level_functions_that_resolve(redis_db) -> None:
    settings = Settings(**redis_db.env())
    the_plan = Plan(project=5, model_version="v1", payloads=[{"task_id": 1}, {"task_id": 2}, {"task_id": 3}],
                    listed=3, already_predicted=0, invalid={})
    job_ids = enqueue(settings, redis_db.client(), "prelabel-names", the_plan, chunk_size=2)
    assert len(job_ids) == 2
    for job_id in job_ids:
        job = Job.fetch(job_id, connection=redis_db.client(), serializer=JSONSerializer)
        assert job.func_name == "backend.prelabel.run_chunk"
        assert job._failure_callback_name == "backend.prelabel.on_chunk_failure"
        assert job.func is backend.prelabel.run_chunk
        assert job.failure_callback is backend.prelabel.on_chunk_failure
        job.delete()


def test_the_plan_job_name_resolves_to_the_plan_function() -> None:
    from rq.utils import import_attribute

    assert import_attribute(backend.prelabel.PLAN_JOB) is backend.prelabel.run_plan
