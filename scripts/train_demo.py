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
import json
import shutil
import sys
import time
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


def generate_eval_data(work: Path, val_images: int, heldout_images: int) -> tuple[Path, Path]:
    """The val split (TRAIN_SEED, split "val") and the held-out split (HELDOUT_SEED, split "test", generator
    defaults) as layout files, so they are scored through the same path as any user dataset."""
    from evf_sam.data.synthetic import generate_dataset

    generate_dataset(work / "val", val_images, seed=TRAIN_SEED, split="val", progress=False)
    generate_dataset(work / "heldout", heldout_images, seed=HELDOUT_SEED, split="test", progress=False)
    return work / "val", work / "heldout"


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
    import evf_sam
    from evf_sam.data.layout import LayoutDataset
    from evf_sam.data.resident import build_synthetic
    from evf_sam.evaluate import evaluate
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
    init = Path(args.init_from) if args.init_from else build_initial_checkpoint(work / "init")
    model = evf_sam.load_model(init, device=device, dtype=torch.float32)
    data = build_synthetic(TRAIN_SEED + 1000 * args.stage, "train", args.train_images, model.sam_image_size,
                           model.beit_image_size, workers=args.workers, progress=not args.no_progress).to(device)
    prepared = time.time() - started
    print(f"data ready in {prepared:.0f} s: {args.train_images} images, {len(data)} expressions", flush=True)
    recipe = ResidentRecipe(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                            aux_weight=args.aux_weight, seed=TRAIN_SEED)
    if args.time_budget:
        recipe.steps = _steps_for_budget(model, data, recipe, args.time_budget)
        print(f"time budget {args.time_budget:.0f} s -> {recipe.steps} steps", flush=True)
    val_set = LayoutDataset(val_root, "val")
    train_started = time.time()
    history = train_resident(model, data, recipe, validate=lambda m: validate(m, val_set, "val", 32),
                             val_every=args.val_every, progress=not args.no_progress,
                             time_limit_s=args.time_budget * 1.1 if args.time_budget else None)
    train_seconds = time.time() - train_started
    steps = history.train[-1]["step"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model.to(torch.float16), out)
    (out / HISTORY_FILE).write_text(json.dumps(history.as_dict(), indent=1))
    plot_curves(history.as_dict(), out / CURVES_FILE)
    heldout = evaluate(out, heldout_root, split="test", device=args.device, images_per_batch=32, progress=False)
    metrics = {"heldout": heldout["splits"]["test"], "val": {k: history.val[-1][k] for k in ("ciou", "giou")},
               "steps": steps, "batch_size": args.batch_size, "train_images": args.train_images,
               "train_expressions": len(data), "device": args.device,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "data_seconds": round(prepared, 1), "train_seconds": round(train_seconds, 1),
               "wall_seconds": round(time.time() - started, 1),
               "reproduce": f"python scripts/train_demo.py train --steps {steps} --batch-size {args.batch_size} "
                            f"--train-images {args.train_images} --lr {args.lr} --warmup {args.warmup} "
                            f"--aux-weight {args.aux_weight}"
                            + (f" --stage {args.stage} --init-from {args.init_from}" if args.init_from else ""),
               "seeds": {"train": TRAIN_SEED + 1000 * args.stage, "heldout": HELDOUT_SEED, "model": MODEL_SEED},
               "parameters": sum(p.numel() for p in model.parameters())}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(_readme(metrics, to_markdown({"held-out (seed 777)": metrics["heldout"]})))
    print(json.dumps(metrics, indent=2))
    return 0


def _steps_for_budget(model: torch.nn.Module, data, recipe, budget: float) -> int:
    """Time 30 steps of the recipe on a copy of the model and return the step count that fits `budget` seconds
    (with room for the periodic validations). Used to fill a GPU slot; the count is recorded in metrics.json."""
    import copy

    from evf_sam.train_resident import ResidentRecipe, train_resident

    probe = ResidentRecipe(**{**recipe.__dict__, "steps": 40, "warmup": 40})
    history = train_resident(copy.deepcopy(model), data, probe, log_every=10, progress=False)
    seconds_per_step = (history.train[-1]["elapsed_s"] - history.train[0]["elapsed_s"]) / 30
    print(f"calibration: {seconds_per_step * 1000:.1f} ms/step", flush=True)
    return max(100, int(0.93 * budget / seconds_per_step) // 100 * 100)


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
    t.add_argument("--train-images", type=int, default=32000,
                   help="synthetic training images (4 expressions each), rendered and preprocessed into GPU memory")
    t.add_argument("--val-images", type=int, default=150, help="validation images (seed TRAIN_SEED, split val)")
    t.add_argument("--heldout-images", type=int, default=300, help="held-out images (seed 777, split test)")
    t.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPU count - 1)")
    t.add_argument("--steps", type=int, default=8000, help="optimizer steps (see --time-budget)")
    t.add_argument("--time-budget", type=float, default=None,
                   help="instead of --steps: time a few steps, then pick the step count that fits this many seconds")
    t.add_argument("--batch-size", type=int, default=128, help="expressions per step")
    t.add_argument("--lr", type=float, default=6e-4, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    t.add_argument("--aux-weight", type=float, default=1.0,
                   help="weight of the auxiliary BEiT-3 grounding loss (0 = off; see evf_sam.train_resident)")
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
