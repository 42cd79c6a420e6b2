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

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from evf_sam.data.layout import LayoutDataset, Record, SampleDataset
from evf_sam.evaluate import evaluate_dataset, prompt_text
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


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Mean over masks of 1 - (2 Σ p t + eps) / (Σ p + Σ t + eps), p = sigmoid(logits); [N,H,W] inputs."""
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    numerator = 2 * (prob * target).sum(1) + eps
    return (1 - numerator / (prob.sum(1) + target.sum(1) + eps)).mean()


def mask_losses(low_res: torch.Tensor, batch: dict[str, Any], sam_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) of low-res logits [T,1,h,w] against the full-size masks, upsampled as at inference.

    Prompts are grouped by (original size, resize shape) so each group is upsampled in one call; each loss is the
    mean over prompts (BCE: mean over pixels first).
    """
    from evf_sam.transforms import postprocess_logits

    groups: dict[tuple, list[int]] = {}
    for row, key in enumerate(zip(batch["original_size"], batch["resize_shape"])):
        groups.setdefault(key, []).append(row)
    bce = low_res.new_zeros(())
    dice = low_res.new_zeros(())
    for (size, resize), rows in groups.items():
        index = torch.tensor(rows, device=low_res.device)
        logits = postprocess_logits(low_res.index_select(0, index), size, sam_size, resize)
        target = torch.stack([batch["masks"][r] for r in rows]).to(logits.device, torch.float32)
        bce = bce + F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2)).sum()
        dice = dice + dice_loss(logits, target) * len(rows)
    count = low_res.shape[0]
    return bce / count, dice / count


# ---------------------------------------------------------------------------------------------------- data


class PromptSamples(torch.utils.data.Dataset):
    """(image, expression) records of a SampleDataset as model inputs, preprocessed by `evf_sam.transforms`."""

    def __init__(self, dataset: SampleDataset, sam_size: int, sam_mode: str, beit_size: int,
                 multitask: bool, preload: bool = False) -> None:
        self.dataset = dataset
        self.sam_size, self.sam_mode, self.beit_size, self.multitask = sam_size, sam_mode, beit_size, multitask
        paths = [str(dataset.image_path(r)) for r in dataset.records]
        ids = {p: i for i, p in enumerate(dict.fromkeys(paths))}
        self.image_ids = [ids[p] for p in paths]
        self.preload = preload
        self._images: dict[int, tuple[Any, torch.Tensor]] = {}
        self._masks: dict[int, torch.Tensor] = {}
        self._last: tuple[int, tuple[Any, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _image(self, index: int) -> tuple[Any, torch.Tensor]:
        from evf_sam.transforms import beit_input, load_image, sam_input

        image_id = self.image_ids[index]
        if image_id in self._images:
            return self._images[image_id]
        if self._last is not None and self._last[0] == image_id:  # consecutive expressions of one image
            return self._last[1]
        image = load_image(self.dataset.load_image(self.dataset.records[index]))
        prepared = (sam_input(image, self.sam_size, self.sam_mode), beit_input(image, self.beit_size))
        if self.preload:
            self._images[image_id] = prepared
        self._last = (image_id, prepared)
        return prepared

    def _mask(self, index: int) -> torch.Tensor:
        if index not in self._masks:
            mask = torch.from_numpy(self.dataset.load_mask(self.dataset.records[index]).astype(np.uint8))
            if not self.preload:
                return mask
            self._masks[index] = mask
        return self._masks[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        record: Record = self.dataset.records[index]
        prepared, beit = self._image(index)
        mask = self._mask(index)
        if tuple(mask.shape) != prepared.original_size:
            raise ValueError(f"mask of {record.prompt!r} is {tuple(mask.shape)}, its image {prepared.original_size}")
        return {"pixels": prepared.pixels, "beit": beit, "mask": mask, "prompt": prompt_text(record, self.multitask),
                "image_id": self.image_ids[index], "original_size": prepared.original_size,
                "resize_shape": prepared.resize_shape}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples -> one batch: distinct images once (`pixels`, `beit`, `image_ids`), per prompt `image_index`."""
    unique: dict[int, int] = {}
    pixels, beit = [], []
    for s in samples:
        if s["image_id"] not in unique:
            unique[s["image_id"]] = len(unique)
            pixels.append(s["pixels"])
            beit.append(s["beit"])
    return {"pixels": torch.stack(pixels), "image_ids": list(unique),
            "image_index": torch.tensor([unique[s["image_id"]] for s in samples], dtype=torch.long),
            "beit": torch.stack(beit), "prompts": [s["prompt"] for s in samples],
            "masks": [s["mask"] for s in samples], "original_size": [s["original_size"] for s in samples],
            "resize_shape": [s["resize_shape"] for s in samples]}


def epoch_order(size: int, seed: int, epoch: int, groups: Sequence[int] | None = None) -> list[int]:
    """The sample order of `epoch`, a function of (seed, epoch) only, so resuming reproduces it.

    With `groups` (a group id per sample, e.g. its image), whole groups are shuffled and each group's samples stay
    together: a batch then holds all expressions of fewer images, so each image is preprocessed and encoded once.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if groups is None:
        return torch.randperm(size, generator=generator).tolist()
    members: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    keys = list(members)
    return [i for g in torch.randperm(len(keys), generator=generator).tolist() for i in members[keys[g]]]


# ---------------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


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
        metrics = evaluate_dataset(EvfPredictor(model, cache_size=0, max_image_batch=images_per_batch), dataset,
                                   name, SplitMetrics(), images_per_batch)
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
    train_set = _concat([LayoutDataset(root, train_split) for root in roots])
    if len(train_set) == 0:
        raise ValueError(f"no training records in {[str(r) for r in roots]} (split {train_split!r})")
    val_set = None
    if val_split is not None or val_data is not None:
        val_set = _concat([LayoutDataset(val_data, val_split)] if val_data is not None
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


class _Concat(SampleDataset):
    """Several layout datasets read as one (records keep their own roots)."""

    def __init__(self, parts: Sequence[LayoutDataset]) -> None:
        self.parts = list(parts)
        self.records = [r for p in self.parts for r in p.records]
        self._owner = {id(r): p for p in self.parts for r in p.records}

    def _part(self, record: Record) -> LayoutDataset:
        return self._owner[id(record)]

    def image_path(self, record: Record) -> Path:
        return self._part(record).image_path(record)

    def load_mask(self, record: Record) -> np.ndarray:
        return self._part(record).load_mask(record)


def _concat(parts: Sequence[LayoutDataset]) -> SampleDataset:
    return parts[0] if len(parts) == 1 else _Concat(parts)


# ---------------------------------------------------------------------------------------------------- CLI


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
