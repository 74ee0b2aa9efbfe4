"""Shared fixtures: seeds, tiny configs, and checkpoints written by transformers' own save_pretrained."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
# Without a GPU the Triton kernels are checked by Triton's interpreter on CPU tensors. It is read when
# ``@triton.jit`` runs, so it must be set before anything imports ``unispeech_fast.kernels``; it is
# never set by the package itself. (torch.cuda.is_available() does not import triton.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped where none exists")
    config.addinivalue_line("markers", "slow: long run at real (int64-index) sizes; deselect with -m 'not slow'")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_unexpected_skips: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and "gpu" not in report.keywords:
        _unexpected_skips.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Under CI a skipped CPU-runnable test is a failure: a broken build must not pass by skipping."""
    if os.environ.get("CI", "").lower() in ("1", "true") and _unexpected_skips and exitstatus == 0:
        print(f"\nCI: {len(_unexpected_skips)} CPU-runnable test(s) skipped: {_unexpected_skips[:10]}")
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``torch.set_num_threads`` is process-wide: a test running a command with ``--threads`` in process does not
    change the thread count later tests see (``info`` compares its report with it)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture
def cuda_ops():
    """``torch.ops.unispeech_fast`` for the ``gpu`` tests of the CUDA kernels; fails (does not skip) on a GPU
    machine whose extension was built without CUDA."""
    from unispeech_fast import _extension

    status = _extension.status()
    assert status.has_cuda, f"the gpu tests need unispeech_fast._C built with CUDA: {status.cuda_reason}"
    return torch.ops.unispeech_fast


FAMILIES = {
    "UniSpeech": ["Model", "ForCTC", "ForSequenceClassification", "ForPreTraining"],
    "UniSpeechSat": [
        "Model",
        "ForCTC",
        "ForSequenceClassification",
        "ForAudioFrameClassification",
        "ForXVector",
        "ForPreTraining",
    ],
}
ALL_CLASSES = [(fam, head) for fam, heads in FAMILIES.items() for head in heads]


def tiny_config_kwargs(family: str, **overrides) -> dict:
    """A small config in the spirit of transformers' own model tests (hidden 16, 2 layers, conv k8/s4)."""
    kw = dict(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=20,
        conv_dim=(32, 32, 32),
        conv_stride=(4, 4, 4),
        conv_kernel=(8, 8, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=32,
        codevector_dim=24,
        proj_codevector_dim=12,
        num_codevectors_per_group=5,
        num_codevector_groups=2,
        num_labels=3,
    )
    if family == "UniSpeechSat":
        kw.update(tdnn_dim=(32, 32), tdnn_kernel=(3, 3), tdnn_dilation=(1, 2), xvector_output_dim=8, num_clusters=7)
    kw.update(overrides)
    return kw


def hf_model(family: str, head: str, **overrides):
    """A randomly initialised transformers model of ``family + head``, in eval mode."""
    import transformers
    config = getattr(transformers, family + "Config")(**tiny_config_kwargs(family, **overrides))
    return getattr(transformers, family + head)(config).eval()


#: The character vocabulary of the tiny CTC checkpoints (transformers' wav2vec2 layout: pad, bos, eos, unk, the word
#: delimiter, a-z, apostrophe): 32 entries, the tiny config's ``vocab_size``.
VOCAB = ["<pad>", "<s>", "</s>", "<unk>", "|"] + [chr(ord("a") + i) for i in range(26)] + ["'"]
#: Config overrides of a layer-norm (UniSpeech-SAT large style) feature encoder.
LAYER_NORM = dict(feat_extract_norm="layer", do_stable_layer_norm=True)


def write_tiny_checkpoints(root, heads: dict, seed: int) -> dict[str, str]:
    """Tiny random layer-norm UniSpeech-SAT checkpoints, written by our ``save_pretrained`` to ``root/<name>`` for each
    ``name: model class`` of ``heads``, made in that order after ``torch.manual_seed(seed)``; the one named ``"ctc"``
    gets a ``vocab.json`` of :data:`VOCAB`. Returns the directories by name."""
    import json

    from unispeech_fast import UniSpeechSatConfig

    torch.manual_seed(seed)
    out = {}
    for name, cls in heads.items():
        cls(UniSpeechSatConfig(**tiny_config_kwargs("UniSpeechSat", **LAYER_NORM))).eval().save_pretrained(root / name)
        out[name] = str(root / name)
    if "ctc" in out:
        with open(os.path.join(out["ctc"], "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({tok: i for i, tok in enumerate(VOCAB)}, f)
    return out


def write_noise(path, samples: int, rng: np.random.Generator, rate: int = 16000) -> None:
    """A mono file of ``samples`` samples of noise (std 0.1, float32) from ``rng``; the format from the name."""
    import soundfile as sf

    sf.write(path, (0.1 * rng.standard_normal(samples)).astype(np.float32), rate)


def write_truncated_flac(path, samples: int, rng: np.random.Generator) -> None:
    """A FLAC file whose header promises ``samples`` samples of noise (:func:`write_noise`) but that holds only the
    first half of its bytes: reading it fails part way."""
    full = f"{path}.full.flac"
    write_noise(full, samples, rng)
    with open(full, "rb") as f:
        data = f.read()
    os.remove(full)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def padded_batch(lengths, total=None, generator_seed=0):
    """Random waveforms ``[B, total]`` with a right-padded attention mask for the given lengths."""
    g = torch.Generator().manual_seed(generator_seed)
    total = total or max(lengths)
    x = torch.randn(len(lengths), total, generator=g)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        x[i, n:] = 0.0
    return x, mask
