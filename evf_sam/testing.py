"""Tiny random EVF checkpoints in the official format, for tests and examples (no download needed).

`make_tiny_checkpoint` writes a complete Hugging Face-style directory (config.json, model.safetensors,
sentencepiece.bpe.model, tokenizer files) of a small random model that `evf_sam.load_model` reads in about a second.
`train_tokenizer` builds the matching XLM-R-style sentencepiece tokenizer from a few sentences.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from evf_sam.config import EvfConfig

# XLM-R / fairseq special tokens; the spm model holds <unk>, <s>, </s> at ids 0-2 and the tokenizer shifts by one.
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                  "cls_token": "<s>", "pad_token": "<pad>", "mask_token": "<mask>"}
TINY_CORPUS = [
    "the dog on the left", "a red car parked near the tree", "the man in a blue shirt holding a cup",
    "white cat sleeping on the sofa", "the zebra in the middle", "a green bottle on the table",
    "person riding a bike", "the tallest building", "two birds in the sky", "yellow umbrella",
    "[semantic] hair", "[semantic] human face", "the shape in the top right corner", "circle", "square", "triangle",
]
TINY_BEIT3 = {"embed_dim": 32, "layers": 2, "heads": 2, "ffn_dim": 64, "img_size": 224, "patch_size": 16,
              "max_text_positions": 64}
TINY_SAM = {"image_size": 128, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2,
            "global_attn_indexes": [1], "window_size": 4, "prompt_dim": 32, "decoder_mlp_dim": 64,
            "decoder_heads": 4, "iou_head_hidden_dim": 32}
TINY_SAM2 = {"image_size": 128, "embed_dim": 8, "num_heads": 1, "stages": [1, 1, 2, 1], "global_att_blocks": [3],
             "window_spec": [8, 4, 4, 2], "window_pos_embed_bkg_spatial_size": [4, 4], "d_model": 32, "mem_dim": 16,
             "memory_attention_layers": 1, "memory_ffn_dim": 64}


def train_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str], vocab_size: int,
                    multitask: bool = False) -> Path:
    """Train a unigram sentencepiece model on `corpus` and write XLM-R tokenizer files into `out_dir`.

    Ids follow the fairseq mapping of the official checkpoints: <s>=0, <pad>=1, </s>=2, <unk>=3, pieces = spm id + 1,
    then <mask>; `multitask` adds "[semantic]" (added_tokens.json) right after <mask>. `vocab_size` is an upper bound.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        character_coverage=1.0, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1)
    (out / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    pieces = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    config = {"tokenizer_class": "XLMRobertaTokenizer", "model_max_length": 512, "padding_side": "right",
              **SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2))
    added = out / "added_tokens.json"
    if multitask:
        added.write_text(json.dumps({"[semantic]": pieces + 2}))
    elif added.exists():
        added.unlink()
    return out


def tiny_config(family: str = "sam", vocab_size: int = 128) -> EvfConfig:
    """The EvfConfig of a tiny model of `family` ("sam" | "sam2") with `vocab_size` text embedding rows."""
    if family not in ("sam", "sam2"):
        raise ValueError(f"family must be 'sam' or 'sam2', got {family!r}")
    beit3 = {**TINY_BEIT3, "vocab_size": vocab_size}
    if family == "sam":
        return EvfConfig(architectures=["EvfSamModel"], hidden_size=32, out_dim=32, mm_extractor_scale="base",
                         sam_scale="huge", beit3_config=beit3, sam_config=dict(TINY_SAM))
    return EvfConfig(architectures=["EvfSam2Model"], hidden_size=32, out_dim=32, mm_extractor_scale="base",
                     sam_scale="tiny", beit3_config=beit3, sam_config=dict(TINY_SAM2))


def make_tiny_checkpoint(out_dir: str | os.PathLike, family: str = "sam", seed: int = 0,
                         multitask: bool = False) -> Path:
    """Write a tiny random EVF checkpoint of `family` ("sam" | "sam2") into `out_dir`; returns the directory."""
    from evf_sam.loading import attach_tokenizer, model_class, save_checkpoint

    out = Path(out_dir)
    train_tokenizer(out, TINY_CORPUS, vocab_size=96, multitask=multitask)
    from transformers import XLMRobertaTokenizer

    rows = len(XLMRobertaTokenizer.from_pretrained(str(out)))
    config = tiny_config(family, vocab_size=rows)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = model_class(config)(config).eval()
    finally:
        torch.random.set_rng_state(state)
    attach_tokenizer(model, out)
    return save_checkpoint(model, out)
