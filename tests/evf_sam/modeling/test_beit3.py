"""Our BEiT-3 against torchscale's (the implementation the official EVF code uses), with the same random weights.

torchscale 0.3.0 is installed as the reference; its BEiT3, Encoder, MultiheadAttention, FeedForwardNetwork,
embedding and multiway modules differ from 0.2.0 (what EVF pins) only in incremental decoding, MoE seeding and an
extra "swish" activation, none of which this encoder-only comparison exercises (diffed against tag v0.2.0).
"""

from __future__ import annotations

import pytest
import torch

from evf_sam.modeling.beit3 import BEiT3

torchscale_beit3 = pytest.importorskip("torchscale.model.BEiT3")
from torchscale.architecture.config import EncoderConfig  # noqa: E402

DIMS = {"embed_dim": 64, "layers": 2, "heads": 4, "ffn_dim": 128, "vocab_size": 120, "img_size": 224,
        "patch_size": 16, "max_text_positions": 40}


def _reference() -> torch.nn.Module:
    args = EncoderConfig(img_size=DIMS["img_size"], patch_size=DIMS["patch_size"], vocab_size=DIMS["vocab_size"],
                         multiway=True, layernorm_embedding=False, normalize_output=True, no_output_layer=True,
                         drop_path_rate=0.0, encoder_embed_dim=DIMS["embed_dim"],
                         encoder_attention_heads=DIMS["heads"], encoder_ffn_embed_dim=DIMS["ffn_dim"],
                         encoder_layers=DIMS["layers"], max_source_positions=DIMS["max_text_positions"])
    return torchscale_beit3.BEiT3(args).eval()


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, BEiT3]:
    torch.manual_seed(0)
    reference = _reference()
    with torch.no_grad():
        for tensor in reference.state_dict().values():  # random everything, LayerNorm affine included
            tensor.copy_(torch.randn_like(tensor) * 0.2)
    ours = BEiT3(**DIMS).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 224, 224, generator=generator)
    ids = torch.randint(4, DIMS["vocab_size"], (3, 9), generator=generator)
    ids[:, 0], lengths = 0, [9, 5, 3]
    for row, length in enumerate(lengths):
        ids[row, length - 1] = 2
        ids[row, length:] = 1  # right padding with <pad>
    return pixels, ids, (ids != 1).long()


def test_same_parameter_names_and_shapes(pair) -> None:
    reference, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}


def test_matches_torchscale_with_padding_and_mask(pair) -> None:
    reference, ours = pair
    pixels, ids, mask = _batch()
    with torch.no_grad():
        expected = reference(textual_tokens=ids, visual_tokens=pixels, text_padding_position=mask == 0)["encoder_out"]
        actual = ours(pixels, ids, mask)
    real = torch.cat([torch.ones(3, 197, dtype=torch.bool), mask.bool()], dim=1)
    assert actual.shape == expected.shape == (3, 197 + 9, DIMS["embed_dim"])
    assert (actual - expected)[real].abs().max().item() <= 1e-4
    assert (actual[:, 0] - expected[:, 0]).abs().max().item() <= 1e-4


def test_padding_with_mask_equals_unpadded(pair) -> None:
    _, ours = pair
    pixels, ids, mask = _batch()
    with torch.no_grad():
        padded = ours(pixels, ids, mask)[2, 0]
        alone = ours(pixels[2:], ids[2:, :3], mask[2:, :3])[0, 0]
    assert (padded - alone).abs().max().item() <= 1e-5


def test_rejects_wrong_image_size_and_overlong_text(pair) -> None:
    _, ours = pair
    with pytest.raises(ValueError, match="expects 224x224"):
        ours(torch.zeros(1, 3, 112, 112), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than the 38 supported"):
        ours(torch.zeros(1, 3, 224, 224), torch.zeros(1, 39, dtype=torch.long))


def test_low_precision_runs(pair) -> None:
    _, ours = pair
    pixels, ids, mask = _batch()
    with torch.no_grad():
        reference = ours(pixels, ids, mask)[:, 0]
        half = BEiT3(**DIMS).to(torch.bfloat16).eval()
        half.load_state_dict(ours.state_dict())
        out = half(pixels.bfloat16(), ids, mask)[:, 0].float()
    assert torch.isfinite(out).all()
    assert (out - reference).abs().max().item() < 0.25 * reference.abs().max().item()
