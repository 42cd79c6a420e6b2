"""Fused attention for the SAM-1 ViT image encoder: its relative-position attention through one SDPA call.

segment-anything's `Attention` materialises the full attention matrix in the activation dtype, adds the decomposed
relative-position terms, softmaxes it and multiplies by V: several passes over a [B*heads, N, N] tensor (N = 4096
for the global blocks of a 1024 px ViT-H). Here the relative-position terms ride inside the dot product instead:

    q' = [q * scale, rel_h(q), rel_w(q)]    k' = [k, onehot(row(k)), onehot(col(k))]    v' = [v, 0]

so that q'.k' = scale q.k + rel_h[q, row(k)] + rel_w[q, col(k)], exactly the biased logits of the original, and
`scaled_dot_product_attention(q', k', v', scale=1)` can run a flash / memory-efficient kernel that never writes the
matrix. The head dimension grows by H + W (80 -> 208 for ViT-H's 64 x 64 global blocks, within flash's 256).
The weights and their names are unchanged; `enable_fused_attention` switches a loaded model in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention

ALIGN = 8  # fused kernels want the head dimension in multiples of 8


def relative_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """rel_pos [2*size-1, C] -> [size(query), size(key), C], entry (i, j) = rel_pos[i - j + size - 1]."""
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table of {rel_pos.shape[0]} rows does not fit a grid side of {size}")
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


class FusedAttention(Attention):
    """segment-anything's `Attention` computed with one `scaled_dot_product_attention` call (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, C]
        if self.use_rel_pos:
            q, k, v, width = _augment(q, k, v, self.scale, self.rel_pos_h, self.rel_pos_w, h, w)
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0)[..., :width]
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, -1))


def _augment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, rel_pos_h: torch.Tensor,
             rel_pos_w: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q', k', v' of the module docstring (zero-padded to a multiple of ALIGN) and the original head width."""
    b, heads, n, c = q.shape
    grid_q = q.reshape(b, heads, h, w, c)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, relative_table(rel_pos_h, h).to(q.dtype)).reshape(b, heads, n, h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, relative_table(rel_pos_w, w).to(q.dtype)).reshape(b, heads, n, w)
    rows = torch.arange(n, device=q.device) // w
    cols = torch.arange(n, device=q.device) % w
    onehot = torch.cat([F.one_hot(rows, h), F.one_hot(cols, w)], dim=-1).to(k.dtype).expand(b, heads, n, h + w)
    pad = (-(c + h + w)) % ALIGN
    q = F.pad(torch.cat([q * scale, rel_h, rel_w], dim=-1), (0, pad))
    k = F.pad(torch.cat([k, onehot], dim=-1), (0, pad))
    v = F.pad(v, (0, h + w + pad))
    return q, k, v, c


def enable_fused_attention(model: torch.nn.Module) -> int:
    """Switch every segment-anything `Attention` inside `model` to `FusedAttention` in place; returns how many.

    A no-op (0) for models without them (EVF-SAM2's Hiera already uses SDPA)."""
    count = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = FusedAttention
            count += 1
    return count
