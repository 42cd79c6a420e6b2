"""Simulated corrections loop on synthetic data: predict -> ground-truth "corrections" -> train -> promote if better.

1. generate a synthetic set for a scenario (`evf_sam.data.synthetic`, its own seed):
   - `project` (default): one Label Studio project as corrections arise in it. Its images have their own look,
     unlike the data the model was trained on (`SceneStyle`: a two-tone tiled background, muted colours, smaller
     objects, only hexagons, circles and triangles), and its prompts are its three label names `bolt` (hexagons),
     `washer` (circles) and `bracket` (triangles), each meaning every object of its kind (semantic masks);
   - `project-shapes`: the same look, but the labels are named by their shapes (`hexagon`, `circle`, `triangle`);
   - `general`: the generator's defaults (the model's own distribution, varied referring expressions);
2. predict every prompt with the checkpoint (`evf_sam.EvfPredictor`);
3. record each (image, prompt) the way the capture does (`backend.corrections.capture.CorrectionsStore`):
   predicted mask, corrected mask = the ground truth, IoU(prediction, correction), model_version and kind
   (`accepted` when the prediction already equals the ground truth, else `edited`);
4. run `backend.corrections.train.train_from_corrections` with Settings carrying the recipe (CORRECTIONS_TRAIN_*:
   held-out images by hash, cIoU / gIoU before and after, promotion only if gIoU improves) and print the decision.

Measured on the shared 2-core CPU machine with models/evf-demo, recipe --epochs 6 --lr 3e-4 (the defaults here;
batch 8, warm-up 0.1), OMP_NUM_THREADS=2 (docs/MODELS.md, "Training from corrections", has more):

  command                           train / held-out  cIoU before -> after  gIoU before -> after  decision  wall
  (defaults; the CI test)                    55 / 56       0.2970 -> 0.4584      0.3103 -> 0.4322  promoted   31 s
  --seed 99                                  51 / 47       0.2805 -> 0.4538      0.3340 -> 0.4557  promoted   28 s
  --images 200 --holdout 0.3                253 / 94       0.2930 -> 0.5254      0.3174 -> 0.4975  promoted  102 s
  --scenario project-shapes                  55 / 56       0.3618 -> 0.4428      0.3397 -> 0.4111  promoted   28 s
  --scenario general                       124 / 116       0.3450 -> 0.3331      0.3130 -> 0.2857  kept       51 s

A project's own labels and look make fine-tuning pay; corrections spread over the model's own distribution do not.

    python scripts/simulate_corrections_loop.py                      # the project scenario, as the test runs it
    python scripts/simulate_corrections_loop.py --scenario general --images 200 --holdout 0.3
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.corrections.capture import CorrectionsStore, iou  # noqa: E402
from backend.corrections.train import train_from_corrections  # noqa: E402
from backend.errors import BackendError  # noqa: E402
from backend.model import format_model_version  # noqa: E402
from backend.settings import Settings  # noqa: E402
from evf_sam.data import layout  # noqa: E402
from evf_sam.data.scenes import DEFAULT_STYLE, SceneStyle  # noqa: E402
from evf_sam.data.synthetic import generate_dataset  # noqa: E402
from evf_sam.evaluate import prompt_text  # noqa: E402


class Scenario(NamedTuple):
    """Where the corrections come from: the images' look and the prompts (None: varied referring expressions)."""

    style: SceneStyle
    labels: Mapping[str, Mapping[str, str]] | None


PROJECT_STYLE = SceneStyle(shapes=("hexagon", "circle", "triangle"), background="tiles", saturation=0.4,
                           size_scale=0.8)
SCENARIOS = {
    "project": Scenario(PROJECT_STYLE, {"bolt": {"shape": "hexagon"}, "washer": {"shape": "circle"},
                                        "bracket": {"shape": "triangle"}}),
    "project-shapes": Scenario(PROJECT_STYLE, {name: {"shape": name} for name in PROJECT_STYLE.shapes}),
    "general": Scenario(DEFAULT_STYLE, None),
}


def record_corrections(checkpoint: str | Path, synthetic: Path, corrections: Path, *,
                       device: str = "cpu") -> dict[str, Any]:
    """Predict every record of the synthetic set and write the corrections dataset; returns counts and mean IoU."""
    import evf_sam

    model = evf_sam.load_model(checkpoint, device=device)
    predictor = evf_sam.EvfPredictor(model)
    version = format_model_version(model.model_name, model.fingerprint, hashlib.sha256(b"synthetic").hexdigest())
    store = CorrectionsStore(corrections)
    by_image: dict[str, list[layout.Record]] = {}
    for record in layout.read_records(synthetic):
        by_image.setdefault(record.image, []).append(record)
    ious, kinds = [], {"accepted": 0, "edited": 0}
    for annotation_id, (image_rel, records) in enumerate(sorted(by_image.items()), start=1):
        image = layout.load_image(synthetic / image_rel)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image_hash = hashlib.sha256(buffer.getvalue()).hexdigest()[:16]
        image_path = f"{layout.IMAGES_DIR}/{image_hash}.png"
        layout.atomic_write_bytes(corrections / image_path, buffer.getvalue(), durable=False)
        predictions = predictor.predict(image, [prompt_text(r, model.is_multitask) for r in records])
        rows = []
        for number, (record, prediction) in enumerate(zip(records, predictions)):
            truth = layout.load_mask(synthetic / record.mask)
            value = iou(prediction.mask, truth)
            kind = "accepted" if np.array_equal(prediction.mask, truth) else "edited"
            kinds[kind] += 1
            ious.append(value)
            stem = f"{layout.MASKS_DIR}/a{annotation_id}-sim-image-{number}"
            layout.save_mask(corrections / f"{stem}.png", truth, durable=False)
            layout.save_mask(corrections / f"{stem}-pred.png", prediction.mask, durable=False)
            rows.append(layout.Record(
                image=image_path, mask=f"{stem}.png", prompt=record.prompt, label=record.label,
                semantic=record.semantic, predicted_mask=f"{stem}-pred.png", iou=round(value, 6),
                model_version=version, task_id=annotation_id, annotation_id=annotation_id, image_hash=image_hash,
                created_at="2026-01-01T00:00:00Z", updated_at="2026-01-01T00:00:00Z",
                extra={"kind": kind, "region_id": f"r{number}", "from_name": "tag", "to_name": "image",
                       "source": "simulated"}))
        store.replace(annotation_id, "2026-01-01T00:00:00Z", rows)
    return {"records": len(ious), "images": len(by_image), "kinds": kinds,
            "mean_prediction_iou": round(float(np.mean(ious)), 4) if ious else None, "model_version": version}


def simulate(checkpoint: str | Path, work: str | Path, *, scenario: str = "project", images: int = 60,
             seed: int = 4242, holdout: float = 0.4, max_side: int = 224, device: str = "cpu",
             progress: bool = True, **recipe: Any) -> dict[str, Any]:
    """The whole loop in a fresh `work` directory; returns the capture summary, the training decision, the settings
    and the wall time. `recipe`: CORRECTIONS_TRAIN_* settings by field name without the prefix (steps, epochs, lr,
    batch_size, warmup, parts); the others keep the settings' defaults."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    chosen, started = SCENARIOS[scenario], time.time()
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    generate_dataset(work / "synthetic", images, seed=seed, split="sim", min_side=160, max_side=max_side,
                     image_format="png", style=chosen.style, labels=chosen.labels, progress=progress)
    capture = record_corrections(checkpoint, work / "synthetic", work / "corrections", device=device)
    settings = Settings(evf_sam_checkpoint=str(checkpoint), evf_sam_device=device,
                        corrections_dir=work / "corrections", checkpoints_dir=work / "checkpoints",
                        corrections_holdout=holdout, corrections_min_records=4,
                        **{f"corrections_train_{key}": value for key, value in recipe.items() if value is not None})
    decision = train_from_corrections(settings)
    return {"capture": capture, "decision": decision, "settings": settings,
            "seconds": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "models" / "evf-demo"),
                        help="checkpoint that makes the predictions and is fine-tuned (default: models/evf-demo)")
    parser.add_argument("--work", default="/tmp/evf-corrections-sim",
                        help="work directory, emptied first (synthetic/, corrections/, checkpoints/)")
    parser.add_argument("--scenario", choices=tuple(SCENARIOS), default="project",
                        help="where the corrections come from (above; default: project)")
    parser.add_argument("--images", type=int, default=60, help="synthetic images (default 60)")
    parser.add_argument("--seed", type=int, default=4242, help="synthetic data seed (training seed is fixed)")
    parser.add_argument("--holdout", type=float, default=0.4, help="share of images held out, by hash (default 0.4)")
    parser.add_argument("--max-side", type=int, default=224, help="largest synthetic image side (default 224)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps (default: CORRECTIONS_TRAIN_STEPS' default)")
    length.add_argument("--epochs", type=int, default=6, help="passes over the training corrections (default 6)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--batch-size", type=int, help="prompts per step (default: the settings' default, 8)")
    parser.add_argument("--warmup", type=float, help="warm-up share of the steps (default: the settings' 0.1)")
    parser.add_argument("--train", dest="parts", metavar="PARTS",
                        help="trainable parts, comma-separated (default: the paper's recipe)")
    args = parser.parse_args(argv)
    try:
        result = simulate(args.checkpoint, args.work, scenario=args.scenario, images=args.images, seed=args.seed,
                          holdout=args.holdout, max_side=args.max_side, device=args.device,
                          steps=args.steps, epochs=0 if args.steps else args.epochs, lr=args.lr,
                          batch_size=args.batch_size, warmup=args.warmup,
                          parts=args.parts.split(",") if args.parts else None)
    except (BackendError, ValueError) as error:
        print(f"error: {getattr(error, 'message', error)}", file=sys.stderr)
        return 2
    decision = result["decision"]
    print(json.dumps({"capture": result["capture"], **{k: decision[k] for k in
                      ("records", "recipe", "steps", "before", "after", "promoted", "checkpoint", "seconds")},
                      "wall_seconds": result["seconds"]}, indent=2))
    before, after = decision["before"], decision["after"]
    print(f"{args.scenario}: held-out ({before['pairs']} pairs): cIoU {before['ciou']:.4f} -> {after['ciou']:.4f}, "
          f"gIoU {before['giou']:.4f} -> {after['giou']:.4f}: "
          f"{'PROMOTED' if decision['promoted'] else 'not promoted (kept the active checkpoint)'} "
          f"({result['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
