"""Parity with the official EVF-SAM code (hustvl/EVF-SAM), run on the same random weights in fp32 on CPU.

Opt-in: set EVF_SAM_OFFICIAL_REPO to a checkout of https://github.com/hustvl/EVF-SAM (tested at 9935dc5) in an
environment where torchscale is installed. The official classes run in a subprocess (their vendored SAM-2 registers its
own hydra config module), with small variants as in the reference §14: BEiT-3-B with Hiera-T, and BEiT-3-B with SAM ViT-B.
Measured 2026-11-30: max abs differences ≤ 2.3e-6 ([CLS], prompt token, mask logits), identical masks.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evf_sam.config import EvfConfig
from evf_sam.loading import check_state_dict, to_model_key

OFFICIAL_REPO = os.environ.get("EVF_SAM_OFFICIAL_REPO")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not OFFICIAL_REPO, reason="set EVF_SAM_OFFICIAL_REPO to a hustvl/EVF-SAM checkout")]

OFFICIAL_RUN = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, ".")
    family, out = sys.argv[1], sys.argv[2]
    from model.configuration_evf import EvfConfig
    torch.manual_seed(0)
    if family == "sam2":
        from model.evf_sam2 import EvfSam2Model as Official
        config = EvfConfig(hidden_size=768, out_dim=256, mm_extractor_scale="base", sam_scale="tiny")
    else:
        import model.evf_sam as module
        from model.segment_anything import build_sam_vit_b
        module.build_sam_vit_h = build_sam_vit_b
        Official = module.EvfSamModel
        config = EvfConfig(hidden_size=768, out_dim=256, mm_extractor_scale="base", sam_scale="huge")
    model = Official(config).float().eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    g = torch.Generator().manual_seed(1)
    images, images_evf = torch.randn(1, 3, 1024, 1024, generator=g), torch.randn(1, 3, 224, 224, generator=g)
    ids = torch.tensor([[0, 581, 10269, 98, 70, 25737, 2]])
    result = {"state": model.state_dict(), "images": images, "images_evf": images_evf, "input_ids": ids}
    with torch.no_grad():
        encoded = model.mm_extractor.beit3(visual_tokens=images_evf, textual_tokens=ids,
                                           text_padding_position=torch.zeros_like(ids))["encoder_out"]
        result["token"] = model.text_hidden_fcs[0](encoded[:, :1])
        if family == "sam2":
            for multimask in (False, True):
                result[f"mask{int(multimask)}"] = model.inference(images, images_evf, ids, [None], [(256, 256)],
                                                                  multimask_output=multimask)
        else:
            result["mask0"] = model.inference(images, images_evf, ids, [(1024, 1024)], [(1024, 1024)],
                                              multimask_output=False)
    torch.save(result, out)
''')


def _official(family: str, tmp_path: Path) -> dict:
    out = tmp_path / f"{family}.pt"
    run = subprocess.run([sys.executable, "-c", OFFICIAL_RUN, family, str(out)], cwd=OFFICIAL_REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _ours(family: str, state: dict):
    if family == "sam2":
        from evf_sam.modeling.evf_sam2 import EvfSam2Model as cls
        config = EvfConfig(architectures=["EvfSam2Model"], hidden_size=768, mm_extractor_scale="base", sam_scale="tiny")
    else:
        from evf_sam.modeling.evf_sam import EvfSamModel as cls
        config = EvfConfig(architectures=["EvfSamModel"], hidden_size=768, mm_extractor_scale="base",
                           sam_config={"embed_dim": 768, "depth": 12, "num_heads": 12,
                                       "global_attn_indexes": [2, 5, 8, 11]})
    model = cls(config).eval()
    state = {to_model_key(k): v for k, v in state.items()}
    check_state_dict(model, state, "official")
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_matches_official_code(family: str, tmp_path: Path) -> None:
    ref = _official(family, tmp_path)
    model = _ours(family, ref["state"])
    ids = ref["input_ids"]
    with torch.no_grad():
        token = model.encode_prompts(ref["images_evf"], ids, torch.ones_like(ids))
        features = model.encode_images(ref["images"])
        torch.testing.assert_close(token, ref["token"], atol=1e-5, rtol=0)
        generations = {"legacy": "mask0", "head": "mask1"} if family == "sam2" else {None: "mask0"}
        for generation, key in generations.items():
            model.config.sam2_generation = generation
            low, _ = model.decode_masks(features, token, torch.tensor([0]))
            logits = F.interpolate(low, ref[key].shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            torch.testing.assert_close(logits, ref[key], atol=1e-5, rtol=0)
            assert torch.equal(logits > 0, ref[key] > 0)
