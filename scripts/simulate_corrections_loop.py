"""Simulated corrections loop on synthetic data: predict -> ground-truth "corrections" -> train -> promote if better.

1. generate a small synthetic referring set (`evf_sam.data.synthetic`, its own seed);
2. predict every expression with the checkpoint (`evf_sam.EvfPredictor`);
3. record each (image, expression) the way the capture does (`backend.corrections.capture.CorrectionsStore`):
   predicted mask, corrected mask = the ground truth, IoU(prediction, correction), model_version and kind
   (`accepted` when the prediction already equals the ground truth, else `edited`);
4. run `backend.corrections.train.train_from_corrections` on it (held-out slice by image hash, before/after
   cIoU / gIoU, promotion only if gIoU improves) and print the decision.

    python scripts/simulate_corrections_loop.py --work /tmp/evf-sim --images 80 --steps 60
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from backend.corrections.capture import CorrectionsStore, iou  # noqa: E402
from backend.corrections.train import train_from_corrections  # noqa: E402
from backend.model import format_model_version  # noqa: E402
from backend.settings import Settings  # noqa: E402
from evf_sam.data import layout  # noqa: E402
from evf_sam.data.synthetic import generate_dataset  # noqa: E402
from evf_sam.evaluate import prompt_text  # noqa: E402


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


def simulate(checkpoint: str | Path, work: str | Path, *, images: int = 80, seed: int = 4242, steps: int = 60,
             batch_size: int = 8, holdout: float = 0.25, max_side: int = 320, device: str = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """The whole loop in a fresh `work` directory; returns the capture summary and the training decision."""
    work = Path(work)
    shutil.rmtree(work, ignore_errors=True)
    generate_dataset(work / "synthetic", images, seed=seed, split="sim", min_side=160, max_side=max_side,
                     image_format="png", progress=progress)
    capture = record_corrections(checkpoint, work / "synthetic", work / "corrections", device=device)
    settings = Settings(evf_sam_checkpoint=str(checkpoint), evf_sam_device=device,
                        corrections_dir=work / "corrections", checkpoints_dir=work / "checkpoints")
    decision = train_from_corrections(settings, steps=steps, holdout=holdout, min_records=4, batch_size=batch_size)
    return {"capture": capture, "decision": decision, "settings": settings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / "models" / "evf-demo"),
                        help="checkpoint that makes the predictions and is fine-tuned (default: models/evf-demo)")
    parser.add_argument("--work", default="/tmp/evf-corrections-sim",
                        help="work directory, emptied first (synthetic/, corrections/, checkpoints/)")
    parser.add_argument("--images", type=int, default=80, help="synthetic images (up to 4 expressions each)")
    parser.add_argument("--seed", type=int, default=4242, help="synthetic data seed (training seed is fixed)")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per optimizer step")
    parser.add_argument("--holdout", type=float, default=0.25, help="fraction of images held out (by image hash)")
    parser.add_argument("--max-side", type=int, default=320, help="largest synthetic image side")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    args = parser.parse_args(argv)
    result = simulate(args.checkpoint, args.work, images=args.images, seed=args.seed, steps=args.steps,
                      batch_size=args.batch_size, holdout=args.holdout, max_side=args.max_side, device=args.device)
    decision = result["decision"]
    print(json.dumps({"capture": result["capture"], **{k: decision[k] for k in
                      ("records", "steps", "before", "after", "promoted", "checkpoint", "seconds")}}, indent=2))
    before, after = decision["before"], decision["after"]
    print(f"held-out ({before['pairs']} pairs): cIoU {before['ciou']:.4f} -> {after['ciou']:.4f}, "
          f"gIoU {before['giou']:.4f} -> {after['giou']:.4f}: "
          f"{'PROMOTED' if decision['promoted'] else 'not promoted (kept the active checkpoint)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
