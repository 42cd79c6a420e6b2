"""`python -m evf_sam eval`: cIoU / gIoU of a checkpoint on a dataset (project layout or RefCOCO), per split.

Predictions go through `EvfPredictor.predict_batch` (the inference path, preprocessing included), several images at a
time; every (image, expression) pair adds its intersection and union to the split it belongs to (reference §10:
cIoU = ΣI / ΣU, gIoU = mean of per-pair IoU with an empty union counting as 1). Results are written as JSON and as a
Markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from evf_sam.data.layout import LayoutDataset, Record, SampleDataset, atomic_write_bytes, read_records
from evf_sam.metrics import SplitMetrics, to_json, to_markdown

ALL_SPLITS = "all"


def open_datasets(data: str | os.PathLike, split: str | None = None,
                  refer_root: str | os.PathLike | None = None) -> dict[str, SampleDataset]:
    """{split name: dataset} for `data`: a directory in the project layout, or a RefCOCO spec ("refcoco|unc|val").

    For a layout directory, `split` picks one split; None evaluates every split named in records.jsonl separately
    (records without a split are called "all"). For a RefCOCO spec, `split` is ignored (the spec names it).
    """
    spec = str(data)
    if Path(spec).is_dir():
        if split is not None:
            return {split: LayoutDataset(spec, split)}
        splits = sorted({r.split or ALL_SPLITS for r in read_records(spec)})
        return {name: _LayoutSplit(spec, None if name == ALL_SPLITS else name) for name in splits}
    if "|" in spec:
        from evf_sam.data.refcoco import RefCocoDataset

        if refer_root is None:
            raise FileNotFoundError(f"RefCOCO split {spec!r} needs --refer-root (the directory holding refcoco/, "
                                    f"refcoco+/, refcocog/ and the COCO images)")
        return {spec: RefCocoDataset(refer_root, spec)}
    raise FileNotFoundError(f"--data {spec!r} is neither a dataset directory (images/, masks/, records.jsonl) nor a "
                            f"RefCOCO spec like 'refcoco|unc|val'")


class _LayoutSplit(LayoutDataset):
    """A layout split where None means "records without a split" (not "every record")."""

    def __init__(self, root: str | os.PathLike, split: str | None) -> None:
        super().__init__(root, split)
        if split is None:
            self.records = [r for r in self.records if r.split is None]


def prompt_text(record: Record, multitask: bool) -> str:
    """The text sent to the model: semantic records get "[semantic] " on multitask models."""
    from evf_sam.transforms import SEMANTIC_PREFIX

    if record.semantic and multitask and not record.prompt.startswith(SEMANTIC_PREFIX.strip()):
        return SEMANTIC_PREFIX + record.prompt
    return record.prompt


def _image_chunks(dataset: SampleDataset, images_per_batch: int) -> Iterator[list[tuple[Any, list[tuple[np.ndarray,
                                                                                                    Record]]]]]:
    chunk: list = []
    for item in dataset.by_image():
        chunk.append(item)
        if len(chunk) == images_per_batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def evaluate_dataset(predictor: Any, dataset: SampleDataset, split: str, metrics: SplitMetrics | None = None,
                     images_per_batch: int = 8, progress: bool = False) -> SplitMetrics:
    """Predict every (image, expression) of `dataset` with `predictor` and add the pairs to `metrics[split]`."""
    from tqdm.auto import tqdm

    metrics = metrics if metrics is not None else SplitMetrics()
    multitask = bool(getattr(predictor.model, "is_multitask", False))
    total = len({dataset.image_path(r) for r in dataset.records})
    with tqdm(total=total, desc=f"eval {split}", unit="img", disable=not progress, leave=False) as bar:
        for chunk in _image_chunks(dataset, images_per_batch):
            items = [(image, [prompt_text(rec, multitask) for _, rec in pairs]) for image, pairs in chunk]
            for (_, pairs), predictions in zip(chunk, predictor.predict_batch(items)):
                for (mask, _), prediction in zip(pairs, predictions):
                    metrics.update(split, prediction.mask, mask)
            bar.update(len(chunk))
    return metrics


def evaluate(checkpoint: str | os.PathLike, data: str | os.PathLike, split: str | None = None,
             refer_root: str | os.PathLike | None = None, device: str = "cpu", dtype: str = "fp32",
             images_per_batch: int = 8, progress: bool = True) -> dict[str, Any]:
    """Load `checkpoint`, evaluate it on every split of `data`; returns {"checkpoint", "model_version", "data",
    "splits": {name: {"ciou", "giou", "pairs", "intersection", "union"}}}."""
    import evf_sam

    model = evf_sam.load_model(checkpoint, device=device, dtype=dtype)
    predictor = evf_sam.EvfPredictor(model, cache_size=0, max_image_batch=images_per_batch, return_logits=False)
    metrics = SplitMetrics()
    for name, dataset in open_datasets(data, split, refer_root).items():
        evaluate_dataset(predictor, dataset, name, metrics, images_per_batch, progress)
    return {"checkpoint": str(checkpoint), "model_version": f"{model.model_name}-{model.fingerprint}",
            "data": str(data), "splits": metrics.results()}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of `python -m evf_sam eval`."""
    parser.description = ("Evaluate a checkpoint: cIoU (ΣI/ΣU) and gIoU (mean per-pair IoU) per split, "
                          "printed as a Markdown table and optionally written as JSON / Markdown files.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory or Hugging Face repo id")
    parser.add_argument("--data", required=True,
                        help="dataset directory in the project layout, or a RefCOCO spec such as 'refcoco|unc|val' "
                             "(quote it: the shell reads | as a pipe)")
    parser.add_argument("--split", default=None,
                        help="layout datasets: evaluate only this split (default: every split separately)")
    parser.add_argument("--refer-root", default=None,
                        help="RefCOCO: the refer_seg directory (refcoco/, refcoco+/, refcocog/, images/)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default: fp32)")
    parser.add_argument("--images-per-batch", type=int, default=8, help="images per predict_batch call (default 8)")
    parser.add_argument("--output", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the Markdown table here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    """Run the evaluation described by parsed `args`; 0 on success, 2 on a bad dataset/checkpoint argument."""
    from evf_sam.errors import EvfError

    try:
        result = evaluate(args.checkpoint, args.data, args.split, args.refer_root, args.device, args.dtype,
                          args.images_per_batch, progress=not args.no_progress)
    except (EvfError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    table = to_markdown(result["splits"])
    if args.output is not None:
        extra = {k: v for k, v in result.items() if k != "splits"}
        atomic_write_bytes(args.output, (to_json(result["splits"], **extra) + "\n").encode())
    if args.markdown is not None:
        atomic_write_bytes(args.markdown, table.encode())
    print(table, end="")
    return 0


def run(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` and run (handy for scripts and tests)."""
    parser = argparse.ArgumentParser(prog="python -m evf_sam eval")
    configure_parser(parser)
    return main(parser.parse_args(argv))


__all__ = ["configure_parser", "evaluate", "evaluate_dataset", "main", "open_datasets", "run"]
