"""Reading and writing EVF checkpoints (Hugging Face format: config.json + weights + tokenizer files).

`load_model` accepts a local directory or a Hugging Face repo id, reads safetensors (single or sharded) or
`pytorch_model.bin`, casts every tensor (official files mix fp16 and fp32), maps the few names that differ between
the official files and the `sam2` package, checks the key set strictly, and materialises the weights without
building a randomly initialised copy first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch
from accelerate import init_empty_weights

from evf_sam.config import EvfConfig
from evf_sam.errors import CheckpointError
from evf_sam.modeling.common import EvfPreTrainedModel

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
HUB_PATTERNS = ["config.json", *TOKENIZER_FILES]
SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
BIN_PATTERNS = ["*.bin", "*.bin.index.json"]
# The EVF code stores SAM-2's layer-scale parameters as `weight` (transformers 4.x renamed every `gamma`); the
# `sam2` package calls them `gamma`. Files may use either; we write the official name.
_FILE_GAMMA = re.compile(r"^(visual_model\.memory_encoder\.fuser\.layers\.\d+)\.weight$")
_MODEL_GAMMA = re.compile(r"^(visual_model\.memory_encoder\.fuser\.layers\.\d+)\.gamma$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LISTED = 20


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.float32/bfloat16/float16 or one of "fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "half"."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif str(dtype).lower().removeprefix("torch.") in DTYPES:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPES)}")


def resolve_checkpoint(path_or_repo: str | os.PathLike) -> tuple[Path, str]:
    """A local checkpoint directory (downloading a Hub repo id if needed) and its short name."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path, path.resolve().name
    text = str(path_or_repo)
    if path.exists():
        raise CheckpointError(f"{text!r} is a file; pass the checkpoint directory that holds config.json and weights")
    if not _REPO_ID.match(text):
        raise CheckpointError(f"checkpoint directory not found: {text!r} (expected a directory holding config.json "
                              f"and model weights, or a Hugging Face repo id such as 'YxZhang/evf-sam2')")
    from huggingface_hub import snapshot_download

    try:  # safetensors first; the .bin files only when the repo has no safetensors weights
        directory = Path(snapshot_download(text, allow_patterns=HUB_PATTERNS + SAFETENSORS_PATTERNS))
        if not any((directory / name).is_file() for name in WEIGHT_FILES):
            directory = Path(snapshot_download(text, allow_patterns=HUB_PATTERNS + BIN_PATTERNS))
    except Exception as error:  # noqa: BLE001 - any hub failure becomes one clear message
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}"
        raise CheckpointError(
            f"{text!r} is not a local directory, and fetching it as a Hugging Face repo id failed ({reason}). "
            f"If this machine is offline or the repo is private, download it elsewhere with "
            f"`huggingface-cli download {text} --local-dir DIR`, copy DIR here and pass its path instead.") from error
    return Path(directory), text.rsplit("/", 1)[-1]


def read_config(directory: Path) -> EvfConfig:
    """EvfConfig from `directory/config.json` (official files are read unchanged)."""
    path = directory / "config.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing: not an EVF checkpoint directory") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if "torch_dtype" in values and "dtype" not in values:
        values["dtype"] = values.pop("torch_dtype")
    config = EvfConfig.from_dict(values)
    try:
        config.family
        config.beit3_dims()
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    return config


def model_class(config: EvfConfig) -> type[EvfPreTrainedModel]:
    """EvfSamModel or EvfSam2Model, chosen by `config.family`."""
    if config.family == "sam":
        from evf_sam.modeling.evf_sam import EvfSamModel
        return EvfSamModel
    from evf_sam.modeling.evf_sam2 import EvfSam2Model
    return EvfSam2Model


def weight_files(directory: Path) -> list[Path]:
    """The weight files of a checkpoint: one file or the shards listed by an index; safetensors preferred."""
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as error:
                raise CheckpointError(f"{path} is not a valid shard index: {error}") from error
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{path} lists shards that are missing: {missing}")
            return [directory / s for s in shards]
        return [path]
    raise CheckpointError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}")


def _read_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one weight file; they may be views of a memory-mapped file (copy them before keeping them)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for key in list(state):
                yield key, state.pop(key)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - corrupt/unsafe files of any kind
        raise CheckpointError(f"cannot read weights from {path}: {type(error).__name__}: {error}") from error


def to_model_key(key: str) -> str:
    """Checkpoint key -> our parameter name."""
    return _FILE_GAMMA.sub(r"\1.gamma", key)


def to_checkpoint_key(key: str) -> str:
    """Our parameter name -> the official checkpoint key."""
    return _MODEL_GAMMA.sub(r"\1.weight", key)


def read_state_dict(directory: Path, device: torch.device, dtype: torch.dtype,
                    keep_fp32: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint under our key names, each cast to `dtype` (`keep_fp32` keys: float32)."""
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        for key, tensor in _read_tensors(path):
            key = to_model_key(key)
            if key in state:
                raise CheckpointError(f"{key!r} appears twice in {directory} (as 'gamma' and 'weight'?)")
            target = (torch.float32 if key in keep_fp32 else dtype) if tensor.is_floating_point() else tensor.dtype
            # copy=True: never keep views of the mapped file (it may be overwritten later, e.g. by save_checkpoint)
            state[key] = tensor.to(device=device, dtype=target, copy=True)
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing and unexpected keys and shape mismatches."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {expected[k]}"
             for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            more = f" (and {len(items) - _LISTED} more)" if len(items) > _LISTED else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:_LISTED])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match {type(model).__name__}: " + "; ".join(problems))


def fingerprint(directory: Path) -> str:
    """16 hex chars identifying the checkpoint: sha256 over config.json and every weight file."""
    digest = hashlib.sha256()
    for path in [directory / "config.json", *weight_files(directory)]:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def attach_tokenizer(model: EvfPreTrainedModel, directory: str | os.PathLike, name: str | None = None) -> None:
    """Set `model.tokenizer` (XLM-R sentencepiece tokenizer from `directory`, right padding) and `model.model_name`."""
    from transformers import XLMRobertaTokenizer

    directory = Path(directory)
    if not (directory / "sentencepiece.bpe.model").is_file():
        raise CheckpointError(f"{directory} has no sentencepiece.bpe.model (the XLM-R tokenizer of the checkpoint)")
    try:
        tokenizer = XLMRobertaTokenizer.from_pretrained(str(directory), padding_side="right")
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"cannot read the tokenizer in {directory}: {type(error).__name__}: {error}") from error
    rows = model.mm_extractor.beit3.text_embed.num_embeddings
    if len(tokenizer) > rows:
        raise CheckpointError(f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model embeds {rows}")
    model.tokenizer = tokenizer
    model.model_name = name or directory.resolve().name


def load_model(path_or_repo: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32) -> EvfPreTrainedModel:
    """Load an EVF-SAM / EVF-SAM2 checkpoint (local dir or HF repo id) in eval mode on `device` in `dtype`."""
    device, dtype = torch.device(device), parse_dtype(dtype)
    directory, name = resolve_checkpoint(path_or_repo)
    config = read_config(directory)
    cls = model_class(config)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls(config)
    except ValueError as error:
        raise CheckpointError(f"{directory / 'config.json'}: {error}") from error
    state = read_state_dict(directory, device, dtype, cls.fp32_buffers)
    check_state_dict(model, state, str(directory))
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.to(device=device, dtype=dtype).eval()
    attach_tokenizer(model, directory, name)
    model.fingerprint = fingerprint(directory)
    return model


def checkpoint_state_dict(model: EvfPreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's state dict under the official checkpoint key names."""
    return {to_checkpoint_key(k): v for k, v in model.state_dict().items()}


def save_checkpoint(model: EvfPreTrainedModel, out_dir: str | os.PathLike,
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write config.json, model.safetensors and the tokenizer files so that `load_model(out_dir)` reads them back.

    Tokenizer files are copied from `tokenizer_dir`, else from the directory `model.tokenizer` was loaded from.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = Path(tokenizer_dir) if tokenizer_dir else None
    if source is None and model.tokenizer is not None:
        source = Path(model.tokenizer.name_or_path)
    if source is None:
        raise CheckpointError("cannot save the tokenizer: the model has none attached; pass tokenizer_dir")
    if not (source / "sentencepiece.bpe.model").is_file():
        raise CheckpointError(f"cannot save the tokenizer: no sentencepiece.bpe.model in {source}")
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = next(model.parameters()).dtype
    config.save_pretrained(out)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in checkpoint_state_dict(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for filename in TOKENIZER_FILES:
        if (source / filename).is_file() and source.resolve() != out.resolve():
            shutil.copyfile(source / filename, out / filename)
    return out
