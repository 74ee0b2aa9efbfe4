"""The file commands' old home: see :mod:`unispeech_fast.cli.audio`. Kept because it is a public path:
``python -m unispeech_fast.audio_cli`` is how README's torchrun corpus commands start each rank, and
``from unispeech_fast import audio_cli`` is used by callers (tests/test_audio.py, test_corpus.py,
test_reliability_cli.py)."""

from .cli.audio import (ManifestError, add_parsers, build_parser, main, read_manifest, run_corpus, run_diarize,
                        run_embed, run_transcribe, run_verify_speakers, split_by_duration)

__all__ = ["add_parsers", "run_embed", "run_transcribe", "run_diarize", "run_verify_speakers", "run_corpus",
           "read_manifest", "split_by_duration", "ManifestError", "main", "build_parser"]

if __name__ == "__main__":
    raise SystemExit(main())
