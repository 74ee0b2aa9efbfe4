"""The file commands' old home: see :mod:`unispeech_fast.cli.audio`. Kept so that
``python -m unispeech_fast.audio_cli`` (as in README's torchrun commands) and ``from unispeech_fast
import audio_cli`` keep working."""

from .cli.audio import (ManifestError, add_parsers, build_parser, main, read_manifest, run_corpus, run_diarize,
                        run_embed, run_transcribe, run_verify_speakers, split_by_duration)

__all__ = ["add_parsers", "run_embed", "run_transcribe", "run_diarize", "run_verify_speakers", "run_corpus",
           "read_manifest", "split_by_duration", "ManifestError", "main", "build_parser"]

if __name__ == "__main__":
    raise SystemExit(main())
