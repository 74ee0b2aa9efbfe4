"""Configurations for UniSpeech and UniSpeech-SAT, compatible with transformers' ``config.json``.

The field names and defaults are those of ``transformers.UniSpeechConfig`` and
``transformers.UniSpeechSatConfig`` (5.x). Unknown keys found in a ``config.json`` are kept as
attributes and written back on save, so a round trip through this library loses nothing.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import operator
import os
from typing import Any, ClassVar

from .ops.feature_extractor.common import conv_output_length

__all__ = ["UniSpeechConfig", "UniSpeechSatConfig", "ConfigError", "SUPPORTED_ACTIVATIONS"]

#: Activations accepted for ``hidden_act`` and ``feat_extract_activation``: the names of transformers' ``ACT2FN``
#: that :mod:`unispeech_fast.activations` implements (a config that transformers cannot load is refused;
#: ``tests/test_config.py`` compares with ``transformers.activations.ACT2FN``).
SUPPORTED_ACTIVATIONS = (
    "gelu",
    "relu",
    "gelu_new",
    "gelu_pytorch_tanh",
    "gelu_fast",
    "quick_gelu",
    "silu",
    "swish",
    "tanh",
    "sigmoid",
)

# Fields shared by both configs, with transformers 5.23 defaults, in transformers' order.
_COMMON_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout": 0.1,
    "activation_dropout": 0.1,
    "attention_dropout": 0.1,
    "feat_proj_dropout": 0.0,
    "feat_quantizer_dropout": 0.0,
    "final_dropout": 0.1,
    "layerdrop": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "feat_extract_norm": "group",
    "feat_extract_activation": "gelu",
    "conv_dim": (512, 512, 512, 512, 512, 512, 512),
    "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "conv_bias": False,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "do_stable_layer_norm": False,
    "apply_spec_augment": True,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_feature_prob": 0.0,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "num_codevectors_per_group": 320,
    "num_codevector_groups": 2,
    "contrastive_logits_temperature": 0.1,
    "num_negatives": 100,
    "codevector_dim": 256,
    "proj_codevector_dim": 256,
    "diversity_loss_weight": 0.1,
    "ctc_loss_reduction": "mean",
    "ctc_zero_infinity": False,
    "use_weighted_layer_sum": False,
    "classifier_proj_size": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Generic PreTrainedConfig fields that transformers writes into every config.json.
_GENERIC_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "dtype": None,
    "tie_last_hidden_states": False,
}

_TUPLE_FIELDS = ("conv_dim", "conv_stride", "conv_kernel", "tdnn_dim", "tdnn_kernel", "tdnn_dilation")
_PROB_FIELDS = (
    "hidden_dropout",
    "activation_dropout",
    "attention_dropout",
    "feat_proj_dropout",
    "feat_quantizer_dropout",
    "final_dropout",
    "layerdrop",
    "mask_time_prob",
    "mask_feature_prob",
)
# Keys that are derived or bookkeeping, never stored as attributes.
_DERIVED_KEYS = ("num_feat_extract_layers", "transformers_version", "model_type", "num_labels")


class ConfigError(ValueError):
    """A config value or a ``config.json`` file is invalid."""


# The parameter dtypes the models run in; a config's ``dtype`` (or ``torch_dtype``) must name one.
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16", "float64")


class _BaseConfig:
    """Shared machinery: defaults, unknown-key passthrough, validation and JSON I/O."""

    model_type: ClassVar[str] = ""
    _defaults: ClassVar[dict[str, Any]] = {}
    #: Our pre-training fields (not in transformers): read through :meth:`pretraining_value`, written to
    #: ``config.json`` only when set, so a default config stays key for key what transformers writes.
    pretraining_defaults: ClassVar[dict[str, Any]] = {}

    def pretraining_value(self, name: str) -> Any:
        """The value of pre-training field ``name``: the one set on this config, else its default."""
        return getattr(self, name, self.pretraining_defaults[name])

    def __init__(self, **kwargs: Any) -> None:
        num_labels = kwargs.pop("num_labels", None)
        torch_dtype = kwargs.pop("torch_dtype", None)
        model_type = kwargs.pop("model_type", None)
        if model_type is not None and model_type != self.model_type:
            raise ConfigError(
                f"model_type {model_type!r} does not match {type(self).__name__} "
                f"(expected {self.model_type!r})"
            )
        for key in ("num_feat_extract_layers", "transformers_version"):
            kwargs.pop(key, None)
        values = {**copy.deepcopy(self._defaults), **copy.deepcopy(_GENERIC_DEFAULTS)}
        values.update(kwargs)
        self._dtype_field = "dtype"  # which config.json field the dtype came from, for error messages
        if values.get("dtype") is None and torch_dtype is not None:
            values["dtype"] = torch_dtype
            self._dtype_field = "torch_dtype"
        for key, value in values.items():
            setattr(self, key, value)
        for key in _TUPLE_FIELDS:
            if key in values and isinstance(values[key], list):
                setattr(self, key, tuple(values[key]))
        id2label = getattr(self, "id2label", None)
        if id2label is not None:
            if not isinstance(id2label, dict):
                raise ConfigError(f"id2label must be a mapping of class ids to names, got {type(id2label).__name__}")
            try:
                self.id2label = {int(k): v for k, v in id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError(f"id2label keys must be integer class ids, got {list(id2label)[:5]}") from None
            label2id = getattr(self, "label2id", None)
            if label2id is not None and not isinstance(label2id, dict):
                raise ConfigError(f"label2id must be a mapping of names to class ids, got {type(label2id).__name__}")
            if num_labels is not None and num_labels != len(self.id2label):
                raise ConfigError(
                    f"num_labels={num_labels} does not match the id2label map of length {len(self.id2label)}"
                )
            if getattr(self, "label2id", None) is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
        else:
            self.num_labels = 2 if num_labels is None else num_labels
        self.validate()

    # ------------------------------------------------------------------ derived values
    @property
    def num_feat_extract_layers(self) -> int:
        return len(self.conv_dim)

    @property
    def inputs_to_logits_ratio(self) -> int:
        return functools.reduce(operator.mul, self.conv_stride, 1)

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ConfigError(f"num_labels must be a positive int, got {n!r}")
        if getattr(self, "id2label", None) is None or len(self.id2label) != n:
            self.id2label = {i: f"LABEL_{i}" for i in range(n)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def receptive_field(self) -> int:
        """Minimum number of input samples that yields one output frame."""
        length = 1
        for kernel, stride in reversed(list(zip(self.conv_kernel, self.conv_stride))):
            length = (length - 1) * stride + kernel
        return length

    def output_length(self, input_length: int) -> int:
        """Frames produced by the conv feature encoder for ``input_length`` samples (0 if too short)."""
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            input_length = conv_output_length(input_length, kernel, stride)
            if input_length <= 0:
                return 0
        return input_length

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) naming the first inconsistent field."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")

        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "num_codevectors_per_group",
                     "num_codevector_groups", "codevector_dim", "proj_codevector_dim", "classifier_proj_size",
                     "mask_time_length", "mask_feature_length"):
            positive_int(name)
        if self.vocab_size is not None:
            positive_int("vocab_size")
        for name in ("conv_bias", "do_stable_layer_norm", "apply_spec_augment", "ctc_zero_infinity",
                     "use_weighted_layer_sum"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be a bool, got {getattr(self, name)!r}")
        for name in _TUPLE_FIELDS:
            if not hasattr(self, name):
                continue
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) == 0 or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
            ):
                raise ConfigError(f"{name} must be a non-empty sequence of positive ints, got {value!r}")
        if not (len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel)):
            raise ConfigError(
                "Configuration for convolutional layers is incorrect: len(conv_dim), len(conv_stride) and "
                f"len(conv_kernel) must be equal, got {len(self.conv_dim)}, {len(self.conv_stride)} and "
                f"{len(self.conv_kernel)}"
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups != 0:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_conv_pos_embedding_groups "
                f"({self.num_conv_pos_embedding_groups})"
            )
        if self.codevector_dim % self.num_codevector_groups != 0:
            raise ConfigError(
                f"codevector_dim ({self.codevector_dim}) must be divisible by num_codevector_groups "
                f"({self.num_codevector_groups})"
            )
        if self.feat_extract_norm not in ("group", "layer"):
            raise ConfigError(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        for name in ("hidden_act", "feat_extract_activation"):
            if getattr(self, name) not in SUPPORTED_ACTIVATIONS:
                raise ConfigError(f"{name} must be one of {SUPPORTED_ACTIVATIONS}, got {getattr(self, name)!r}")
        if self.ctc_loss_reduction not in ("mean", "sum", "none"):
            raise ConfigError(f"ctc_loss_reduction must be 'mean', 'sum' or 'none', got {self.ctc_loss_reduction!r}")
        for name in _PROB_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {value!r}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
            raise ConfigError(f"layer_norm_eps must be a positive float, got {eps!r}")
        adapter = getattr(self, "adapter_attn_dim", None)
        if adapter is not None and (not isinstance(adapter, int) or isinstance(adapter, bool) or adapter < 1):
            raise ConfigError(f"adapter_attn_dim must be a positive int or None, got {adapter!r}")
        dtype = getattr(self, "dtype", None)
        if dtype is not None:
            is_dtype = isinstance(dtype, str) or type(dtype).__module__ == "torch" and type(dtype).__name__ == "dtype"
            name = str(dtype).replace("torch.", "") if is_dtype else None
            if name not in SUPPORTED_DTYPES:
                field = getattr(self, "_dtype_field", "dtype")
                raise ConfigError(f"{field} must name a dtype the models run in ({', '.join(SUPPORTED_DTYPES)}), "
                                  f"got {dtype!r}")
        self._validate_extra()

    def _validate_extra(self) -> None:
        pass

    # ------------------------------------------------------------------ dict / JSON
    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content, keys sorted, tuples as lists, as transformers writes it."""
        out: dict[str, Any] = {}
        for key, value in vars(self).items():
            if key.startswith("_") or key in _DERIVED_KEYS:
                continue
            if isinstance(value, tuple):
                value = list(value)
            if key == "dtype" and value is not None and not isinstance(value, str):
                value = str(value).replace("torch.", "")
            out[key] = value
        out["model_type"] = self.model_type
        out["num_feat_extract_layers"] = self.num_feat_extract_layers
        if out.get("id2label") is not None:
            if self.num_labels == 2 and out["id2label"] == {0: "LABEL_0", 1: "LABEL_1"}:
                # transformers leaves the default two-label map out of config.json.
                out.pop("id2label")
                out.pop("label2id", None)
            else:
                out["id2label"] = {str(k): v for k, v in out["id2label"].items()}
        for key in ("architectures", "dtype", "output_attentions", "tie_last_hidden_states"):
            if out.get(key) in (None, False):
                out.pop(key, None)
        if out.get("output_hidden_states") is False:
            out.pop("output_hidden_states")
        if out.get("return_dict") is True:
            out.pop("return_dict")
        try:  # informational only; written when transformers (an optional extra) is installed
            from importlib.metadata import PackageNotFoundError, version

            out["transformers_version"] = version("transformers")
        except PackageNotFoundError:
            pass
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any):
        return cls(**{**data, **overrides})

    @classmethod
    def from_json_file(cls, path: str | os.PathLike):
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not a valid JSON config file ({exc})") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any):
        """Read ``config.json`` from a directory (or a path to the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json found at {file}")
        config = cls.from_json_file(file)
        for key, value in overrides.items():
            setattr(config, key, tuple(value) if key in _TUPLE_FIELDS and isinstance(value, list) else value)
        config.validate()
        return config

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        os.makedirs(directory, exist_ok=True)
        file = os.path.join(directory, "config.json")
        with open(file, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return file

    def copy(self):
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"


class UniSpeechConfig(_BaseConfig):
    """Configuration of UniSpeech models (``model_type="unispeech"``).

    Accepts every field of ``transformers.UniSpeechConfig`` with the same defaults; any other key is
    stored unchanged. ``num_ctc_classes`` and ``replace_prob`` configure ``UniSpeechForPreTraining``,
    with two fields of our own (not in transformers): ``pretraining_ctc_weight`` (the authors'
    ``mtlalpha``, 0.5) and ``pretraining_ctc_blank_id`` (None: ``pad_token_id``, transformers' CTC
    convention; the authors' phone dictionary puts their blank ``<s>`` at 76). Both are read with
    :meth:`pretraining_value` and written to ``config.json`` only when set.
    """

    model_type = "unispeech"
    _defaults = {**_COMMON_DEFAULTS, "num_ctc_classes": 80, "replace_prob": 0.5}
    pretraining_defaults = {"pretraining_ctc_weight": 0.5, "pretraining_ctc_blank_id": None}

    def _validate_extra(self) -> None:
        if not isinstance(self.num_ctc_classes, int) or self.num_ctc_classes < 1:
            raise ConfigError(f"num_ctc_classes must be a positive int, got {self.num_ctc_classes!r}")
        for name in ("replace_prob", "pretraining_ctc_weight"):
            rp = self.pretraining_value(name) if name in self.pretraining_defaults else getattr(self, name)
            if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not 0.0 <= rp <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {rp!r}")
        blank = self.pretraining_value("pretraining_ctc_blank_id")
        if blank is not None and (isinstance(blank, bool) or not isinstance(blank, int)
                                  or not 0 <= blank < self.num_ctc_classes):
            raise ConfigError(f"pretraining_ctc_blank_id must be None (use pad_token_id) or an int in "
                              f"[0, num_ctc_classes={self.num_ctc_classes}), got {blank!r}")


class UniSpeechSatConfig(_BaseConfig):
    """Configuration of UniSpeech-SAT models (``model_type="unispeech-sat"``).

    Accepts every field of ``transformers.UniSpeechSatConfig`` with the same defaults; any other key
    is stored unchanged. ``tdnn_*`` and ``xvector_output_dim`` configure ``UniSpeechSatForXVector``.
    Fields of our own (not in transformers) configure ``UniSpeechSatForPreTraining``'s loss:
    ``utterance_contrastive_loss_weight`` (1.0; the authors' released config is ambiguous, see the
    README), ``feature_penalty_weight`` (10.0), ``utterance_contrastive_layer`` (None:
    ``num_hidden_layers // 2``, i.e. 6 for Base as in the authors' code, 12 for Large as in their
    released config) and ``num_utterance_negatives`` (100). Like the UniSpeech ones they are read with
    :meth:`pretraining_value` and written to ``config.json`` only when set.
    """

    model_type = "unispeech-sat"
    _defaults = {
        **_COMMON_DEFAULTS,
        "tdnn_dim": (512, 512, 512, 512, 1500),
        "tdnn_kernel": (5, 3, 3, 1, 1),
        "tdnn_dilation": (1, 2, 3, 1, 1),
        "xvector_output_dim": 512,
        "num_clusters": 504,
    }
    pretraining_defaults = {
        "utterance_contrastive_loss_weight": 1.0,
        "feature_penalty_weight": 10.0,
        "utterance_contrastive_layer": None,
        "num_utterance_negatives": 100,
    }

    def _validate_extra(self) -> None:
        if not (len(self.tdnn_dim) == len(self.tdnn_kernel) == len(self.tdnn_dilation)):
            raise ConfigError(
                "len(tdnn_dim), len(tdnn_kernel) and len(tdnn_dilation) must be equal, got "
                f"{len(self.tdnn_dim)}, {len(self.tdnn_kernel)} and {len(self.tdnn_dilation)}"
            )
        for name in ("xvector_output_dim", "num_clusters", "num_utterance_negatives"):
            value = self.pretraining_value(name) if name in self.pretraining_defaults else getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        for name in ("utterance_contrastive_loss_weight", "feature_penalty_weight"):
            value = self.pretraining_value(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
        layer = self.pretraining_value("utterance_contrastive_layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)
                                  or not 1 <= layer <= self.num_hidden_layers):
            raise ConfigError(f"utterance_contrastive_layer must be None (num_hidden_layers // 2) or an int in "
                              f"[1, num_hidden_layers={self.num_hidden_layers}], got {layer!r}")
