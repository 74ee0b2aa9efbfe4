"""``python -m unispeech_fast``: see :mod:`unispeech_fast.cli`."""

from .cli import main

raise SystemExit(main())
