"""Command line: `python -m backend serve|worker` (configuration comes from environment variables)."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from backend.settings import Settings


def _environment_help() -> str:
    lines = ["environment variables (see backend/settings.py):"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        names = getattr(alias, "choices", None) or [alias or name.upper()]
        default = field.default if field.default_factory is None else field.default_factory()
        shown = "unset" if default is None else default
        text = f"  {' / '.join(str(n) for n in names)} (default: {shown})"
        if field.description:
            text += f"\n      {field.description}"
        lines.append(text)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands serve, worker, and the not-yet-available prelabel/corrections)."""
    parser = argparse.ArgumentParser(
        prog="python -m backend", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Label Studio ML backend serving EVF-SAM text-prompted brush masks.\n"
                    "Without REDIS_URL, `serve` runs jobs itself (embedded mode); with it, start one `worker` per GPU.",
        epilog=_environment_help())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP server Label Studio connects to",
                                description="Run the HTTP server (routes /health /setup /predict /webhook /versions "
                                            "/metrics). Embedded mode loads the model at start.")
    serve.add_argument("--host", help="interface to bind (default: HOST or 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (default: PORT or 9090)")

    worker = commands.add_parser(
        "worker", help="run an RQ worker that holds the model (needs REDIS_URL); one per GPU",
        description="Take jobs from the interactive queue first, then batch; predict jobs go through the model in "
                    "batches (up to WORKER_BATCH_JOBS jobs, waiting at most WORKER_BATCH_WAIT_MS for them). Loads "
                    "the model once before the first job. SIGTERM: finish the current batch, then exit. "
                    "Several GPUs: one worker per GPU, e.g. `python -m backend worker --gpu 1` (or "
                    "CUDA_VISIBLE_DEVICES=1 python -m backend worker).")
    worker.add_argument("--burst", action="store_true", help="exit once the queues are empty")
    worker.add_argument("--name", help="worker name (default: evf-<host>-<pid>)")
    worker.add_argument("--gpu", help="serve on this GPU only (an index or a GPU UUID; sets CUDA_VISIBLE_DEVICES)")
    worker.add_argument("--batch-jobs", type=_positive_int, metavar="N",
                        help="predict jobs per batch (default: WORKER_BATCH_JOBS)")
    worker.add_argument("--batch-wait-ms", type=_non_negative_float, metavar="T",
                        help="longest wait for a batch to fill, in ms (default: WORKER_BATCH_WAIT_MS)")

    from backend import prelabel

    prelabel.add_arguments(commands.add_parser(
        "prelabel", help="pre-label a Label Studio project through its API (progress bar; rerun resumes)",
        description="List a project's tasks through the LS API, skip those already predicted by the current "
                    "model_version, predict the rest (Redis: chunks on the batch queue for the workers; embedded: "
                    "in this process) and write the predictions back. Needs LABEL_STUDIO_URL and "
                    "LABEL_STUDIO_API_KEY."))
    from backend.corrections import cli as corrections_cli

    corrections_cli.add_arguments(commands.add_parser(
        "corrections", help="report on or train from the collected corrections (CORRECTIONS_DIR)",
        description="Annotators' corrections of our predictions, collected from Label Studio webhooks."))
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be a number of milliseconds from 0 to 10000, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"invalid configuration:\n{error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.command == "serve":
        return _serve(args, settings)
    if args.command == "corrections":
        from backend.corrections.cli import run_cli as run_corrections

        return run_corrections(args, settings)
    if args.command == "prelabel":
        from backend.prelabel import run_cli

        return run_cli(args, settings)
    if settings.redis_url is None:
        print("python -m backend worker needs REDIS_URL (without it, `serve` runs the jobs itself)", file=sys.stderr)
        return 2
    from backend.placement import pin_gpu
    from backend.worker import run_worker
    from evf_sam.errors import EvfError

    overrides = {"worker_batch_jobs": args.batch_jobs, "worker_batch_wait_ms": args.batch_wait_ms}
    settings = settings.model_copy(update={key: value for key, value in overrides.items() if value is not None})
    try:
        if args.gpu is not None:
            pin_gpu(args.gpu)
        return run_worker(settings, burst=args.burst, name=args.name)
    except EvfError as error:
        print(f"cannot load the model: {error}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from backend.app import create_app
    from evf_sam.errors import EvfError

    if settings.embedded:  # load the weights before listening; a bad checkpoint is one clear line, not a traceback
        from backend.jobs import get_runtime

        try:
            get_runtime(settings)
        except EvfError as error:
            print(f"cannot load the model: {error}", file=sys.stderr)
            return 1
    uvicorn.run(create_app(settings), host=args.host or settings.host, port=args.port or settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
