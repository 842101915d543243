"""Pre-training: train the visual tokenizer, then Toto by next-token prediction (`totobench pretrain`).

    totobench pretrain --config configs/pretrain/toto-tiny.yaml [--out DIR] [--resume]
    torchrun --standalone --nproc_per_node=2 -m totobench pretrain --config ...   # DDP, gloo on CPU

Stages, each stored under the state folder (`<out>/train_state` unless the config says otherwise):
  1. tokenizer: a VQ-VAE trained on frames of the training files (rank 0), evaluated on frames of
     the held-out files (PSNR, codebook usage), saved to <out>/tokenizer/;
  2. tokens: every training and held-out video frame and image tokenized once (tokens.npz);
  3. transformer: next-token cross-entropy on sequences sampled from a weighted mixture of image
     and video folders; AdamW (0.9, 0.95), linear warmup then cosine decay, gradient clipping.
     A checkpoint (weights + optimizer, last.pt) every `checkpoint_every` steps also refreshes the
     checkpoint folder, so a partial model is always usable.
  4. held-out next-token loss of the trained model and of random init (torch seed 0, same tokenizer),
     then training.json, the loss curve and the model card (README.md) in the checkpoint folder.

Data order is a pure function of (seed, step, sample index): `--resume` after a kill continues
from the last checkpoint with the same batches and optimizer state, so it reproduces the
uninterrupted run; a run with N processes sees the same global batches as a single process.

With `data.shards: DIR` (token shards of `totobench tokenize`, `shards.py`) stages 1-2 are skipped:
training streams sequences from the shards (memory independent of the corpus size) and the
checkpoint records the shards' tokenizer.

Modules, in stage order: `config` (the YAML), `corpus` (files, frames, token corpus, batches),
`tokenizer_stage` (stages 1-2, and `totobench tokenize`), `shards` (token shards: writer, index,
ShardCorpus), `train` (stage 3), `card` (loss curve, model card), `pipeline` (`pretrain()`, the
stages in order).
"""

from totobench.pretrain.config import load_pretrain_config
from totobench.pretrain.corpus import TokenCorpus, batch_for_step, collate
from totobench.pretrain.pipeline import pretrain
from totobench.pretrain.train import initial_model, lr_at, make_optimizer, next_token_loss, next_token_targets

__all__ = ["TokenCorpus", "batch_for_step", "collate", "initial_model", "load_pretrain_config", "lr_at",
           "make_optimizer", "next_token_loss", "next_token_targets", "pretrain"]
