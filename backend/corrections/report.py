"""Corrections report: how much annotators changed our predictions, as a self-contained HTML page and a JSON summary.

`python -m backend corrections report [--out DIR]` writes `DIR/report.html` (plots embedded as base64 PNG, rendered with
matplotlib's Agg backend) and `DIR/summary.json`:
- histogram of IoU(prediction, correction) over predicted regions;
- per label, the share of regions accepted unchanged / edited / redrawn / deleted / added (stacked bars);
- per model_version, mean IoU and accepted share (trend, versions in order of first use);
- the worst prompts (lowest mean IoU) with thumbnails: image, predicted overlay, corrected overlay.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from backend.corrections.capture import KINDS, CorrectionsStore
from evf_sam.data import layout

KIND_COLOURS = {"accepted": "#2e7d32", "edited": "#9ccc65", "redrawn": "#ffb300", "deleted": "#e53935",
                "added": "#1e88e5"}
THUMB = 160


def summarize(records: list[layout.Record], *, worst: int = 8) -> dict[str, Any]:
    """Counts and IoU statistics of the corrections (the JSON summary)."""
    paired = [r for r in records if r.iou is not None]
    ious = np.array([r.iou for r in paired], dtype=float)
    per_label: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(KINDS, 0))
    for record in records:
        per_label[record.label or "(no label)"][record.extra.get("kind", "added")] += 1
    versions: dict[str, list[layout.Record]] = defaultdict(list)
    for record in sorted(paired, key=lambda r: str(r.created_at or "")):
        versions[record.model_version or "(unknown)"].append(record)
    prompts: dict[str, list[layout.Record]] = defaultdict(list)
    for record in paired:
        prompts[record.prompt].append(record)
    worst_prompts = sorted(prompts.items(), key=lambda item: (np.mean([r.iou for r in item[1]]), item[0]))[:worst]
    counts, edges = np.histogram(ious, bins=10, range=(0.0, 1.0))
    return {
        "records": len(records),
        "annotations": len({r.annotation_id for r in records}),
        "tasks": len({r.task_id for r in records}),
        "kinds": {kind: sum(r.extra.get("kind") == kind for r in records) for kind in KINDS},
        "iou": {"pairs": len(paired), "mean": _round(ious.mean()) if len(ious) else None,
                "median": _round(np.median(ious)) if len(ious) else None,
                "histogram": {"edges": [round(e, 2) for e in edges.tolist()], "counts": counts.tolist()}},
        "per_label": {label: dict(kinds) for label, kinds in sorted(per_label.items())},
        "per_model_version": [{"model_version": version, "regions": len(rs),
                               "mean_iou": _round(np.mean([r.iou for r in rs])),
                               "accepted_share": _round(np.mean([r.extra.get("kind") == "accepted" for r in rs]))}
                              for version, rs in versions.items()],
        "worst_prompts": [{"prompt": prompt, "regions": len(rs), "mean_iou": _round(np.mean([r.iou for r in rs])),
                           "labels": sorted({r.label for r in rs})} for prompt, rs in worst_prompts],
    }


def _round(value: float) -> float:
    return round(float(value), 4)


# --- plots -------------------------------------------------------------------------------------------------------

def _figure_png(figure: Any) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def plot_histogram(summary: dict[str, Any]) -> str:
    """Base64 PNG: histogram of IoU(prediction, correction)."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3))
    edges, counts = summary["iou"]["histogram"]["edges"], summary["iou"]["histogram"]["counts"]
    axes.bar(edges[:-1], counts, width=0.1, align="edge", color="#1e88e5", edgecolor="white")
    axes.set(xlabel="IoU(prediction, correction)", ylabel="regions", xlim=(0, 1),
             title=f"IoU over {summary['iou']['pairs']} predicted region(s)")
    return _figure_png(figure)


def plot_kinds_per_label(summary: dict[str, Any]) -> str:
    """Base64 PNG: per label, stacked shares of accepted / edited / redrawn / deleted / added."""
    import matplotlib.pyplot as plt

    labels = list(summary["per_label"])
    figure, axes = plt.subplots(figsize=(6, 0.5 + 0.4 * max(len(labels), 1)))
    left = np.zeros(len(labels))
    totals = np.array([max(sum(summary["per_label"][label].values()), 1) for label in labels])
    for kind in KINDS:
        share = np.array([summary["per_label"][label][kind] for label in labels]) / totals
        axes.barh(labels, share, left=left, color=KIND_COLOURS[kind], label=kind)
        left += share
    axes.set(xlim=(0, 1), xlabel="share of regions")
    axes.legend(ncol=5, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _figure_png(figure)


def plot_trend(summary: dict[str, Any]) -> str:
    """Base64 PNG: mean IoU and accepted share per model_version."""
    import matplotlib.pyplot as plt

    rows = summary["per_model_version"]
    figure, axes = plt.subplots(figsize=(6, 3))
    x = np.arange(len(rows))
    axes.plot(x, [r["mean_iou"] for r in rows], "o-", color="#1e88e5", label="mean IoU")
    axes.plot(x, [r["accepted_share"] for r in rows], "s--", color="#2e7d32", label="accepted unchanged")
    axes.set_xticks(x, [r["model_version"] for r in rows], rotation=20, ha="right", fontsize=7)
    axes.set(ylim=(0, 1.05), title="per model_version")
    axes.legend(fontsize=7)
    return _figure_png(figure)


def thumbnails(root: Path, record: layout.Record) -> str:
    """Base64 PNG: the image, the predicted mask and the corrected mask (red overlays), side by side."""
    image = layout.load_image(root / record.image)
    scale = THUMB / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = np.asarray(image.resize(size))
    panels = [base]
    for path in (record.predicted_mask, record.mask):
        mask = np.zeros(base.shape[:2], bool)
        if path and (root / path).is_file():
            mask = np.asarray(Image.fromarray(layout.load_mask(root / path)).resize(size)) > 0
        overlay = base.copy()
        overlay[mask] = (0.45 * overlay[mask] + 0.55 * np.array([230, 30, 30])).astype(np.uint8)
        panels.append(overlay)
    gap = np.full((size[1], 4, 3), 255, np.uint8)
    strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(strip).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# --- page --------------------------------------------------------------------------------------------------------

def render_html(summary: dict[str, Any], plots: dict[str, str], worst: list[tuple[dict[str, Any], list[str]]]) -> str:
    """The report page (no external resources)."""
    esc = html.escape
    kinds = "".join(f"<td>{summary['kinds'][k]}</td>" for k in KINDS)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Corrections report</title>",
        "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "img{max-width:100%}</style></head><body>",
        "<h1>Corrections report</h1>",
        f"<p>{summary['records']} region record(s) from {summary['annotations']} annotation(s) on "
        f"{summary['tasks']} task(s). Mean IoU(prediction, correction): {summary['iou']['mean']}.</p>",
        f"<table><tr>{''.join(f'<th>{k}</th>' for k in KINDS)}</tr><tr>{kinds}</tr></table>",
    ]
    if not summary["records"]:
        parts.append("<p><b>No corrections recorded yet.</b></p>")
    for title, key in (("IoU histogram", "iou_histogram"), ("Outcome per label", "kinds_per_label"),
                       ("Trend per model_version", "trend")):
        if key in plots:
            parts.append(f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{plots[key]}'>")
    if worst:
        parts.append("<h2>Worst prompts</h2><p>image · predicted · corrected</p><table>"
                     "<tr><th>prompt</th><th>labels</th><th>regions</th><th>mean IoU</th><th>examples</th></tr>")
        for row, images in worst:
            cells = "".join(f"<img alt='thumbnail' src='data:image/png;base64,{b}'><br>" for b in images)
            parts.append(f"<tr><td>{esc(row['prompt'])}</td><td>{esc(', '.join(row['labels']))}</td>"
                         f"<td>{row['regions']}</td><td>{row['mean_iou']}</td><td>{cells}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(corrections_dir: str | Path, out_dir: str | Path, *, worst: int = 8,
                 examples: int = 2) -> dict[str, Path]:
    """Write `report.html` and `summary.json` into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    store = CorrectionsStore(corrections_dir)
    records = store.records()
    summary = summarize(records, worst=worst)
    plots: dict[str, str] = {}
    if records:
        plots["iou_histogram"] = plot_histogram(summary)
        plots["kinds_per_label"] = plot_kinds_per_label(summary)
        if summary["per_model_version"]:
            plots["trend"] = plot_trend(summary)
    rows = []
    for row in summary["worst_prompts"]:
        chosen = sorted((r for r in records if r.prompt == row["prompt"] and r.iou is not None),
                        key=lambda r: r.iou)[:examples]
        rows.append((row, [thumbnails(store.root, r) for r in chosen]))
    out = Path(out_dir)
    paths = {"html": out / "report.html", "json": out / "summary.json"}
    layout.atomic_write_bytes(paths["html"], render_html(summary, plots, rows).encode("utf-8"))
    layout.atomic_write_bytes(paths["json"], json.dumps({**summary, "plots": sorted(plots)}, indent=2).encode())
    return paths
