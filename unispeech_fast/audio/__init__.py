"""Inference on audio files: reading, resampling, length-bucketed batching and a Python API.

The four tasks of the ``unispeech-fast embed|transcribe|diarize|verify-speakers`` commands
(:mod:`unispeech_fast.cli.audio`) are plain functions here::

    from unispeech_fast import audio
    model = audio.load_model("path/to/checkpoint")          # class from config.json "architectures"
    vectors = audio.embed(model, ["a.wav", "b.flac"])         # mean-pooled last_hidden_state per file
    texts = audio.transcribe(model, ["a.wav"])                # ForCTC + vocab.json, greedy decoding
    segments = audio.diarize(model, ["meeting.wav"])          # ForAudioFrameClassification
    emb = audio.xvectors(model, ["a.wav", "b.wav"]); audio.cosine_scores(emb)   # ForXVector

Inputs are file paths (WAV/FLAC/OGG and anything else libsndfile reads, through ``soundfile``) or
waveforms (numpy arrays / tensors, ``[samples]`` or ``[channels, samples]``, at ``sample_rate``).
Every input is mixed down to mono (mean over channels), resampled to 16 kHz with :func:`resample`
when needed and, when the checkpoint's ``preprocessor_config.json`` asks for it (``do_normalize``;
transformers' Wav2Vec2FeatureExtractor default is True), normalised to zero mean and unit variance
(``(x - mean) / sqrt(var + 1e-7)``, as that feature extractor does).

Batching (:func:`plan_batches`): inputs are sorted by length and packed greedily, longest first,
into batches whose padding stays below ``max_padding`` (a fraction of the padded batch) and whose
padded size stays below ``max_batch_seconds`` of audio (a file longer than that runs alone). Padded
batches run with an ``attention_mask``; results are trimmed to each input's own frames and returned
in input order.

- Layer-norm checkpoints (``feat_extract_norm == "layer"``): the padded batch gives each input's
  single-utterance result (to float rounding).
- Group-norm checkpoints (``feat_extract_norm == "group"``, the base models): the first conv layer
  normalises over the whole (padded) time axis, so the zeros of padding shift every frame of the
  shorter inputs. transformers' feature extractor for these checkpoints returns no attention mask
  at all (``return_attention_mask=False``), so its batched results differ from single-utterance
  ones in the encoder too. We pass the attention mask (padded frames are then ignored by the
  encoder), which leaves only the group-norm shift; a log line says so. ``exact=True`` (``--exact``)
  batches only inputs of identical length, so no padding exists and every result equals the
  single-utterance one; it costs speed where lengths all differ (then each file runs alone).
- ForXVector: transformers computes the pooled frames of a padded input without the TDNN dilation
  (so it pools a few frames computed from padding); these functions count the dilation for their
  own calls (:func:`unispeech_fast.models.heads.tdnn_lengths_use_dilation`, a context variable:
  the config is not written) so padded inputs pool exactly their own frames, as a single-utterance
  run does.

Threads: an inference call writes nothing to the model or its config, so several threads may call
these functions on one model at once and get the single-thread results. (With ``progress`` on, the
call adds forward hooks to the model for its duration to move the bar; leave it off, the default,
for concurrent calls.)

Bad inputs: by default the first unusable input (missing, unreadable, truncated, too short,
non-finite) raises :class:`AudioError` naming it, before the model runs where the check is cheap
(the header is read and the end of the audio decoded for every file first). Pass
``failures={}`` (a dict) to collect them instead: each bad input is recorded as name -> reason,
its result is None, and every other input still runs.

Long inputs: the conv feature encoder tiles long waveforms exactly by itself
(:mod:`unispeech_fast.tiling`); the transformer runs on the whole input in one pass (attention is
quadratic in the number of 20 ms frames). The optional progress bar advances per conv stack and per
transformer layer, so it moves within a single long file too.

Layout: :mod:`.io` (reading, header info, mono, the stereo-layout check, normalisation),
:mod:`.resampling`, :mod:`.batching` (:func:`plan_batches`, :class:`Progress`) and :mod:`.tasks`
(embed, transcribe, diarize, x-vectors, RTTM, scores); :func:`load_model` lives with the other
loading code in :mod:`unispeech_fast.loading`.
"""

from __future__ import annotations

from ..loading import ModelMismatchError, load_model
from .batching import Progress, plan_batches
from .io import NORMALIZE_EPS, AudioError, AudioInput, _as_mono, _soundfile, audio_info, normalize_waveform, read_audio
from .resampling import SAMPLE_RATE, resample
from .tasks import (Segment, _min_samples, _require_head, _xvector_rows, cosine_scores, ctc_greedy_decode, diarize,
                    embed, frame_probabilities, load_vocab, rttm_file_id, rttm_lines, segments_from_probabilities,
                    transcribe, xvectors)

__all__ = [
    "SAMPLE_RATE",
    "AudioError",
    "ModelMismatchError",
    "Segment",
    "read_audio",
    "audio_info",
    "resample",
    "normalize_waveform",
    "plan_batches",
    "load_model",
    "load_vocab",
    "ctc_greedy_decode",
    "embed",
    "transcribe",
    "frame_probabilities",
    "diarize",
    "rttm_lines",
    "rttm_file_id",
    "xvectors",
    "cosine_scores",
    "Progress",
]
