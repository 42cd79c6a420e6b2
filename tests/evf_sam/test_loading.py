"""load_model / save_checkpoint on tiny checkpoints written in the official format."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evf_sam.errors import CheckpointError
from evf_sam.loading import load_model, save_checkpoint
from evf_sam.testing import make_tiny_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "evf-tiny", family="sam", seed=0)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _inputs(model, prompts=("the dog on the left", "circle")):
    torch.manual_seed(1)
    size = model.sam_image_size
    tok = model.tokenizer(list(prompts), padding=True, return_tensors="pt")
    return (torch.randn(2, 3, size, size), torch.randn(len(prompts), 3, 224, 224), tok.input_ids,
            tok.attention_mask, torch.tensor([0, 1][:len(prompts)]))


def test_round_trip_keeps_weights_and_outputs(tiny_sam: Path, tmp_path: Path) -> None:
    model = load_model(tiny_sam)
    stored = load_file(str(tiny_sam / "model.safetensors"))
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in stored.items()}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stored.items())

    again = load_model(save_checkpoint(model, tmp_path / "copy"))
    with torch.no_grad():
        low, score = model(*_inputs(model))
        low2, score2 = again(*_inputs(again))
    assert low.shape == (2, 1, model.sam_image_size // 4, model.sam_image_size // 4) and low.dtype == torch.float32
    assert torch.equal(low, low2) and torch.equal(score, score2)
    assert again.fingerprint == model.fingerprint


def test_contract_attributes(tiny_sam: Path) -> None:
    model = load_model(tiny_sam, device="cpu", dtype="fp32")
    assert (model.family, model.sam_image_size, model.is_multitask) == ("sam", 128, False)
    assert model.model_name == "evf-tiny"
    assert len(model.fingerprint) == 16 and int(model.fingerprint, 16) >= 0
    assert not model.training
    assert model.tokenizer("a").input_ids[0] == 0 and model.tokenizer.pad_token_id == 1


@pytest.mark.parametrize("name, dtype", [("bf16", torch.bfloat16), ("float16", torch.float16),
                                         (torch.bfloat16, torch.bfloat16)])
def test_dtype_is_applied_but_positional_encoding_stays_fp32(tiny_sam: Path, name, dtype) -> None:
    model = load_model(tiny_sam, dtype=name)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.visual_model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.dtype == torch.float32
    low, _ = model(*_inputs(model))
    assert torch.isfinite(low).all()


def test_unknown_dtype_is_rejected(tiny_sam: Path) -> None:
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        load_model(tiny_sam, dtype="int8")


def _edit(ckpt: Path, tmp: Path, edit) -> Path:
    out = _copy(ckpt, tmp / "edited")
    state = load_file(str(out / "model.safetensors"))
    edit(state)
    save_file(state, str(out / "model.safetensors"))
    return out


def test_missing_key_is_named(tiny_sam: Path, tmp_path: Path) -> None:
    path = _edit(tiny_sam, tmp_path, lambda s: s.pop("visual_model.mask_decoder.iou_token.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: visual_model\.mask_decoder\.iou_token\.weight"):
        load_model(path)


def test_unexpected_key_is_named(tiny_sam: Path, tmp_path: Path) -> None:
    path = _edit(tiny_sam, tmp_path, lambda s: s.update({"visual_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: visual_model\.extra\.weight"):
        load_model(path)


def test_wrong_shape_is_named(tiny_sam: Path, tmp_path: Path) -> None:
    path = _edit(tiny_sam, tmp_path, lambda s: s.update({"text_hidden_fcs.0.2.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"text_hidden_fcs\.0\.2\.bias: file \(7,\) vs model \(32,\)"):
        load_model(path)


def test_long_key_lists_are_truncated_with_a_count(tiny_sam: Path, tmp_path: Path) -> None:
    def drop_beit(state):
        for key in [k for k in state if k.startswith("mm_extractor.")]:
            state.pop(key)

    with pytest.raises(CheckpointError, match=r"missing keys: .*\(and \d+ more\)"):
        load_model(_edit(tiny_sam, tmp_path, drop_beit))


def test_mixed_fp16_fp32_file_is_cast(tiny_sam: Path, tmp_path: Path) -> None:
    def half_visual(state):
        for key in [k for k in state if k.startswith("visual_model.")]:
            state[key] = state[key].half()

    model = load_model(_edit(tiny_sam, tmp_path, half_visual), dtype="fp32")
    reference = load_model(tiny_sam)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=2e-3, rtol=2e-3)


def test_pytorch_model_bin(tiny_sam: Path, tmp_path: Path) -> None:
    out = _copy(tiny_sam, tmp_path / "bin")
    torch.save(load_file(str(out / "model.safetensors")), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    model = load_model(out)
    assert torch.equal(model.state_dict()["text_hidden_fcs.0.0.weight"],
                       load_model(tiny_sam).state_dict()["text_hidden_fcs.0.0.weight"])


def test_sharded_safetensors(tiny_sam: Path, tmp_path: Path) -> None:
    out = _copy(tiny_sam, tmp_path / "sharded")
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(out / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert load_model(out).state_dict().keys() == load_model(tiny_sam).state_dict().keys()


def test_fingerprint_follows_the_weights(tiny_sam: Path, tmp_path: Path) -> None:
    path = _edit(tiny_sam, tmp_path, lambda s: s["text_hidden_fcs.0.2.bias"].add_(1.0))
    assert load_model(path).fingerprint != load_model(tiny_sam).fingerprint


def test_missing_directory_and_missing_weights(tiny_sam: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint directory not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        load_model(tiny_sam / "model.safetensors")
    out = _copy(tiny_sam, tmp_path / "noweights")
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        load_model(out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_model(tmp_path / "empty")


def test_repo_id_offline_gives_clear_error(tmp_path: Path) -> None:
    code = ("from evf_sam.loading import load_model\nfrom evf_sam.errors import CheckpointError\n"
            "try:\n    load_model('YxZhang/evf-sam2')\nexcept CheckpointError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ERR 'YxZhang/evf-sam2' is not a local directory, and fetching it as a Hugging Face")
    assert "--local-dir" in run.stdout and "pass its path" in run.stdout


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "evf2-tiny", family="sam2", seed=0)


def test_sam2_round_trip(tiny_sam2: Path, tmp_path: Path) -> None:
    model = load_model(tiny_sam2)
    assert (model.family, model.sam_image_size, model.is_multitask, model.generation) == ("sam2", 128, False, "legacy")
    again = load_model(save_checkpoint(model, tmp_path / "copy"))
    with torch.no_grad():
        low, score = model(*_inputs(model))
        low2, score2 = again(*_inputs(again))
    assert torch.equal(low, low2) and torch.equal(score, score2)


def test_sam2_layer_scale_loads_as_weight_or_gamma(tiny_sam2: Path, tmp_path: Path) -> None:
    official = load_file(str(tiny_sam2 / "model.safetensors"))
    assert "visual_model.memory_encoder.fuser.layers.1.weight" in official  # written under the official name

    def to_gamma(state):
        for i in (0, 1):
            state[f"visual_model.memory_encoder.fuser.layers.{i}.gamma"] = state.pop(
                f"visual_model.memory_encoder.fuser.layers.{i}.weight")

    renamed = load_model(_edit(tiny_sam2, tmp_path, to_gamma))
    gamma = renamed.visual_model.memory_encoder.fuser.layers[1].gamma
    assert torch.equal(gamma, official["visual_model.memory_encoder.fuser.layers.1.weight"])

    def both(state):
        state["visual_model.memory_encoder.fuser.layers.0.gamma"] = state[
            "visual_model.memory_encoder.fuser.layers.0.weight"].clone()

    shutil.rmtree(tmp_path / "edited")
    with pytest.raises(CheckpointError, match="appears twice"):
        load_model(_edit(tiny_sam2, tmp_path, both))


def test_save_needs_a_tokenizer(tmp_path: Path) -> None:
    from evf_sam.modeling.evf_sam import EvfSamModel
    from evf_sam.testing import tiny_config

    with pytest.raises(CheckpointError, match="the model has none attached; pass tokenizer_dir"):
        save_checkpoint(EvfSamModel(tiny_config("sam")), tmp_path / "out")


def test_official_style_from_pretrained_and_save_pretrained(tiny_sam: Path, tmp_path: Path) -> None:
    from evf_sam.modeling.evf_sam import EvfSamModel
    from evf_sam.modeling.evf_sam2 import EvfSam2Model

    model = EvfSamModel.from_pretrained(tiny_sam, torch_dtype=torch.float16, low_cpu_mem_usage=True)
    assert model.dtype == torch.float16 and model.model_name == "evf-tiny"
    model.save_pretrained(tmp_path / "saved")
    assert load_model(tmp_path / "saved").state_dict().keys() == model.state_dict().keys()
    with pytest.raises(CheckpointError, match="holds a EvfSamModel, not a EvfSam2Model"):
        EvfSam2Model.from_pretrained(tiny_sam)
