"""BEiT-3 multiway transformer (the EVF text+image fusion encoder), in plain PyTorch.

Parameter names equal those of torchscale's `BEiT3` as stored in the EVF checkpoints under `mm_extractor.beit3.`.
Image and text tokens attend to each other in every layer; every Linear and LayerNorm has an A copy for the image
tokens (the first 1 + number-of-patches positions) and a B copy for the text tokens. Sub-LN layout: pre-LN blocks
with an extra LayerNorm on the attention output (`inner_attn_ln`) and inside the FFN (`ffn_layernorm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5
FIRST_POSITION = 2  # fairseq convention: position ids start at 2


class Multiway(nn.Module):
    """Two copies of a module: `A` applied to the image tokens, `B` to the text tokens."""

    def __init__(self, make: type[nn.Module] | object, *args: object) -> None:
        super().__init__()
        self.A = make(*args)
        self.B = make(*args)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A(image), self.B(text)


class FeedForward(nn.Module):
    """fc1 -> exact GELU computed in fp32 -> LayerNorm (Sub-LN) -> fc2."""

    def __init__(self, dim: int, ffn_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc1(x)
        hidden = F.gelu(hidden.float()).type_as(hidden)
        return self.fc2(self.ffn_layernorm(hidden))


class SelfAttention(nn.Module):
    """Joint multi-head self-attention over image and text tokens with multiway projections."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = Multiway(nn.Linear, dim, dim)
        self.k_proj = Multiway(nn.Linear, dim, dim)
        self.v_proj = Multiway(nn.Linear, dim, dim)
        self.out_proj = Multiway(nn.Linear, dim, dim)
        self.inner_attn_ln = Multiway(nn.LayerNorm, dim, LN_EPS)

    def forward(self, image: torch.Tensor, text: torch.Tensor,
                keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B,N,D], text [B,L,D]; keep [B,1,1,N+L] bool (True = real token) or None."""
        b, n, d = image.shape

        def heads(proj: Multiway) -> torch.Tensor:
            joint = torch.cat(proj(image, text), dim=1)
            return joint.view(b, joint.shape[1], self.heads, d // self.heads).transpose(1, 2)

        attn = F.scaled_dot_product_attention(heads(self.q_proj), heads(self.k_proj), heads(self.v_proj),
                                              attn_mask=keep)
        attn = attn.transpose(1, 2).reshape(b, -1, d)
        return self.out_proj(*self.inner_attn_ln(attn[:, :n], attn[:, n:]))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer: x + Attn(LN(x)), then x + FFN(LN(x)), all multiway."""

    def __init__(self, dim: int, heads: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, heads)
        self.self_attn_layer_norm = Multiway(nn.LayerNorm, dim, LN_EPS)
        self.ffn = Multiway(FeedForward, dim, ffn_dim)
        self.final_layer_norm = Multiway(nn.LayerNorm, dim, LN_EPS)

    def forward(self, image: torch.Tensor, text: torch.Tensor,
                keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        attn_image, attn_text = self.self_attn(*self.self_attn_layer_norm(image, text), keep)
        image, text = image + attn_image, text + attn_text
        ffn_image, ffn_text = self.ffn(*self.final_layer_norm(image, text))
        return image + ffn_image, text + ffn_text


class Encoder(nn.Module):
    """Position tables (A: image, B: text), the layer stack and the final multiway LayerNorm."""

    def __init__(self, dim: int, layers: int, heads: int, ffn_dim: int, vision_positions: int,
                 text_positions: int) -> None:
        super().__init__()
        self.embed_positions = nn.Module()
        self.embed_positions.A = nn.Embedding(vision_positions, dim)
        self.embed_positions.B = nn.Embedding(text_positions, dim)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim) for _ in range(layers))
        self.layer_norm = Multiway(nn.LayerNorm, dim, LN_EPS)


class VisionEmbedding(nn.Module):
    """Patchify with a strided convolution and prepend the [CLS] token; `mask_token` is kept for checkpoints."""

    def __init__(self, img_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"BEiT-3 expects {self.img_size}x{self.img_size} images, got {tuple(pixels.shape[-2:])}")
        patches = self.proj(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)


class BEiT3(nn.Module):
    """BEiT-3 encoder over one image and one (right-padded) text per row.

    forward(pixels [B,3,S,S], input_ids [B,L], attention_mask [B,L] with 1 = real token) -> [B, 1+P+L, D]
    (P = number of patches; token 0 is the visual [CLS]).
    """

    def __init__(self, embed_dim: int, layers: int, heads: int, ffn_dim: int, vocab_size: int, img_size: int = 224,
                 patch_size: int = 16, max_text_positions: int = 1024) -> None:
        super().__init__()
        self.text_embed = nn.Embedding(vocab_size, embed_dim)
        self.vision_embed = VisionEmbedding(img_size, patch_size, embed_dim)
        self.num_vision_tokens = self.vision_embed.num_patches + 1
        self.encoder = Encoder(embed_dim, layers, heads, ffn_dim, self.num_vision_tokens + FIRST_POSITION,
                               max_text_positions)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.cls_token, std=0.02)
        nn.init.trunc_normal_(self.vision_embed.mask_token, std=0.02)

    @property
    def max_text_tokens(self) -> int:
        """Longest text (including <s> and </s>) the text position table can hold."""
        return self.encoder.embed_positions.B.num_embeddings - FIRST_POSITION

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_hidden(pixels, input_ids, attention_mask)[0]

    def forward_with_hidden(self, pixels: torch.Tensor, input_ids: torch.Tensor,
                            attention_mask: torch.Tensor | None = None,
                            layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward`'s output and the tokens [B, 1+P+L, D] leaving encoder layer `layer` (before the final
        LayerNorm; None when `layer` is None); training uses them for auxiliary losses."""
        image = self.vision_embed(pixels)
        text = self.text_embed(input_ids)
        if text.shape[1] > self.max_text_tokens:
            raise ValueError(f"text of {text.shape[1]} tokens is longer than the {self.max_text_tokens} supported")
        positions = self.encoder.embed_positions
        image = image + positions.A.weight[FIRST_POSITION:FIRST_POSITION + image.shape[1]]
        text = text + positions.B.weight[FIRST_POSITION:FIRST_POSITION + text.shape[1]]

        keep = None
        if attention_mask is not None:
            real = attention_mask.to(torch.bool)
            text = text * real.unsqueeze(-1).to(text.dtype)  # padded positions start as zeros
            keep = torch.cat([real.new_ones(real.shape[0], image.shape[1]), real], dim=1)[:, None, None, :]
        layers = self.encoder.layers
        wanted = None if layer is None else layer % len(layers)
        hidden = None
        for index, block in enumerate(layers):
            image, text = block(image, text, keep)
            if index == wanted:
                hidden = torch.cat([image, text], dim=1)
        return torch.cat(self.encoder.layer_norm(image, text), dim=1), hidden
