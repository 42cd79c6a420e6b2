"""Tiny checkpoints and test tokenizers follow the official file layout and token-id conventions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import XLMRobertaTokenizer

from evf_sam.loading import load_model
from evf_sam.testing import TINY_CORPUS, make_tiny_checkpoint, train_tokenizer

FILES = {"config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer_config.json",
         "special_tokens_map.json"}


@pytest.mark.parametrize("family", ["sam", "sam2"])
def test_tiny_checkpoint_layout_and_loading(family: str, tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "tiny", family=family)
    assert path == tmp_path / "tiny" and {p.name for p in path.iterdir()} == FILES
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == [{"sam": "EvfSamModel", "sam2": "EvfSam2Model"}[family]]
    model = load_model(path)
    assert model.family == family and not model.is_multitask
    assert model.mm_extractor.beit3.text_embed.num_embeddings == len(model.tokenizer)


def test_multitask_checkpoint_knows_semantic(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path / "multi", family="sam2", multitask=True)
    added = json.loads((path / "added_tokens.json").read_text())
    model = load_model(path)
    assert model.is_multitask and model.generation == "head"
    assert added == {"[semantic]": len(model.tokenizer) - 1}
    assert model.tokenizer("[semantic] hair").input_ids[:2] == [0, added["[semantic]"]]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path) -> None:
    first = (make_tiny_checkpoint(tmp_path / "a", seed=3) / "model.safetensors").read_bytes()
    again = (make_tiny_checkpoint(tmp_path / "b", seed=3) / "model.safetensors").read_bytes()
    other = (make_tiny_checkpoint(tmp_path / "c", seed=4) / "model.safetensors").read_bytes()
    assert first == again and first != other


def test_tokenizer_uses_the_fairseq_id_mapping(tmp_path: Path) -> None:
    out = train_tokenizer(tmp_path / "tok", TINY_CORPUS, vocab_size=80, multitask=False)
    pieces = spm.SentencePieceProcessor(model_file=str(out / "sentencepiece.bpe.model"))
    tokenizer = XLMRobertaTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tokenizer.convert_tokens_to_ids("<mask>") == pieces.get_piece_size() + 1
    text = "the dog on the left"
    assert tokenizer(text).input_ids == [0, *(i + 1 for i in pieces.encode(text)), 2]
    assert pieces.get_piece_size() <= 80 and not (out / "added_tokens.json").exists()


def test_retraining_without_multitask_drops_semantic(tmp_path: Path) -> None:
    out = train_tokenizer(tmp_path / "tok", TINY_CORPUS, vocab_size=64, multitask=True)
    assert (out / "added_tokens.json").exists()
    train_tokenizer(out, TINY_CORPUS, vocab_size=64, multitask=False)
    assert "[semantic]" not in XLMRobertaTokenizer.from_pretrained(str(out)).get_vocab()
