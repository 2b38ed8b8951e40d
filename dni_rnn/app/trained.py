"""A trained run in one's own code: the model, the tokenizer and the config of a checkpoint.

    run = dni_rnn.load("runs/ptb-word-small-dni-T35-s1")          # best.pt, else last.pt
    ids = torch.tensor([run.tokenizer.encode("the market")]).T    # (T, 1): one stream
    logits, state = run.model(ids, run.state(1))                  # (T, 1, V), (h, c)

Nothing but the checkpoint is read: the vocabulary travels inside it and the tokenizer is
the one its config names (word, char; a sentencepiece model is found in the corpus cache,
where training left it). `generate` and `score` (sampling.py, scoring.py) build on this.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import corpora
from corpora import CorpusError, Vocabulary
from corpora.paths import cache_root

from . import checkpoint as ckpt
from .config import LM_CORPORA, Config, data_tokenizer, validate
from .run import select_device
from .tasks import build_task, language_model


class TextCodec:
    """Text <-> ids exactly as training read its corpus: each line tokenised, `<eos>` where
    a line ends.

    Attributes:
        name: "word", "char" or "sentencepiece".
        vocab: the run's `corpora.Vocabulary` (ids in the model's order).
        tokenizer: the `corpora` tokenizer (tokenize / detokenize one line).
    """

    def __init__(self, tokenizer, vocab):
        self.tokenizer, self.vocab = tokenizer, vocab
        self.name = tokenizer.name

    def tokens(self, text):
        """The tokens of `text`, `<eos>` at each newline ("a b\\n" ends with one, "a b" not)."""
        out = []
        for i, line in enumerate(text.split("\n")):
            if i:
                out.append(self.vocab.eos_token)
            out.extend(self.tokenizer.tokenize(line))
        return out

    def unknown(self, tokens):
        """The distinct tokens the vocabulary lacks, in order of appearance."""
        return list(dict.fromkeys(t for t in tokens if t not in self.vocab))

    def encode(self, text):
        """Ids of `text` (list of int); unknown tokens become `<unk>`.

        Raises:
            CorpusError: a token is unknown and the vocabulary has no `<unk>` (characters).
        """
        return self.vocab.encode(self.tokens(text), source="the text")

    def detokenize(self, tokens):
        """One line's text from its tokens: spaces between words, none between characters,
        sentencepiece's own decoding."""
        return self.tokenizer.detokenize(tokens)

    def decode(self, ids):
        """Text of ids (ints or a tensor), `<eos>` as a newline."""
        lines = [[]]
        for t in self.vocab.decode(ids):
            if t == self.vocab.eos_token:
                lines.append([])
            else:
                lines[-1].append(t)
        return "\n".join(self.detokenize(line) for line in lines)


@dataclass(eq=False)
class Trained:
    """A saved run, ready to use (`load`).

    Attributes:
        model: the trained model, in eval mode, on `device`: `model(inputs, state) ->
            (outputs, state)`, time-major: ids (T, B) -> logits (T, B, V) for a language
            model, (T, B, D_in) -> logits (T, B, D_out) for a copy task.
        tokenizer: a `TextCodec` for a language model; None for a copy task.
        config: the run's `Config`.
        device: where the model is.
        checkpoint: the file read.
        step: updates the model was trained for.
        task_state: the task's saved state (the copy tasks' curriculum).
    """

    model: object
    tokenizer: TextCodec | None
    config: Config
    device: object
    checkpoint: Path
    step: int
    task_state: dict

    @property
    def vocab(self):
        """The vocabulary (None for a copy task)."""
        return self.tokenizer.vocab if self.tokenizer is not None else None

    @property
    def is_language_model(self):
        """A language-model run (not a copy task)."""
        return self.config.data.corpus in LM_CORPORA

    def state(self, batch=1):
        """The zero recurrent state for `batch` streams, on the model's device ((h, c) of
        shape (layers, batch, H) each for an LSTM)."""
        return self.model.init_state(batch)


def load(path, device="auto"):
    """Load a run directory's best checkpoint (else its last), or a checkpoint file.

    Read with `torch.load(weights_only=True)`: no code in the file runs.

    Args:
        path: a run directory or a `.pt` checkpoint.
        device: "auto" (CUDA when present), "cpu", "cuda" or "cuda:N".
    Returns:
        Trained: the model in eval mode, its tokenizer, config and a `state(batch)` helper.
    Raises:
        CheckpointError: no such path, no checkpoint in it, not a dni_rnn checkpoint, a
            corrupt file, or weights that do not fit the saved config (one line each).
        ConfigError: a config this version cannot read, or a device that is not there.
    """
    file = ckpt.find(path)
    c = ckpt.load(file)
    cfg = validate(Config.from_dict(c["config"], where=f"checkpoint {file.name}"))
    dev = select_device(device)
    tokenizer = None
    if cfg.data.corpus in LM_CORPORA:
        if c.get("vocab") is None:
            raise ckpt.CheckpointError(f"checkpoint {file} has no vocabulary")
        try:
            vocab = Vocabulary.from_state_dict(c["vocab"])
        except CorpusError as e:
            raise ckpt.CheckpointError(f"checkpoint {file}: {e}") from None
        tokenizer = TextCodec(_tokenizer(cfg, vocab, file), vocab)
        model = language_model(cfg.model, len(vocab))
    else:
        model = build_task(cfg).build_model()
    try:
        model.load_state_dict(c["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ckpt.CheckpointError(f"checkpoint {file} does not fit its own config "
                                   f"({first[:200]})") from None
    return Trained(model=model.to(dev).eval(), tokenizer=tokenizer, config=cfg, device=dev,
                   checkpoint=file, step=int(c["runner"]["step"]), task_state=c["task"])


def _tokenizer(cfg, vocab, file):
    """The corpora tokenizer that produced `vocab`'s ids."""
    name = data_tokenizer(cfg.data)
    if name == "word":
        return corpora.WordTokenizer()
    if name == "char":
        # ptb-char too: its files are CharTokenizer's symbols of the word files
        return corpora.CharTokenizer()
    return _sentencepiece(vocab, file)


def _sentencepiece(vocab, file):
    """The sentencepiece model whose pieces are `vocab`: the run directory's copy, else one
    in the corpus cache (the checkpoint holds the pieces, not the model)."""
    from corpora.subword import SentencePieceTokenizer, import_sentencepiece

    import_sentencepiece()  # a CorpusError saying how to install it
    folder = cache_root() / "sentencepiece"
    kept = Path(file).parent / "sentencepiece.model"  # the run's own copy (`Run.setup`)
    for model in [kept] * kept.is_file() + sorted(folder.glob("*.model")):
        tok = SentencePieceTokenizer(model)
        if tok.fixed_vocabulary() == vocab:
            return tok
    raise ckpt.CheckpointError(
        f"checkpoint {file}: its sentencepiece model is not in {folder} (set "
        f"DNI_RNN_CACHE_DIR to the cache it was trained with, or run `dni-rnn evaluate "
        f"{file}` with the training data once: that rebuilds it there)")
