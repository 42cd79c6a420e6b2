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
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: CORRECTIONS_TRAIN_STEPS, 200)")
    length.add_argument("--epochs", type=int,
                        help="passes over the training corrections instead of a step count "
                             "(default: CORRECTIONS_TRAIN_EPOCHS; 0 = use the steps)")
    train.add_argument("--lr", type=float, help="peak learning rate (default: CORRECTIONS_TRAIN_LR, 1e-4)")
    train.add_argument("--batch-size", type=int, help="prompts per step (default: CORRECTIONS_TRAIN_BATCH_SIZE, 8)")
    train.add_argument("--warmup", type=float,
                       help="warm-up share of the steps, 0-0.5 (default: CORRECTIONS_TRAIN_WARMUP, 0.1)")
    train.add_argument("--train", dest="parts", metavar="PARTS",
                       help="comma-separated trainable parts among projector, beit3, mask_decoder, prompt_encoder, "
                            "image_encoder (default: CORRECTIONS_TRAIN_PARTS, else the family's paper recipe)")
    train.add_argument("--holdout", type=float, help="held-out share of images (default: CORRECTIONS_HOLDOUT, 0.2)")
    train.add_argument("--min-records", type=int,
                       help="refuse to train on fewer records (default: CORRECTIONS_MIN_RECORDS, 8)")


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
        decision: dict[str, Any] = train_from_corrections(
            settings, corrections_dir=args.dir, redis=redis, steps=args.steps, epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, warmup=args.warmup, parts=args.parts, holdout=args.holdout,
            min_records=args.min_records)
        print(json.dumps(decision, indent=2))
        return 0
    except BackendError as error:
        print(f"corrections {args.corrections_command}: {error.message}", file=sys.stderr)
        return 2
