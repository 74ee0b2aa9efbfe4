#!/usr/bin/env bash
# Set up .venv (see scripts/setup_venv.sh), print the environment report, and run the demo: a randomly
# initialised UniSpeechSatModel (transformers' default config) on 4 s of random 16 kHz audio on CPU.
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --model tiny --seconds 1`.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_venv.sh
.venv/bin/python -m unispeech_fast info
echo
.venv/bin/python -m unispeech_fast demo "$@"
