"""Training commands on ``torch.distributed`` (``torchrun``): ``unispeech-fast finetune`` and
``unispeech-fast pretrain``.

- :mod:`.data`: manifests (JSONL, TSV, the authors' fairseq ``.tsv`` + label files), label encoding,
  length-bucketed batch plans, bad-file checks;
- :mod:`.loop`: the DDP training loop with exact checkpoints;
- :mod:`.pretrain`: the pre-training objective on that loop (masks, negatives, utterance mixing,
  Gumbel temperature schedule);
- :mod:`.cli`: the ``finetune`` and ``pretrain`` subcommands.
"""
