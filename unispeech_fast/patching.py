"""Drop-in acceleration of an already-loaded transformers model: :func:`patch` / :func:`unpatch`.

``patch(model)`` builds the unispeech_fast model of the same class (one of the ten) around the *same*
parameter and buffer objects as the transformers instance (our state-dict keys are transformers'), and
routes that instance's ``forward`` to it. Only that instance changes: the class, other instances and
transformers itself are untouched, and ``unpatch(model)`` restores the original forward. Because the
parameters are shared, optimisers, ``.to()``, ``state_dict``/``save_pretrained`` and Trainer keep
working on the transformers object; ``train()``/``eval()`` on it are mirrored on every call.

The patched forward takes our models' arguments (the same names as transformers': ``input_values``,
``attention_mask``, ``labels``, ``mask_time_indices``, ``head_mask``, ``output_attentions``,
``output_hidden_states``, ``return_dict``), returns our output dataclasses (indexable and keyed like
transformers' ``ModelOutput``), and runs the ops on the current :func:`unispeech_fast.backend`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn

from .configuration import UniSpeechConfig, UniSpeechSatConfig
from .models import MODEL_CLASSES

__all__ = ["patch", "unpatch", "is_patched"]

_ATTR = "_unispeech_fast_model"
_CLASSES = {cls.__name__: cls for cls in MODEL_CLASSES}


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` currently runs through :func:`patch`."""
    return _ATTR in vars(model)


def _share(ours: nn.Module, theirs: nn.Module) -> None:
    """Make every parameter and buffer of ``ours`` the very tensor object ``theirs`` holds under that key."""
    ours_keys = set(ours.state_dict(keep_vars=True))
    theirs_state = theirs.state_dict(keep_vars=True)
    missing, unexpected = sorted(ours_keys - set(theirs_state)), sorted(set(theirs_state) - ours_keys)
    if missing or unexpected:
        raise ValueError(
            f"cannot patch {type(theirs).__name__}: state-dict keys differ from unispeech_fast's "
            f"(missing in the model: {missing[:5]}, unknown to unispeech_fast: {unexpected[:5]})"
        )
    for key, tensor in theirs_state.items():
        path, _, name = key.rpartition(".")
        owner = ours.get_submodule(path) if path else ours
        if isinstance(tensor, nn.Parameter):
            setattr(owner, name, tensor)
        else:
            owner.register_buffer(name, tensor, persistent=name not in owner._non_persistent_buffers_set)


def patch(model: nn.Module) -> nn.Module:
    """Route ``model`` (a transformers UniSpeech/UniSpeechSat model of any of the ten classes) through
    unispeech_fast, sharing its parameters. Returns ``model`` itself.

    Raises:
        TypeError: ``model`` is not one of the ten transformers classes.
        ValueError: it is already patched, or its parameters do not match the config.
    """
    name = type(model).__name__
    module = type(model).__module__
    if name not in _CLASSES or not module.startswith("transformers."):
        raise TypeError(
            f"model must be a transformers UniSpeech*/UniSpeechSat* model of one of the classes "
            f"{sorted(_CLASSES)}, got {module}.{name}"
        )
    if is_patched(model):
        raise ValueError(f"this {name} instance is already patched; call unpatch(model) first")
    config_cls = UniSpeechSatConfig if name.startswith("UniSpeechSat") else UniSpeechConfig
    config = config_cls.from_dict(model.config.to_dict())
    with torch.device("meta"):  # no memory: every tensor is replaced by the model's own below
        ours = _CLASSES[name](config)
    _share(ours, model)
    ours.train(model.training)

    @functools.wraps(ours.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if ours.training != model.training:
            ours.train(model.training)
        return ours(*args, **kwargs)

    vars(model)[_ATTR] = ours  # a plain attribute: not a registered submodule (state_dict stays transformers')
    vars(model)["forward"] = forward  # instance attribute: nn.Module.__call__ finds it first
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on ``model`` (its own forward runs again). Returns ``model``."""
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} instance is not patched")
    del vars(model)["forward"]
    del vars(model)[_ATTR]
    return model
