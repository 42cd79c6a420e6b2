"""`python -m backend prelabel`: its options, and a run with a progress bar (or a job's state with --status)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any

from backend.errors import BackendError, BadRequest
from backend.prelabel.planning import make_client
from backend.prelabel.request import PrelabelRequest
from backend.prelabel.run import run_inline, start_run, state_for
from backend.settings import Settings


def add_arguments(parser: Any) -> None:
    """Options of `python -m backend prelabel`."""
    parser.add_argument("--project", type=int, help="Label Studio project id (required unless --status)")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help='prompt for every task (repeatable; "Label: text" picks a label); default: the '
                             "task's prompt field, else the labels' prompts")
    parser.add_argument("--filter", metavar="JSON",
                        help='Label Studio Data Manager query, e.g. \'{"filters": {"conjunction": "and", "items": '
                             '[{"filter": "filter:tasks:total_annotations", "operator": "equal", "type": "Number", '
                             '"value": 0}]}}\'')
    parser.add_argument("--tasks", metavar="IDS", help="only these task ids: 1,2,10-20")
    parser.add_argument("--chunk-size", type=int, default=8, help="tasks per queued job (default 8)")
    parser.add_argument("--no-wait", action="store_true", help="Redis mode: queue the work and exit")
    parser.add_argument("--status", metavar="JOB_ID", help="print the state of a job (Redis mode) and exit")


def _batch_workers(settings: Settings, redis: Any) -> int:
    from rq.worker_registration import WORKERS_BY_QUEUE_KEY

    return int(redis.scard(WORKERS_BY_QUEUE_KEY % settings.queue_batch))


def parse_task_ids(text: str) -> list[int]:
    """`"1,2,10-12"` -> [1, 2, 10, 11, 12] (BadRequest for anything else)."""
    ids: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            low, _, high = part.partition("-")
            ids.extend(range(int(low), int(high or low) + 1))
    except ValueError:
        raise BadRequest(f"--tasks: {text!r} is not a list of ids and ranges like 1,2,10-20", field="tasks") from None
    return ids


def run_cli(args: Any, settings: Settings) -> int:
    """`python -m backend prelabel …`; returns the exit status (0: every task done or skipped)."""
    from tqdm import tqdm

    redis = None
    if settings.redis_url is not None:
        from backend.queueing import redis_connection

        redis = redis_connection(settings)
    state = state_for(settings, redis)
    if args.status:
        report = state.get(args.status)
        print(json.dumps(report, indent=2) if report else f"no prelabel job {args.status!r}"
              + ("" if redis is not None else " (embedded mode keeps no state between runs)"))
        return 0 if report else 1
    try:
        if args.project is None:
            raise BadRequest("--project is required", field="project")
        body: dict[str, Any] = {"project": args.project, "prompts": args.prompt, "chunk_size": args.chunk_size}
        if args.filter:
            try:
                body["filter"] = json.loads(args.filter)
            except json.JSONDecodeError as error:
                raise BadRequest(f"--filter is not valid JSON: {error}", field="filter") from None
        if args.tasks:
            body["task_ids"] = parse_task_ids(args.tasks)
        request = PrelabelRequest.from_json(body)
        job_id = f"prelabel-{uuid.uuid4().hex[:12]}"
        with make_client(settings) as client:
            state.create(job_id, status="planning", project=request.project)
            the_plan = start_run(settings, request, client, state, job_id, redis=redis)
            print(f"job {job_id}: project {request.project}, model_version {the_plan.model_version}: "
                  f"{the_plan.listed} task(s) listed, {the_plan.already_predicted} already predicted, "
                  f"{len(the_plan.payloads)} to predict")
            if redis is not None and not _batch_workers(settings, redis):
                print(f"warning: no worker is listening on queue '{settings.queue_batch}'; the chunks wait until "
                      "one starts (python -m backend worker)", file=sys.stderr)
            if redis is not None and args.no_wait:
                print(f"queued; follow it with: python -m backend prelabel --status {job_id}")
                return 0
            bar = tqdm(total=len(the_plan.payloads) + len(the_plan.invalid), unit="task", desc="pre-labelling")

            def progress() -> dict[str, Any]:
                report = state.get(job_id) or {}
                bar.update(report.get("done", 0) + report.get("failed", 0) + report.get("skipped", 0) - bar.n)
                bar.set_postfix(failed=report.get("failed", 0), refresh=False)
                return report

            try:
                if redis is None:
                    run_inline(settings, the_plan, job_id, state, client, request.chunk_size,
                               on_progress=progress)
                else:
                    while progress().get("remaining", 0) > 0:
                        time.sleep(0.5)
                report = progress()
            except KeyboardInterrupt:
                bar.close()
                print(f"\ninterrupted; {'queued chunks keep running on the workers; ' if redis else ''}"
                      "run the same command again to resume (tasks already predicted are skipped)")
                return 130
            bar.close()
    except BackendError as error:
        print(f"prelabel: {error.message}", file=sys.stderr)
        return 2
    print(f"done {report['done']}, failed {report['failed']}, skipped {report['skipped']}")
    for failure in report["failures"][:20]:
        print(f"  task {failure['task']}: {failure['code']}: {failure['message']}")
    return 0 if report["failed"] == 0 else 1
