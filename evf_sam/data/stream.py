"""Fresh synthetic images during training: `SyntheticStream` renders new scenes in worker processes while the GPU
trains and swaps them into the resident pool, oldest images first.

A pool of 16,000 images is memorised within a few thousand steps (training IoU keeps rising while validation stalls,
docs/MODELS.md); with the stream, every image is replaced after it has been sampled a few times, so the model keeps
seeing scenes it has not seen before, at the cost of CPU cores only. The pool must have the fixed layout of
`build_synthetic(..., fill_expressions=True)`; new images are indices `start, start+1, ...` of the same (seed, split).
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor

import torch

from evf_sam.data.resident import ResidentData, parts_to_data, render_part


class SyntheticStream:
    """Renders images `start, start+1, ...` of (seed, split) in `workers` processes, `chunk` images per job, and
    writes finished ones over the pool's images in turn (`refresh`). Use as a context manager, or call `close`."""

    def __init__(self, seed: int, split: str, start: int, sam_size: int, beit_size: int, *, max_side: int = 640,
                 expressions: int = 4, workers: int = 4, chunk: int = 32) -> None:
        if workers < 1 or chunk < 1:
            raise ValueError("workers and chunk must be >= 1")
        self._job = (seed, split, sam_size, beit_size, max_side, expressions)
        self._next_index = start
        self._chunk = chunk
        # spawn, not fork: the parent holds CUDA state and threads that a forked child must not inherit
        self._pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self._pending: deque[Future] = deque()
        self._next_slot = 0
        self.rendered = 0  # images rendered and swapped in so far
        for _ in range(2 * workers):
            self._submit()

    def _submit(self) -> None:
        seed, split, sam_size, beit_size, max_side, expressions = self._job
        stop = self._next_index + self._chunk
        self._pending.append(self._pool.submit(render_part, (seed, split, self._next_index, stop, sam_size, beit_size,
                                                             max_side, expressions, True)))
        self._next_index = stop

    def ready(self) -> bool:
        """Whether a finished chunk is waiting for `refresh`."""
        return bool(self._pending) and self._pending[0].done()

    def refresh(self, data: ResidentData) -> torch.Tensor:
        """Swap every finished chunk into `data` (without waiting for unfinished ones) and queue as many new jobs.
        Returns the expression rows that changed (long, possibly empty)."""
        parts = []
        while self.ready():
            parts.append(self._pending.popleft().result())
            self._submit()
        parts = [part for part in parts if len(part["sam"])]
        if not parts:
            return torch.empty(0, dtype=torch.long, device=data.sam.device)
        fresh = parts_to_data(parts)
        count = min(len(fresh.sam), len(data.sam))
        slots = (self._next_slot + torch.arange(count)) % len(data.sam)
        if count < len(fresh.sam):
            fresh = _first_images(fresh, count)
        self._next_slot = (self._next_slot + count) % len(data.sam)
        self.rendered += count
        return data.replace_images(slots, fresh)

    def close(self) -> None:
        """Stop the workers (unfinished jobs are dropped)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> SyntheticStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_images(data: ResidentData, count: int) -> ResidentData:
    """The first `count` images of fixed-layout `data` with their expressions."""
    rows = len(data) // len(data.sam) * count
    return ResidentData(data.sam[:count], data.shapes[:count], data.beit[:count], data.masks[:rows],
                        data.image_of[:rows], data.texts[:rows], data.kinds[:rows])
