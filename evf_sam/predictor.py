"""EvfPredictor: text prompts -> masks, with batching and an image-embedding cache.

One call takes several images, each with several prompts. Images are decoded and hashed by content; embeddings of
images seen before come from an LRU cache kept on the model's device, the others are encoded in batches. BEiT-3 then
runs once over all prompts of the call (right-padded with an attention mask), the mask decoder once over all prompts
(each gathering its image's embedding) - replayed as CUDA graphs when the model has them (`evf_sam.acceleration`) -
and the logits go back to every image's original size in float32, where they are thresholded on the model's device;
the masks, the scores and (if asked) the logits come to the host in one copy.

The per-image CPU work (decode, content hash, resize, layout, pinning) is `prepare_image`, which any thread may run
while another thread holds the predictor in `predict_batch`; a server prepares images on a thread pool and keeps the
model's thread for the model.
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
from evf_sam.transforms import (ImageInput, beit_float_steps, beit_input, check_prompts, load_image,
                                postprocess_logits, sam_float_steps, sam_host_steps, sam_input, sam_mode, tokenize)


@dataclass(frozen=True, eq=False)
class Prediction:
    """The answer to one prompt: `mask` bool [H,W] and `logits` float32 [H,W] at the (EXIF-transposed) original
    size, with `mask == logits > 0` (`logits` None when the predictor was made with `return_logits=False`);
    `score` is the decoder's predicted IoU."""

    mask: np.ndarray
    logits: np.ndarray | None
    score: float


@dataclass(frozen=True)
class CacheStats:
    """Image-embedding cache counters: lookups that found (`hits`) or missed (`misses`) an image, current `size`
    and `capacity` (images)."""

    hits: int
    misses: int
    size: int
    capacity: int


@dataclass(frozen=True)
class _HostInputs:
    """The CPU part of an image's preprocessing, ready to upload. Reference path: `sam` float32 [3,S,S] and `beit`
    float32 [3,224,224], both final. Device path: `sam` uint8 [3,h,w] (resized, or stretched to S x S for "head")
    and `beit` uint8 [3,H,W] (the image), whose float steps run on the model's device."""

    sam: torch.Tensor
    beit: torch.Tensor
    resize_shape: tuple[int, int] | None

    def pinned(self) -> _HostInputs:
        """The same tensors in page-locked memory, so uploads are asynchronous DMA copies."""
        return _HostInputs(self.sam.pin_memory(), self.beit.pin_memory(), self.resize_shape)


@dataclass(frozen=True, eq=False)
class PreparedImage:
    """An image made ready for `EvfPredictor.predict_batch` by `EvfPredictor.prepare_image`: `image` uint8 RGB
    [H,W,3] (EXIF-transposed), its content `key`, and the CPU part of its preprocessing (None when the embedding was
    cached when it was prepared; should it have been evicted since, the predictor redoes that part itself)."""

    image: np.ndarray
    key: str
    inputs: _HostInputs | None
    recipe: tuple[Any, ...]  # the preprocessing `inputs` were made for (sizes, mode, path, pinning)


@dataclass
class _Encoded:
    """What is kept per image: SAM features (batch of 1) and the BEiT-3 pixels [3,224,224], on the model device."""

    features: ImageFeatures
    beit_pixels: torch.Tensor
    resize_shape: tuple[int, int] | None


_NUMPY_DTYPES = {torch.float32: np.float32, torch.bool: np.bool_}


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
    `return_logits` False leaves `Prediction.logits` None: only masks and scores are copied to the host (a server's
    choice: a quarter of the bytes). Calls are serialised by a lock, so one predictor may be shared by threads.
    """

    def __init__(self, model: Any, cache_size: int = 32, max_image_batch: int = 8, max_prompt_batch: int = 64,
                 preprocess_device: str | None = None, return_logits: bool = True) -> None:
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
        self.return_logits = return_logits
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

    def prepare_image(self, image: ImageInput | PreparedImage) -> PreparedImage:
        """Decode, hash and preprocess the CPU part of one image (path, PIL image or uint8 RGB array [H,W,3]).

        Safe to call from any thread, also while another thread is in `predict_batch`: it takes no lock. Images
        whose embedding is cached skip the preprocessing. Raises ImageError for an unreadable image.
        """
        if isinstance(image, PreparedImage) and image.recipe == self._recipe():
            return image
        array = load_image(image.image if isinstance(image, PreparedImage) else image)
        key = image_key(array)
        return PreparedImage(array, key, None if key in self._cache else self._host_inputs(array), self._recipe())

    def predict(self, image: ImageInput | PreparedImage, prompts: Sequence[str],
                semantic: bool = False) -> list[Prediction]:
        """One image (path, PIL image, uint8 RGB array [H,W,3] or PreparedImage) and its prompts -> one Prediction
        per prompt."""
        return self.predict_batch([(image, prompts)], semantic=semantic)[0]

    def predict_batch(self, items: Sequence[tuple[ImageInput | PreparedImage, Sequence[str]]],
                      semantic: bool = False) -> list[list[Prediction]]:
        """[(image, prompts), ...] -> for each item, one Prediction per prompt, in order.

        Same masks as calling `predict` per item. Images may be PreparedImage (`prepare_image`), so that this call
        does no per-image CPU work beyond uploads. `semantic` prefixes every prompt with "[semantic] "
        (multitask checkpoints only). Raises ImageError / PromptError naming the offending item.
        """
        images, prompt_lists = self._check_items(items)
        model = self.model
        input_ids, attention_mask = tokenize(model.tokenizer, [p for plist in prompt_lists for p in plist],
                                             model.max_text_tokens, semantic=semantic, multitask=model.is_multitask)
        with self._lock:
            return self._predict(images, prompt_lists, input_ids, attention_mask)

    def _predict(self, images: list[PreparedImage], prompt_lists: list[list[str]],
                 input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[Prediction]]:
        model = self.model
        keys = [image.key for image in images]
        with torch.inference_mode():
            encoded = self._encode_images(images)
            unique = list(encoded)
            image_index = torch.tensor([unique.index(key) for key, plist in zip(keys, prompt_lists) for _ in plist],
                                       dtype=torch.long, device=self.device)
            features = ImageFeatures.cat([encoded[key].features for key in unique])
            beit = torch.stack([encoded[key].beit_pixels for key in unique])
            graphs = getattr(model, "prompt_graphs", None)
            if graphs is not None and not graphs.supports(model):
                graphs = None
            low_res, scores = [], []
            for start in range(0, input_ids.shape[0], self.max_prompt_batch):
                rows = slice(start, start + self.max_prompt_batch)
                length = int(attention_mask[rows].sum(dim=1).max())
                ids, mask = input_ids[rows, :length], attention_mask[rows, :length]
                if graphs is not None:
                    logits, score = graphs.run(model, beit, features, image_index[rows], ids, mask,
                                               self.max_prompt_batch)
                else:
                    tokens = model.encode_prompts(beit.index_select(0, image_index[rows]), ids.to(self.device),
                                                  mask.to(self.device))
                    logits, score = model.decode_masks(features, tokens, image_index[rows])
                low_res.append(logits)
                scores.append(score)
            low = torch.cat(low_res)

            full, start = [], 0
            for image, key, plist in zip(images, keys, prompt_lists):
                full.append(postprocess_logits(low[start:start + len(plist)], image.image.shape[:2],
                                               model.sam_image_size, encoded[key].resize_shape))
                start += len(plist)
            # float32 first (see packed_host_copy)
            host = self._to_host([torch.cat(scores).float(), *(full if self.return_logits else []),
                                  *(image_logits > 0 for image_logits in full)])
        score_list = host[0].tolist()
        masks = host[len(host) - len(full):]
        logits_host = host[1:1 + len(full)] if self.return_logits else [None] * len(full)
        results, start = [], 0
        for image_masks, image_logits, plist in zip(masks, logits_host, prompt_lists):
            results.append([Prediction(mask=image_masks[i], logits=None if image_logits is None else image_logits[i],
                                       score=score_list[start + i]) for i in range(len(plist))])
            start += len(plist)
        return results

    def _to_host(self, tensors: list[torch.Tensor]) -> list[np.ndarray]:
        """Result tensors on the model's device -> numpy arrays on the host (from a GPU in one copy)."""
        if self.device.type == "cpu":
            return [tensor.numpy() for tensor in tensors]
        return packed_host_copy(tensors)

    def _check_items(self, items: Sequence[tuple[ImageInput | PreparedImage, Sequence[str]]]
                     ) -> tuple[list[PreparedImage], list[list[str]]]:
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence) or len(items) == 0:
            raise PromptError("predict_batch needs a non-empty list of (image, prompts) pairs")
        images, prompt_lists = [], []
        for number, item in enumerate(items):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise PromptError(f"item {number} must be an (image, prompts) pair")
            image, prompts = item
            try:
                prompt_lists.append(check_prompts(prompts))
                if not isinstance(image, PreparedImage):
                    array = load_image(image)
                    image = PreparedImage(array, image_key(array), None, ())  # preprocessed when not cached
                images.append(image)
            except (ImageError, PromptError) as error:
                raise type(error)(f"item {number}: {error}" if len(items) > 1 else str(error)) from error
        return images, prompt_lists

    def _encode_images(self, images: list[PreparedImage]) -> dict[str, _Encoded]:
        """Embeddings of the distinct images (in first-seen order): cached ones reused, the rest encoded in batches."""
        found: dict[str, _Encoded | None] = {}
        first: dict[str, PreparedImage] = {}
        for image in images:
            if image.key in found:
                continue
            entry = self._cache.get(image.key)
            if entry is not None:
                self._cache.move_to_end(image.key)
                self._hits += 1
            else:
                self._misses += 1
                first[image.key] = image
            found[image.key] = entry
        missing = list(first.values())
        for start in range(0, len(missing), self.max_image_batch):
            found.update(self._encode_batch(missing[start:start + self.max_image_batch]))
        for key, entry in found.items():
            self._remember(key, entry)
        return found  # type: ignore[return-value]

    def _encode_batch(self, batch: list[PreparedImage]) -> dict[str, _Encoded]:
        model, dtype = self.model, self.dtype
        recipe = self._recipe()
        hosts = [image.inputs if image.inputs is not None and image.recipe == recipe else
                 self._host_inputs(image.image) for image in batch]
        inputs = [self._device_inputs(host) for host in hosts]
        pixels = torch.stack([sam for sam, _ in inputs]).to(dtype=dtype)
        # Kept in the model dtype: SAM-2's FPN returns float32 even for bf16/fp16 weights.
        features = model.encode_images(pixels).to(dtype=dtype)
        encoded = {}
        for row, (image, host, (_, beit)) in enumerate(zip(batch, hosts, inputs)):
            index = torch.tensor([row], device=features.embeddings.device)
            encoded[image.key] = _Encoded(features.select(index), beit.to(dtype=dtype), host.resize_shape)
        return encoded

    def _recipe(self) -> tuple[Any, ...]:
        model = self.model
        return (model.sam_image_size, sam_mode(model), model.beit_image_size, self.preprocess_device,
                self.device.type == "cuda")

    def _host_inputs(self, image: np.ndarray) -> _HostInputs:
        """The CPU part of the preprocessing (see _HostInputs), contiguous, pinned for a CUDA model."""
        model = self.model
        size, mode = model.sam_image_size, sam_mode(model)
        if self.preprocess_device is None:
            sam = sam_input(image, size, mode)
            host = _HostInputs(sam.pixels, beit_input(image, model.beit_image_size), sam.resize_shape)
        else:
            pixels, resize_shape = sam_host_steps(image, size, mode)
            host = _HostInputs(pixels.contiguous(), _chw(image).contiguous(), resize_shape)
        return host.pinned() if self.device.type == "cuda" else host

    def _device_inputs(self, host: _HostInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Upload, then (device path) the float steps of transforms.sam_input / beit_input on the model's device:
        the SAM input [3,S,S] and the BEiT-3 input [3,224,224], float32."""
        device = self.device
        sam, beit = host.sam.to(device, non_blocking=True), host.beit.to(device, non_blocking=True)
        if self.preprocess_device is None:
            return sam, beit
        model = self.model
        return (sam_float_steps(sam, model.sam_image_size, sam_mode(model)),
                beit_float_steps(beit, model.beit_image_size))

    def _remember(self, key: str, entry: _Encoded) -> None:
        if self.cache_size == 0:
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def packed_host_copy(tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """float32 / bool tensors (float32 first, so every part stays 4-byte aligned) -> numpy arrays on the host: their
    bytes packed into one buffer on their device, one device-to-host copy (one wait), views of its parts."""
    packed = torch.cat([tensor.reshape(-1).view(torch.uint8) for tensor in tensors]).cpu().numpy()
    arrays, offset = [], 0
    for tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        arrays.append(packed[offset:offset + size].view(_NUMPY_DTYPES[tensor.dtype]).reshape(tuple(tensor.shape)))
        offset += size
    return arrays


def _chw(image: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] array -> uint8 tensor view [3,H,W] (no copy)."""
    return torch.from_numpy(image).permute(2, 0, 1)
