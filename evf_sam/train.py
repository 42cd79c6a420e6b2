"""`python -m evf_sam train`: fine-tune an EVF checkpoint on datasets in the project layout (synthetic or corrections).

Recipe (paper / reference §10): the mask logits are upsampled to the ground-truth resolution exactly as at inference
(`transforms.postprocess_logits`) and scored with BCE-with-logits + Dice. The SAM image encoder stays frozen (as in the
paper) unless `image_encoder` is listed in `trainable` — meant only for training a model from scratch (the demo recipe,
`scripts/train_demo.py`). AdamW with linear warm-up and cosine decay, gradient accumulation, bf16 autocast on CUDA.

The output directory receives the final Hugging Face-format checkpoint (config.json, model.safetensors, tokenizer
files; loadable by `load_model`) plus `train_state.pt` (everything needed to resume: trainable weights, optimizer,
scheduler, step, data position, RNG states), `training_history.json` and `training_curves.png`.
A resumed run (`resume=True`) continues from the saved state as if it had never stopped: the data order of an epoch
depends only on (seed, epoch).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from evf_sam.data.layout import LayoutDataset, SampleDataset, concat_datasets
from evf_sam.data.prompt_samples import PromptSamples, collate, epoch_order
from evf_sam.evaluate import evaluate_dataset
from evf_sam.losses import mask_losses
from evf_sam.metrics import SplitMetrics

STATE_FILE = "train_state.pt"
HISTORY_FILE = "training_history.json"
CURVES_FILE = "training_curves.png"
PARTS = ("projector", "beit3", "mask_decoder", "prompt_encoder", "image_encoder")
DEFAULT_PARTS = {"sam": ("projector", "beit3", "mask_decoder"), "sam2": ("projector", "beit3")}


@dataclass
class TrainResult:
    """What `train` returns: the checkpoint directory, the optimizer steps done, and the history
    (`train`: one entry per logged step; `val`: one per validation) with the last validation metrics."""

    checkpoint: Path
    steps: int
    history: dict[str, list[dict[str, float]]]
    final_metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- parts


def _part_prefixes(model: Any) -> dict[str, tuple[str, ...]]:
    sam2 = model.family == "sam2"
    return {
        "projector": ("text_hidden_fcs.",),
        "beit3": ("mm_extractor.",),
        "mask_decoder": ("visual_model.sam_mask_decoder.",) if sam2 else ("visual_model.mask_decoder.",),
        "prompt_encoder": ("visual_model.sam_prompt_encoder.",) if sam2 else ("visual_model.prompt_encoder.",),
        "image_encoder": ("visual_model.image_encoder.",),
    }


def parse_parts(text: str | Sequence[str] | None, family: str) -> tuple[str, ...]:
    """"projector,beit3" or a list -> validated part names; None -> the family default (paper recipe)."""
    if text is None:
        return DEFAULT_PARTS[family]
    names = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise ValueError(f"unknown trainable part(s) {unknown or names!r}; choose from {', '.join(PARTS)}")
    return tuple(dict.fromkeys(names))


def set_trainable(model: torch.nn.Module, parts: Sequence[str]) -> list[str]:
    """Freeze everything but the parameters of `parts`; returns the trainable parameter names."""
    prefixes = tuple(p for part in parts for p in _part_prefixes(model)[part])
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(prefixes))
        if param.requires_grad:
            names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------- losses


# ---------------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine_factor((step - warmup) / max(1, total - warmup), min_ratio)


def cosine_factor(progress: float, min_ratio: float = 0.0) -> float:
    """Cosine decay from 1 at `progress` 0 to `min_ratio` at 1 (and after)."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- plots


def plot_curves(history: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Training loss (total, BCE, Dice) per step and validation cIoU / gIoU, side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history["train"]]
    for key in ("loss", "bce", "dice"):
        left.plot(steps, [h[key] for h in history["train"]], label=key, linewidth=1)
    left.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    if steps:
        left.set_yscale("log")
        left.legend()
    val_steps = [h["step"] for h in history["val"]]
    for key in ("ciou", "giou"):
        right.plot(val_steps, [h[key] for h in history["val"]], marker="o", label=key)
    right.set(xlabel="optimizer step", ylabel="IoU", title="validation", ylim=(0, 1))
    if val_steps:
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- training


def _encode_images(model: Any, batch: dict[str, Any], device: torch.device, frozen: bool,
                   cache: dict[int, Any] | None) -> Any:
    """ImageFeatures of the batch's distinct images; with a frozen encoder under no_grad, cached per image id."""
    from evf_sam.modeling.common import ImageFeatures

    if not frozen:
        return model.encode_images(batch["pixels"].to(device))
    missing = [i for i, image_id in enumerate(batch["image_ids"]) if cache is None or image_id not in cache]
    fresh = {}
    if missing:
        with torch.no_grad():
            features = model.encode_images(batch["pixels"][missing].to(device))
        for row, i in enumerate(missing):
            fresh[batch["image_ids"][i]] = features.select(torch.tensor([row]))
        if cache is not None:
            cache.update(fresh)
    store = cache if cache is not None else fresh
    return ImageFeatures.cat([store[image_id] for image_id in batch["image_ids"]])


def validate(model: Any, dataset: SampleDataset | None, name: str, images_per_batch: int = 8) -> dict[str, float]:
    """cIoU / gIoU of `model` on `dataset` through the inference path (`EvfPredictor`); {} without a dataset."""
    from evf_sam.predictor import EvfPredictor

    if dataset is None or len(dataset) == 0:
        return {}
    was_training = model.training
    model.eval()
    try:
        predictor = EvfPredictor(model, cache_size=0, max_image_batch=images_per_batch, return_logits=False)
        metrics = evaluate_dataset(predictor, dataset, name, SplitMetrics(), images_per_batch)
    finally:
        model.train(was_training)
    result = metrics.results()[name]
    return {"ciou": float(result["ciou"]), "giou": float(result["giou"]), "pairs": int(result["pairs"])}


def train(checkpoint: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike],
          output_dir: str | os.PathLike, *, train_split: str | None = "train", val_split: str | None = "val",
          val_data: str | os.PathLike | None = None, trainable: str | Sequence[str] | None = None,
          epochs: int = 1, max_steps: int | None = None, batch_size: int = 8, grad_accum: int = 1,
          lr: float = 1e-4, weight_decay: float = 0.01, warmup_steps: int = 100, min_lr_ratio: float = 0.0,
          bce_weight: float = 2.0, dice_weight: float = 0.5, clip_grad: float | None = 1.0,
          device: str | torch.device = "cpu", bf16: bool = True, seed: int = 0, num_workers: int = 0,
          cache_features: bool = True, preload: bool = False, group_by_image: bool = True,
          save_every: int | None = None, log_every: int = 10, resume: bool = False, stop_after: int | None = None,
          time_limit_s: float | None = None, save_dtype: str = "fp32", val_images_per_batch: int = 8,
          progress: bool = True) -> TrainResult:
    """Fine-tune `checkpoint` on `data` (one or more layout directories) and write the result to `output_dir`.

    `train_split` / `val_split` select records by their `split` field (None: all records; validation is skipped when
    the split is empty or `val_split` is None); `val_data` takes the validation records from another directory.
    `trainable`: part names among projector, beit3, mask_decoder, prompt_encoder, image_encoder (default: the
    paper's recipe for the family). Training runs `max_steps` optimizer steps if given, else `epochs` epochs;
    one optimizer step = `grad_accum` batches of `batch_size` prompts. `preload` keeps every preprocessed image and
    mask in memory after first use (fast for small datasets; use with `num_workers=0`). `group_by_image` keeps the
    expressions of an image together in the shuffled order (each image is then preprocessed and encoded once per
    batch); False shuffles expressions independently. Validation (cIoU / gIoU through the
    predictor) runs after every epoch and at the end. `resume=True` continues from `output_dir/train_state.pt`;
    `stop_after` ends the session after that many optimizer steps in total (state saved), so a long schedule can be
    split over several sessions. `time_limit_s` is a safety net: the session ends the same way once that many
    seconds have passed (the run is then shorter than its schedule; `TrainResult.steps` says how far it got).
    """
    import evf_sam
    from evf_sam.loading import parse_dtype, save_checkpoint
    from evf_sam.transforms import sam_mode, tokenize
    from tqdm.auto import tqdm

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    model = evf_sam.load_model(checkpoint, device=device, dtype=torch.float32)
    parts = parse_parts(trainable, model.family)
    trainable_names = set(set_trainable(model, parts))
    frozen_encoder = "image_encoder" not in parts
    model.train()

    roots = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    train_set = concat_datasets([LayoutDataset(root, train_split) for root in roots])
    if len(train_set) == 0:
        raise ValueError(f"no training records in {[str(r) for r in roots]} (split {train_split!r})")
    val_set = None
    if val_split is not None or val_data is not None:
        val_set = concat_datasets([LayoutDataset(val_data, val_split)] if val_data is not None
                          else [LayoutDataset(root, val_split) for root in roots])
    samples = PromptSamples(train_set, model.sam_image_size, sam_mode(model), model.beit_image_size,
                            model.is_multitask, preload=preload)

    params = [p for n, p in model.named_parameters() if n in trainable_names]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    batches_per_epoch = math.ceil(len(samples) / batch_size)
    if grad_accum < 1 or grad_accum > batches_per_epoch:
        raise ValueError(f"grad_accum must be between 1 and the {batches_per_epoch} batches of an epoch, "
                         f"got {grad_accum}")
    steps_per_epoch = max(1, batches_per_epoch // grad_accum)
    total_steps = max_steps if max_steps is not None else epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, min(warmup_steps, max(1, total_steps // 2)), total_steps, min_lr_ratio))

    step, epoch, cursor = 0, 0, 0
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["trainable"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, cursor, history = state["step"], state["epoch"], state["cursor"], state["history"]
        _set_rng_state(state["rng"])

    def save_state() -> None:
        _save_state(state_path, {
            "trainable": {n: t.detach().cpu() for n, t in model.state_dict().items() if n in trainable_names},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
            "cursor": cursor, "history": history, "rng": _rng_state(), "parts": list(parts), "seed": seed})

    amp = bf16 and device.type == "cuda"
    cache: dict[int, Any] | None = {} if (frozen_encoder and cache_features) else None
    tokenizer = model.tokenizer
    running: dict[str, float] = {"loss": 0.0, "bce": 0.0, "dice": 0.0, "n": 0}
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    started = time.time()
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    while step < end:
        order = epoch_order(len(samples), seed, epoch, samples.image_ids if group_by_image else None)
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        usable = len(batches) - len(batches) % grad_accum
        loader = torch.utils.data.DataLoader(samples, batch_sampler=batches[cursor:usable], collate_fn=collate,
                                             num_workers=num_workers, pin_memory=device.type == "cuda")
        micro = 0
        for batch in loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                features = _encode_images(model, batch, device, frozen_encoder, cache)
                ids, attention = tokenize(tokenizer, batch["prompts"], model.max_text_tokens)
                image_index = batch["image_index"].to(device)
                beit = batch["beit"].to(device, non_blocking=True).index_select(0, image_index)
                tokens = model.encode_prompts(beit, ids.to(device), attention.to(device))
                low_res, _ = model.decode_masks(features, tokens, image_index)
            bce, dice = mask_losses(low_res.float(), batch, model.sam_image_size)
            loss = bce_weight * bce + dice_weight * dice
            (loss / grad_accum).backward()
            running["loss"] += loss.item()
            running["bce"] += bce.item()
            running["dice"] += dice.item()
            running["n"] += 1
            cursor += 1
            micro += 1
            if micro % grad_accum:
                continue
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % log_every == 0 or step == total_steps:
                n = running.pop("n")
                entry = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                         **{k: v / n for k, v in running.items()}, "elapsed_s": time.time() - started}
                history["train"].append(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
                running = {"loss": 0.0, "bce": 0.0, "dice": 0.0, "n": 0}
            if save_every and step % save_every == 0:
                save_state()
            if time_limit_s is not None and time.time() - started > time_limit_s:
                end = step
            if step >= end:
                break
        if step < end or cursor >= usable:
            epoch, cursor = epoch + 1, 0
            if step < end and val_set is not None:
                _record_val(history, model, val_set, step, epoch, val_images_per_batch)
                save_state()
    bar.close()
    if val_set is not None and (not history["val"] or history["val"][-1]["step"] != step):
        _record_val(history, model, val_set, step, epoch, val_images_per_batch)
    save_state()

    final = history["val"][-1] if history["val"] else {}
    model.eval()
    target_dtype = parse_dtype(save_dtype)
    if target_dtype != torch.float32:
        model.to(target_dtype)
    save_checkpoint(model, out)
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1))
    plot_curves(history, out / CURVES_FILE)
    return TrainResult(out, step, history, {k: v for k, v in final.items() if k in ("ciou", "giou")})


def _record_val(history: dict[str, list[dict[str, float]]], model: Any, dataset: SampleDataset, step: int,
                epoch: int, images_per_batch: int) -> None:
    result = validate(model, dataset, "val", images_per_batch)
    if result:
        history["val"].append({"step": step, "epoch": epoch, **result})
