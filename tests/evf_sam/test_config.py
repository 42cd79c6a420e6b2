"""EvfConfig reads the official config.json files unchanged and derives the model family and dimensions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evf_sam.config import EvfConfig
from evf_sam.errors import CheckpointError
from evf_sam.loading import read_config

# The published configs (reference §2.1): evf-sam / -multitask (transformers 4.31.0) and evf-sam2 (4.43.3).
OFFICIAL = {
    "evf-sam": {"_name_or_path": "evf-sam", "architectures": ["EvfSamModel"], "bos_token_id": 0, "eos_token_id": 2,
                "hidden_size": 1024, "mm_extractor_scale": "large", "model_type": "evf", "out_dim": 256,
                "pad_token_id": 1, "sam_scale": "huge", "tie_word_embeddings": False, "torch_dtype": "float16",
                "transformers_version": "4.31.0"},
    "evf-sam2": {"_name_or_path": "evf-sam2", "architectures": ["EvfSam2Model"], "bos_token_id": 0,
                 "eos_token_id": 2, "hidden_size": 1024, "mm_extractor_scale": "large", "model_type": "evf",
                 "out_dim": 256, "pad_token_id": 1, "sam_scale": "large", "torch_dtype": "float16",
                 "transformers_version": "4.43.3"},
}
# transformers 5 writes `dtype` for `torch_dtype` and stamps its own version; everything else must survive.
RENAMED = {"torch_dtype": "dtype"}
RESTAMPED = {"transformers_version"}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_config_round_trips(name: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(OFFICIAL[name]))
    config = read_config(tmp_path)
    config.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    for key, value in OFFICIAL[name].items():
        if key not in RESTAMPED and key != "_name_or_path":
            assert saved[RENAMED.get(key, key)] == value, key
    reread, original = read_config(tmp_path / "saved").to_dict(), config.to_dict()
    ignored = RESTAMPED | {"_name_or_path"}  # transformers does not save the load path
    def kept(values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in ignored}

    assert kept(reread) == kept(original)


def test_official_values_and_family() -> None:
    sam = EvfConfig.from_dict(OFFICIAL["evf-sam"])
    assert sam.family == "sam" and sam.sam_dims()["embed_dim"] == 1280 and sam.beit3_dims()["layers"] == 24
    sam2 = EvfConfig.from_dict(OFFICIAL["evf-sam2"])
    assert sam2.family == "sam2" and sam2.sam2_preset() == ("configs/sam2/sam2_hiera_l.yaml", {})
    assert sam2.sam2_generation_override() is None


def test_defaults_follow_the_reference() -> None:
    config = EvfConfig()
    assert (config.hidden_size, config.out_dim, config.pad_token_id, config.bos_token_id, config.eos_token_id,
            config.tie_word_embeddings) == (768, 256, 1, 0, 2, False)
    assert config.beit3_dims()["embed_dim"] == 768


def test_family_from_sam_scale_without_architectures() -> None:
    assert EvfConfig(hidden_size=1024, mm_extractor_scale="large", sam_scale="huge").family == "sam"
    assert EvfConfig(hidden_size=1024, mm_extractor_scale="large", sam_scale="tiny").family == "sam2"
    with pytest.raises(ValueError, match="cannot tell the model family"):
        EvfConfig(sam_scale="giant").family


def test_unsupported_architecture_is_not_guessed_from_sam_scale(tmp_path: Path) -> None:
    values = {"architectures": ["EvfEffiSamModel"], "hidden_size": 1024, "mm_extractor_scale": "large",
              "sam_scale": "tiny"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    with pytest.raises(CheckpointError, match=r"unsupported architectures \['EvfEffiSamModel'\]"):
        read_config(tmp_path)


def test_optional_small_model_fields_override_presets() -> None:
    config = EvfConfig(hidden_size=32, beit3_config={"embed_dim": 32, "layers": 2}, sam_config={"depth": 2})
    assert config.beit3_dims() | {} == {"embed_dim": 32, "layers": 2, "heads": 12, "ffn_dim": 3072,
                                        "vocab_size": 64010, "img_size": 224, "patch_size": 16,
                                        "max_text_positions": 1024}
    assert config.sam_dims()["depth"] == 2 and config.sam_dims()["embed_dim"] == 1280


@pytest.mark.parametrize("values, message", [
    ({"hidden_size": 1024, "mm_extractor_scale": "huge"}, "mm_extractor_scale must be one of"),
    ({"hidden_size": 768, "mm_extractor_scale": "large"}, r"hidden_size \(768\) must equal the BEiT-3 embed_dim"),
])
def test_invalid_configs_are_reported(values: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        EvfConfig(**values).beit3_dims()
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["EvfSamModel"], **values}))
    with pytest.raises(CheckpointError, match=message):
        read_config(tmp_path)


def test_unreadable_config_json(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        read_config(tmp_path)
