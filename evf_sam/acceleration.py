"""One switch for the inference speed-ups that change how a loaded model computes, not what it computes.

- fused attention (SAM-1 ViT): relative-position attention through one SDPA call (`modeling.fused_attention`);
- `torch.compile` of the SAM image encoder (the bulk of the FLOPs) for the shapes it sees; the first call of each
  new batch size compiles (tens of seconds on a full-size model), later calls reuse the compiled graph.
Weights and parameter names are untouched, so checkpoints save and load as before.
"""

from __future__ import annotations

from typing import Any

from evf_sam.modeling.fused_attention import enable_fused_attention


def accelerate(model: Any, *, fused_attention: bool = True, compile_encoder: bool = False) -> dict[str, Any]:
    """Apply the chosen speed-ups to `model` in place; returns what was done (for logs and benchmarks)."""
    done: dict[str, Any] = {"fused_attention_modules": 0, "compiled_encoder": False}
    if fused_attention:
        done["fused_attention_modules"] = enable_fused_attention(model)
    if compile_encoder:
        model.visual_model.image_encoder.compile(dynamic=False)
        done["compiled_encoder"] = True
    return done
