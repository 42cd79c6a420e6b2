"""One switch for the inference speed-ups that change how a loaded model computes, not what it computes.

- fused attention (SAM-1 ViT): relative-position attention through one SDPA call (`modeling.fused_attention`);
- `torch.compile` of the SAM image encoder (the bulk of the FLOPs) for the shapes it sees; the first call of each
  new batch size compiles (tens of seconds on a full-size model), later calls reuse the compiled graph;
- CUDA graphs of the prompt path (BEiT-3 + projector + mask decoder, `evf_sam.prompt_graphs`), attached as
  `model.prompt_graphs`: `EvfPredictor` replays them when the model is on CUDA (a new prompt on a cached image is
  launch-bound without them); the first call of each shape bucket captures (well under a second).
Weights and parameter names are untouched, so checkpoints save and load as before.
"""

from __future__ import annotations

from typing import Any

from evf_sam.modeling.fused_attention import enable_fused_attention
from evf_sam.prompt_graphs import PromptGraphs


def accelerate(model: Any, *, fused_attention: bool = True, compile_encoder: bool = False,
               compile_mode: str | None = None, prompt_graphs: bool = False) -> dict[str, Any]:
    """Apply the chosen speed-ups to `model` in place; returns what was done (for logs and benchmarks): the number of
    fused attention modules, the compile mode (False: not compiled), whether prompt graphs will be replayed.

    `compile_mode` is torch.compile's `mode` for the image encoder (None: its default; e.g.
    "max-autotune-no-cudagraphs"). `prompt_graphs` attaches a `PromptGraphs` (used on CUDA only).
    """
    done: dict[str, Any] = {"fused_attention_modules": 0, "compiled_encoder": False, "prompt_graphs": False}
    if fused_attention:
        done["fused_attention_modules"] = enable_fused_attention(model)
    if compile_encoder:
        model.visual_model.image_encoder.compile(dynamic=False, mode=compile_mode)
        done["compiled_encoder"] = compile_mode or "default"
    if prompt_graphs:
        if getattr(model, "prompt_graphs", None) is None:
            model.prompt_graphs = PromptGraphs()
        done["prompt_graphs"] = PromptGraphs.supports(model)
    return done
