"""`python -m evf_sam train`: the command line of `evf_sam.train.train` (fine-tuning on datasets in the project
layout)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from evf_sam.train import PARTS, train


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m evf_sam train`."""
    parser.description = ("Fine-tune an EVF-SAM checkpoint on datasets in the project layout (images/, masks/, "
                          "records.jsonl): BCE + Dice at full mask resolution, AdamW, warm-up + cosine, "
                          "validation cIoU/gIoU per epoch. Writes a loadable checkpoint to --output.")
    parser.add_argument("--checkpoint", required=True, help="starting checkpoint (directory or HF repo id)")
    parser.add_argument("--data", required=True, nargs="+", help="one or more dataset directories")
    parser.add_argument("--output", required=True, type=Path, help="output directory (checkpoint + train state)")
    parser.add_argument("--train-split", default="train", help="records used for training ('' = all; default train)")
    parser.add_argument("--val-split", default="val", help="records used for validation ('' = none; default val)")
    parser.add_argument("--val-data", default=None, help="take validation records from this directory instead")
    parser.add_argument("--train", dest="trainable", default=None,
                        help=f"comma-separated trainable parts among {', '.join(PARTS)} (default: projector,beit3,"
                             f"mask_decoder for SAM-1, projector,beit3 for SAM-2). image_encoder is for training "
                             f"from scratch only; fine-tuning real checkpoints keeps it frozen as in the paper")
    parser.add_argument("--epochs", type=int, default=1, help="epochs (default 1; ignored with --steps)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
    parser.add_argument("--grad-accum", type=int, default=1, help="batches per optimizer step (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="linear warm-up steps (default 100)")
    parser.add_argument("--bce-weight", type=float, default=2.0, help="weight of the BCE loss (default 2.0)")
    parser.add_argument("--dice-weight", type=float, default=0.5, help="weight of the Dice loss (default 0.5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-bf16", action="store_true", help="disable bf16 autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order and RNGs (default 0)")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes (default 0)")
    parser.add_argument("--no-feature-cache", action="store_true",
                        help="recompute frozen image embeddings every time instead of caching them per image")
    parser.add_argument("--preload", action="store_true",
                        help="keep preprocessed images and masks in memory after first use (small datasets)")
    parser.add_argument("--save-every", type=int, default=None, help="also save the train state every N steps")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/train_state.pt if present")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end this session after N optimizer steps in total (resume later with --resume)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="end the session after this many seconds (state saved; resume later with --resume)")
    parser.add_argument("--save-dtype", default="fp32", help="storage dtype of the output weights: fp32|bf16|fp16")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the training described by parsed `args`; 0 on success, 2 on bad input."""
    from evf_sam.errors import EvfError

    try:
        result = train(args.checkpoint, args.data, args.output, train_split=args.train_split or None,
                       val_split=args.val_split or None, val_data=args.val_data, trainable=args.trainable,
                       epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, weight_decay=args.weight_decay,
                       warmup_steps=args.warmup_steps, bce_weight=args.bce_weight, dice_weight=args.dice_weight,
                       device=args.device, bf16=not args.no_bf16, seed=args.seed, num_workers=args.workers,
                       cache_features=not args.no_feature_cache, save_every=args.save_every, resume=args.resume,
                       stop_after=args.stop_after, time_limit_s=args.time_limit, preload=args.preload,
                       save_dtype=args.save_dtype, progress=not args.no_progress)
    except (EvfError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items()) or "no validation split"
    print(f"trained {result.steps} steps -> {result.checkpoint} ({metrics})")
    return 0
