"""`python -m backend corrections report|train`: summarise the collected corrections, or fine-tune on them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from backend.errors import BackendError
from backend.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of `python -m backend corrections`."""
    actions = parser.add_subparsers(dest="corrections_command", required=True, metavar="ACTION")
    report = actions.add_parser("report", help="HTML report + JSON summary of the corrections dataset",
                                description="Write report.html (IoU histogram, outcome per label, trend per "
                                            "model_version, worst prompts with thumbnails; self-contained) and "
                                            "summary.json.")
    report.add_argument("--dir", help="corrections dataset (default: CORRECTIONS_DIR)")
    report.add_argument("--out", default="corrections-report", help="output directory (default: corrections-report)")
    report.add_argument("--worst", type=int, default=8, help="how many worst prompts to show (default 8)")

    train = actions.add_parser("train", help="fine-tune on the corrections; promote only if the held-out IoU improves",
                               description="Split the corrections deterministically (held-out share by image "
                                           "hash), evaluate the active checkpoint, fine-tune it with evf_sam.train, "
                                           "evaluate again and promote the new checkpoint only if it is better. The "
                                           "decision goes to CHECKPOINTS_DIR/training.json (shown by /health); a "
                                           "promoted checkpoint is also published in Redis (<prefix>:active_checkpoint)"
                                           "; workers and the embedded server switch to it before their next job.")
    train.add_argument("--dir", help="corrections dataset (default: CORRECTIONS_DIR)")
    train.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    train.add_argument("--holdout", type=float, default=0.2, help="held-out share (default 0.2)")
    train.add_argument("--min-records", type=int, default=8, help="refuse to train on fewer records (default 8)")


def run_cli(args: argparse.Namespace, settings: Settings) -> int:
    """Run the chosen action; returns the exit status."""
    try:
        if args.corrections_command == "report":
            from backend.corrections.report import build_report

            paths = build_report(args.dir or settings.corrections_dir, args.out, worst=args.worst)
            print(f"wrote {paths['html']} and {paths['json']}")
            return 0
        from backend.corrections.train import train_from_corrections

        redis = None
        if settings.redis_url is not None:
            from backend.queueing import redis_connection

            redis = redis_connection(settings)
        decision: dict[str, Any] = train_from_corrections(settings, corrections_dir=args.dir, steps=args.steps,
                                                          holdout=args.holdout, min_records=args.min_records,
                                                          redis=redis)
        print(json.dumps(decision, indent=2))
        return 0
    except BackendError as error:
        print(f"corrections {args.corrections_command}: {error.message}", file=sys.stderr)
        return 2
