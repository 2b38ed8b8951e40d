"""ptb-word-small's model on Penn Treebank, trained by Lightning's Trainer (TBPTT or DNI).

    python examples/lightning_ptb.py                    # DNI as recipes/ptb-word-small.toml
    python examples/lightning_ptb.py --method bptt      # plain TBPTT
    python examples/lightning_ptb.py --smoke            # seconds: 4 updates on 8k tokens
    python examples/lightning_ptb.py --accelerator cpu --devices 2 --strategy ddp

The recipe: a 2x200 LSTM without dropout, 20 streams, T = 35, Adam 1e-3, the model's
gradient norm clipped at 0.25 (Trainer(gradient_clip_val=0.25)), DNI with raw targets, the
cap and the guard at beta = lambda = 0.0125, 6 epochs. The PTB files come from --data-dir,
$DNI_RNN_DATA_DIR or the cache, else they are downloaded (md5-checked) into the cache.
Logs (CSV) and checkpoints go to --out; --resume CKPT goes on from a checkpoint.
"""
import argparse

import lightning as L
import torch
import torch.nn.functional as F

import corpora
import dni_rnn
from dni_rnn.lightning import StreamLoader, TBPTTModule

# sg-push's settings (recipes/ptb-word-small.toml's DNI until 2026-12-04: a capped push from
# a state-only synthesizer; the recipe's DNI now also reads the next words, docs/dni.md)
RECIPE_DNI = {"target_scale": "raw", "sg_cap": 1.0, "sg_scale": 0.0125}


class PTBLanguageModel(TBPTTModule):
    """Embedding -> 2x200 LSTM -> decoder over PTB's 10,000 words."""

    def __init__(self, vocab_size, embed_dim=200, hidden_dim=200, num_layers=2, lr=1e-3,
                 truncation=35, dni=None):
        super().__init__(truncation=truncation, dni=dni, metric="ppl")
        self.save_hyperparameters()
        self.lm = dni_rnn.RNNLanguageModel(vocab_size, embed_dim, hidden_dim, num_layers)

    def forward(self, tokens, state):
        return self.lm(tokens, state)  # (T, B) ids -> (T, B, V) logits

    def init_state(self, batch_size):
        return self.lm.init_state(batch_size)  # (h, c), each (layers, B, H)

    def chunk_loss(self, logits, targets):
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def ptb_loaders(data_dir, batch_size, eval_batch_size, length, tokens=(0, 0, 0)):
    """(vocabulary size, train, valid and test StreamLoaders): each split one stream,
    batchified into parallel columns, cut to the first `tokens` (0: all)."""
    corpus = corpora.load_ptb("word", data_dir=data_dir, progress=False)
    loaders = []
    for split, width, limit in zip(("train", "valid", "test"),
                                   (batch_size, eval_batch_size, eval_batch_size), tokens):
        ids = corpus.split(split)
        ids = corpora.batchify(ids[:limit] if limit else ids, width)  # (N, B): column b is
        loaders.append(StreamLoader.from_ids(ids, length=length))     # a stretch of the text
    return (len(corpus.vocab), *loaders)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=("dni", "bptt"), default="dni")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--data-dir", default=None, help="the PTB files or a folder holding ptb/")
    p.add_argument("--out", default="runs/lightning-ptb", help="logs and checkpoints")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--resume", default=None, help="a checkpoint to go on from")
    p.add_argument("--smoke", action="store_true", help="seconds: 4 updates on 8k tokens")
    return p.parse_args(argv)


def main(argv=None):
    """Train, then test the best checkpoint; returns the test metrics."""
    args = parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    tokens = (8000, 2000, 2000) if args.smoke else (0, 0, 0)
    vocab_size, train, valid, test = ptb_loaders(args.data_dir, 20, 10, 35, tokens)
    model = PTBLanguageModel(vocab_size, dni=RECIPE_DNI if args.method == "dni" else None)
    best = L.pytorch.callbacks.ModelCheckpoint(dirpath=f"{args.out}/checkpoints",
                                               monitor="val_loss", save_last=True)
    trainer = L.Trainer(
        max_epochs=args.epochs, max_steps=4 if args.smoke else -1,
        val_check_interval=2 if args.smoke else 1.0, gradient_clip_val=0.25,
        accelerator=args.accelerator, devices=args.devices, strategy=args.strategy,
        logger=L.pytorch.loggers.CSVLogger(args.out), callbacks=[best],
        enable_progress_bar=not args.smoke, enable_model_summary=not args.smoke,
        log_every_n_steps=1 if args.smoke else 50, num_sanity_val_steps=0)
    trainer.fit(model, train, valid, ckpt_path=args.resume)
    return trainer.test(model, test, ckpt_path="best", verbose=not args.smoke)[0]


if __name__ == "__main__":
    main()
