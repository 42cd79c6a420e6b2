"""CUDA graphs for the prompt path: BEiT-3 + projector + mask decoder, replayed for fixed shapes.

A new prompt on a cached image is launch-bound at small batches: BEiT-3-L's 24 multiway layers and SAM's decoder are
about a thousand small kernels, each costing more host time than device time. `PromptGraphs` captures that path once
per shape bucket and replays it afterwards. Shapes are made fixed by padding: prompt rows up to the next power of two
(padded rows repeat the first prompt's image, their outputs are dropped), text up to the next power of two of at
least MIN_TEXT_TOKENS tokens with attention mask 0 (BEiT-3 zeroes those tokens and masks them out as keys, so real
tokens see the same inputs). Each replay reads its inputs from static buffers, filled per call by gathering the
per-image BEiT-3 pixels and SAM features row by row, so one graph serves any mix of images.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from evf_sam.modeling.common import ImageFeatures

log = logging.getLogger(__name__)

MIN_TEXT_TOKENS = 8


def prompt_bucket(count: int, limit: int) -> int:
    """Prompt rows of the graph that serves `count` prompts: the next power of two, at most `limit` (>= count)."""
    if not 1 <= count <= limit:
        raise ValueError(f"a prompt batch needs 1..{limit} prompts, got {count}")
    return min(1 << (count - 1).bit_length(), limit)


def text_bucket(length: int, limit: int) -> int:
    """Token columns of the graph that serves texts of `length` tokens: the next power of two, at least
    MIN_TEXT_TOKENS, at most `limit` (the model's `max_text_tokens`, >= length)."""
    if not 1 <= length <= limit:
        raise ValueError(f"a prompt needs 1..{limit} tokens, got {length}")
    return min(max(MIN_TEXT_TOKENS, 1 << (length - 1).bit_length()), limit)


@dataclass
class _Inputs:
    """One padded prompt batch of T rows: BEiT-3 pixels [T,3,S,S], SAM features with one row per prompt, and
    `text` [2,T,L] long (input ids, attention mask); `rows` is arange(T), the decoder's image index."""

    beit: torch.Tensor
    features: ImageFeatures
    text: torch.Tensor
    rows: torch.Tensor


@dataclass
class _Captured:
    """A captured graph with its static inputs and the outputs its replays overwrite."""

    graph: torch.cuda.CUDAGraph
    inputs: _Inputs
    logits: torch.Tensor
    scores: torch.Tensor


def _forward(model: Any, inputs: _Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = model.encode_prompts(inputs.beit, inputs.text[0], inputs.text[1])
    return model.decode_masks(inputs.features, tokens, inputs.rows)


class PromptGraphs:
    """The captured prompt-path graphs of one model, by (prompt rows, text tokens) bucket (see the module docstring).

    `evf_sam.acceleration.accelerate(model, prompt_graphs=True)` attaches one as `model.prompt_graphs`; the predictor
    then calls `run` when `supports(model)`. Graphs read the weights where they were at capture: in-place updates
    (`load_state_dict`, optimiser steps) are seen by the next replay, while moving or casting the model reallocates
    them, so every graph is dropped and captured again. Should a capture fail, the graphs are switched off with one
    warning, `failure` says why and `run` computes eagerly.
    """

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, int], _Captured] = {}
        self._images: dict[int, tuple[torch.Tensor, ImageFeatures]] = {}  # static image rows, shared across L
        self._pool: Any = None
        self._stream: Any = None  # warm-ups and captures run on one side stream (so captures share memory well)
        self._weights: tuple[Any, ...] = ()
        self.failure: str | None = None  # why graphs were switched off, if they were
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> PromptGraphs:
        return PromptGraphs()  # captures hold the original model's memory; a copy captures its own

    @staticmethod
    def supports(model: Any) -> bool:
        """True where `run` replays graphs: a CUDA model, called outside autocast (a capture fixes the dtypes)."""
        return next(model.parameters()).device.type == "cuda" and not torch.is_autocast_enabled("cuda")

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """The (prompt rows, text tokens) shapes captured so far."""
        return sorted(self._graphs)

    def clear(self) -> None:
        """Drop every graph and its buffers (the memory goes back to PyTorch's allocator)."""
        with self._lock:
            self._graphs.clear()
            self._images.clear()
            self._pool = None

    def run(self, model: Any, beit: torch.Tensor, features: ImageFeatures, image_index: torch.Tensor,
            input_ids: torch.Tensor, attention_mask: torch.Tensor, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt path for n prompts, padded to their bucket: low-res logits [n,1,h,w] and IoU [n], float32.

        `beit` [B,3,S,S] and `features` (B images) are per image, in the model's dtype on its device; `image_index`
        [n] (device) picks each prompt's image; `input_ids` / `attention_mask` [n,L] (host) as from
        `transforms.tokenize`; `limit` is the largest prompt batch (a bucket never exceeds it). Equals
        `model.decode_masks(features, model.encode_prompts(beit[image_index], input_ids, attention_mask),
        image_index)` up to float rounding.
        """
        count, length = input_ids.shape
        rows, columns = prompt_bucket(count, limit), text_bucket(length, model.max_text_tokens)
        index = torch.cat([image_index, image_index[:1].expand(rows - count)])
        text = torch.zeros((2, rows, columns), dtype=torch.long)
        text[0, :count, :length] = input_ids
        text[1, :count, :length] = attention_mask
        with torch.inference_mode(), self._lock:
            captured = self._graph(model, rows, columns, beit, features) if self.supports(model) else None
            if captured is None:
                inputs = _Inputs(beit.index_select(0, index), features.select(index), text.to(beit.device),
                                 torch.arange(rows, device=beit.device))
                logits, scores = _forward(model, inputs)
                return logits[:count], scores[:count]
            static = captured.inputs
            torch.index_select(beit, 0, index, out=static.beit)
            torch.index_select(features.embeddings, 0, index, out=static.features.embeddings)
            for source, target in zip(features.high_res, static.features.high_res):
                torch.index_select(source, 0, index, out=target)
            static.text.copy_(text)
            captured.graph.replay()
            return captured.logits[:count].clone(), captured.scores[:count].clone()

    def _graph(self, model: Any, rows: int, columns: int, beit: torch.Tensor,
               features: ImageFeatures) -> _Captured | None:
        """The graph of this bucket, captured on first use; None once a capture has failed."""
        if self.failure is not None:
            return None
        weights = tuple((p.data_ptr(), p.dtype) for p in (next(model.mm_extractor.parameters()),
                                                           model.text_hidden_fcs[0][0].weight))
        if weights != self._weights:
            self._graphs.clear()
            self._images.clear()
            self._pool = None
            self._weights = weights
        captured = self._graphs.get((rows, columns))
        if captured is None:
            try:
                captured = self._capture(model, rows, columns, beit, features)
            except Exception as error:  # noqa: BLE001 - an optional speed-up: fall back to the eager path
                log.warning("CUDA graphs of the prompt path switched off, the prompt path runs eagerly: %s", error)
                self.failure = f"{type(error).__name__}: {error}"
                self._graphs.clear()
                self._images.clear()
                return None
            self._graphs[(rows, columns)] = captured
        return captured

    def _capture(self, model: Any, rows: int, columns: int, beit: torch.Tensor,
                 features: ImageFeatures) -> _Captured:
        started = time.perf_counter()
        device = beit.device
        if rows not in self._images:
            self._images[rows] = (beit.new_zeros((rows, *beit.shape[1:])),
                                  ImageFeatures(features.embeddings.new_zeros((rows, *features.embeddings.shape[1:])),
                                                tuple(t.new_zeros((rows, *t.shape[1:])) for t in features.high_res)))
        static_beit, static_features = self._images[rows]
        text = torch.zeros((2, rows, columns), dtype=torch.long, device=device)
        text[1] = 1  # warm-up inputs: every token real (what the graph computes does not depend on the values)
        inputs = _Inputs(static_beit, static_features, text, torch.arange(rows, device=device))
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        self._stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(self._stream):  # lazy initialisation (cuBLAS workspaces, kernel choice) first
            _forward(model, inputs)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the worker's pool threads may pin memory meanwhile, which a global capture would refuse
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            logits, scores = _forward(model, inputs)
        torch.cuda.current_stream(device).wait_stream(self._stream)
        if self._pool is None:
            self._pool = graph.pool()  # later captures share the memory of intermediates (replays never overlap)
        log.info("captured the prompt-path CUDA graph for %d prompt(s) x %d tokens in %.2f s", rows, columns,
                 time.perf_counter() - started)
        return _Captured(graph, inputs, logits, scores)
