"""Pieces shared by EVF-SAM and EVF-SAM2: image features, the text projector, and the model base class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from evf_sam.config import EvfConfig
from evf_sam.errors import ImageError, PromptError
from evf_sam.modeling.beit3 import BEiT3

SEMANTIC_TOKEN = "[semantic]"


@dataclass
class ImageFeatures:
    """SAM image embeddings of a batch of images.

    `embeddings` [B,C,h,w] is what the mask decoder attends to (SAM-2: with `no_mem_embed` added); `high_res`
    holds SAM-2's two skip maps after `conv_s0`/`conv_s1` ([B,C/8,4h,4w], [B,C/4,2h,2w]); empty for SAM-1.
    """

    embeddings: torch.Tensor
    high_res: tuple[torch.Tensor, ...] = ()

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def select(self, index: torch.Tensor) -> ImageFeatures:
        """Rows `index` (LongTensor [T]) of every tensor, e.g. one row per prompt."""
        index = index.to(self.embeddings.device)
        return ImageFeatures(self.embeddings.index_select(0, index),
                             tuple(t.index_select(0, index) for t in self.high_res))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageFeatures:
        """Copy to another device and/or dtype."""
        return ImageFeatures(self.embeddings.to(device=device, dtype=dtype),
                             tuple(t.to(device=device, dtype=dtype) for t in self.high_res))

    @staticmethod
    def cat(parts: Sequence[ImageFeatures]) -> ImageFeatures:
        """Concatenate along the image axis (e.g. cached single images into one batch)."""
        return ImageFeatures(torch.cat([p.embeddings for p in parts]),
                             tuple(torch.cat(ts) for ts in zip(*(p.high_res for p in parts))))


def build_text_projector(hidden_size: int, out_dim: int) -> nn.ModuleList:
    """Linear(D,D) -> ReLU -> Linear(D,out_dim) as `text_hidden_fcs.0.{0,2}` (the official key names)."""
    return nn.ModuleList([nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_size, out_dim))])


class MultimodalExtractor(nn.Module):
    """Holds BEiT-3 under the attribute name used by the checkpoints (`mm_extractor.beit3`)."""

    def __init__(self, dims: dict[str, int]) -> None:
        super().__init__()
        self.beit3 = BEiT3(**dims)


class EvfPreTrainedModel(PreTrainedModel):
    """Base of EvfSamModel / EvfSam2Model: BEiT-3 + projector, prompt encoding, and the contract attributes.

    Subclasses build `visual_model` and implement `encode_images` and `decode_masks`. `load_model` attaches
    `tokenizer`, `fingerprint` and `model_name`.
    """

    config_class = EvfConfig
    base_model_prefix = "evf"
    main_input_name = "pixel_values"
    family: str = ""
    # Buffers kept in float32 whatever the model dtype (the dense positional encoding is computed in fp32).
    fp32_buffers: tuple[str, ...] = ()

    def __init__(self, config: EvfConfig) -> None:
        super().__init__(config)
        self.mm_extractor = MultimodalExtractor(config.beit3_dims())
        self.text_hidden_fcs = build_text_projector(config.hidden_size, config.out_dim)
        self.tokenizer: Any = None
        self.fingerprint: str = ""
        self.model_name: str = ""

    def _init_weights(self, module: nn.Module) -> None:
        """No-op: modules initialise themselves and checkpoints are loaded by `evf_sam.loading`."""

    @classmethod
    def from_pretrained(cls, path_or_repo: Any, *, dtype: torch.dtype | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                        **ignored: Any) -> EvfPreTrainedModel:
        """`evf_sam.load_model` under the name the official code uses; loading-only kwargs of transformers are ignored."""
        from evf_sam.errors import CheckpointError
        from evf_sam.loading import load_model

        model = load_model(path_or_repo, device=device, dtype=dtype or torch_dtype or torch.float32)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path_or_repo} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def save_pretrained(self, save_directory: Any, **ignored: Any) -> None:
        """`evf_sam.loading.save_checkpoint`: official key names plus the tokenizer files."""
        from evf_sam.loading import save_checkpoint

        save_checkpoint(self, save_directory)

    @property
    def sam_image_size(self) -> int:
        """Side of the square SAM input."""
        raise NotImplementedError

    @property
    def beit_image_size(self) -> int:
        """Side of the square BEiT-3 input (224 for official checkpoints)."""
        return self.mm_extractor.beit3.vision_embed.img_size

    @property
    def max_text_tokens(self) -> int:
        """Longest token sequence (with <s> and </s>) BEiT-3 accepts."""
        return self.mm_extractor.beit3.max_text_tokens

    @property
    def is_multitask(self) -> bool:
        """True when the attached tokenizer knows the "[semantic]" token (the -multitask checkpoints)."""
        if self.tokenizer is None:
            return False
        return self.tokenizer.convert_tokens_to_ids(SEMANTIC_TOKEN) != self.tokenizer.unk_token_id

    def encode_prompts(self, beit_pixels: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """[T,3,224,224], [T,L], [T,L] (1 = real token) -> prompt tokens [T,1,out_dim] (visual [CLS], projected).

        Raises PromptError for texts longer than `max_text_tokens` and ImageError for a wrong image size.
        """
        weight = self.text_hidden_fcs[0][0].weight
        size = self.beit_image_size
        if beit_pixels.ndim != 4 or tuple(beit_pixels.shape[1:]) != (3, size, size):
            raise ImageError(f"BEiT-3 input must be [T,3,{size},{size}], got {list(beit_pixels.shape)}")
        if input_ids.shape[-1] > self.max_text_tokens:
            raise PromptError(f"prompt of {input_ids.shape[-1]} tokens exceeds the model's limit of "
                              f"{self.max_text_tokens} tokens (including <s> and </s>)")
        if input_ids.shape[0] != beit_pixels.shape[0] or attention_mask.shape != input_ids.shape:
            raise PromptError(f"shapes disagree: beit_pixels {list(beit_pixels.shape)}, input_ids "
                              f"{list(input_ids.shape)}, attention_mask {list(attention_mask.shape)}")
        tokens = self.mm_extractor.beit3(beit_pixels.to(device=weight.device, dtype=weight.dtype),
                                         input_ids.to(weight.device), attention_mask.to(weight.device))
        return self.text_hidden_fcs[0](tokens[:, :1])

    def _check_sam_input(self, pixel_values: torch.Tensor) -> None:
        size = self.sam_image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ImageError(f"SAM input must be [B,3,{size},{size}], got {list(pixel_values.shape)}")

    def encode_images(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Normalised SAM input [B,3,S,S] -> ImageFeatures."""
        raise NotImplementedError

    def decode_masks(self, features: ImageFeatures, prompt_tokens: torch.Tensor,
                     image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ImageFeatures of B images, tokens [T,1,C], image_index [T] -> low-res logits [T,1,h,w], IoU [T]."""
        raise NotImplementedError

    def forward(self, pixel_values: torch.Tensor, beit_pixels: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, image_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_images + encode_prompts + decode_masks: low-res logits [T,1,h,w] (float32), IoU [T]."""
        features = self.encode_images(pixel_values)
        tokens = self.encode_prompts(beit_pixels, input_ids, attention_mask)
        return self.decode_masks(features, tokens, image_index)

    def dense_positional_encoding(self, pe_layer: nn.Module, size: tuple[int, int],
                                  dtype: torch.dtype) -> torch.Tensor:
        """SAM's random-Fourier positional encoding of the embedding grid [1,C,h,w], computed in fp32, cast to dtype."""
        gaussian = pe_layer.positional_encoding_gaussian_matrix.float()
        h, w = size
        with torch.autocast(gaussian.device.type, enabled=False):
            ys = (torch.arange(h, device=gaussian.device, dtype=torch.float32) + 0.5) / h
            xs = (torch.arange(w, device=gaussian.device, dtype=torch.float32) + 0.5) / w
            grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)
            angles = 2 * torch.pi * ((2 * grid - 1) @ gaussian)
            pe = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return pe.permute(2, 0, 1).unsqueeze(0).to(dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> EvfPreTrainedModel:
        kept = {name: self.get_buffer(name) for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self.get_buffer(name)
            if new.dtype != torch.float32:
                source = new if old.is_meta or new.is_meta else old
                module_name, _, attr = name.rpartition(".")
                self.get_submodule(module_name)._buffers[attr] = source.to(device=new.device, dtype=torch.float32)
        return self
