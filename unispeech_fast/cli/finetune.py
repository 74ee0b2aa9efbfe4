"""``unispeech-fast finetune`` and ``unispeech-fast pretrain``: the parsers and runners live with the training
loop in :mod:`unispeech_fast.train.cli` (they import nothing from this package, so there is no cycle)."""

from __future__ import annotations

from ..train.cli import PRETRAIN_HEADS, TASK_HEADS, add_parsers, run_finetune, run_pretrain

__all__ = ["add_parsers", "run_finetune", "run_pretrain", "TASK_HEADS", "PRETRAIN_HEADS"]
