"""Training on `ResidentData` (preprocessed tensors already on the GPU): the from-scratch demo-model recipe.

Each step samples expressions, gathers their images' SAM and BEiT-3 inputs and bit-packed masks from GPU tensors and
runs the model; nothing else happens on the CPU, so the GPU stays busy (the file-based `evf_sam.train` decodes and
preprocesses every sample on the CPU). Losses as in `evf_sam.train` (BCE-with-logits + Dice), computed in the S x S
SAM frame the masks were resized into, plus an optional MSE on the decoder's IoU head against the IoU the mask
actually reached, so `Prediction.score` means something.

From scratch, the text reaches the mask only through BEiT-3's single [CLS] token, and that grounding signal is weak:
the decoder first learns to segment "some shape" and the model stalls picking the wrong one (docs/MODELS.md).
`GroundingHeads` (training only, not part of the checkpoint) give the fused encoder dense grounding losses on a
coarse patch grid: one predicts the target from BEiT-3's patch tokens of an intermediate layer, one from the
projected prompt token the mask decoder receives (so that token must carry where the target is). With
`grounding_only` the SAM image encoder and decoder are skipped: a cheap pre-training of BEiT-3 + projector. A
curriculum can restrict the first steps to some expression kinds (e.g. attributes before spatial relations).
With a `SyntheticStream`, fresh images replace the oldest ones in the pool while training runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from evf_sam.data.resident import ResidentData
from evf_sam.data.stream import SyntheticStream
from evf_sam.losses import dice_loss
from evf_sam.train import cosine_factor, lr_factor


@dataclass
class ResidentRecipe:
    """Optimiser, loss and schedule settings of `train_resident`."""

    steps: int  # 0: as many as fit `train_resident`'s time limit, the schedule following elapsed time
    batch_size: int = 128
    lr: float = 6e-4
    weight_decay: float = 0.05
    warmup: int = 500
    min_lr_ratio: float = 0.02
    bce_weight: float = 2.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    aux_weight: float = 1.0  # patch grounding from BEiT-3 layer `aux_layer`
    aux_layer: int = -2
    prompt_grid_weight: float = 0.0  # coarse target mask from the projected prompt token
    grounding_only: bool = False  # BEiT-3 + projector only (grounding losses), no SAM
    curriculum: float = 0.0  # fraction of training (steps, or time) on `curriculum_kinds` only
    curriculum_kinds: tuple[str, ...] = ("attribute", "semantic")
    compile: bool = False  # torch.compile the SAM image encoder and the BEiT-3 layers (CUDA)
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


def tokenize_all(model: Any, texts: list[str], device: torch.device, chunk: int = 4096,
                 length: int = 0) -> tuple[torch.Tensor, ...]:
    """Token ids and attention masks [M,L] of every text, padded to the longest (at least `length`), on `device`."""
    from evf_sam.transforms import tokenize

    parts = [tokenize(model.tokenizer, texts[i:i + chunk], model.max_text_tokens) for i in range(0, len(texts), chunk)]
    length = max([length] + [ids.shape[1] for ids, _ in parts])
    pad = model.tokenizer.pad_token_id
    ids = torch.cat([F.pad(i, (0, length - i.shape[1]), value=pad) for i, _ in parts])
    attention = torch.cat([F.pad(a, (0, length - a.shape[1]), value=0) for _, a in parts])
    return ids.to(device), attention.to(device)


def _retokenize(model: Any, data: ResidentData, rows: torch.Tensor, ids: torch.Tensor,
                attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids`/`attention` with expression `rows` tokenized again from `data.texts` (widened if a new text is longer)."""
    new_ids, new_attention = tokenize_all(model, [data.texts[row] for row in rows.tolist()], ids.device,
                                          length=ids.shape[1])
    if new_ids.shape[1] > ids.shape[1]:
        extra = new_ids.shape[1] - ids.shape[1]
        ids = F.pad(ids, (0, extra), value=model.tokenizer.pad_token_id)
        attention = F.pad(attention, (0, extra), value=0)
    ids.index_copy_(0, rows, new_ids)
    attention.index_copy_(0, rows, new_attention)
    return ids, attention


def _kind_rows(data: ResidentData, kinds: tuple[str, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([i for i, kind in enumerate(data.kinds) if kind in kinds], dtype=torch.long, device=device)


class GroundingHeads(torch.nn.Module):
    """Training-only heads that predict the target on BEiT-3's g x g patch grid (not saved with the model).

    `patch`: LayerNorm + Linear on each patch token of an encoder layer -> one logit per patch;
    `prompt`: MLP on the projected prompt token the mask decoder receives -> g*g logits."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        beit3 = model.mm_extractor.beit3
        dim = beit3.text_embed.embedding_dim
        out_dim = model.text_hidden_fcs[0][-1].out_features
        self.grid = beit3.vision_embed.img_size // beit3.vision_embed.proj.kernel_size[0]
        self.patch = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 1))
        self.prompt = torch.nn.Sequential(torch.nn.Linear(out_dim, out_dim), torch.nn.GELU(),
                                          torch.nn.Linear(out_dim, self.grid * self.grid))

    def patch_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tokens [T,1+P+L,D] of an encoder layer -> logits [T,g,g]."""
        patches = hidden[:, 1:1 + self.grid * self.grid]
        return self.patch(patches).reshape(-1, self.grid, self.grid).float()

    def prompt_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prompt tokens [T,1,C] -> logits [T,g,g]."""
        return self.prompt(tokens[:, 0]).reshape(-1, self.grid, self.grid).float()


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


def _grid_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target) + dice_loss(logits, target)


def step_losses(model: Any, data: ResidentData, ids: torch.Tensor, attention: torch.Tensor, rows: torch.Tensor,
                recipe: ResidentRecipe, heads: GroundingHeads | None = None) -> dict[str, torch.Tensor]:
    """Forward the expressions `rows` and return their losses (`loss` is the weighted total)."""
    images = data.image_of.index_select(0, rows).long()
    device = rows.device
    beit3 = model.mm_extractor.beit3
    weight = model.text_hidden_fcs[0][0].weight
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16 and device.type == "cuda"):
        out, hidden = beit3.forward_with_hidden(data.beit.index_select(0, images).to(weight.dtype),
                                                ids.index_select(0, rows), attention.index_select(0, rows),
                                                layer=recipe.aux_layer if recipe.aux_weight > 0 else None)
        tokens = model.text_hidden_fcs[0](out[:, :1])
        patch_logits = heads.patch_logits(hidden) if hidden is not None and heads is not None else None
        prompt_logits = heads.prompt_logits(tokens) if recipe.prompt_grid_weight > 0 and heads is not None else None
        if not recipe.grounding_only:
            features = model.encode_images(data.sam_pixels(images))
            low_res, predicted_iou = model.decode_masks(features, tokens, torch.arange(len(rows), device=device))
    losses: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=device)
    if not recipe.grounding_only:
        size = data.sam_size
        logits = F.interpolate(low_res.float(), (size, size), mode="bilinear", align_corners=False)[:, 0]
        target = data.mask_targets(rows)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        dice = dice_loss(logits, target)
        with torch.no_grad():
            reached = _iou(logits > 0, target > 0.5)
        iou = F.mse_loss(predicted_iou.float(), reached)
        loss = recipe.bce_weight * bce + recipe.dice_weight * dice + recipe.iou_weight * iou
        losses.update(bce=bce, dice=dice, iou_mse=iou, iou=reached.mean())
    if patch_logits is not None or prompt_logits is not None:
        grid_target = grid_targets(data, rows, images, heads.grid)
        for name, logits, scale in (("aux", patch_logits, recipe.aux_weight),
                                    ("prompt_grid", prompt_logits, recipe.prompt_grid_weight)):
            if logits is not None:
                losses[name] = _grid_loss(logits, grid_target)
                loss = loss + scale * losses[name]
                with torch.no_grad():
                    losses[f"{name}_iou"] = _iou(logits > 0, grid_target > 0.5).mean()
    return {"loss": loss, **losses}


def _iou(hit: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-row IoU of boolean maps [T,...] (1 where both are empty)."""
    union = (hit | truth).flatten(1).sum(1)
    inter = (hit & truth).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union, dtype=torch.float32))


def _time_factor(elapsed: float, limit: float, step: int, recipe: ResidentRecipe) -> float:
    """Learning-rate factor of a run that fills `limit` seconds: linear warm-up over `recipe.warmup` steps, then
    cosine decay to `recipe.min_lr_ratio` by elapsed time."""
    if step < recipe.warmup:
        return (step + 1) / recipe.warmup
    return cosine_factor(elapsed / limit, recipe.min_lr_ratio)


def _compile(model: Any) -> None:
    """Compile the SAM image encoder and each BEiT-3 layer for their fixed training shapes (each layer instance and
    batch size is its own graph, hence the larger cache)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model.visual_model.image_encoder.compile(dynamic=False)
    for layer in model.mm_extractor.beit3.encoder.layers:
        layer.compile(dynamic=False)


def train_resident(model: Any, data: ResidentData, recipe: ResidentRecipe, *,
                   validate: Callable[[Any], dict[str, float]] | None = None, val_every: int = 1000,
                   log_every: int = 50, time_limit_s: float | None = None, progress: bool = True,
                   stream: SyntheticStream | None = None, refresh_every: int = 10) -> ResidentHistory:
    """Train `model` (on `data`'s device) for `recipe.steps` AdamW steps with warm-up + cosine: every parameter,
    or only BEiT-3 + projector with `recipe.grounding_only` (the others get no gradient).

    `validate(model)` runs every `val_every` steps and at the end; `time_limit_s` ends early (the schedule is not
    stretched: a run cut short ends at a higher learning rate) unless `recipe.steps` is 0: then the run fills
    `time_limit_s` and warm-up, cosine decay and curriculum follow the elapsed time. With `stream`, finished fresh
    images replace the oldest in `data` every `refresh_every` steps. Returns the history; the model is left in eval
    mode.
    """
    if recipe.steps <= 0 and not time_limit_s:
        raise ValueError("recipe.steps = 0 (fill the time) needs time_limit_s")
    from tqdm.auto import tqdm

    device = data.sam.device
    torch.manual_seed(recipe.seed)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    ids, attention = tokenize_all(model, data.texts, device)
    wants_heads = recipe.aux_weight > 0 or recipe.prompt_grid_weight > 0
    heads = GroundingHeads(model).to(device) if wants_heads else None
    if recipe.compile and device.type == "cuda":
        _compile(model)
    params = [p for p in model.parameters() if p.requires_grad]
    params += list(heads.parameters()) if heads is not None else []
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    everything = torch.arange(len(data), device=device)
    early = _kind_rows(data, recipe.curriculum_kinds, device)
    if recipe.curriculum and not len(early):
        raise ValueError(f"no expressions of the curriculum kinds {recipe.curriculum_kinds} in the data")
    history = ResidentHistory()
    totals: dict[str, torch.Tensor] = {}
    started = time.time()
    model.train()
    by_time = recipe.steps <= 0
    bar = tqdm(total=None if by_time else recipe.steps, desc="train", unit="step", disable=not progress,
               dynamic_ncols=True)
    step, progress_done, lr = 0, 0.0, 0.0
    while progress_done < 1.0:
        if stream is not None and step % refresh_every == 0:
            fresh = stream.refresh(data)
            if len(fresh):
                ids, attention = _retokenize(model, data, fresh, ids, attention)
                if progress_done < recipe.curriculum:
                    early = _kind_rows(data, recipe.curriculum_kinds, device)
        pool = early if progress_done < recipe.curriculum else everything
        rows = pool[torch.randint(len(pool), (recipe.batch_size,), device=device, generator=generator)]
        if by_time:
            lr = recipe.lr * _time_factor(time.time() - started, time_limit_s, step, recipe)
        else:
            lr = recipe.lr * lr_factor(step, recipe.warmup, recipe.steps, recipe.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = step_losses(model, data, ids, attention, rows, recipe, heads)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        elapsed = time.time() - started
        progress_done = elapsed / time_limit_s if by_time else step / recipe.steps
        out_of_time = not by_time and time_limit_s is not None and elapsed > time_limit_s
        finished = progress_done >= 1.0 or out_of_time
        for key, value in losses.items():
            totals[key] = totals.get(key, 0) + value.detach()
        if step % log_every == 0 or finished:
            count = step - (history.train[-1]["step"] if history.train else 0)
            entry = {"step": step, "lr": lr, "elapsed_s": time.time() - started,
                     **{k: float(v) / count for k, v in totals.items()}}
            if stream is not None:
                entry["fresh_images"] = stream.rendered
            history.train.append(entry)
            shown = ("loss", "iou", "aux_iou", "prompt_grid_iou")
            bar.set_postfix({**{k: f"{entry[k]:.3f}" for k in shown if k in entry},
                             **({"fresh": entry["fresh_images"]} if stream is not None else {})})
            totals = {}
        if validate is not None and (step % val_every == 0 or finished):
            model.eval()
            history.val.append({"step": step, "elapsed_s": time.time() - started, **validate(model)})
            model.train()
            print(f"step {step}: validation {history.val[-1]}", flush=True)
        if out_of_time:
            break
    bar.close()
    model.eval()
    return history
