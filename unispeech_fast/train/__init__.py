"""Training commands on ``torch.distributed`` (``torchrun``): ``unispeech-fast finetune``.

- :mod:`.data`: manifests (JSONL, TSV, the authors' fairseq ``.tsv`` + label files), label encoding,
  length-bucketed batch plans, bad-file checks;
- :mod:`.loop`: the DDP training loop with exact checkpoints;
- the ``finetune`` subcommand is :mod:`unispeech_fast.cli.finetune`.

``unispeech-fast pretrain`` waits for the pretraining losses (issue 12).
"""
