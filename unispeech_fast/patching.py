"""Drop-in acceleration of an already-loaded transformers model: :func:`patch` / :func:`unpatch`.

``patch(model)`` builds the unispeech_fast model of the same class (one of the ten) and routes that
instance's ``forward`` to it. Only that instance changes: the class, other instances and transformers
itself are untouched, and ``unpatch(model)`` restores the original forward. Our state-dict keys are
transformers', so optimisers, ``.to()``, ``state_dict``/``save_pretrained`` and Trainer keep working on
the transformers object.

**The patched model follows the transformers model as it changes.** Our model holds the transformers
model's own layer objects (every ``Linear``, ``Conv1d``, ``LayerNorm``, ``GroupNorm`` and ``Dropout``)
and the parameters the others own directly, and before every call it re-reads them from the transformers
model: parameters replaced in any way (``load_state_dict(..., assign=True)``, a new ``nn.Parameter``,
``.to()``), layers swapped for other modules (a LoRA-style wrapper), hooks on those layers, ``train()`` /
``eval()`` of any submodule, ``gradient_checkpointing`` flags and config edits (the model is rebuilt) are
all seen on the next call. Writes through ``.data`` need nothing: the tensors are the same objects. What
cannot be followed is refused with a :class:`PatchedModelChangedError` naming the submodule, never run
stale: hooks on a module that unispeech_fast replaces by its own (an encoder layer, the attention, the
feature encoder...) or on a layer whose weights a fused kernel reads directly (the conv layers, the
positional conv, the TDNN kernels), a non-plain module in the place of such a layer, or a replaced or
removed structural submodule. ``unpatch(model)`` then runs transformers' own forward.

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

__all__ = ["patch", "unpatch", "is_patched", "PatchedModelChangedError"]

_ATTR = "_unispeech_fast_model"
_CLASSES = {cls.__name__: cls for cls in MODEL_CLASSES}
#: Layers our model takes over from the transformers model as objects (so replacing one there replaces it here).
_SHARED_LAYERS = (nn.Linear, nn.Conv1d, nn.LayerNorm, nn.GroupNorm, nn.Dropout)
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # never called, so hooks on them never fire anywhere


class PatchedModelChangedError(RuntimeError):
    """The transformers model behind :func:`patch` changed in a way the patched forward cannot follow."""


def is_patched(model: nn.Module) -> bool:
    """True when ``model`` currently runs through :func:`patch`."""
    return _ATTR in vars(model)


# transformers installs these on its layers on the first call asking for hidden states or attentions;
# they record only while transformers' own forward runs (a context variable it sets), so never under ours.
_TRANSFORMERS_CAPTURE = "transformers.utils.output_capturing"


def _hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward/backward (pre-)hooks that would do something when it is called."""
    tables = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
    if not any(tables):
        return False
    return any(getattr(fn, "__module__", None) != _TRANSFORMERS_CAPTURE for table in tables for fn in table.values())


def _is_weight_normed(module: nn.Module) -> bool:
    """A conv whose ``weight`` is exactly ``weight_norm(dim=2)`` (what the positional conv kernels fold)."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    return (plist is not None and len(plist) == 1 and type(plist[0]).__name__ == "_WeightNorm"
            and getattr(plist[0], "dim", None) == 2 and not _hooks(plist) and not _hooks(plist[0]))


class _Follower:
    """Keeps our model in step with the transformers model: :meth:`sync` runs before every patched call."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._build()

    def _build(self) -> None:
        model = self.model
        name = type(model).__name__
        self.config_dict = model.config.to_dict()
        config_cls = UniSpeechSatConfig if name.startswith("UniSpeechSat") else UniSpeechConfig
        config = config_cls.from_dict(self.config_dict)
        with torch.device("meta"):  # no memory: every tensor is replaced by the model's own below
            ours = _CLASSES[name](config)
        _check_keys(ours, model)
        self.ours = ours
        self.types: dict[str, type] = {}  # structural path -> the transformers module's type at patch time
        self.shared: dict[str, tuple[type, bool] | None] = {}  # layer path -> (type, weight-normed) if read by weight
        self.own: set[str] = set()  # parameterless modules of ours that transformers does not have
        self._record(ours, model, "")
        self.sync()
        ours_state, theirs_state = ours.state_dict(keep_vars=True), model.state_dict(keep_vars=True)
        unshared = [k for k, v in ours_state.items() if theirs_state[k] is not v]
        if unshared:  # a structure this module does not know how to follow: refuse rather than copy
            raise ValueError(f"cannot patch {name}: tensors not shared with the model: {unshared[:5]}")
        if _ATTR in vars(model):
            vars(model)[_ATTR] = ours

    def _record(self, ours: nn.Module, theirs: nn.Module, path: str) -> None:
        self.types[path] = type(theirs)
        reads = getattr(type(ours), "READS_WEIGHTS_OF", ())
        for child, sub in ours._modules.items():
            if sub is None:
                continue
            sub_path = f"{path}.{child}" if path else child
            target = theirs._modules.get(child)
            if target is None:
                if any(True for _ in sub.parameters()) or any(True for _ in sub.buffers()):
                    raise ValueError(f"cannot patch {type(self.model).__name__}: it has no submodule {sub_path!r}")
                self.own.add(sub_path)
            elif isinstance(sub, _SHARED_LAYERS):
                base = next(t for t in _SHARED_LAYERS if isinstance(sub, t))
                self.shared[sub_path] = (base, nn.utils.parametrize.is_parametrized(sub)) if child in reads else None
            else:
                self._record(sub, target, sub_path)

    def sync(self) -> nn.Module:
        """Re-read layers, parameters, modes and config from the transformers model; returns our model."""
        if self.model.config.to_dict() != self.config_dict:
            self._build()  # a config edit may change structure or constants baked into our modules
            return self.ours
        self._sync(self.ours, self.model, "")
        return self.ours

    def _sync(self, ours: nn.Module, theirs: nn.Module, path: str) -> None:
        """Follow ``theirs`` (the transformers module at ``path``, whose place our ``ours`` takes)."""
        if type(theirs) is not self.types[path]:
            raise PatchedModelChangedError(
                f"the patched model's submodule {path!r} was replaced ({self.types[path].__name__} -> "
                f"{type(theirs).__name__}); patch() follows replaced Linear/Conv1d/LayerNorm/GroupNorm/Dropout "
                f"layers only. Call unispeech_fast.unpatch(model) to run transformers' forward")
        if path and not isinstance(theirs, _CONTAINERS):  # the model's own hooks run (its __call__ runs)
            _refuse_hooks(path, theirs)
        for child, sub in theirs._modules.items():  # modules of theirs that ours has no counterpart of
            if sub is not None and child not in ours._modules:
                for sub_path, module in sub.named_modules(prefix=f"{path}.{child}" if path else child):
                    _refuse_hooks(sub_path, module)
        ours.training = theirs.training
        for flag in ("gradient_checkpointing", "_requires_grad"):
            if flag in vars(ours) and flag in vars(theirs):
                setattr(ours, flag, getattr(theirs, flag))
        for kind in ("_parameters", "_buffers"):
            mine, their = getattr(ours, kind), getattr(theirs, kind)
            for key in mine:
                if key not in their:
                    raise PatchedModelChangedError(
                        f"the patched model's {path or 'top-level module'} no longer has its {kind[1:-1]} {key!r}")
                if mine[key] is not their[key]:
                    mine[key] = their[key]
        for child, sub in ours._modules.items():
            if sub is None:
                continue
            sub_path = f"{path}.{child}" if path else child
            if sub_path in self.own:
                sub.train(theirs.training)
                continue
            target = theirs._modules.get(child)
            if target is None:
                raise PatchedModelChangedError(f"the patched model's submodule {sub_path!r} was removed")
            if sub_path in self.shared:  # called as a module (its hooks run) unless its weights are read
                read = self.shared[sub_path]
                if read is not None:
                    _check_weight_read(sub_path, target, *read)
                if sub is not target:
                    ours._modules[child] = target
            else:
                self._sync(sub, target, sub_path)


def _refuse_hooks(path: str, module: nn.Module) -> None:
    """Hooks on a transformers module that unispeech_fast never calls would never fire: refuse them."""
    if _hooks(module):
        raise PatchedModelChangedError(
            f"the patched model's submodule {path!r} ({type(module).__name__}) has hooks, but unispeech_fast "
            f"runs its own module there, so they would never fire; hook a Linear/LayerNorm/Dropout layer "
            f"(or the whole model) instead, or call unispeech_fast.unpatch(model) to run transformers' forward")


def _check_weight_read(path: str, layer: nn.Module, base: type, weight_normed: bool) -> None:
    """A layer whose weights a fused kernel reads directly must be the plain layer, unhooked."""
    problem = None
    if not isinstance(layer, base) or type(layer).forward is not base.forward:
        problem = f"was replaced by a {type(layer).__name__}"
    elif _hooks(layer):
        problem = "has hooks"
    elif weight_normed and not _is_weight_normed(layer):
        problem = "is not exactly weight_norm(dim=2) any more"
    if problem:
        raise PatchedModelChangedError(
            f"the patched model's layer {path!r} {problem}, but unispeech_fast's fused kernel reads its "
            f"weights directly (it is never called as a module), so hooks or wrappers there would be "
            f"bypassed. Call unispeech_fast.unpatch(model) to run transformers' forward")


def _check_keys(ours: nn.Module, theirs: nn.Module) -> None:
    ours_keys = set(ours.state_dict(keep_vars=True))
    theirs_keys = set(theirs.state_dict(keep_vars=True))
    missing, unexpected = sorted(ours_keys - theirs_keys), sorted(theirs_keys - ours_keys)
    if missing or unexpected:
        raise ValueError(
            f"cannot patch {type(theirs).__name__}: state-dict keys differ from unispeech_fast's "
            f"(missing in the model: {missing[:5]}, unknown to unispeech_fast: {unexpected[:5]})"
        )


def patch(model: nn.Module) -> nn.Module:
    """Route ``model`` (a transformers UniSpeech/UniSpeechSat model of any of the ten classes) through
    unispeech_fast, following its layers, parameters, hooks and modes on every call (see the module
    docstring). Returns ``model`` itself.

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
    follower = _Follower(model)

    @functools.wraps(follower.ours.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return follower.sync()(*args, **kwargs)

    vars(model)[_ATTR] = follower.ours  # a plain attribute, not a submodule (state_dict stays transformers')
    vars(model)["forward"] = forward  # instance attribute: nn.Module.__call__ finds it first
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on ``model`` (its own forward runs again). Returns ``model``."""
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} instance is not patched")
    del vars(model)["forward"]
    del vars(model)[_ATTR]
    return model
