"""Train the shipped demo model `models/evf-demo` from scratch, deterministically, on synthetic data.

    python scripts/train_demo.py train --out models/evf-demo --device cuda      # the recipe (docs/MODELS.md)
    python scripts/train_demo.py figure --model models/evf-demo                 # docs/img/demo_predictions.png

`train` generates the synthetic train / val splits (`evf_sam.data.synthetic`, seed TRAIN_SEED) and a held-out split
from a different seed (HELDOUT_SEED), trains a sentencepiece tokenizer on the generator's text corpus, builds a small
EvfSamModel (SAM-1 family: ViT 256-d x 6 at 256 px, BEiT-3 256-d x 4; random init), trains ALL of it with
`evf_sam.train` (the image encoder too: nothing is pretrained here; fine-tuning real checkpoints keeps it frozen),
evaluates the result on the held-out split with `evf_sam.evaluate` and writes the checkpoint (fp16 weights),
metrics.json, training curves and a README into `--out`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TRAIN_SEED = 20261130
HELDOUT_SEED = 777
MODEL_SEED = 0
TOKENIZER_VOCAB = 600
BEIT3 = {"embed_dim": 256, "layers": 4, "heads": 4, "ffn_dim": 1024, "img_size": 224, "patch_size": 16,
         "max_text_positions": 64}
SAM = {"image_size": 256, "patch_size": 16, "embed_dim": 256, "depth": 6, "num_heads": 8,
       "global_attn_indexes": [2, 5], "window_size": 8, "prompt_dim": 256, "decoder_mlp_dim": 1024,
       "decoder_heads": 8, "iou_head_hidden_dim": 256}
ALL_PARTS = "image_encoder,prompt_encoder,mask_decoder,beit3,projector"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json")


def _shard(job: tuple[str, int, int, str]) -> str:
    from evf_sam.data.synthetic import generate_dataset

    root, n_images, seed, split, max_side = job
    generate_dataset(root, n_images, seed=seed, split=split, max_side=max_side, progress=False)
    return root


def generate_data(work: Path, train_images: int, val_images: int, heldout_images: int, shards: int,
                  train_max_side: int = 640, train_seed: int = TRAIN_SEED) -> tuple[list[Path], Path, Path]:
    """Train shards (seeds train_seed + k, longest side <= train_max_side), a val split (TRAIN_SEED, split "val")
    and the held-out split (HELDOUT_SEED, split "test", generator defaults), generated in parallel processes.
    Returns (train roots, val root, held-out root)."""
    per_shard = -(-train_images // shards)
    jobs = [(str(work / f"train{k:02d}"), min(per_shard, train_images - k * per_shard), train_seed + k, "train",
             train_max_side) for k in range(shards) if train_images - k * per_shard > 0]
    jobs += [(str(work / "val"), val_images, TRAIN_SEED, "val", 640),
             (str(work / "heldout"), heldout_images, HELDOUT_SEED, "test", 640)]
    with ProcessPoolExecutor(max_workers=min(len(jobs), 16)) as pool:
        list(pool.map(_shard, jobs))
    return [Path(j[0]) for j in jobs[:-2]], work / "val", work / "heldout"


def build_initial_checkpoint(directory: Path) -> Path:
    """Tokenizer trained on the generator's corpus + a randomly initialised small EvfSamModel, saved to `directory`."""
    from transformers import XLMRobertaTokenizer

    from evf_sam.config import EvfConfig
    from evf_sam.data.synthetic import text_corpus
    from evf_sam.loading import attach_tokenizer, save_checkpoint
    from evf_sam.modeling.evf_sam import EvfSamModel
    from evf_sam.testing import train_tokenizer

    train_tokenizer(directory, text_corpus(20000, seed=0), vocab_size=TOKENIZER_VOCAB)
    rows = len(XLMRobertaTokenizer.from_pretrained(str(directory)))
    config = EvfConfig(architectures=["EvfSamModel"], hidden_size=BEIT3["embed_dim"], out_dim=SAM["prompt_dim"],
                       mm_extractor_scale="base", sam_scale="huge", beit3_config={**BEIT3, "vocab_size": rows},
                       sam_config=dict(SAM))
    torch.manual_seed(MODEL_SEED)
    model = EvfSamModel(config).eval()
    attach_tokenizer(model, directory)
    return save_checkpoint(model, directory)


def run_training(args: argparse.Namespace) -> int:
    from evf_sam.evaluate import evaluate
    from evf_sam.metrics import to_markdown
    from evf_sam.train import CURVES_FILE, HISTORY_FILE, train

    started = time.time()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    train_roots, val_root, heldout_root = generate_data(work / "data", args.train_images, args.val_images,
                                                        args.heldout_images, args.shards, args.train_max_side,
                                                        TRAIN_SEED + 1000 * args.stage)
    print(f"data generated in {time.time() - started:.0f} s", flush=True)
    if args.init_from:  # a later stage: copy the previous stage's model so --out can be the same directory
        init = work / "init"
        shutil.copytree(args.init_from, init)
    else:
        init = build_initial_checkpoint(work / "init")
    recipe = dict(train_split="train", val_data=val_root, val_split="val", trainable=ALL_PARTS,
                  batch_size=args.batch_size, lr=args.lr, weight_decay=0.05, warmup_steps=args.warmup,
                  min_lr_ratio=0.02, bce_weight=2.0, dice_weight=1.0, device=args.device, bf16=True, seed=TRAIN_SEED,
                  num_workers=args.workers, save_dtype="fp16", val_images_per_batch=32)
    steps = args.steps
    if args.time_budget:
        steps = _steps_for_budget(init, train_roots, work / "calibration", recipe, args.time_budget)
        print(f"time budget {args.time_budget:.0f} s -> {steps} steps", flush=True)
    train_started = time.time()
    result = train(init, train_roots, work / "run", max_steps=steps, log_every=25, progress=not args.no_progress,
                   time_limit_s=args.time_budget * 1.15 if args.time_budget else None, **recipe)
    train_seconds = time.time() - train_started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES + (CURVES_FILE, HISTORY_FILE):
        if (result.checkpoint / name).is_file():
            shutil.copyfile(result.checkpoint / name, out / name)
    heldout = evaluate(out, heldout_root, split="test", device=args.device, images_per_batch=32, progress=False)
    metrics = {"heldout": heldout["splits"]["test"], "val": result.final_metrics, "steps": result.steps,
               "batch_size": args.batch_size, "train_images": args.train_images, "device": args.device,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "wall_seconds": round(time.time() - started, 1), "train_seconds": round(train_seconds, 1),
               "reproduce": f"python scripts/train_demo.py train --steps {result.steps} --batch-size {args.batch_size} "
                            f"--train-images {args.train_images} --train-max-side {args.train_max_side} --lr {args.lr} "
                            f"--warmup {args.warmup}" + (f" --stage {args.stage} --init-from {args.init_from}"
                                                         if args.init_from else ""),
               "seeds": {"train": TRAIN_SEED, "heldout": HELDOUT_SEED, "model": MODEL_SEED},
               "parameters": sum(p.numel() for p in _load(out).parameters())}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(_readme(metrics, to_markdown({"held-out (seed 777)": metrics["heldout"]})))
    print(json.dumps(metrics, indent=2))
    return 0


def _steps_for_budget(init: Path, train_roots: list[Path], work: Path, recipe: dict, budget: float) -> int:
    """Time 40 steps of the recipe (validation off) and return the step count that fits `budget` seconds, leaving
    room for one validation and data-loader restart per epoch. Used to fill a GPU slot; the count is recorded."""
    from evf_sam.train import train

    calibration = {**recipe, "val_split": None, "val_data": None}
    history = train(init, train_roots, work, max_steps=40, log_every=10, progress=False, **calibration).history
    seconds_per_step = (history["train"][-1]["elapsed_s"] - history["train"][0]["elapsed_s"]) / 30
    print(f"calibration: {seconds_per_step * 1000:.0f} ms/step", flush=True)
    return max(100, int(0.9 * budget / seconds_per_step) // 100 * 100)


def _load(path: Path) -> torch.nn.Module:
    import evf_sam

    return evf_sam.load_model(path)


def _readme(metrics: dict, table: str) -> str:
    return (f"# evf-demo\n\nA small EVF-SAM (SAM-1 family) trained from scratch on synthetic shapes by "
            f"`scripts/train_demo.py`; see docs/MODELS.md for the recipe. {metrics['parameters']:,} parameters, "
            f"fp16 weights. For demos and tests only: it knows coloured shapes, not the real world.\n\n"
            f"Held-out synthetic split ({metrics['heldout']['pairs']} expressions):\n\n{table}")


def make_figure(args: argparse.Namespace) -> int:
    """A grid of held-out predictions (overlay + prompt as title) -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    import evf_sam
    from evf_sam.data.synthetic import make_example

    model = evf_sam.load_model(args.model)
    predictor = evf_sam.EvfPredictor(model)
    rows, cols = 3, 4
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4.2 * rows))
    for k, ax in enumerate(axes.flat):
        scene, chosen = make_example(HELDOUT_SEED, "test", 10_000 + k // 2)
        item = chosen[k % 2 % len(chosen)]
        prediction = predictor.predict(scene.image, [item["text"]], semantic=False)[0]
        overlay = scene.image.astype(np.float32)
        overlay[prediction.mask] = 0.45 * overlay[prediction.mask] + 0.55 * np.array([50, 120, 220])
        truth = scene.union(item["targets"])
        iou = (prediction.mask & truth).sum() / max(1, (prediction.mask | truth).sum())
        ax.imshow(overlay.astype(np.uint8))
        ax.contour(truth, levels=[0.5], colors="yellow", linewidths=1)
        ax.set_title(f"\"{item['text']}\"\nIoU {iou:.2f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("evf-demo on held-out synthetic images: prediction (blue), ground truth (yellow outline)")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=80)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="generate data, train from scratch, evaluate, write the model dir")
    t.add_argument("--out", default="models/evf-demo", help="output model directory (default models/evf-demo)")
    t.add_argument("--work", default="/tmp/evf-demo-work", help="scratch directory for data and train state")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--train-images", type=int, default=12000, help="synthetic training images (4 expressions each)")
    t.add_argument("--val-images", type=int, default=150)
    t.add_argument("--heldout-images", type=int, default=300)
    t.add_argument("--shards", type=int, default=14, help="parallel generator processes for the training data")
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--time-budget", type=float, default=None,
                   help="instead of --steps: time a few steps, then pick the step count that fits this many seconds")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=4e-4)
    t.add_argument("--warmup", type=int, default=300)
    t.add_argument("--workers", type=int, default=12, help="data loader processes")
    t.add_argument("--train-max-side", type=int, default=640,
                   help="longest side of the generated training images (smaller = faster data loading)")
    t.add_argument("--init-from", default=None,
                   help="continue from this checkpoint (a later stage) instead of a random initialisation")
    t.add_argument("--stage", type=int, default=0,
                   help="stage number; offsets the training-data seed so later stages see new images")
    t.add_argument("--no-progress", action="store_true")
    f = sub.add_parser("figure", help="docs/img/demo_predictions.png from a trained model")
    f.add_argument("--model", default="models/evf-demo")
    f.add_argument("--output", default="docs/img/demo_predictions.png")
    args = parser.parse_args(argv)
    return run_training(args) if args.command == "train" else make_figure(args)


if __name__ == "__main__":
    sys.exit(main())
