"""EvfPredictor: text prompts -> masks, with batching and an image-embedding cache.

One call takes several images, each with several prompts. Images are decoded and hashed by content; embeddings of
images seen before come from an LRU cache kept on the model's device, the others are encoded in batches. BEiT-3 then
runs once over all prompts of the call (right-padded with an attention mask), the mask decoder once over all prompts
(each gathering its image's embedding), and the logits go back to every image's original size in float32.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from evf_sam.errors import ImageError, PromptError
from evf_sam.modeling.common import ImageFeatures
from evf_sam.transforms import (ImageInput, beit_input, check_prompts, load_image, postprocess_logits, sam_input,
                                sam_mode, tokenize)


@dataclass(frozen=True, eq=False)
class Prediction:
    """The answer to one prompt: `mask` bool [H,W] and `logits` float32 [H,W] at the (EXIF-transposed) original
    size, with `mask == logits > 0`; `score` is the decoder's predicted IoU."""

    mask: np.ndarray
    logits: np.ndarray
    score: float


@dataclass(frozen=True)
class CacheStats:
    """Image-embedding cache counters: lookups that found (`hits`) or missed (`misses`) an image, current `size`
    and `capacity` (images)."""

    hits: int
    misses: int
    size: int
    capacity: int


@dataclass
class _Encoded:
    """What is kept per image: SAM features (batch of 1) and the BEiT-3 pixels [3,224,224], on the model device."""

    features: ImageFeatures
    beit_pixels: torch.Tensor
    resize_shape: tuple[int, int] | None


def image_key(image: np.ndarray) -> str:
    """Content hash of a decoded uint8 image: blake2b over its shape and pixel bytes."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class EvfPredictor:
    """Predict masks for text prompts with a loaded EvfSamModel / EvfSam2Model.

    `cache_size` images keep their embeddings (0 disables the cache); at most `max_image_batch` images go through
    the image encoder at once and at most `max_prompt_batch` prompts through BEiT-3 and the decoder.
    `preprocess_device` None runs preprocessing on the CPU (the reference path); "model" runs its float steps on the
    model's device (uint8 uploads, faster for large images on a GPU; equal up to float rounding of the resizes).
    Calls are serialised by a lock, so one predictor may be shared by threads.
    """

    def __init__(self, model: Any, cache_size: int = 32, max_image_batch: int = 8, max_prompt_batch: int = 64,
                 preprocess_device: str | None = None) -> None:
        if cache_size < 0 or max_image_batch < 1 or max_prompt_batch < 1:
            raise ValueError("cache_size must be >= 0, max_image_batch and max_prompt_batch >= 1")
        if preprocess_device not in (None, "model"):
            raise ValueError(f"preprocess_device must be None or 'model', got {preprocess_device!r}")
        if getattr(model, "tokenizer", None) is None:
            raise ValueError("the model has no tokenizer attached: load it with evf_sam.load_model")
        self.model = model
        self.cache_size = cache_size
        self.max_image_batch = max_image_batch
        self.max_prompt_batch = max_prompt_batch
        self.preprocess_device = preprocess_device
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def cache_stats(self) -> CacheStats:
        """Hit/miss counters since creation (or the last `clear_cache`) and the cache fill."""
        return CacheStats(self._hits, self._misses, len(self._cache), self.cache_size)

    def clear_cache(self) -> None:
        """Drop every cached embedding and reset the counters."""
        with self._lock:
            self._cache.clear()
            self._hits = self._misses = 0

    def predict(self, image: ImageInput, prompts: Sequence[str], semantic: bool = False) -> list[Prediction]:
        """One image (path, PIL image or uint8 RGB array [H,W,3]) and its prompts -> one Prediction per prompt."""
        return self.predict_batch([(image, prompts)], semantic=semantic)[0]

    def predict_batch(self, items: Sequence[tuple[ImageInput, Sequence[str]]],
                      semantic: bool = False) -> list[list[Prediction]]:
        """[(image, prompts), ...] -> for each item, one Prediction per prompt, in order.

        Same masks as calling `predict` per item. `semantic` prefixes every prompt with "[semantic] "
        (multitask checkpoints only). Raises ImageError / PromptError naming the offending item.
        """
        images, prompt_lists = self._check_items(items)
        model = self.model
        input_ids, attention_mask = tokenize(model.tokenizer, [p for plist in prompt_lists for p in plist],
                                             model.max_text_tokens, semantic=semantic, multitask=model.is_multitask)
        keys = [image_key(image) for image in images]
        with self._lock:
            return self._predict(images, keys, prompt_lists, input_ids, attention_mask)

    def _predict(self, images: list[np.ndarray], keys: list[str], prompt_lists: list[list[str]],
                 input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[Prediction]]:
        model = self.model
        with torch.inference_mode():
            encoded = self._encode_images(images, keys)
            unique = list(encoded)
            image_index = torch.tensor([unique.index(key) for key, plist in zip(keys, prompt_lists) for _ in plist],
                                       dtype=torch.long, device=self.device)
            features = ImageFeatures.cat([encoded[key].features for key in unique])
            beit = torch.stack([encoded[key].beit_pixels for key in unique])
            low_res, scores = [], []
            for start in range(0, input_ids.shape[0], self.max_prompt_batch):
                rows = slice(start, start + self.max_prompt_batch)
                length = int(attention_mask[rows].sum(dim=1).max())
                tokens = model.encode_prompts(beit.index_select(0, image_index[rows]),
                                              input_ids[rows, :length].to(self.device),
                                              attention_mask[rows, :length].to(self.device))
                logits, score = model.decode_masks(features, tokens, image_index[rows])
                low_res.append(logits)
                scores.append(score)
            low = torch.cat(low_res)
            score_list = torch.cat(scores).float().cpu().tolist()

            results, start = [], 0
            for image, key, plist in zip(images, keys, prompt_lists):
                rows = slice(start, start + len(plist))
                full = postprocess_logits(low[rows], image.shape[:2], model.sam_image_size,
                                          encoded[key].resize_shape).cpu().numpy()
                results.append([Prediction(mask=full[i] > 0, logits=full[i], score=score_list[start + i])
                                for i in range(len(plist))])
                start += len(plist)
        return results

    def _check_items(self, items: Sequence[tuple[ImageInput, Sequence[str]]]) -> tuple[list[np.ndarray],
                                                                                        list[list[str]]]:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
            raise PromptError("predict_batch needs a non-empty list of (image, prompts) pairs")
        images, prompt_lists = [], []
        for number, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise PromptError(f"item {number} must be an (image, prompts) pair")
            image, prompts = item
            try:
                prompt_lists.append(check_prompts(prompts))
                images.append(load_image(image))
            except (ImageError, PromptError) as error:
                raise type(error)(f"item {number}: {error}" if len(items) > 1 else str(error)) from error
        return images, prompt_lists

    def _encode_images(self, images: list[np.ndarray], keys: list[str]) -> dict[str, _Encoded]:
        """Embeddings of the distinct images (in first-seen order): cached ones reused, the rest encoded in batches."""
        found: dict[str, _Encoded | None] = {}
        for key in keys:
            if key in found:
                continue
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self._hits += 1
            else:
                self._misses += 1
            found[key] = entry
        missing = [(key, images[keys.index(key)]) for key, entry in found.items() if entry is None]
        for start in range(0, len(missing), self.max_image_batch):
            found.update(self._encode_batch(missing[start:start + self.max_image_batch]))
        for key, entry in found.items():
            self._remember(key, entry)
        return found  # type: ignore[return-value]

    def _encode_batch(self, batch: list[tuple[str, np.ndarray]]) -> dict[str, _Encoded]:
        model, device, dtype = self.model, self.device, self.dtype
        where = device if self.preprocess_device == "model" else None
        mode = sam_mode(model)
        sam_inputs = [sam_input(image, model.sam_image_size, mode, device=where) for _, image in batch]
        pixels = torch.stack([s.pixels for s in sam_inputs]).to(device=device, dtype=dtype)
        # Kept in the model dtype: SAM-2's FPN returns float32 even for bf16/fp16 weights.
        features = model.encode_images(pixels).to(dtype=dtype)
        encoded = {}
        for row, ((key, image), prepared) in enumerate(zip(batch, sam_inputs)):
            beit = beit_input(image, model.beit_image_size, device=where).to(device=device, dtype=dtype)
            index = torch.tensor([row], device=features.embeddings.device)
            encoded[key] = _Encoded(features.select(index), beit, prepared.resize_shape)
        return encoded

    def _remember(self, key: str, entry: _Encoded) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
