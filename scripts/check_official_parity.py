"""Numerical parity of our EVF-SAM / EVF-SAM2 against the official implementation (hustvl/EVF-SAM), on CPU in fp32.

The official code is NOT part of this project: pass the path of a checkout of https://github.com/hustvl/EVF-SAM
(tested at 9935dc5). The script builds the official classes with random weights (SAM-1 with the ViT-B builder in place
of ViT-H, SAM-2 with Hiera-T, BEiT-3 base, so it runs on a laptop CPU), writes their state dict as an official-format
checkpoint directory, loads that with `evf_sam.load_model` (strict), and compares the final mask logits of the official
`inference()` / `forward(inference=True)` path with `EvfPredictor` on the same image and prompts.

    python scripts/check_official_parity.py --official /path/to/EVF-SAM [--out parity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import evf_sam  # noqa: E402
from evf_sam.testing import train_tokenizer  # noqa: E402

PROMPTS = ["the zebra on the left", "a red car"]
SAM_VIT_B = {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": [2, 5, 8, 11]}


@contextmanager
def official_code(root: Path):
    """Import the official package `model` (and its `inference.py` helpers) from `root`, run from there (hydra)."""
    cwd = os.getcwd()
    sys.path.insert(0, str(root))
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(cwd)
        sys.path.remove(str(root))


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter and float buffer so that no zero-initialised tensor hides a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            tensor.add_(0.02 * torch.randn(tensor.shape, generator=gen))


def write_checkpoint(model: torch.nn.Module, config: dict, tokenizer_dir: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in tokenizer_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def use_package_sam2_configs() -> None:
    """The official vendored SAM-2 points hydra's global config search path at its own copy; point it back."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    initialize_config_module("sam2", version_base="1.2")


def test_image(seed: int = 0, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A smooth random RGB image (structured, so that resizing is exercised, not just noise)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    from PIL import Image
    return np.asarray(Image.fromarray(low).resize(size[::-1], Image.BICUBIC))


def compare(name: str, ours: np.ndarray, theirs: np.ndarray) -> dict:
    a, b = ours > 0, theirs > 0
    union = np.logical_or(a, b).sum()
    iou = float(np.logical_and(a, b).sum() / union) if union else 1.0
    result = {"case": name, "shape": list(ours.shape), "max_abs_diff": float(np.abs(ours - theirs).max()),
              "mean_abs_diff": float(np.abs(ours - theirs).mean()), "mask_iou": iou,
              "logit_range": [float(theirs.min()), float(theirs.max())]}
    print(f"{name:45s} max|Δ| {result['max_abs_diff']:.2e}  mean|Δ| {result['mean_abs_diff']:.2e}  "
          f"mask IoU {iou:.6f}  (logits in [{theirs.min():.2f}, {theirs.max():.2f}])")
    return result


def check_sam(root: Path, work: Path, tokenizer_dir: Path) -> list[dict]:
    with official_code(root):
        import inference as official_inference
        import model.evf_sam as official
        from model.configuration_evf import EvfConfig as OfficialConfig
        from model.segment_anything import build_sam_vit_b

        official.build_sam_vit_h = build_sam_vit_b  # ViT-H is too slow for a CPU check; same code path
        cfg = {"hidden_size": 768, "out_dim": 256, "mm_extractor_scale": "base", "sam_scale": "huge"}
        torch.manual_seed(0)
        theirs = official.EvfSamModel(OfficialConfig(**cfg)).eval()
        perturb(theirs, 1)
        ckpt = write_checkpoint(theirs, {**cfg, "architectures": ["EvfSamModel"], "model_type": "evf",
                                         "sam_config": SAM_VIT_B}, tokenizer_dir, work / "official-sam")
        ours = evf_sam.load_model(ckpt)
        image = test_image()
        sam_in, resize = official_inference.sam_preprocess(image, model_type="ori")
        beit_in = official_inference.beit3_preprocess(image, 224)
        tokens = [ours.tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
        results = []
        with torch.no_grad():
            single = theirs.inference(sam_in[None], beit_in[None], tokens[0], resize_list=[resize],
                                      original_size_list=[image.shape[:2]])[0].numpy()
            padded = torch.nn.utils.rnn.pad_sequence([t[0] for t in tokens], batch_first=True, padding_value=1)
            batch = theirs(images=sam_in[None], images_evf=beit_in[None], input_ids=padded,
                           attention_masks=padded != 1, offset=torch.tensor([0, 2]), masks_list=[None],
                           label_list=[torch.zeros(image.shape[:2])], resize_list=[resize], inference=True)
            batch = batch["pred_masks"][0].numpy()
    predictor = evf_sam.EvfPredictor(ours)
    mine = predictor.predict(image, PROMPTS)
    results.append(compare("EVF-SAM (ViT-B) inference(), one prompt", mine[0].logits, single))
    for i, prompt in enumerate(PROMPTS):
        results.append(compare(f"EVF-SAM forward(inference) padded, prompt {i}", mine[i].logits, batch[i]))
    return results


def check_sam2(root: Path, work: Path, tokenizer_dir: Path) -> list[dict]:
    with official_code(root):
        import inference as official_inference
        import model.evf_sam2 as official
        from model.configuration_evf import EvfConfig as OfficialConfig

        cfg = {"hidden_size": 768, "out_dim": 256, "mm_extractor_scale": "base", "sam_scale": "tiny"}
        torch.manual_seed(0)
        theirs = official.EvfSam2Model(OfficialConfig(**cfg)).eval()
        perturb(theirs, 2)
        ckpt = write_checkpoint(theirs, {**cfg, "architectures": ["EvfSam2Model"], "model_type": "evf",
                                         "sam2_generation": "head"}, tokenizer_dir, work / "official-sam2")
        use_package_sam2_configs()
        ours = evf_sam.load_model(ckpt)
        image = test_image(1)
        sam_in, _ = official_inference.sam_preprocess(image, model_type="sam2")
        beit_in = official_inference.beit3_preprocess(image, 224)
        ids = ours.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            single = theirs.inference(sam_in[None].float(), beit_in[None], ids, resize_list=[None],
                                      original_size_list=[image.shape[:2]], multimask_output=True)[0].numpy()
    mine = evf_sam.EvfPredictor(ours).predict(image, PROMPTS[:1])
    return [compare("EVF-SAM2 (Hiera-T) inference(), head, one prompt", mine[0].logits, single)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="checkout of hustvl/EVF-SAM")
    parser.add_argument("--work", type=Path, default=Path("runs/parity"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--family", choices=["sam", "sam2", "both"], default="both")
    args = parser.parse_args()
    if not (args.official / "model" / "evf_sam.py").exists():
        parser.error(f"{args.official} does not look like a checkout of hustvl/EVF-SAM (no model/evf_sam.py)")
    work = args.work.resolve()
    tokenizer_dir = train_tokenizer(work / "tokenizer", PROMPTS * 10 + ["zebra", "left", "car", "red"], vocab_size=40)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    checks = {"sam": [check_sam], "sam2": [check_sam2], "both": [check_sam, check_sam2]}[args.family]
    results = [r for check in checks for r in check(args.official.resolve(), work, tokenizer_dir)]
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    worst = max(r["max_abs_diff"] for r in results)
    print(f"worst max|Δ| = {worst:.2e}")
    return 0 if worst <= 1e-3 and min(r["mask_iou"] for r in results) >= 0.999 else 1


if __name__ == "__main__":
    raise SystemExit(main())
