"""Training on `ResidentData` (preprocessed tensors already on the GPU): the from-scratch demo-model recipe.

Each step samples expressions uniformly, gathers their images' SAM and BEiT-3 inputs and bit-packed masks from GPU
tensors and runs the model; nothing else happens on the CPU, so the GPU stays busy (the file-based `evf_sam.train`
decodes and preprocesses every sample on the CPU). Losses as in `evf_sam.train` (BCE-with-logits + Dice), computed
in the S x S SAM frame the masks were resized into, plus an optional MSE on the decoder's IoU head against the
IoU the mask actually reached, so `Prediction.score` means something.

From scratch, the text reaches the mask only through BEiT-3's single [CLS] token, and that grounding signal is
weak: the decoder first learns to segment "some shape" and the model stalls picking the wrong one (demo run 1 in
docs/MODELS.md). An auxiliary head (training only, not part of the checkpoint) therefore predicts the target's
mask from BEiT-3's patch tokens of an intermediate layer, giving the fused encoder a dense grounding loss; the last
layer's [CLS] can then read the located target.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from evf_sam.data.resident import ResidentData
from evf_sam.train import dice_loss, lr_factor


@dataclass
class ResidentRecipe:
    """Optimiser and loss settings of `train_resident`."""

    steps: int
    batch_size: int = 128
    lr: float = 6e-4
    weight_decay: float = 0.05
    warmup: int = 500
    min_lr_ratio: float = 0.02
    bce_weight: float = 2.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    aux_weight: float = 1.0
    aux_layer: int = -2
    clip_grad: float = 1.0
    seed: int = 0
    bf16: bool = True


@dataclass
class ResidentHistory:
    """Logged training losses and validation metrics (same shape as `evf_sam.train`'s history)."""

    train: list[dict[str, float]] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[dict[str, float]]]:
        return {"train": self.train, "val": self.val}


def tokenize_all(model: Any, texts: list[str], device: torch.device, chunk: int = 4096) -> tuple[torch.Tensor, ...]:
    """Token ids and attention masks [M,L] of every text, padded to the longest, on `device`."""
    from evf_sam.transforms import tokenize

    parts = [tokenize(model.tokenizer, texts[i:i + chunk], model.max_text_tokens) for i in range(0, len(texts), chunk)]
    length = max(ids.shape[1] for ids, _ in parts)
    pad = model.tokenizer.pad_token_id
    ids = torch.cat([F.pad(i, (0, length - i.shape[1]), value=pad) for i, _ in parts])
    attention = torch.cat([F.pad(a, (0, length - a.shape[1]), value=0) for _, a in parts])
    return ids.to(device), attention.to(device)


class GroundingHead(torch.nn.Module):
    """LayerNorm + Linear on BEiT-3 patch tokens -> one target logit per patch (the auxiliary loss; not saved).

    Captures the image tokens of encoder layer `layer` with a forward hook while attached to `model`."""

    def __init__(self, model: Any, layer: int) -> None:
        super().__init__()
        beit3 = model.mm_extractor.beit3
        dim = beit3.text_embed.embedding_dim
        self.grid = beit3.vision_embed.img_size // beit3.vision_embed.proj.kernel_size[0]
        self.head = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 1))
        self.captured: torch.Tensor | None = None
        self.hook = beit3.encoder.layers[layer].register_forward_hook(self._capture)

    def _capture(self, module: Any, inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.captured = output[0]

    def forward(self) -> torch.Tensor:
        """Logits [T,g,g] of the last captured forward pass."""
        patches = self.captured[:, 1:1 + self.grid * self.grid]
        return self.head(patches).reshape(-1, self.grid, self.grid).float()


def grid_targets(data: ResidentData, rows: torch.Tensor, images: torch.Tensor, grid: int) -> torch.Tensor:
    """Ground truth of `rows` as BEiT-3 sees its image (the unpadded content stretched to a square), averaged
    onto a `grid` x `grid` patch grid: float [T,g,g] in [0,1]."""
    target = data.mask_targets(rows)[:, None]
    size = data.sam_size
    shapes = data.shapes.index_select(0, images).to(target.device).float() / size
    theta = torch.zeros(len(rows), 2, 3, device=target.device)
    theta[:, 0, 0], theta[:, 0, 2] = shapes[:, 1], shapes[:, 1] - 1
    theta[:, 1, 1], theta[:, 1, 2] = shapes[:, 0], shapes[:, 0] - 1
    sample = F.affine_grid(theta, [len(rows), 1, 4 * grid, 4 * grid], align_corners=False)
    return F.avg_pool2d(F.grid_sample(target, sample, mode="bilinear", align_corners=False), 4)[:, 0]


def step_losses(model: Any, data: ResidentData, ids: torch.Tensor, attention: torch.Tensor, rows: torch.Tensor,
                recipe: ResidentRecipe, grounding: GroundingHead | None = None) -> dict[str, torch.Tensor]:
    """Forward the expressions `rows` and return their losses (`loss` is the weighted total)."""
    images = data.image_of.index_select(0, rows).long()
    device = rows.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16 and device.type == "cuda"):
        features = model.encode_images(data.sam_pixels(images))
        tokens = model.encode_prompts(data.beit.index_select(0, images).float(), ids.index_select(0, rows),
                                      attention.index_select(0, rows))
        low_res, predicted_iou = model.decode_masks(features, tokens, torch.arange(len(rows), device=device))
        aux_logits = grounding() if grounding is not None else None
    size = data.sam_size
    logits = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)[:, 0]
    target = data.mask_targets(rows)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    dice = dice_loss(logits, target)
    with torch.no_grad():
        hit = logits > 0
        truth = target > 0.5
        union = (hit | truth).flatten(1).sum(1)
        reached = torch.where(union > 0, (hit & truth).flatten(1).sum(1) / union.clamp(min=1), torch.ones_like(bce))
    iou = F.mse_loss(predicted_iou.float(), reached)
    loss = recipe.bce_weight * bce + recipe.dice_weight * dice + recipe.iou_weight * iou
    losses = {"bce": bce, "dice": dice, "iou_mse": iou, "iou": reached.mean()}
    if aux_logits is not None:
        aux_target = grid_targets(data, rows, images, grounding.grid)
        losses["aux"] = (F.binary_cross_entropy_with_logits(aux_logits, aux_target)
                         + dice_loss(aux_logits, aux_target))
        loss = loss + recipe.aux_weight * losses["aux"]
    return {"loss": loss, **losses}


def train_resident(model: Any, data: ResidentData, recipe: ResidentRecipe, *,
                   validate: Callable[[Any], dict[str, float]] | None = None, val_every: int = 1000,
                   log_every: int = 50, time_limit_s: float | None = None, progress: bool = True) -> ResidentHistory:
    """Train every parameter of `model` (on `data`'s device) for `recipe.steps` AdamW steps with warm-up + cosine.

    `validate(model)` runs every `val_every` steps and at the end; `time_limit_s` ends early (the schedule is not
    stretched: a run cut short ends at a higher learning rate). Returns the history; the model is left in eval mode.
    """
    from tqdm.auto import tqdm

    device = data.sam.device
    torch.manual_seed(recipe.seed)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    ids, attention = tokenize_all(model, data.texts, device)
    grounding = GroundingHead(model, recipe.aux_layer).to(device) if recipe.aux_weight > 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(grounding.parameters()) if grounding is not None else []
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, recipe.warmup, recipe.steps, recipe.min_lr_ratio))
    history = ResidentHistory()
    totals: dict[str, torch.Tensor] = {}
    started = time.time()
    model.train()
    bar = tqdm(total=recipe.steps, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    step = 0
    while step < recipe.steps:
        rows = torch.randint(len(data), (recipe.batch_size,), device=device, generator=generator)
        losses = step_losses(model, data, ids, attention, rows, recipe, grounding)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0) + value.detach()
        out_of_time = time_limit_s is not None and time.time() - started > time_limit_s
        if step % log_every == 0 or step == recipe.steps or out_of_time:
            count = step - (history.train[-1]["step"] if history.train else 0)
            entry = {"step": step, "lr": scheduler.get_last_lr()[0], "elapsed_s": time.time() - started,
                     **{k: float(v) / count for k, v in totals.items()}}
            history.train.append(entry)
            bar.set_postfix(loss=f"{entry['loss']:.4f}", iou=f"{entry['iou']:.3f}")
            totals = {}
        if validate is not None and (step % val_every == 0 or step == recipe.steps or out_of_time):
            model.eval()
            history.val.append({"step": step, "elapsed_s": time.time() - started, **validate(model)})
            model.train()
            print(f"step {step}: validation {history.val[-1]}", flush=True)
        if out_of_time:
            break
    bar.close()
    if grounding is not None:
        grounding.hook.remove()
    model.eval()
    return history
