"""Train the shipped demo model `models/evf-demo` from scratch, deterministically, on synthetic data.

    python scripts/train_demo.py train --out models/evf-demo --device cuda      # the recipe (docs/MODELS.md)
    python scripts/train_demo.py figure --model models/evf-demo                 # docs/img/demo_predictions.png

`train` writes the val split (seed TRAIN_SEED) and a held-out split from a different seed (HELDOUT_SEED) as files,
renders the training images straight into GPU memory (`evf_sam.data.resident`, seed TRAIN_SEED + 1000 * stage),
trains a sentencepiece tokenizer on the generator's text corpus and builds a small EvfSamModel (SAM-1 family: ViT
256-d x 6 at 256 px, BEiT-3 256-d x 4; random init) unless --init-from continues an earlier stage, trains ALL of it
with `evf_sam.train_resident` (the image encoder too: nothing is pretrained here; fine-tuning real checkpoints keeps
it frozen), evaluates the result on the held-out split with `evf_sam.evaluate` and writes the checkpoint (fp16
weights), metrics.json, training curves and a README into `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

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


def generate_eval_data(work: Path, val_images: int, heldout_images: int) -> tuple[Path, Path]:
    """The val split (TRAIN_SEED, split "val") and the held-out split (HELDOUT_SEED, split "test", generator
    defaults) as layout files, so they are scored through the same path as any user dataset."""
    from evf_sam.data.synthetic import generate_dataset

    generate_dataset(work / "val", val_images, seed=TRAIN_SEED, split="val", progress=False)
    generate_dataset(work / "heldout", heldout_images, seed=HELDOUT_SEED, split="test", progress=False)
    return work / "val", work / "heldout"


def architecture(beit_layers: int, sam_depth: int) -> tuple[dict, dict]:
    """BEiT-3 and SAM settings of the demo model with `beit_layers` fusion layers and a `sam_depth`-block ViT
    (global attention in the middle and last blocks, windows elsewhere)."""
    sam = {**SAM, "depth": sam_depth, "global_attn_indexes": sorted({sam_depth // 2 - 1, sam_depth - 1})}
    return {**BEIT3, "layers": beit_layers}, sam


def build_initial_checkpoint(directory: Path, beit_layers: int = BEIT3["layers"],
                             sam_depth: int = SAM["depth"]) -> Path:
    """Tokenizer trained on the generator's corpus + a randomly initialised small EvfSamModel, saved to `directory`."""
    from transformers import XLMRobertaTokenizer

    from evf_sam.config import EvfConfig
    from evf_sam.data.synthetic import text_corpus
    from evf_sam.loading import attach_tokenizer, save_checkpoint
    from evf_sam.modeling.evf_sam import EvfSamModel
    from evf_sam.testing import train_tokenizer

    train_tokenizer(directory, text_corpus(20000, seed=0), vocab_size=TOKENIZER_VOCAB)
    rows = len(XLMRobertaTokenizer.from_pretrained(str(directory)))
    beit3, sam = architecture(beit_layers, sam_depth)
    config = EvfConfig(architectures=["EvfSamModel"], hidden_size=beit3["embed_dim"], out_dim=sam["prompt_dim"],
                       mm_extractor_scale="base", sam_scale="huge", beit3_config={**beit3, "vocab_size": rows},
                       sam_config=sam)
    torch.manual_seed(MODEL_SEED)
    model = EvfSamModel(config).eval()
    attach_tokenizer(model, directory)
    return save_checkpoint(model, directory)


def load_training_data(args: argparse.Namespace, model: torch.nn.Module, device: torch.device):
    """The stage's training images in GPU memory: rendered now, or read from `--data-cache` when a run with the
    same arguments wrote it (concurrent runs on one GPU share one rendering)."""
    from evf_sam.data.resident import ResidentData, build_synthetic

    cache = Path(args.data_cache) if args.data_cache else None
    if cache is not None and args.stream:
        raise SystemExit("--data-cache and --stream exclude each other: a streamed pool changes while training")
    if cache is not None and cache.is_file():
        data = ResidentData.load(cache)
        found = (len(data.sam), data.sam_size, int(data.beit.shape[-1]))
        wanted = (args.train_images, model.sam_image_size, model.beit_image_size)
        if found != wanted:
            raise SystemExit(f"--data-cache {cache} holds (images, SAM size, BEiT-3 size) {found}, this run needs "
                             f"{wanted}: delete it or pass another path")
        return data.to(device)
    data = build_synthetic(TRAIN_SEED + 1000 * args.stage, "train", args.train_images, model.sam_image_size,
                           model.beit_image_size, fill_expressions=args.stream, workers=args.workers,
                           progress=not args.no_progress)
    if cache is not None:
        partial = cache.with_suffix(".partial")
        data.save(partial)
        partial.rename(cache)
    return data.to(device)


def open_stream(args: argparse.Namespace, model: torch.nn.Module) -> Any:
    """A `SyntheticStream` continuing the stage's training images after the pool (`--stream`), else a no-op."""
    from evf_sam.data.stream import SyntheticStream

    if not args.stream:
        return contextlib.nullcontext()
    workers = args.stream_workers or max(1, (os.cpu_count() or 2) - 2)
    return SyntheticStream(TRAIN_SEED + 1000 * args.stage, "train", args.train_images, model.sam_image_size,
                           model.beit_image_size, workers=workers)


def run_training(args: argparse.Namespace) -> int:
    import evf_sam
    from evf_sam.acceleration import accelerate
    from evf_sam.data.layout import LayoutDataset
    from evf_sam.loading import save_checkpoint
    from evf_sam.metrics import to_markdown
    from evf_sam.train import CURVES_FILE, HISTORY_FILE, plot_curves, validate
    from evf_sam.train_resident import ResidentRecipe, train_resident

    started = time.time()
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    device = torch.device(args.device)
    val_root, heldout_root = generate_eval_data(work, args.val_images, args.heldout_images)
    init = (Path(args.init_from) if args.init_from
            else build_initial_checkpoint(work / "init", args.beit_layers, args.sam_depth))
    model = evf_sam.load_model(init, device=device, dtype=torch.float32)
    if device.type == "cuda":
        accelerate(model, fused_attention=True)
    data = load_training_data(args, model, device)
    prepared = time.time() - started
    print(f"data ready in {prepared:.0f} s: {len(data.sam)} images, {len(data)} expressions", flush=True)

    phases = {}
    val_set = LayoutDataset(val_root, "val")
    with open_stream(args, model) as stream:
        if args.pretrain_steps or args.pretrain_time:
            pretrain = ResidentRecipe(steps=args.pretrain_steps, batch_size=args.pretrain_batch_size,
                                      lr=args.pretrain_lr, warmup=args.pretrain_warmup, grounding_only=True,
                                      aux_weight=1.0, prompt_grid_weight=1.0, curriculum=args.curriculum,
                                      compile=args.compile, seed=TRAIN_SEED)
            phases["pretrain"] = train_resident(model, data, pretrain, progress=not args.no_progress,
                                                time_limit_s=None if args.pretrain_steps else args.pretrain_time,
                                                stream=stream)
            print(f"grounding pre-training: {phases['pretrain'].train[-1]}", flush=True)
        recipe = ResidentRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                                aux_weight=args.aux_weight, prompt_grid_weight=args.prompt_grid_weight,
                                curriculum=0.0 if phases else args.curriculum, compile=args.compile,
                                seed=TRAIN_SEED)
        if args.time_budget:
            recipe.steps = 0
            print(f"time budget {args.time_budget:.0f} s: as many steps as fit, schedule by elapsed time", flush=True)
        train_started = time.time()
        history = train_resident(model, data, recipe, validate=lambda m: validate(m, val_set, "val", 32),
                                 val_every=args.val_every, progress=not args.no_progress,
                                 time_limit_s=args.time_budget, stream=stream)
        fresh_images = stream.rendered if stream is not None else 0
    train_seconds = time.time() - train_started
    steps = history.train[-1]["step"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.to(torch.float16), out)
    (out / HISTORY_FILE).write_text(json.dumps(history.as_dict(), indent=1))
    plot_curves(history.as_dict(), out / CURVES_FILE)
    if phases:
        (out / "pretrain_history.json").write_text(json.dumps(phases["pretrain"].as_dict(), indent=1))
    heldout, kinds = heldout_scores(out, heldout_root, args.device)
    pretrain_steps = phases["pretrain"].train[-1]["step"] if phases else 0
    metrics = {"heldout": heldout, "heldout_per_kind": kinds,
               "val": {k: history.val[-1][k] for k in ("ciou", "giou")},
               "steps": steps, "pretrain_steps": pretrain_steps, "batch_size": args.batch_size,
               "train_images": args.train_images, "train_expressions": len(data), "fresh_images": fresh_images,
               "device": args.device,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "data_seconds": round(prepared, 1), "train_seconds": round(train_seconds, 1),
               "wall_seconds": round(time.time() - started, 1),
               "reproduce": "python scripts/train_demo.py train " + " ".join(_reproduce(args, steps, pretrain_steps)),
               "seeds": {"train": TRAIN_SEED + 1000 * args.stage, "heldout": HELDOUT_SEED, "model": MODEL_SEED},
               "parameters": sum(p.numel() for p in model.parameters())}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(_readme(metrics, to_markdown({"held-out (seed 777)": metrics["heldout"]})))
    print(json.dumps(metrics, indent=2))
    return 0


def _reproduce(args: argparse.Namespace, steps: int, pretrain_steps: int) -> list[str]:
    """The command-line arguments that repeat this run with its step counts fixed."""
    parts = [f"--steps {steps}", f"--batch-size {args.batch_size}", f"--train-images {args.train_images}",
             f"--lr {args.lr}", f"--warmup {args.warmup}", f"--aux-weight {args.aux_weight}",
             f"--prompt-grid-weight {args.prompt_grid_weight}"]
    if pretrain_steps:
        parts += [f"--pretrain-steps {pretrain_steps}", f"--pretrain-batch-size {args.pretrain_batch_size}",
                  f"--pretrain-lr {args.pretrain_lr}", f"--pretrain-warmup {args.pretrain_warmup}"]
    if args.curriculum:
        parts.append(f"--curriculum {args.curriculum}")
    if args.stream:
        parts.append("--stream")
    if args.init_from:
        parts += [f"--stage {args.stage}", f"--init-from {args.init_from}"]
    else:
        parts += [f"--beit-layers {args.beit_layers}", f"--sam-depth {args.sam_depth}"]
    return parts


def heldout_scores(checkpoint: Path, heldout_root: Path, device: str) -> tuple[dict, dict[str, dict]]:
    """Held-out cIoU/gIoU overall and per expression kind (attribute, position, superlative, relation, semantic),
    from one prediction of every pair."""
    import evf_sam
    from evf_sam.data.layout import LayoutDataset
    from evf_sam.evaluate import evaluate_dataset
    from evf_sam.metrics import SplitMetrics

    predictor = evf_sam.EvfPredictor(evf_sam.load_model(checkpoint, device=device), cache_size=0,
                                     max_image_batch=32)
    dataset = LayoutDataset(heldout_root, "test")
    records, metrics = dataset.records, SplitMetrics()
    for kind in sorted({_kind(r) for r in records}):
        dataset.records = [r for r in records if _kind(r) == kind]
        evaluate_dataset(predictor, dataset, kind, metrics, images_per_batch=32)
    kinds = metrics.results()
    pairs = sum(k["pairs"] for k in kinds.values())
    overall = {"ciou": sum(k["intersection"] for k in kinds.values()) / sum(k["union"] for k in kinds.values()),
               "giou": sum(k["giou"] * k["pairs"] for k in kinds.values()) / pairs, "pairs": pairs}
    return overall, {name: {key: k[key] for key in ("ciou", "giou", "pairs")} for name, k in kinds.items()}


def _kind(record) -> str:
    return "semantic" if record.semantic else record.extra.get("kind", "?")


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


def _at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="generate data, train from scratch, evaluate, write the model dir")
    t.add_argument("--out", default="models/evf-demo", help="output model directory (default models/evf-demo)")
    t.add_argument("--work", default="/tmp/evf-demo-work", help="scratch directory for data and train state")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--train-images", type=int, default=32000,
                   help="synthetic training images (4 expressions each), rendered and preprocessed into GPU memory")
    t.add_argument("--val-images", type=int, default=150, help="validation images (seed TRAIN_SEED, split val)")
    t.add_argument("--heldout-images", type=int, default=300, help="held-out images (seed 777, split test)")
    t.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPU count - 1)")
    t.add_argument("--steps", type=int, default=8000, help="optimizer steps (see --time-budget)")
    t.add_argument("--time-budget", type=float, default=None,
                   help="instead of --steps: train for this many seconds, the schedule following elapsed time "
                        "(the step count reached is recorded in metrics.json)")
    t.add_argument("--batch-size", type=int, default=128, help="expressions per step")
    t.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    t.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the auxiliary BEiT-3 grounding loss (0 = off; see evf_sam.train_resident)")
    t.add_argument("--prompt-grid-weight", type=float, default=0.0,
                   help="weight of the auxiliary loss predicting the target's coarse mask from the prompt token")
    t.add_argument("--curriculum", type=float, default=0.0,
                   help="fraction of training (of pre-training when there is one) on attribute and 'all the ...' "
                        "expressions only, before position/superlative/relation ones")
    t.add_argument("--pretrain-steps", type=int, default=0,
                   help="grounding pre-training of BEiT-3 + projector alone (no SAM) before the joint phase")
    t.add_argument("--pretrain-time", type=float, default=None,
                   help="instead of --pretrain-steps: seconds of grounding pre-training (steps picked by timing)")
    t.add_argument("--pretrain-batch-size", type=int, default=512)
    t.add_argument("--pretrain-lr", type=float, default=1e-3)
    t.add_argument("--pretrain-warmup", type=int, default=300)
    t.add_argument("--beit-layers", type=int, default=BEIT3["layers"],
                   help="BEiT-3 layers of a fresh model (ignored with --init-from)")
    t.add_argument("--sam-depth", type=int, default=SAM["depth"],
                   help="SAM ViT blocks of a fresh model (ignored with --init-from)")
    t.add_argument("--compile", action="store_true", help="torch.compile the image encoder and BEiT-3 layers")
    t.add_argument("--stream", action="store_true",
                   help="keep rendering new training images while training and swap them in, oldest first "
                        "(evf_sam.data.stream), so the model does not memorise the --train-images pool")
    t.add_argument("--stream-workers", type=_at_least_one, default=None,
                   help="rendering processes of --stream (default: CPU count - 2)")
    t.add_argument("--data-cache", default=None,
                   help="file for the rendered training data: read when present, else written (shared by runs)")
    t.add_argument("--val-every", type=int, default=1000, help="validate every N steps")
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
