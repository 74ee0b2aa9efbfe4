"""``python -m unispeech_fast.cli``: the same as ``python -m unispeech_fast``."""

from . import main

raise SystemExit(main())
