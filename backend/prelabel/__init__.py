"""Bulk pre-labelling: predict a whole Label Studio project and write the predictions back through the LS API.

`python -m backend prelabel --project 3` (`cli`) or `POST /jobs/prelabel` (`run.submit`):

1. plan (`planning`) — read the project's label config, list its tasks (optionally filtered), skip the tasks that
   already carry a prediction of the current `model_version`, and cut the rest into chunks;
2. run (`run`, `chunks`) — each chunk is one job on the `batch` queue (`run_chunk`; embedded mode: the same code
   in-process): claim each task for (project, model_version) in Redis, re-check LS for an existing prediction, predict
   the chunk's tasks with one batched model call, write them with one `import/predictions` call, release the claims;
3. report (`state`) — job state (done / failed with reasons / skipped / remaining) lives in Redis (`JobState`), shown
   by the CLI progress bar and `GET /jobs/{id}`.

Rerunning resumes: finished tasks already carry a current prediction in LS and are skipped. Two overlapping runs do not
duplicate predictions: a task is predicted only by the run holding its claim, and only after re-checking LS. A write
whose answer got lost is re-checked before it is tried again. `auto` pre-labels new tasks from the TASKS_CREATED
webhook. Queued jobs name `backend.prelabel.run_chunk`, `.run_plan` and `.on_chunk_failure`: keep them re-exported.
"""

from backend.prelabel.auto import auto_prelabel_enabled, on_tasks_created
from backend.prelabel.chunks import Predict, on_chunk_failure, process_chunk, run_chunk
from backend.prelabel.cli import add_arguments, parse_task_ids, run_cli
from backend.prelabel.planning import Plan, make_client, plan
from backend.prelabel.request import PrelabelRequest
from backend.prelabel.run import (CHUNK_FAILURE, CHUNK_JOB, PLAN_JOB, enqueue, predict_via, run_inline, run_plan,
                                  start_run, state_for, status, submit)
from backend.prelabel.state import Claims, JobState

__all__ = [
    "CHUNK_FAILURE", "CHUNK_JOB", "PLAN_JOB", "Claims", "JobState", "Plan", "Predict", "PrelabelRequest",
    "add_arguments", "auto_prelabel_enabled", "enqueue", "make_client", "on_chunk_failure", "on_tasks_created",
    "parse_task_ids", "plan", "predict_via", "process_chunk", "run_chunk", "run_cli", "run_inline", "run_plan",
    "start_run", "state_for", "status", "submit",
]
