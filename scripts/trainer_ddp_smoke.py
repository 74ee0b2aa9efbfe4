"""transformers' Trainer with our model under torchrun (DDP), on a tiny random model and random audio.

A wiring check, not a recipe for real data: it shows the pieces a Trainer run needs (the collator with
per-sample mask seeds, ``remove_unused_columns=False`` so the seeds reach it, ``SaveConfigCallback``,
``seed_layerdrop``) and writes each rank's final weights so a test can check the ranks agree.

    torchrun --nproc_per_node 2 scripts/trainer_ddp_smoke.py --output-dir /tmp/run --family UniSpeechSat --head ForCTC

(add ``--master_addr 127.0.0.1 --master_port PORT`` to torchrun on a machine without a resolvable
hostname). On CPU torchrun's processes talk over gloo.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import Trainer, TrainingArguments

import unispeech_fast as uf
from unispeech_fast.training import SaveConfigCallback, SpeechDataCollator, sample_seed

TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=20, conv_dim=(32, 32, 32),
            conv_stride=(4, 4, 4), conv_kernel=(8, 8, 8), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2, vocab_size=32, num_labels=3, mask_time_prob=0.3, mask_time_length=2)


class RandomSpeech(torch.utils.data.Dataset):
    def __init__(self, config, head: str, n: int) -> None:
        self.config, self.head, self.n = config, head, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        wave = torch.randn(1100 + 23 * i, generator=g)
        if self.head == "ForCTC":
            labels = torch.randint(1, self.config.vocab_size, (3,), generator=g)
        else:
            labels = torch.randint(0, self.config.num_labels, (), generator=g)
        return {"input_values": wave, "labels": labels, "mask_seed": sample_seed(0, i)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--family", choices=["UniSpeech", "UniSpeechSat"], default="UniSpeechSat")
    parser.add_argument("--head", choices=["ForCTC", "ForSequenceClassification"], default="ForCTC")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    config = getattr(uf, args.family + "Config")(**TINY)
    torch.manual_seed(0)
    model = getattr(uf, args.family + args.head)(config)
    model.seed_layerdrop(0)  # the same LayerDrop draws on every rank
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir, use_cpu=True, max_steps=args.steps, per_device_train_batch_size=2,
            learning_rate=1e-3, report_to=[], logging_steps=1, disable_tqdm=True, save_steps=args.steps,
            remove_unused_columns=False, seed=0, gradient_checkpointing=args.gradient_checkpointing,
        ),
        train_dataset=RandomSpeech(config, args.head, 16),
        data_collator=SpeechDataCollator(model),
        callbacks=[SaveConfigCallback()],
    )
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    torch.save(model.state_dict(), os.path.join(args.output_dir, f"final-rank{rank}.pt"))


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Leave without interpreter finalisation: gloo's worker threads were seen to abort a finished run there
    # (SIGABRT, "terminate called without an active exception"); the outputs are written and closed. After
    # DDP, destroy_process_group() does not stop those threads (README "Training", DDP teardown).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
