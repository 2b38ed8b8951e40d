"""Corpora for dni_rnn: tokenised id streams, vocabularies, batching and synthetic tasks.

Everything here is light to import: ``datasets`` and ``sentencepiece`` are optional and
imported only by the functions that need them (``load_hf``, ``load_wikitext``, the
"sentencepiece" tokenizer).
"""

from .batching import batchify, batchify_mask, split_streams
from .corpus import Corpus
from .errors import CorpusError, VocabularyMismatch
from .hf import load_hf, load_wikitext
from .ptb import load_ptb, locate_ptb
from .synthetic import (Curriculum, TaskBatch, bit_errors, copy_task, episode_length,
                        offset_streams, repeat_copy_task)
from .text import load_text_files
from .tokenizers import CharTokenizer, WordTokenizer
from .vocab import Vocabulary

__all__ = [
    "Corpus", "CorpusError", "VocabularyMismatch", "Vocabulary",
    "load_ptb", "locate_ptb", "load_text_files", "load_hf", "load_wikitext",
    "WordTokenizer", "CharTokenizer",
    "batchify", "batchify_mask", "split_streams",
    "copy_task", "repeat_copy_task", "offset_streams", "episode_length", "bit_errors", "Curriculum", "TaskBatch",
]
