"""Reading and writing checkpoints in transformers' format.

Accepted layouts in a directory: ``model.safetensors``; sharded safetensors with
``model.safetensors.index.json``; ``pytorch_model.bin`` (optionally sharded with
``pytorch_model.bin.index.json``). Weight-norm parameters load under both namings
(``weight_g``/``weight_v`` and ``parametrizations.weight.original0/1``). A backbone checkpoint loads
into a head class (the head is initialised fresh and reported) and a head checkpoint into a backbone
(the head keys are dropped and reported), with transformers' prefix handling.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import torch

from .configuration import SUPPORTED_DTYPES, ConfigError

__all__ = ["CheckpointError", "ModelMismatchError", "load_pretrained", "save_pretrained", "read_state_dict",
           "load_model"]

logger = logging.getLogger("unispeech_fast")

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

_LEGACY_RENAMES = ((re.compile(r"\.weight_g$"), ".parametrizations.weight.original0"),
                   (re.compile(r"\.weight_v$"), ".parametrizations.weight.original1"))


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model; the message names the file or keys."""


class ModelMismatchError(ValueError):
    """The checkpoint's class does not fit the task (e.g. ``transcribe`` on a model without a CTC head)."""


# ------------------------------------------------------------------------------------------ resolve
def resolve_directory(path_or_id: str | os.PathLike) -> str:
    """A local directory as is, else a hub id downloaded with huggingface_hub (when installed)."""
    path = os.fspath(path_or_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    looks_like_id = re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", path) is not None and not path.startswith((".", "/"))
    if not looks_like_id:
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(
            f"{path!r} is not a local directory, and huggingface_hub is not installed to fetch it from the hub "
            "(pip install 'unispeech_fast[hub]')"
        ) from None
    try:
        return huggingface_hub.snapshot_download(
            path, allow_patterns=["config.json", "*.safetensors", "*.bin", "*.index.json", "vocab.json"]
        )
    except Exception as exc:  # offline, unknown repo, auth: all end here with the cause attached
        raise FileNotFoundError(
            f"{path!r} is not a local directory and could not be fetched from the hub ({type(exc).__name__}: {exc})"
        ) from exc


# ------------------------------------------------------------------------------------------ read
def _read_safetensors(file: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(file, device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file (corrupt or truncated?): {exc}") from exc


def _read_bin(file: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{file}: not a readable PyTorch weights file (corrupt or truncated?): {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state dict)")
    return state


def _read_index(file: str) -> dict[str, str]:
    try:
        with open(file, encoding="utf-8") as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except Exception as exc:
        raise CheckpointError(f"{file}: not a valid shard index ({type(exc).__name__}: {exc})") from exc
    return weight_map


def read_state_dict(directory: str) -> dict[str, torch.Tensor]:
    """Load all tensors of the checkpoint in ``directory`` (safetensors preferred over .bin)."""
    for index_name, weights_name, reader in (
        (SAFE_INDEX, SAFE_WEIGHTS, _read_safetensors),
        (BIN_INDEX, BIN_WEIGHTS, _read_bin),
    ):
        single = os.path.join(directory, weights_name)
        if os.path.isfile(single):
            return reader(single)
        index = os.path.join(directory, index_name)
        if os.path.isfile(index):
            state: dict[str, torch.Tensor] = {}
            weight_map = _read_index(index)
            for shard in sorted(set(weight_map.values())):
                shard_file = os.path.join(directory, shard)
                if not os.path.isfile(shard_file):
                    raise CheckpointError(f"{index}: lists shard {shard}, which is missing from {directory}")
                state.update(reader(shard_file))
            missing = sorted(set(weight_map) - set(state))
            if missing:
                raise CheckpointError(f"{index}: keys listed in the index are absent from the shards: {missing[:10]}")
            return state
    raise CheckpointError(
        f"no weights found in {directory}: expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {BIN_WEIGHTS} or {BIN_INDEX}"
    )


# ------------------------------------------------------------------------------------------ key mapping
def _rename_legacy(key: str) -> str:
    for pattern, repl in _LEGACY_RENAMES:
        key = pattern.sub(repl, key)
    return key


def _match_keys(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Map checkpoint keys onto the model's, transformers-style; returns (state, report)."""
    prefix = model.base_model_prefix + "."
    is_head = hasattr(model, model.base_model_prefix) and model.base_model is not model
    expected = set(model.state_dict().keys())
    state = {_rename_legacy(k): v for k, v in state.items()}
    has_prefix = any(k.startswith(prefix) for k in state)
    ignored: list[str] = []
    if is_head and not has_prefix:
        # Backbone checkpoint into a head: every key belongs under the prefix.
        state = {prefix + k: v for k, v in state.items()}
    elif not is_head and has_prefix:
        # Head checkpoint into a backbone: keep the backbone part, drop the head.
        ignored = sorted(k for k in state if not k.startswith(prefix))
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    elif is_head:
        # Same family of checkpoint: keys of another head are dropped (reported), as transformers does.
        ignored = sorted(k for k in state if not k.startswith(prefix) and k not in expected)
        state = {k: v for k, v in state.items() if k not in ignored}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    backbone_key = (lambda k: k.startswith(prefix)) if is_head else (lambda k: True)
    optional = tuple((prefix if is_head else "") + k for k in model._optional_backbone_keys)
    newly_initialized = [k for k in missing if not backbone_key(k) or k in optional]
    missing_backbone = [k for k in missing if k not in newly_initialized]
    unexpected_optional = [k for k in unexpected if k in optional]
    unexpected = [k for k in unexpected if k not in optional]
    for k in unexpected_optional:
        state.pop(k)
    ignored += unexpected_optional
    report = {
        "missing_keys": missing_backbone,
        "unexpected_keys": unexpected,
        "newly_initialized_keys": newly_initialized,
        "ignored_keys": ignored,
    }
    return state, report


def _resolve_dtype(dtype: Any, config, state: dict[str, torch.Tensor]) -> torch.dtype:
    """The parameter dtype: the ``dtype`` argument, else the config's (validated when the config was
    read, so a bad one names config.json), else the stored tensors'. Only dtypes the models run in
    (:data:`~unispeech_fast.configuration.SUPPORTED_DTYPES`) are accepted: not int8 or float8."""
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        stored = getattr(config, "dtype", None)
        if stored is not None:
            return getattr(torch, str(stored).replace("torch.", ""))
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        return floats[0] if floats and str(floats[0]).replace("torch.", "") in SUPPORTED_DTYPES else torch.float32
    name = str(dtype).replace("torch.", "") if isinstance(dtype, (str, torch.dtype)) else None
    if name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be 'auto', None or one of the dtypes the models run in "
                         f"({', '.join(SUPPORTED_DTYPES)}), got {dtype!r}")
    return getattr(torch, name)


def load_pretrained(cls, path_or_id, dtype, device, strict, output_loading_info, config_overrides):
    directory = resolve_directory(path_or_id)
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"no config.json in {directory}")
    try:
        config = cls.config_class.from_pretrained(config_file, **config_overrides)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if config_file in msg else f"{config_file}: {msg}") from exc
    state = read_state_dict(directory)
    target_dtype = _resolve_dtype(dtype, config, state)
    model = cls(config)
    state, report = _match_keys(model, state)
    expected = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"{directory}: tensor shapes do not match the config:\n  " + "\n  ".join(mismatched))
    if strict and (report["missing_keys"] or report["unexpected_keys"]):
        raise CheckpointError(
            f"{directory} does not match {cls.__name__}:\n"
            f"  missing keys: {report['missing_keys']}\n  unexpected keys: {report['unexpected_keys']}\n"
            "(pass strict=False to load anyway; missing parameters then keep their fresh initialisation)"
        )
    non_float = [k for k, v in state.items() if not v.is_floating_point()]
    if non_float:
        raise CheckpointError(f"{directory}: non-floating tensors where parameters are expected: {non_float[:10]}")
    model.load_state_dict(state, strict=False)
    if report["newly_initialized_keys"]:
        logger.warning(
            "%s: these parameters are not in the checkpoint and were newly initialised (train them before use): %s",
            cls.__name__, report["newly_initialized_keys"],
        )
    if report["ignored_keys"]:
        logger.warning("%s: these checkpoint keys are not used by this class: %s", cls.__name__, report["ignored_keys"])
    if not strict and (report["missing_keys"] or report["unexpected_keys"]):
        logger.warning("%s: missing keys %s, unexpected keys %s (strict=False)", cls.__name__,
                       report["missing_keys"], report["unexpected_keys"])
    model.to(dtype=target_dtype)
    if device is not None:
        model.to(device=device)
    model.config.dtype = str(target_dtype).replace("torch.", "")
    model.eval()
    model.loading_info = report
    return (model, report) if output_loading_info else model


# ------------------------------------------------------------------------------------------ write
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must be an int (bytes) or like '500MB', got {size!r}")
    return int(match.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (briefly process-wide)
    os.umask(mask)
    return mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, then the file's mode made ``0o666 & ~umask``, as ``open`` creates a file:
    safetensors (0.8) creates it readable by its owner only (0600)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def save_pretrained(model, directory, *, max_shard_size=None, safe_serialization=True) -> None:
    """Write ``config.json`` and weights (safetensors, or ``pytorch_model.bin``), sharded if asked."""
    os.makedirs(directory, exist_ok=True)
    config = model.config.copy()
    config.architectures = [type(model).__name__]
    config.dtype = str(model.dtype).replace("torch.", "")
    config.save_pretrained(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Tied or shared storage would break safetensors; clone to be safe.
    state = {k: v.clone() if v.untyped_storage().nbytes() != v.numel() * v.element_size() else v
             for k, v in state.items()}
    weights_name, index_name = (SAFE_WEIGHTS, SAFE_INDEX) if safe_serialization else (BIN_WEIGHTS, BIN_INDEX)
    for stale in (SAFE_WEIGHTS, SAFE_INDEX, BIN_WEIGHTS, BIN_INDEX):
        path = os.path.join(directory, stale)
        if os.path.isfile(path):
            os.remove(path)

    def write(tensors: dict[str, torch.Tensor], file: str) -> None:
        if safe_serialization:
            save_safetensors(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        else:
            torch.save(tensors, os.path.join(directory, file))

    if max_shard_size is None:
        write(state, weights_name)
        return
    limit = _parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        write(state, weights_name)
        return
    stem, ext = weights_name.rsplit(".", 1)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.{ext}"
        write(shard, name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, index_name), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------------ load by architecture
def _model_classes() -> dict[str, type]:
    from .models import MODEL_CLASSES  # imported here: the models import this module

    return {cls.__name__: cls for cls in MODEL_CLASSES}


def load_model(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
):
    """Load a checkpoint directory with the class named in its ``config.json`` ("architectures").

    Without "architectures" the bare backbone of the config's ``model_type`` is used. The model
    gets two attributes these functions read: ``checkpoint_dir`` (where ``vocab.json`` is looked
    up) and ``preprocessor_config`` (the directory's ``preprocessor_config.json``, or ``{}``).
    """
    directory = resolve_directory(path)
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        raise CheckpointError(f"no config.json in {directory}")
    config = _read_json_object(config_file, CheckpointError)
    classes = _model_classes()
    archs = config.get("architectures") or []
    if archs:
        name = archs[0]
        if name not in classes:
            raise ModelMismatchError(
                f"{config_file}: architectures[0] is {name!r}, which unispeech_fast does not implement "
                f"(known: {', '.join(sorted(classes))})"
            )
    else:
        model_type = config.get("model_type")
        backbones = {"unispeech": "UniSpeechModel", "unispeech-sat": "UniSpeechSatModel"}
        if model_type not in backbones:
            raise ModelMismatchError(
                f"{config_file}: no 'architectures' field, and model_type {model_type!r} is neither "
                "'unispeech' nor 'unispeech-sat'"
            )
        name = backbones[model_type]
    model = classes[name].from_pretrained(directory, dtype=dtype, device=device)
    model.checkpoint_dir = directory
    model.preprocessor_config = {}
    pre = os.path.join(directory, "preprocessor_config.json")
    if os.path.isfile(pre):
        model.preprocessor_config = _read_json_object(pre, CheckpointError)
    return model.eval()


def _read_json_object(path: str, error: type[Exception]) -> dict:
    """The JSON object in ``path``; ``error`` naming the file when it is not valid JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
