"""The ``finetune`` command's old home: see :mod:`unispeech_fast.cli.finetune`."""

from ..cli.finetune import TASK_HEADS, add_parsers, run_finetune

__all__ = ["add_parsers", "run_finetune", "TASK_HEADS"]
